"""The defects found by trying to break 8c265e7 (issue 19), each through the command line or the
public API as a user hits it: nothing stale, nothing edited by a refusal, no traceback.

The kills during the final epoch's writes (checkpoint, fp16 weights, per-image values, provenance)
are in tests/test_faults.py (``test_a_kill_during_the_final_epoch_s_writes_resumes_to_all_its_files``).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
from helpers import same

import lvae
from lvae import cli
from lvae.book.build import BookError, execute_chapter, parse_params
from lvae.config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.registry.runs import CHECKPOINT, WEIGHTS_FP16, Run, list_runs
from lvae.registry.storage import DiskFullError, RunError
from lvae.training.loop import get_or_train

REPO = Path(__file__).resolve().parent.parent
CONFIG = RunConfig("brk", ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8)),
                   TrainConfig(dataset="synthetic", subset=128, batch_size=32, warmup_epochs=2))
ECONFIG = EvalConfig(every=1, iw_k=8, iw_chunk=4, test_subset=64, train_subset=64)
TINY = ["--variant", "vae", "--depth", "2", "--dataset", "synthetic", "--subset", "64", "--batch-size", "32",
        "--latent-sizes", "4,2", "--hidden-sizes", "16,8", "--eval-iw-k", "4", "--eval-iw-chunk", "4",
        "--eval-test-subset", "32", "--eval-train-subset", "32", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train(root, epochs=3, **kw) -> Run:
    return get_or_train(CONFIG, epochs, ECONFIG, root=root, progress=False, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 3-epoch run (with its checkpoint and fp16 weights); tests copy it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tmp_path_factory.mktemp("trained")).path
    finally:
        torch.set_num_threads(before)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the (git-ignored) training locks."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def cli_exit(args: list[str], capsys) -> tuple[int, str]:
    """cli.main's exit status (SystemExit of a refused option included) and its stderr."""
    try:
        code = cli.main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LVAE_RESULTS"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lvae.cli", *args], env=env, text=True, **kw)


# -- 1. stale fp16 weights on a complete run --------------------------------------------------------
def test_a_full_disk_at_the_final_fp16_write_resumes_to_the_final_weights(trained, tmp_path):
    """The disk fills up at the final epoch's fp16 write (a real os.write that fails with ENOSPC):
    the run fails, and the resume ends with fp16 weights of the final epoch, not the previous one."""
    def enospc():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    undo = faults.install(f"append:.{WEIGHTS_FP16}.tmp-{os.getpid()}:3", kill=enospc)  # the 3rd fp16 write
    try:
        with pytest.raises(DiskFullError, match="no space left"):
            train(tmp_path)
    finally:
        undo()
    run = train(tmp_path)  # resume, with space
    assert run.status == "complete" and run.epochs == 3
    got, want = (torch.load(p / WEIGHTS_FP16, weights_only=True) for p in (run.path, trained))
    assert got["epoch"] == 3 and same(got, want)
    assert [p.name for p in run.path.glob(".*.tmp-*")] == []


