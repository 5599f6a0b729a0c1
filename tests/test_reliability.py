"""Atomic persistence, corrupted files and bad inputs: each is detected or refused with a message
that names the fix, and nothing that was stored before is lost."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import lvae
from lvae import data as datasets
from lvae import runs
from lvae.bounds import iw_bound, kl_per_unit, training_bound
from lvae.config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.profiles import load_profile
from lvae.runs import CHECKPOINT, WEIGHTS_FP16, Run, RunError, get_or_train, read_jsonl
from helpers import same

TIMING = {"epoch_seconds", "iw_seconds"}
CONFIG = RunConfig("rel", ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8)),
                   TrainConfig(dataset="synthetic", subset=128, batch_size=32, warmup_epochs=2))
ECONFIG = EvalConfig(every=1, iw_samples=8, iw_chunk=4, test_subset=64, train_subset=64)
FIX = r"delete|move it away|restore"  # every RunError about a damaged file says what to do


pytestmark = pytest.mark.usefixtures("one_thread")


def train(root, epochs=3, **kw) -> Run:
    return get_or_train(CONFIG, epochs, ECONFIG, root=root, progress=False, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 3-epoch run; tests copy it before damaging it."""
    return train(tmp_path_factory.mktemp("trained")).path


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    dst = tmp_path / trained.name
    dst.mkdir()
    for f in trained.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rows(run: Run) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in run.metrics()]


# -- atomic persistence ----------------------------------------------------------------------------
def test_atomic_write_never_exposes_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "provenance.json"
    runs.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == [target.name]

    def crash(*_):  # the process dies between the fsynced temp file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_write_json(target, {"a": 2})
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_torch_save(tmp_path / CHECKPOINT, {"model": {}})
    assert json.loads(target.read_text()) == {"a": 1}  # the old version is intact
    assert not (tmp_path / CHECKPOINT).exists()
    monkeypatch.undo()
    runs.atomic_write_json(target, {"a": 3})
    assert json.loads(target.read_text()) == {"a": 3}


