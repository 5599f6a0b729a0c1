"""The run registry in process: same seed => identical numbers, resume == uninterrupted, reuse,
locking, status and results of failed / unfinished runs, NaN/inf handling."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import same

import lvae.data.datasets
import lvae.registry.runs
import lvae.training.checkpoints
import lvae.training.loop
import lvae.training.step
from lvae import cli
from lvae.config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.registry.experiments import run_config
from lvae.registry.runs import (CHECKPOINT, SANE_CHECKPOINT, WEIGHTS_FP16, Run, RunFailedError, RunIncompleteError,
                                list_runs)
from lvae.registry.storage import RunLockedError, run_lock
from lvae.training.loop import get_or_train
from lvae.training.step import NonFiniteLossError

TIMING = {"epoch_seconds", "iw_seconds"}
STEPS = 4  # per epoch: 128 images in batches of 32
CONFIG = RunConfig("reg", ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8)),
                   TrainConfig(dataset="synthetic", subset=128, batch_size=32, warmup_epochs=2))
REPO = Path(__file__).resolve().parents[1]
ECONFIG = EvalConfig(every=2, iw_k=8, iw_chunk=4, test_subset=64, train_subset=64)


def train(root, epochs=4, config=CONFIG, ecfg=ECONFIG, **kw) -> Run:
    return get_or_train(config, epochs, ecfg, root=root, progress=False, **kw)


def state(run: Run) -> dict:
    ckpt = torch.load(run.path / CHECKPOINT, weights_only=True)
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in run.metrics()]
    return {"ckpt": ckpt, "metrics": rows}




pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> dict:
    return state(train(tmp_path_factory.mktemp("ref")))


def test_same_seed_identical_numbers(reference, tmp_path):
    run = train(tmp_path)
    assert run.status == "complete" and run.epochs == 4
    assert [r["epoch"] for r in run.metrics()] == [2, 4] and "test_LK" in run.metrics()[-1]
    assert same(state(run), reference)  # weights, Adam state, every metric: bit-identical


def test_different_seed_differs(reference, tmp_path):
    other = dataclasses.replace(CONFIG, train=dataclasses.replace(CONFIG.train, seed=1))
    assert other.key != CONFIG.key
    got = state(train(tmp_path, config=other))
    assert got["metrics"][-1]["test_L1"] != reference["metrics"][-1]["test_L1"]


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [3, 1], [1, 2, 1]])
def test_resume_equals_uninterrupted(reference, tmp_path, chunks):
    """Stopping after odd epochs (between evaluations) and resuming gives the same numbers."""
    for n in chunks[:-1]:
        run = train(tmp_path, stop_after=n)
        assert run.status == "partial"
        with pytest.raises(RunIncompleteError, match="resume it"):
            run.result("test_L1")
        assert run.result_text("test_L1") == "partial"
    run = train(tmp_path, stop_after=chunks[-1])
    assert run.status == "complete" and run.provenance["resumes"] == len(chunks) - 1
    assert same(state(run), reference)


def test_extending_a_finished_run_matches_training_it_at_once(tmp_path):
    short = train(tmp_path / "a", epochs=2)
    assert short.status == "complete"
    longer = train(tmp_path / "a", epochs=4)
    at_once = train(tmp_path / "b", epochs=4)
    assert same(state(longer)["ckpt"], state(at_once)["ckpt"])


def test_a_complete_run_is_reused_not_retrained(tmp_path):
    run = train(tmp_path)
    stamp = (run.path / CHECKPOINT).stat().st_mtime_ns
    again = train(tmp_path)
    assert again.path == run.path and (run.path / CHECKPOINT).stat().st_mtime_ns == stamp
    assert train(tmp_path, epochs=3).epochs == 4  # asking for fewer epochs reuses it too
    assert run.result("test_L1") == run.metrics()[-1]["test_L1"] and run.ok


def test_a_second_trainer_is_refused_while_the_run_is_locked(tmp_path):
    path = tmp_path / CONFIG.dir_name
    with run_lock(path):
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}.*wait for it to finish"):
            train(tmp_path)
    assert not (path / "config.json").exists()  # the refused process wrote nothing
    assert train(tmp_path).status == "complete"  # lock released: it trains


def test_status_running_then_interrupted(tmp_path):
    run = train(tmp_path, stop_after=1)
    prov = run.provenance
    prov["status"] = "running"  # what a process killed mid-epoch leaves
    (run.path / "provenance.json").write_text(json.dumps(prov))
    with run_lock(run.path):
        assert run.status == "running"  # a live process holds the lock
    assert run.status == "interrupted"
    with pytest.raises(RunIncompleteError):
        run.result("test_L1")
    assert train(tmp_path).status == "complete"


# -- numerical faults ----------------------------------------------------------------------------
def inject(monkeypatch, at_call: int, kind: str) -> None:
    """Make the at_call-th training bound non-finite (loss) or give it non-finite gradients."""
    real = lvae.training.step.training_bound
    calls = {"n": 0}

    def faulty(model, x, *args, **kwargs):
        b = real(model, x, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] != at_call:
            return b
        if kind == "nan_loss":
            return b * float("nan")
        if kind == "inf_loss":
            return b - float("inf")
        w = next(model.parameters())  # d/dw sqrt(w - w) = inf * 0 = nan, the value stays 0
        return b + torch.sqrt(w - w).sum()

    monkeypatch.setattr(lvae.training.step, "training_bound", faulty)


@pytest.mark.parametrize("kind,at_call,message", [
    ("nan_loss", STEPS + 3, r"non-finite loss \(nan\) at epoch 2, step 3"),
    ("inf_loss", STEPS + 2, r"non-finite loss \(inf\) at epoch 2, step 2"),
    ("nan_grad", STEPS + 2, r"non-finite loss \(nan\) at epoch 2, step 3"),  # surfaces at the next step
    ("nan_grad", 2 * STEPS, r"non-finite gradients at epoch 2 \(step 4"),  # last step: parameters checked
])
def test_non_finite_training_stops_keeps_last_good_checkpoint_and_fails_the_run(
        monkeypatch, tmp_path, capsys, kind, at_call, message):
    ecfg = dataclasses.replace(ECONFIG, every=1)
    good = train(tmp_path / "good", ecfg=ecfg, stop_after=1)  # the state after epoch 1
    inject(monkeypatch, at_call, kind)
    with pytest.raises(NonFiniteLossError, match=message) as err:
        train(tmp_path / "bad", ecfg=ecfg)
    assert "keeps its checkpoint of epoch 1" in str(err.value) and "learning rate" in str(err.value)
    run = Run(tmp_path / "bad" / CONFIG.dir_name)
    assert run.status == "failed" and run.epochs == 1 and message.replace("\\", "")[:20] in run.error
    assert same(state(run), state(good))  # checkpoint of epoch 1 kept, bit-identical; no row of epoch 2
    # a failed run never yields a number
    with pytest.raises(RunFailedError, match="failed: non-finite"):
        run.result("test_L1")
    assert run.result_text("test_L1") == "failed" and not run.ok
    row = run.summary()
    assert row["status"] == "failed" and row["test_L1"] is None and "non-finite" in row["error"]
    assert cli.main(["runs", "--out", str(tmp_path / "bad")]) == 0
    table = capsys.readouterr().out
    assert "failed" in table and f"{run.last('test_L1'):.2f}" not in table
    # once the cause is gone, the run resumes from its last good checkpoint and completes
    monkeypatch.undo()
    assert same(state(train(tmp_path / "bad", ecfg=ecfg)), state(train(tmp_path / "ok", ecfg=ecfg)))
    assert Run(run.path).status == "complete" and Run(run.path).error is None


# -- evaluations that are not sane (issue 13, findings 1 and 2) -------------------------------------
def spoil_evaluation(monkeypatch, at_epoch: int, **values) -> None:
    """Make the evaluation of ``at_epoch`` return ``values`` (e.g. test_L1=nan) instead of its own."""
    real = lvae.training.loop.evaluate

    def spoiled(model, data, cfg, ecfg, epoch, *args, **kwargs):
        out = real(model, data, cfg, ecfg, epoch, *args, **kwargs)
        return {**out, **values} if epoch + 1 == at_epoch else out

    monkeypatch.setattr(lvae.training.loop, "evaluate", spoiled)


def strict_json(text: str):
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in a file"))


@pytest.mark.parametrize("values,message", [
    ({"test_L1": float("nan")}, r"epoch 2 is not sane: non-finite values \(test_L1=nan\)"),
    ({"test_LK": float("-inf")}, r"epoch 2 is not sane: non-finite values \(test_LK=-inf\)"),
    ({"kl_units": [[float("nan")] * 4, [0.1] * 2]}, r"non-finite values \(kl_units=non-finite entries\)"),
    ({"test_L1": -4.9e12}, r"test_L1 = -4\.9e\+12 nats per image, more than 10 times below the -44\.4 of a model "
                          r"that predicts 0\.5 for every pixel"),
])
def test_an_insane_evaluation_fails_the_run_and_keeps_the_last_sane_checkpoint(
        monkeypatch, tmp_path, capsys, values, message):
    """A NaN evaluation, or a bound far below the trivial model's, was recorded as a complete run;
    now the run fails naming the epoch and the fix, records no insane number, and keeps the
    checkpoint of its last sane evaluation."""
    ecfg = dataclasses.replace(ECONFIG, every=1)
    good = train(tmp_path / "good", ecfg=ecfg, stop_after=1)
    spoil_evaluation(monkeypatch, 2, **values)
    with pytest.raises(lvae.training.step.DivergedError, match=message) as err:
        train(tmp_path / "bad", ecfg=ecfg)
    assert "lower the learning rate (lr=0.001; --lr on the command line)" in str(err.value)
    assert "keeps its checkpoint of epoch 1" in str(err.value)
    run = Run(tmp_path / "bad" / CONFIG.dir_name)
    assert run.status == "failed" and run.epochs == 1 and re.search(message, run.error)
    assert same(state(run), state(good))  # checkpoint and rows of epoch 1; no row of epoch 2
    with pytest.raises(RunFailedError):
        run.result("test_L1")
    for f in run.path.glob("*.json*"):
        for line in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            strict_json(line)
    assert cli.main(["runs", "--out", str(tmp_path / "bad"), "--json"]) == 0
    assert strict_json(capsys.readouterr().out)[0]["status"] == "failed"


def test_an_insane_first_evaluation_keeps_no_checkpoint(monkeypatch, tmp_path):
    spoil_evaluation(monkeypatch, 1, test_L1=float("nan"))
    with pytest.raises(lvae.training.step.DivergedError, match="epoch 1 is not sane.*keeps no checkpoint"):
        train(tmp_path, ecfg=dataclasses.replace(ECONFIG, every=1))
    run = Run(tmp_path / CONFIG.dir_name)
    assert run.status == "failed" and run.epochs == 0 and run.metrics() == []
    assert not (run.path / CHECKPOINT).exists() and not (run.path / WEIGHTS_FP16).exists()


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_failure_between_evaluations_rolls_back_to_the_last_evaluated_checkpoint(monkeypatch, tmp_path, hard_links):
    """Evaluations every 2 epochs, the one of epoch 4 insane: the checkpoint (and fp16 weights) of
    epoch 3 were never evaluated, so the run goes back to those of epoch 2 (kept as a hard link,
    or a copy on a file system without links)."""
    good = train(tmp_path / "good", stop_after=2)
    if not hard_links:
        def no_link(*_):
            raise OSError(errno.EPERM, "no hard links here")
        monkeypatch.setattr(lvae.training.checkpoints.os, "link", no_link)
    spoil_evaluation(monkeypatch, 4, test_L1=float("nan"))
    with pytest.raises(lvae.training.step.DivergedError, match="epoch 4 is not sane.*keeps its checkpoint of epoch 2"):
        train(tmp_path / "bad")
    run = Run(tmp_path / "bad" / CONFIG.dir_name)
    assert run.epochs == 2 and same(state(run), state(good))
    assert same(torch.load(run.path / WEIGHTS_FP16, weights_only=True), torch.load(good.path / WEIGHTS_FP16,
                                                                                  weights_only=True))
    assert not (run.path / SANE_CHECKPOINT).exists()
    monkeypatch.undo()
    assert same(state(train(tmp_path / "bad")), state(train(tmp_path / "ok")))  # and resumes from there


def test_a_training_bound_that_keeps_getting_worse_fails_the_run(monkeypatch, tmp_path):
    """After warm-up the training L1 falls at three evaluations in a row, by more than a tenth of
    the trivial bound in all: the run fails at the third."""
    real = lvae.training.loop.evaluate
    first = {}

    def worsening(model, data, cfg, ecfg, epoch, *args, **kwargs):
        out = real(model, data, cfg, ecfg, epoch, *args, **kwargs)
        first.setdefault("L1", out["train_L1"])
        return {**out, "train_L1": first["L1"] - 2.0 * epoch}  # 2 nats worse per epoch

    monkeypatch.setattr(lvae.training.loop, "evaluate", worsening)
    with pytest.raises(lvae.training.step.DivergedError, match=r"epoch 6 is not sane: train_L1 fell at 3 evaluations in a "
                                                       r"row after warm-up.*at epoch 3.*keeps getting worse"):
        train(tmp_path, epochs=8, ecfg=dataclasses.replace(ECONFIG, every=1))
    assert Run(tmp_path / CONFIG.dir_name).epochs == 5


def test_evaluation_problem_thresholds():
    from lvae.training.step import SANITY_FACTOR, evaluation_problem, trivial_bound

    assert trivial_bound(784, "bernoulli") == pytest.approx(-543.4, abs=0.05)
    assert trivial_bound(2048, "gaussian") == pytest.approx(-2048 * 1.0439, abs=0.5)
    row = {"epoch": 1, "beta": 0.0, "train_L1": -500.0, "test_L1": -520.0, "test_L1_se": float("nan")}
    assert evaluation_problem(row, [], 784, "bernoulli") is None  # an undefined standard error is not insane
    floor = SANITY_FACTOR * trivial_bound(784, "bernoulli")
    assert evaluation_problem({**row, "test_L1": floor + 1}, [], 784, "bernoulli") is None
    assert "test_L1" in evaluation_problem({**row, "test_L1": floor - 1}, [], 784, "bernoulli")
    assert evaluation_problem({**row, "test_L1": -6000.0}, [], 784, "gaussian") is None  # its own floor: -8187
    # worsening: only after warm-up, only three falls in a row, only by more than 54 nats in all
    hist = [{"epoch": e, "beta": 1.0, "train_L1": -100.0 - 20 * e} for e in (1, 2, 3)]
    assert "keeps getting worse" in evaluation_problem({"epoch": 4, "beta": 1.0, "train_L1": -180.0}, hist, 784,
                                                       "bernoulli")
    assert evaluation_problem({"epoch": 4, "beta": 1.0, "train_L1": -150.0}, hist, 784, "bernoulli") is None
    assert evaluation_problem({"epoch": 4, "beta": 0.9, "train_L1": -180.0}, hist, 784, "bernoulli") is None
    assert evaluation_problem({"epoch": 4, "beta": 1.0, "train_L1": -180.0}, hist[1:], 784, "bernoulli") is None


def test_no_committed_run_would_have_failed_the_sanity_checks():
    """Replaying every evaluation of the registry's runs through the checks: none trips them."""
    from lvae.registry.runs import list_runs, results_dir
    from lvae.training.step import evaluation_problem

    runs = list_runs(results_dir())
    for run in runs:
        rows = run.metrics()
        for i, row in enumerate(rows):
            assert evaluation_problem(row, rows[:i], run.config.model.x_dim, run.config.model.likelihood) is None