def test_a_complete_run_with_stale_fp16_weights_is_repaired_from_its_checkpoint(trained, tmp_path):
    """A run marked complete whose fp16 weights are older than its checkpoint (left so by an older lvae)
    is not complete: get_or_train rewrites them from the checkpoint, and export refuses it until then."""
    run_dir = copy_run(trained, tmp_path / trained.name)
    want = (run_dir / WEIGHTS_FP16).read_bytes()
    stale = torch.load(run_dir / WEIGHTS_FP16, weights_only=True)
    stale.pop("digest")
    stale["epoch"] = 2
    stale["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in stale["model"].items()}
    torch.save(lvae.registry.runs._with_digest(stale), run_dir / WEIGHTS_FP16)
    with pytest.raises(RunError, match=f"{WEIGHTS_FP16} holds the weights of epoch 2, not those of its last epoch 3"):
        lvae.registry.archive.export_runs([run_dir], tmp_path / "runs.tar")
    run = train(tmp_path)
    assert run.status == "complete" and run.epochs == 3
    assert same(torch.load(run.path / WEIGHTS_FP16, weights_only=True), torch.load(trained / WEIGHTS_FP16,
                                                                                    weights_only=True))
    assert (run.path / WEIGHTS_FP16).read_bytes() == want


# -- 2. a refused train changes nothing ------------------------------------------------------------
def test_a_refused_train_of_a_committed_run_changes_none_of_its_files(tmp_path, capsys):
    name = "mnist-vae_bn_wu-3-3351e1c189"
    run_dir = copy_run(REPO / "results" / name, tmp_path / name)
    before = files(run_dir)
    code, err = cli_exit(["train", "--profile", "cpu", "--variant", "vae_bn_wu", "--depth", "3", "--epochs", "12",
                          "--eval-iw-k", "7", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 1 and f"no {CHECKPOINT} to resume" in err, err
    assert files(run_dir) == before


# -- 3. one bad run does not break `lvae runs` --------------------------------------------------------
def test_lvae_runs_lists_every_broken_run_as_damaged(trained, tmp_path, capsys):
    good = copy_run(trained, tmp_path / trained.name)
    broken = {}
    for label, edit in [("epochs-text", {"epochs": "three"}), ("epochs-null", {"epochs": None}),
                        ("status-number", {"status": 5})]:
        d = copy_run(trained, tmp_path / f"{label}-x")
        prov = json.loads((d / "provenance.json").read_text())
        (d / "provenance.json").write_text(json.dumps({**prov, **edit}))
        broken[d.name] = "provenance.json is corrupted"
    d = copy_run(trained, tmp_path / "metrics-dir-x")
    (d / "metrics.jsonl").unlink()
    (d / "metrics.jsonl").mkdir()
    broken[d.name] = "metrics.jsonl cannot be read"
    d = copy_run(trained, tmp_path / "torn-config-x")
    (d / "config.json").write_text('{"format_version": 1, "run": {"na')
    broken[d.name] = "config.json is corrupted"
    d = copy_run(trained, tmp_path / "no-provenance-x")
    (d / "provenance.json").unlink()
    broken[d.name] = "provenance.json is missing.*resume it"
    assert cli.main(["runs", "--out", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Warning" not in err, err
    listed = {r["name"]: r for r in json.loads(out)}
    assert set(listed) == {good.name, *broken}
    assert listed[good.name]["status"] == "complete" and listed[good.name]["test_L1"] is not None
    for name, match in broken.items():
        row = listed[name]
        assert row["status"] == "damaged" and row["test_L1"] is None and row["test_LK"] is None, row
        assert re.search(match, row["error"]) and "delete" in row["error"], row
    assert cli.main(["runs", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert all(re.search(rf"{name}\s.*{'complete' if name == good.name else 'damaged'}", table) for name in listed)
    # a run whose provenance.json was deleted resumes from its checkpoint, which writes it anew
    resumed = copy_run(trained, tmp_path / "again" / trained.name)
    (resumed / "provenance.json").unlink()
    assert Run(resumed).status == "damaged"
    run = train(tmp_path / "again")
    assert run.status == "complete" and run.epochs == 3


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_lvae_runs_into_a_closed_pipe_is_quiet(trained, tmp_path):
    """`lvae runs | head -3`: the reader leaves before lvae writes; no BrokenPipeError, exit 0."""
    for i in range(3):
        copy_run(trained, tmp_path / f"{trained.name}-{i}")
    proc = run_cli("runs", "--out", str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the process has imported torch: its first write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


# -- 4. values beyond float32 and malformed seeds ---------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"lr": 1e39}, "lr=1e\\+39 must be a finite number within float32's range"),
    ({"lr": 1e300}, "lr=1e\\+300 must be a finite number within float32's range"),
    ({"adam_eps": 1e39}, "adam_eps=1e\\+39 must be a finite number within float32's range"),
    ({"clip_norm": 1e39}, "clip_norm=1e\\+39"),
    ({"seed": 1.5}, "seed=1.5 must be an integer from 0 to 2\\*\\*63 - 1"),
    ({"seed": "a"}, "seed='a' must be an integer"),
    ({"seed": 99999999999999999999999}, "seed=99999999999999999999999 must be an integer from 0"),
    ({"seed": -1}, "seed=-1 must be an integer from 0"),
    ({"seed": True}, "seed=True must be an integer"),
    ({"test_seed": None}, "test_seed=None must be an integer"),
    ({"init_from": "X@abc"}, "init_from='X@abc' must be '<run>@<epoch>'"),
    ({"init_from": ""}, "init_from='' must be"),
])
def test_train_config_refuses_values_beyond_float32_and_malformed_seeds(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("args,match", [
    (["--lr", "1e39"], "--lr 1e\\+39 must be a finite number within float32's range"),
    (["--adam-eps", "1e39"], "--adam-eps 1e\\+39 must be a finite number"),
    (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999 must be an integer from 0"),
])
def test_cli_refuses_values_beyond_float32_before_the_run_folder(tmp_path, capsys, args, match):
    code, err = cli_exit(["train", "--epochs", "2", "--out", str(tmp_path), *TINY, *args], capsys)
    assert code == 2 and re.search(match, err), err
    assert list(tmp_path.iterdir()) == []


def test_sample_posterior_refuses_k_below_one():
    model = lvae.build_model(ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 6))).eval()
    x = (torch.rand(5, 12) < 0.5).float()
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"k={k!r} must be a positive integer"):
            model.sample_posterior(x, k=k)
    zs, log_q = model.sample_posterior(x, k=2)
    assert log_q.shape == (2, 5)


# -- 5. read-only targets: one line, before the work -------------------------------------------------
def read_only(folder: Path, command: list[str]) -> list[str]:
    """``command`` run with ``folder`` read-only: a read-only bind mount in a mount namespace of its
    own (root ignores permissions), else permissions (chmod, undone by the caller)."""
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("root without unshare: no way to make a folder read-only")
        script = f'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *command]
    folder.chmod(0o555)
    return command


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_read_only_targets_are_refused_in_one_line_before_the_work(trained, tmp_path):
    registry = tmp_path / "registry"
    run_dir = copy_run(trained, registry / trained.name)
    before = files(registry)
    env = {k: v for k, v in os.environ.items() if k != "LVAE_RESULTS"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    code = ("import sys; from lvae import cli\n"
            "rc = [cli.main(a.split('|')) for a in sys.argv[1:]]\nprint(rc)")
    try:
        cmd = read_only(registry, [sys.executable, "-c", code,
                                   f"eval|{run_dir.name}|--out|{registry}|--iw-k|4|--chunk|4|--device|cpu",
                                   f"runs|export|{run_dir.name}|--out|{registry}|-o|{registry / 'runs.tar'}"])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    finally:
        registry.chmod(0o755)
    assert proc.stdout.strip() == "[1, 1]", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("lvae eval: error: cannot write into") and "writable registry" in lines[0]
    assert lines[1].startswith("lvae runs: error: cannot write into") and "writable folder" in lines[1]
    assert "L_K" not in proc.stderr and "%" not in proc.stderr  # refused before the evaluation ran
    assert files(registry) == before


# -- 6. a bad --init-from leaves nothing ----------------------------------------------------------------
def test_a_bad_init_from_is_refused_before_the_run_folder(tmp_path, capsys):
    assert cli.main(["train", "--epochs", "2", "--out", str(tmp_path), *TINY]) == 0
    capsys.readouterr()
    [parent] = [p.name for p in tmp_path.iterdir()]
    for spec, code, match in [("nonexistent", 1, "no run named 'nonexistent'"),
                              (f"{parent}@7", 1, f"{parent} has a checkpoint at epoch 2; train it to exactly 7"),
                              (f"{parent}@abc", 2, f"--init-from {parent}@abc must be '<run>@<epoch>'")]:
        got, err = cli_exit(["train", "--epochs", "3", "--out", str(tmp_path), "--name", "child", *TINY,
                             "--init-from", spec], capsys)
        assert got == code and match in err, err
        assert [p.name for p in tmp_path.iterdir()] == [parent]
    assert cli.main(["train", "--epochs", "3", "--out", str(tmp_path), "--name", "child", *TINY,
                     "--init-from", f"{parent}@2"]) == 0  # a good one still works


def test_a_bad_init_from_in_python_leaves_no_run_folder(tmp_path, one_thread):
    import dataclasses

    from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
    from lvae.registry.storage import RunError
    from lvae.training.loop import get_or_train

    cfg = RunConfig("child", ModelConfig(x_dim=64, latent_sizes=(4,), hidden_sizes=(8,)),
                    TrainConfig(dataset="synthetic", subset=64, batch_size=32, warmup_epochs=1))
    ecfg = EvalConfig(every=1, iw_k=4, iw_chunk=4, test_subset=16, train_subset=32)
    parent = get_or_train(dataclasses.replace(cfg, name="parent"), 1, ecfg, root=tmp_path, progress=False)
    for spec in ("nonexistent@1", f"{parent.name}@7"):
        bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=spec))
        with pytest.raises(RunError):
            get_or_train(bad, 2, ecfg, root=tmp_path, progress=False)
        assert [p.name for p in tmp_path.iterdir()] == [parent.name]


# -- 7. empty and out-of-range strings --------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (["--out", ""], "--out is empty; give a folder"),
    (["--name", ""], "run name '' is not a single folder name"),
    (["--subset", ""], "argument --subset: '' is not an integer"),
    (["--eval-test-subset", ""], "argument --eval-test-subset: '' is not an integer"),
    (["--eval-iw-subset", "99999"], "--eval-iw-subset 99999: L_K is computed on the first of the 32 test images"),
    (["--eval-train-subset", "100"], "--eval-train-subset 100: the training set has 64 images; give at most 64"),
])
def test_empty_and_out_of_range_strings_are_refused(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in args else ["--out", str(tmp_path / "reg")]
    code, err = cli_exit(["train", "--epochs", "2", *out, *TINY, *args], capsys)
    assert code == 2 and match in err, err
    assert list(tmp_path.iterdir()) == []


# -- 8. other tracebacks -------------------------------------------------------------------------------
def test_export_to_an_empty_name_book_with_a_torn_parameter_and_a_dangling_out_are_one_line(
        trained, tmp_path, capsys):
    registry = tmp_path / "reg"
    copy_run(trained, registry / trained.name)
    code, err = cli_exit(["runs", "export", trained.name, "--out", str(registry), "-o", ""], capsys)
    assert code == 2 and "-o is empty" in err, err
    with pytest.raises(RunError, match="archive name is empty"):
        lvae.registry.archive.export_runs([trained.name], "", root=registry)
    code, err = cli_exit(["book", "-p", "depths=[1,"], capsys)
    assert code == 2 and "parameter 'depths=[1,': '[1,' is not a YAML value" in err, err
    with pytest.raises(BookError, match="e.g. -p depths=\\[1,2\\]"):
        parse_params(["epochs={"])
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    code, err = cli_exit(["train", "--epochs", "2", "--out", str(dangling), *TINY], capsys)
    assert code == 2 and f"is a symbolic link to {tmp_path / 'gone'}, which does not exist" in err, err
    assert not (tmp_path / "gone").exists()


def test_ctrl_c_in_a_chapter_leaves_no_running_notebook(tmp_path, monkeypatch):
    import papermill

    md = tmp_path / "methods.md"
    md.write_text("---\njupytext:\n  text_representation:\n    format_name: myst\n---\n# m\n\n```{code-cell}\n1\n```\n")

    def interrupted(src, out, **kw):
        Path(out).write_text("{}")  # papermill writes the notebook as it runs
        raise KeyboardInterrupt
    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute_chapter(md, tmp_path / "book" / "methods.ipynb", "smoke", {}, tmp_path, log=lambda *_: None)
    assert [p.name for p in (tmp_path / "book").iterdir()] == []


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_ctrl_c_in_lvae_train_says_one_line_and_leaves_the_run_interrupted(tmp_path):
    tiny = TINY.copy()
    tiny[tiny.index("--subset") + 1] = "512"
    args = ["train", "--epochs", "40", "--out", str(tmp_path), *tiny]
    proc = run_cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    prov = None
    while time.monotonic() < deadline and proc.poll() is None:  # wait until it trains
        prov = next(tmp_path.glob("*/provenance.json"), None)
        if prov is not None and json.loads(prov.read_text() or "{}").get("status") == "running":
            break
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == ("lvae train: interrupted; the run resumes from its last checkpoint: run "
                                            "the same command again")
    [run] = list_runs(tmp_path)
    assert run.status == "interrupted"


# -- 10. the archive's digests check integrity, not origin ------------------------------------------
def test_import_help_and_readme_say_the_manifest_is_not_authenticated(capsys):
    with pytest.raises(SystemExit):
        cli.main(["runs", "import", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "integrity, not origin" in text and "source you trust" in text
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "check integrity (no file was damaged on the way), not origin" in readme