def test_read_jsonl_tolerates_only_a_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    good = [{"epoch": 1, "x": 1.5}, {"epoch": 2, "x": 2.5}]
    full = "".join(json.dumps(r) + "\n" for r in good)
    for cut in range(len(full) - 1):  # a writer killed after any number of bytes
        p.write_text(full[:cut])
        got = read_jsonl(p)
        assert got == good[:len(got)]
    p.write_text(full + '{"epoch": 3, "x"')
    assert read_jsonl(p) == good
    p.write_text(json.dumps(good[0]) + "\n" + "{garbage\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(RunError, match="line 2 is corrupted; delete the run directory"):
        read_jsonl(p)
    p.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(RunError, match="corrupted"):
        read_jsonl(p)
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_torn_metrics_line_and_stale_temp_files_are_repaired_on_resume(trained, tmp_path):
    run = train(tmp_path, stop_after=2)
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "beta": 1.0, "test_')  # a torn line (e.g. copied mid-write)
    for name in (CHECKPOINT, "metrics.jsonl", "provenance.json"):
        (run.path / f".{name}.tmp-999999").write_bytes(b"half")
    foreign = run.path / ".evals.jsonl.tmp-999999"  # not ours: `lvae eval` writes it without the lock
    foreign.write_bytes(b"x")
    assert [r["epoch"] for r in Run(run.path).metrics()] == [1, 2]
    done = train(tmp_path)
    assert rows(done) == rows(Run(trained))
    assert [p.name for p in done.path.glob(".*.tmp-*")] == [foreign.name]
    assert all(line.endswith("}") for line in (done.path / "metrics.jsonl").read_text().splitlines())


# -- corrupted run files -------------------------------------------------------------------------
def _flip(path: Path, pos: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 1 << bit
    path.write_bytes(bytes(raw))




def _save_raw(path: Path, payload: dict) -> None:
    torch.save(payload, path)


def _damage(run_dir: Path, kind: str) -> None:
    ck = run_dir / CHECKPOINT
    size = ck.stat().st_size
    if kind.startswith("truncate"):
        keep = {"truncate-0": 0, "truncate-100": 100, "truncate-half": size // 2, "truncate-1": size - 1}[kind]
        ck.write_bytes(ck.read_bytes()[:keep])
    elif kind == "garbage":
        ck.write_bytes(os.urandom(size))
    elif kind == "tensor-bytes":  # valid zip, one weight changed: only the digest can tell
        obj = torch.load(ck, weights_only=True)
        obj["model"][next(iter(obj["model"]))].view(-1)[0] += 1e-3
        _save_raw(ck, obj)
    elif kind == "epoch-field":
        obj = torch.load(ck, weights_only=True)
        obj["epoch"] = 2
        _save_raw(ck, obj)
    elif kind == "format-version":
        obj = torch.load(ck, weights_only=True)
        obj.pop("digest")
        obj["format_version"] = 99
        _save_raw(ck, runs._with_digest(obj))
    elif kind == "other-architecture":
        other = lvae.build_model(ModelConfig(x_dim=64, latent_sizes=(3, 2), hidden_sizes=(16, 8)))
        obj = torch.load(ck, weights_only=True)
        obj.pop("digest")
        obj["model"] = other.state_dict()
        _save_raw(ck, runs._with_digest(obj))
    else:
        raise AssertionError(kind)


CHECKPOINT_DAMAGE = ["truncate-0", "truncate-100", "truncate-half", "truncate-1", "garbage", "tensor-bytes",
                     "epoch-field", "format-version", "other-architecture"]


@pytest.mark.parametrize("kind", CHECKPOINT_DAMAGE)
def test_damaged_checkpoint_is_refused_with_the_fix(run_copy, kind):
    _damage(run_copy, kind)
    with pytest.raises(RunError, match=FIX) as err:
        Run(run_copy).load_model()
    assert CHECKPOINT in str(err.value)
    # resuming refuses too, and leaves everything else as it was
    prov = (run_copy / "provenance.json").read_text()
    with pytest.raises(RunError, match=FIX):
        train(run_copy.parent, epochs=4)
    assert (run_copy / "provenance.json").read_text() == prov


def test_random_bit_flips_in_a_checkpoint_are_detected_or_harmless(trained, tmp_path):
    """Every flip is either refused or leaves the loaded content exactly as saved (zip padding,
    timestamps): a damaged checkpoint is never silently loaded."""
    original = runs.load_checkpoint(trained / CHECKPOINT)
    raw = (trained / CHECKPOINT).read_bytes()
    rng = random.Random(0)
    detected = harmless = 0
    victim = tmp_path / CHECKPOINT
    for _ in range(60):
        victim.write_bytes(raw)
        _flip(victim, rng.randrange(len(raw)), rng.randrange(8))
        try:
            loaded = runs.load_checkpoint(victim)
        except RunError:
            detected += 1
            continue
        assert same(loaded, original), "a bit flip changed the checkpoint and was not detected"
        harmless += 1
    assert detected + harmless == 60 and detected > 20
    print(f"checkpoint bit flips: {detected} detected, {harmless} harmless, 0 silent")


def test_damaged_fp16_weights_are_refused(run_copy):
    (run_copy / CHECKPOINT).unlink()  # the book's situation: only the fp16 weights travel
    Run(run_copy).load_model()  # intact: fine
    obj = torch.load(run_copy / WEIGHTS_FP16, weights_only=True)
    obj["model"][next(iter(obj["model"]))].view(-1)[0] += 1
    torch.save(obj, run_copy / WEIGHTS_FP16)
    with pytest.raises(RunError, match=f"{WEIGHTS_FP16} is corrupted.*delete"):
        Run(run_copy).load_model()


@pytest.mark.parametrize("content,match", [
    ("", "config.json is corrupted"),
    ('{"format_version": 1, "run": {"name": "x", "mo', "config.json is corrupted"),
    ("[1, 2]", "not a JSON object"),
    ('{"format_version": 0, "run": {}}', "incompatible lvae.*format_version 0.*move it away or delete it"),
    ('{"run": {}}', "incompatible lvae.*format_version None"),
    ('{"format_version": 1, "run": {"name": "x", "model": {"x_dim": 64, "depth_v2": 3}, "train": {}}}',
     "does not describe a valid run.*depth_v2.*delete the run directory"),
])
def test_damaged_or_incompatible_config_json_is_refused(run_copy, content, match):
    (run_copy / "config.json").write_text(content)
    with pytest.raises(RunError, match=match):
        Run(run_copy)
    with pytest.raises(RunError, match=match):
        train(run_copy.parent)  # get_or_train on that key refuses too, before touching anything
    with pytest.warns(UserWarning):
        assert runs.list_runs(run_copy.parent) == []


def test_damaged_provenance_is_refused_with_the_fix(run_copy):
    (run_copy / "provenance.json").write_text('{"status": "compl')
    with pytest.raises(RunError, match="provenance.json is corrupted.*delete it.*resumes from its checkpoint"):
        Run(run_copy).status
    (run_copy / "provenance.json").unlink()  # the fix named in the message works
    run = train(run_copy.parent)
    assert run.status == "complete" and run.epochs == 3


def test_corrupted_metrics_line_is_refused(run_copy):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0][:-5] + "#####"
    (run_copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match="line 1 is corrupted; delete the run directory"):
        Run(run_copy).metrics()


# -- corrupted or unavailable data files -----------------------------------------------------------
def _idx(array: np.ndarray) -> bytes:
    code = {np.dtype("u1"): 0x08}[array.dtype]
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch) -> Path:
    """A tiny MNIST-format directory whose checksums replace the real ones."""
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": _idx(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)),
             "train-labels-idx1-ubyte": _idx(rng.integers(0, 10, 20, dtype=np.uint8)),
             "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)),
             "t10k-labels-idx1-ubyte": _idx(rng.integers(0, 10, 10, dtype=np.uint8))}
    directory = tmp_path / "mnist"
    directory.mkdir()
    for name, raw in files.items():
        (directory / name).write_bytes(raw)
    monkeypatch.setattr(datasets, "MNIST_FILES",
                        {n: (len(raw), hashlib.sha256(raw).hexdigest()) for n, raw in files.items()})
    assert datasets.load_dataset("mnist", path=directory).x_train.shape == (20, 784)
    return directory


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "empty"])
def test_corrupted_data_file_fails_its_checksum(fake_mnist, damage):
    victim = fake_mnist / "t10k-images-idx3-ubyte"
    raw = victim.read_bytes()
    victim.write_bytes({"flip": raw[:500] + bytes([raw[500] ^ 4]) + raw[501:], "truncate": raw[:-7],
                        "append": raw + b"\0", "empty": b""}[damage])
    with pytest.raises(datasets.ChecksumError, match=f"{victim} is corrupted.*Fix: delete {victim}"):
        datasets.load_dataset("mnist", path=fake_mnist)