# -- run names (issue 13, finding 7) -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "..", "-x", "x" * 101, "a\x00b"])
def test_a_run_name_must_be_one_folder_name(tmp_path, name):
    with pytest.raises(ConfigError, match=r"is not a single folder name.*e\.g\. --name my-run"):
        train(tmp_path / "out", config=dataclasses.replace(CONFIG, name=name))
    assert list(tmp_path.iterdir()) == []  # nothing written, inside --out or beside it


def test_cli_name_escaping_out_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--name", "../x", "--out", str(tmp_path / "out"), "--epochs", "1", "--warmup-epochs", "1",
                  "--quiet", "--dataset", "synthetic", "--subset", "64", "--x-dim", "64", "--depth", "1",
                  "--latent-sizes", "2", "--hidden-sizes", "8", "--eval-iw-k", "2",
                  "--eval-test-subset", "16", "--eval-train-subset", "16"])  # were it not refused: seconds
    assert exit_.value.code == 2 and "is not a single folder name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- refusals before any work ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"epochs": 0}, "epochs=0 must be a positive integer"),
    ({"epochs": 2.5}, "epochs=2.5"),
    ({"epochs": 2, "stop_after": 0}, "stop_after=0"),
    ({"epochs": 2, "config": dataclasses.replace(CONFIG, train=dataclasses.replace(CONFIG.train, dataset="cifar"))},
     "dataset='cifar' is not valid; choose one of"),
    ({"epochs": 2, "config": dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, x_dim=784))},
     "x_dim=64.*model expects x_dim=784.*fix ModelConfig"),
])
def test_bad_arguments_are_refused_before_the_run_directory_exists(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        train(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_list_runs_skips_an_incompatible_directory_with_a_warning(tmp_path):
    good = train(tmp_path, epochs=1)
    bad = tmp_path / "old-run"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"format_version": 0, "run": {}}))
    with pytest.warns(UserWarning, match="incompatible lvae"):
        assert [r.name for r in list_runs(tmp_path)] == [good.name]


