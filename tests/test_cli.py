"""The command line: bad options and values are refused (exit 2, a message, no run directory),
run-time problems give exit 1 and a message that names the fix, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvae import cli
from lvae import data as datasets
from lvae.runs import CHECKPOINT, Run, run_lock

REPO = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "32", "--latent-sizes", "4,2",
        "--hidden-sizes", "16,8", "--eval-iw-samples", "4", "--eval-iw-chunk", "4", "--eval-test-subset", "32",
        "--eval-train-subset", "32", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(out: Path, *extra: str, epochs: str = "2") -> list[str]:
    return ["train", "--variant", "vae", "--depth", "2", "--epochs", epochs, "--out", str(out), *TINY, *extra]


def test_train_then_list(tmp_path, capsys):
    assert cli.main(train_args(tmp_path)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "complete" and out["epochs"] == 2 and "test_LK" in out
    assert cli.main(["runs", "--out", str(tmp_path), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["status"] == "complete" and row["test_LK"] == out["test_LK"]


BAD_OPTIONS = {
    "unknown option": (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
    "negative latent size": (["--latent-sizes", "4,-2"], "latent_sizes=.*positive integer"),
    "mismatched sizes": (["--hidden-sizes", "16"], "one hidden size per stochastic layer"),
    "not a list of ints": (["--latent-sizes", "four"], "not a list of ints"),
    "unknown likelihood": (["--likelihood", "poisson"], "likelihood='poisson' is not valid"),
    "unknown inference": (["--inference", "topdown"], "inference='topdown' is not valid"),
    "negative lr": (["--lr", "-1"], "lr=-1.0 must be > 0"),
    "batch size text": (["--batch-size", "abc"], "invalid int value: 'abc'"),
    "zero batch": (["--batch-size", "0"], "batch_size=0"),
    "depth out of range": (["--depth", "7"], "invalid choice: 7"),
    "unknown variant": (["--variant", "iwae"], "invalid choice: 'iwae'"),
    "zero eval every": (["--eval-every", "0"], "every"),
    "negative warm-up": (["--warmup-epochs", "-3"], "warmup_epochs=-3"),
    "zero subset": (["--subset", "0"], "subset=0"),
    "unknown dataset": (["--dataset", "cifar"], "dataset='cifar' is not valid; choose one of"),
    "zero epochs": (["--epochs", "0"], "--epochs 0 must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_train_options_exit_2_with_a_message_and_create_nothing(tmp_path, capsys, case):
    extra, match = BAD_OPTIONS[case]
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_:
        cli.main(train_args(out, *extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re
    assert re.search(match, err), err
    assert not out.exists() or list(out.iterdir()) == []


def test_missing_epochs_and_unknown_command_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--variant", "vae"])
    assert exit_.value.code == 2 and "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit"])
    assert exit_.value.code == 2 and "invalid choice: 'fit'" in capsys.readouterr().err


def test_runtime_errors_exit_1_with_the_fix(tmp_path, capsys):
    assert cli.main(train_args(tmp_path, epochs="1")) == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run"])
    # locked by another trainer
    with run_lock(run_dir):
        assert cli.main(train_args(tmp_path, epochs="2")) == 1
    err = capsys.readouterr().err
    assert f"being trained by another process (pid {os.getpid()})" in err and "Traceback" not in err
    # a damaged checkpoint
    raw = (run_dir / CHECKPOINT).read_bytes()
    (run_dir / CHECKPOINT).write_bytes(raw[: len(raw) // 2])
    assert cli.main(train_args(tmp_path, epochs="2")) == 1
    assert "is damaged" in capsys.readouterr().err
    assert cli.main(["eval", run_dir.name, "--out", str(tmp_path), "--iw", "4", "--test-subset", "16"]) == 1
    assert "delete it to retrain the run" in capsys.readouterr().err
    # an unknown run
    assert cli.main(["eval", "no-such-run", "--out", str(tmp_path)]) == 1
    assert "no run named 'no-such-run'" in capsys.readouterr().err


def test_dataset_unavailable_offline_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets, "OMNIGLOT_URLS", ["http://127.0.0.1:9/chardata.mat"])
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    assert cli.main(["data", "omniglot"]) == 1
    err = capsys.readouterr().err
    assert "lvae data: error:" in err and "chardata.mat" in err and "Traceback" not in err


def test_runs_lists_failed_and_interrupted_runs_without_their_numbers(tmp_path, capsys):
    assert cli.main(train_args(tmp_path, epochs="1")) == 0
    run = Run(json.loads(capsys.readouterr().out)["run"])
    value = run.last("test_L1")
    prov = run.provenance
    for status, shown in (("running", "interrupted"), ("failed", "failed")):
        prov.update(status=status, error="non-finite loss (nan) at epoch 2, step 3")
        (run.path / "provenance.json").write_text(json.dumps(prov))
        assert cli.main(["runs", "--out", str(tmp_path)]) == 0
        table = capsys.readouterr().out
        assert shown in table
        assert cli.main(["runs", "--out", str(tmp_path), "--json"]) == 0
        [row] = json.loads(capsys.readouterr().out)
        assert row["status"] == shown
    assert f"{value:.2f}" not in table and row["test_L1"] is None and "non-finite" in row["error"]


def test_a_second_process_is_refused_while_a_run_is_locked(tmp_path):
    """Across processes: `lvae train` refuses a run another process trains, and touches nothing."""
    assert cli.main(train_args(tmp_path, epochs="1")) == 0
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with run_lock(run_dir):
        proc = subprocess.run([sys.executable, "-m", "lvae.cli", *train_args(tmp_path, epochs="2")],
                              env=env, capture_output=True, text=True, timeout=240)
        after = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert proc.returncode == 1, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "wait for it to finish" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.parametrize("args,match", [
    (["--profile", "gpu-huge"], "unknown profile 'gpu-huge'; choose one of"),
    (["--profile", "smoke", "-p", "learning_rate=3"], r"has no parameter\(s\) \['learning_rate'\]; its parameters"),
])
def test_book_refuses_unknown_profiles_and_parameters_before_any_work(tmp_path, capsys, args, match):
    import re
    assert cli.main(["book", *args, "--out", str(tmp_path / "build")]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "build").exists()