def test_missing_data_file_and_offline_dataset_are_refused(fake_mnist, tmp_path, monkeypatch):
    (fake_mnist / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(datasets.DataUnavailableError, match="missing: train-labels-idx1-ubyte. Fix"):
        datasets.load_dataset("mnist", path=fake_mnist)
    # nothing cached and no source reachable (offline laptop / cluster node)
    monkeypatch.setattr(datasets, "OMNIGLOT_URLS", ["http://127.0.0.1:9/chardata.mat"])
    with pytest.raises(datasets.DataUnavailableError) as err:
        datasets.load_dataset("omniglot", data_dir=tmp_path / "empty-cache")
    assert "chardata.mat" in str(err.value)
    assert not list((tmp_path / "empty-cache").rglob("*.mat"))


def test_unavailable_dataset_is_refused_before_the_run_directory_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "OMNIGLOT_URLS", ["http://127.0.0.1:9/chardata.mat"])
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "cache"))
    cfg = dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, x_dim=784),
                              train=dataclasses.replace(CONFIG.train, dataset="omniglot"))
    with pytest.raises(datasets.DataUnavailableError):
        get_or_train(cfg, 1, ECONFIG, root=tmp_path / "results", progress=False)
    assert not (tmp_path / "results").exists()


# -- bad inputs to the public API and to configs ---------------------------------------------------
@pytest.fixture(scope="module")
def model() -> lvae.HierarchicalVAE:
    return lvae.build_model(ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 8)))