def test_evaluate_run_uses_every_requested_test_image_and_is_recorded(tmp_path):
    from lvae.training.step import evaluate_run

    run = train(tmp_path, epochs=2, ecfg=dataclasses.replace(ECONFIG, iw_subset=16))
    assert run.metrics()[-1]["n_iw"] == 16  # training-time L_K on the profile's subset
    row = evaluate_run(run, iw_k=8, test_subset=None, iw_chunk=4, device="cpu")
    assert row["n_iw"] == row["n_test"] == len(lvae.data.datasets.load_dataset("synthetic").x_test)
    assert run.evals()[-1]["test_LK"] == row["test_LK"]


@pytest.mark.parametrize("variant", ["lvae_bn_wu", "vae_bn_wu"])
def test_stored_weights_keep_the_committed_key_layout(tmp_path, variant):
    """A run trained now stores its weights under the same keys as the committed
    fp16 weights (lvae_format 1), so the per-layer blocks changed nothing on disk."""
    committed = next(p for p in sorted((REPO / "results").glob(f"mnist-{variant}-5-*/model-fp16.pt")))
    cfg = run_config(variant, 5, warmup_epochs=1, subset=256)
    run = get_or_train(cfg, 1, dataclasses.replace(ECONFIG, iw_k=2), root=tmp_path, progress=False,
                       save_fp16=True)
    old = set(torch.load(committed, weights_only=True)["model"])
    assert set(torch.load(run.path / WEIGHTS_FP16, weights_only=True)["model"]) == old
    assert set(torch.load(run.path / CHECKPOINT, weights_only=True)["model"]) == old
