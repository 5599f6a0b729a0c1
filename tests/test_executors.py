"""A grid spread over jobs (lvae.training.executors): one submitit job per group, each writing into one
registry, gives exactly the runs of the in-process grid. The jobs run as real subprocesses through
submitit's local executor; the slurm path is checked up to the sbatch script it would submit."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from helpers import same

from lvae import cli
from lvae.config import ConfigError, EvalConfig
from lvae.registry.experiments import grid
from lvae.registry.runs import CHECKPOINT
from lvae.registry.storage import run_lock
from lvae.training.executors import (GridJobError, JobOptions, make_executor, require_submitit, submit_grid,
                                     train_grid_on)
from lvae.training.grid import group_configs, train_grid

needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="submitit is not installed (the cluster extra: pip install -e '.[cluster]')")
# two groups of two stacked models (VAE+BN and VAE+BN+WU differ only in warm-up) at depths 1 and 2
CONFIGS = grid("fig3", depths=(1, 2), variants=("vae_bn", "vae_bn_wu"), dataset="synthetic", subset=128,
               warmup_epochs=1)
EVAL = EvalConfig(every=1, iw_k=5, iw_chunk=5, test_subset=50, train_subset=50)

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(run) -> dict:
    """A run's numbers and weights, without wall-clock times."""
    rows = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in run.metrics()]
    ckpt = torch.load(run.path / CHECKPOINT, weights_only=True)
    return {"metrics": rows, "model": ckpt["model"], "optimizer": ckpt["optimizer"], "epoch": ckpt["epoch"]}


@pytest.mark.slow  # a real process, a book build or torch.compile
@needs_submitit
def test_local_jobs_train_the_grid_exactly_as_in_process(tmp_path):
    assert len(group_configs(CONFIGS)) == 2
    jobs = tmp_path / "jobs"
    runs = train_grid_on("local", CONFIGS, 1, EVAL, root=tmp_path / "jobs-registry", folder=jobs,
                         options=JobOptions(cpus=1, time_min=30))
    assert len(list(jobs.glob("*_submitted.pkl"))) == 2  # one job per group
    here = train_grid(CONFIGS, 1, EVAL, root=tmp_path / "in-process", device="cpu", progress=False)
    for a, b in zip(here, runs):
        assert b.name == a.name and b.status == "complete" and b.epochs == 1
        assert same(_record(b), _record(a)), a.name
    again = submit_grid(CONFIGS, 1, EVAL, root=tmp_path / "jobs-registry", folder=jobs)
    assert again.jobs == [] and [r.name for r in again.wait()] == [r.name for r in here]  # complete: not resubmitted


@pytest.mark.slow  # a real process, a book build or torch.compile
@needs_submitit
def test_a_failed_job_is_reported_with_its_runs_error_and_log(tmp_path):
    cfgs = group_configs(CONFIGS)[0]
    root = tmp_path / "registry"
    with run_lock(root / cfgs[0].dir_name):  # as if another process trained it: the job is refused
        with pytest.raises(GridJobError, match=r"1 of 1 job\(s\) failed: job \d+ \(synthetic-vae_bn-1, "
                                               r"synthetic-vae_bn_wu-1\): .*RunLockedError: .*being trained by "
                                               r"another process.*\(log: .*_0_log.err\).*run the same command again"):
            train_grid_on("local", cfgs, 1, EVAL, root=root, folder=tmp_path / "jobs", options=JobOptions(cpus=1))


def test_a_missing_submitit_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    with pytest.raises(ConfigError, match=r"slurm executor needs submitit.*pip install -e '\.\[cluster\]'"):
        require_submitit("slurm")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--grid", "fig3", "--executor", "slurm", "--epochs", "1", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "pip install -e '.[cluster]'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was created


@needs_submitit
def test_slurm_options_reach_the_sbatch_script(monkeypatch, tmp_path):
    path_env = os.environ["PATH"]
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # a machine without slurm
    with pytest.raises(ConfigError, match=r"needs slurm \(no srun on the PATH here\).*--executor local"):
        make_executor("slurm", tmp_path)
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{path_env}")  # as on a login node
    ex = make_executor("slurm", tmp_path, JobOptions(partition="gpu", time_min=90, gpus=1, cpus=4, mem_gb=16,
                                                     account="lab"))
    script = ex._executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16GB", "#SBATCH --account=lab"):
        assert line in script, line


def test_cli_passes_the_executor_and_job_options(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli, "require_submitit", lambda executor: None)
    monkeypatch.setattr(cli, "train_grid_on", lambda executor, cfgs, epochs, ecfgs, **kw: calls.append(
        (executor, cfgs, epochs, ecfgs, kw)) or [])
    assert cli.main(["train", "--grid", "fig3", "--depths", "1", "--epochs", "2", "--dataset", "synthetic",
                     "--warmup-epochs", "1", "--executor", "slurm", "--slurm-partition", "P", "--slurm-time", "30",
                     "--slurm-gpus", "1", "--device", "cuda", "--out", str(tmp_path), "--jobs-dir",
                     str(tmp_path / "jobs")]) == 0
    ((executor, cfgs, epochs, ecfgs, kw),) = calls
    assert executor == "slurm" and epochs == 2 and [c.name for c in cfgs] == [
        f"synthetic-{v}-1" for v in ("vae", "vae_bn", "vae_bn_wu", "lvae_bn_wu")]
    assert kw["options"] == JobOptions(partition="P", time_min=30, gpus=1)  # --device cuda: the node's GPU
    assert kw["device"] == "cuda" and kw["folder"] == str(tmp_path / "jobs") and kw["root"] == str(tmp_path)


@pytest.mark.parametrize("args,message", [
    (["--executor", "local", "--epochs", "1"], "--executor goes with --grid fig3"),
    (["--grid", "fig3", "--slurm-partition", "P", "--epochs", "1"], "--slurm-partition goes with --executor slurm"),
    (["--grid", "fig3", "--executor", "local", "--slurm-partition", "P", "--epochs", "1"],
     "--slurm-partition goes with --executor slurm, not local"),
])
def test_cli_refuses_misplaced_cluster_options(monkeypatch, tmp_path, capsys, args, message):
    monkeypatch.setattr(cli, "require_submitit", lambda executor: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *args, "--out", str(tmp_path)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