SHAPE = r"x must be a float tensor of shape \[batch, 12\].*reshape"
API_CALLS = {
    "elbo 3-d": (lambda m: lvae.elbo(m, torch.rand(2, 3, 4)), ValueError, SHAPE),
    "elbo wrong width": (lambda m: lvae.elbo(m, torch.rand(2, 13)), ValueError, SHAPE),
    "elbo 1-d": (lambda m: lvae.elbo(m, torch.rand(12)), ValueError, SHAPE),
    "elbo list": (lambda m: lvae.elbo(m, [[0.0] * 12]), ValueError, SHAPE),
    "iw_bound wrong width": (lambda m: iw_bound(m, torch.rand(2, 11), 4), ValueError, SHAPE),
    "iw_bound k=0": (lambda m: iw_bound(m, torch.rand(2, 12), 0), ValueError, "k=0 must be >= 1"),
    "training_bound wrong width": (lambda m: training_bound(m, torch.rand(2, 11), 1.0, 2, 2), ValueError, SHAPE),
    "kl_per_unit wrong width": (lambda m: kl_per_unit(m, torch.rand(2, 11)), ValueError, SHAPE),
    "log_joint x": (lambda m: m.log_joint(torch.rand(2, 11), [torch.rand(2, 4), torch.rand(2, 3)]), ValueError, SHAPE),
    "log_joint too few zs": (lambda m: m.log_joint(torch.rand(2, 12), [torch.rand(2, 4)]), ValueError, "bottom to top"),
    "log_joint zs order": (lambda m: m.log_joint(torch.rand(2, 12), [torch.rand(2, 3), torch.rand(2, 4)]),
                           ValueError, "bottom to top"),
    "build_model dict": (lambda m: lvae.build_model({"x_dim": 12}), TypeError, "takes an lvae.ModelConfig"),
}


@pytest.mark.parametrize("call", list(API_CALLS))
def test_public_api_refuses_wrong_inputs_with_the_fix(model, call):
    fn, exc, match = API_CALLS[call]
    with pytest.raises(exc, match=match):
        fn(model)


@pytest.mark.parametrize("call", ["int64 x", "float64 x", "log_joint batch mismatch"])
def test_public_api_dtype_and_batch_mismatch(model, call):
    fn = {"int64 x": lambda: lvae.elbo(model, torch.ones(2, 12, dtype=torch.int64)),
          "float64 x": lambda: lvae.elbo(model, torch.rand(2, 12, dtype=torch.float64)),
          "log_joint batch mismatch": lambda: model.log_joint(torch.rand(2, 12), [torch.rand(5, 4), torch.rand(5, 3)]),
          }[call]
    with pytest.raises((ValueError, TypeError), match="x|zs"):
        fn()


@pytest.mark.parametrize("cls,kwargs,match", [
    (ModelConfig, {"latent_sizes": (4, -2), "hidden_sizes": (16, 8)}, "positive integer"),
    (ModelConfig, {"latent_sizes": (4, 0), "hidden_sizes": (16, 8)}, "positive integer"),
    (ModelConfig, {"latent_sizes": (4, 2), "hidden_sizes": (16,)}, "one hidden size per stochastic layer"),
    (ModelConfig, {"latent_sizes": (4, 2.5), "hidden_sizes": (16, 8)}, "positive integer"),
    (ModelConfig, {"likelihood": "poisson"}, "likelihood='poisson' is not valid; choose one of"),
    (ModelConfig, {"x_dim": -784}, "x_dim"),
    (ModelConfig, {"latent_sizes": (), "hidden_sizes": ()}, "empty"),
    (TrainConfig, {"batch_size": 0}, "batch_size=0 must be a positive integer"),
    (TrainConfig, {"lr": -1e-3}, "lr=-0.001 must be > 0"),
    (TrainConfig, {"subset": 0}, "subset=0"),
    (TrainConfig, {"warmup_epochs": -1}, "warmup_epochs=-1"),
    (EvalConfig, {"every": 0}, "every"),
    (EvalConfig, {"bn_stats": "batch"}, "bn_stats='batch' is not valid"),
])
def test_invalid_configs_are_refused(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


def test_unknown_config_fields_are_refused_with_the_valid_ones():
    d = CONFIG.to_dict()
    d["model"]["latent_size"] = [4]
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) \['latent_size'\]; valid fields"):
        RunConfig.from_dict(d)


def test_unknown_profile_and_bad_profile_files_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown profile 'gpu-huge'; choose one of \[.*'cpu'"):
        load_profile("gpu-huge")
    bad = tmp_path / "profiles.yml"
    bad.write_text("p1:\n  epochs: 3\n  epohcs: 4\np2:\n  epochs: 3\n  variants: [lvae_bn_wu, ladder]\n")
    monkeypatch.setenv("LVAE_PROFILES", str(bad))
    with pytest.raises(ConfigError, match=r"unknown keys \['epohcs'\]; valid keys"):
        load_profile("p1")
    with pytest.raises(ConfigError, match=r"unknown variants \['ladder'\]"):
        load_profile("p2")


def test_bad_dataset_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; valid names"):
        datasets.load_dataset("cifar")
    with pytest.raises(ValueError, match="subset size"):
        datasets.load_dataset("synthetic", subset=0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(datasets.train_batches(datasets.load_dataset("synthetic", subset=8), 0, 0, 0))


def test_fault_hook_fires_only_when_asked(monkeypatch):
    from lvae import runs as registry
    killed = []
    monkeypatch.setattr(registry.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(registry, "_fault_counts", {})
    monkeypatch.delenv(registry.FAULT_ENV, raising=False)
    for _ in range(5):
        registry._test_fault_hook("checkpoint")
    assert killed == [] and registry._fault_counts == {}  # unset: not even counted
    monkeypatch.setenv(registry.FAULT_ENV, "eval:2, checkpoint:3")
    for _ in range(5):
        registry._test_fault_hook("checkpoint")
    registry._test_fault_hook("eval")
    assert killed == [(os.getpid(), registry.signal.SIGKILL)]
    registry._test_fault_hook("eval")
    assert len(killed) == 2


def test_checkpoints_of_the_previous_format_still_resume(tmp_path):
    """Checkpoints written before digests and pending train losses existed load and resume."""
    run = train(tmp_path / "old", stop_after=2)
    ck = torch.load(run.path / CHECKPOINT, weights_only=True)
    for key in ("digest", "train_losses"):
        ck.pop(key)
    torch.save(ck, run.path / CHECKPOINT)
    fp16 = torch.load(run.path / WEIGHTS_FP16, weights_only=True)
    fp16.pop("digest")
    torch.save(fp16, run.path / WEIGHTS_FP16)
    Run(run.path).load_model()
    done = train(tmp_path / "old")  # every=1: no pending losses, so the numbers are those of a fresh run
    assert rows(done) == rows(train(tmp_path / "new"))
