"""Atomic persistence, corrupted files and bad inputs: each is detected or refused with a message
that names the fix, and nothing that was stored before is lost."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import struct
from pathlib import Path

import faults
import numpy as np
import pytest
import torch
from helpers import same

import lvae
import lvae.model.warmup
from lvae.config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.data import batches, datasets
from lvae.model.bounds import iw_bound, iw_bound_batched, kl_per_unit, training_bound
from lvae.model.gaussian import NoiseReplay
from lvae.model.network import draw_noise
from lvae.registry import runs, storage
from lvae.registry.profiles import load_profile
from lvae.registry.runs import CHECKPOINT, WEIGHTS_FP16, Run
from lvae.registry.storage import RunError, read_jsonl
from lvae.training.loop import get_or_train

TIMING = {"epoch_seconds", "iw_seconds"}
CONFIG = RunConfig("rel", ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8)),
                   TrainConfig(dataset="synthetic", subset=128, batch_size=32, warmup_epochs=2))
ECONFIG = EvalConfig(every=1, iw_k=8, iw_chunk=4, test_subset=64, train_subset=64)
FIX = r"delete|move it away|restore"  # every RunError about a damaged file says what to do


pytestmark = pytest.mark.usefixtures("one_thread")


def train(root, epochs=3, eval_config=ECONFIG, **kw) -> Run:
    return get_or_train(CONFIG, epochs, eval_config, root=root, progress=False, **kw)


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
    storage.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == [target.name]

    def crash(*_):  # the process dies between the fsynced temp file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.atomic_write_json(target, {"a": 2})
    with pytest.raises(KeyboardInterrupt):
        storage.atomic_torch_save(tmp_path / CHECKPOINT, {"model": {}})
    assert json.loads(target.read_text()) == {"a": 1}  # the old version is intact
    assert not (tmp_path / CHECKPOINT).exists()
    monkeypatch.undo()
    storage.atomic_write_json(target, {"a": 3})
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


def strict_json(text: str):
    """json.loads that refuses the bare NaN / Infinity which Python's json writes by default."""
    def refuse(token):
        raise ValueError(f"bare {token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_no_file_holds_a_bare_nan(tmp_path):
    """A non-finite number is written as null: every file stays valid JSON (issue 13, finding 1)."""
    row = {"epoch": 1, "test_L1": float("nan"), "kl_units": [[0.5, float("inf")]], "iw_k": 8, "ok": True}
    storage.append_jsonl(tmp_path / "evals.jsonl", row)
    storage.write_jsonl(tmp_path / "metrics.jsonl", [row])
    storage.atomic_write_json(tmp_path / "provenance.json", {"wall_seconds": float("-inf"), "epochs": 2})
    want = {"epoch": 1, "test_L1": None, "kl_units": [[0.5, None]], "iw_k": 8, "ok": True}
    for name in ("evals.jsonl", "metrics.jsonl"):
        assert [strict_json(line) for line in (tmp_path / name).read_text().splitlines()] == [want]
    assert strict_json((tmp_path / "provenance.json").read_text()) == {"wall_seconds": None, "epochs": 2}


def test_a_run_evaluated_on_one_image_writes_valid_json(tmp_path):
    """The standard error of one image is undefined (NaN): stored as null, the run is complete."""
    run = train(tmp_path, epochs=1, eval_config=dataclasses.replace(ECONFIG, test_subset=1))
    assert run.status == "complete" and run.metrics()[-1]["test_L1_se"] is None
    for f in run.path.glob("*.json*"):
        for line in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            strict_json(line)


def test_appending_cuts_off_a_torn_last_line(tmp_path):
    p = tmp_path / "evals.jsonl"
    p.write_text('{"a": 1}\n{"a": 2, "b')  # a writer killed mid-row
    storage.append_jsonl(p, {"a": 3})
    assert p.read_text() == '{"a": 1}\n{"a": 3}\n'


def test_full_disk_names_the_folder_removes_the_temp_file_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    """A checkpoint write that fails with ENOSPC mid-file (issue 13, finding 4): DiskFullError naming
    disk space and the folder, no temp file left, the checkpoint of the previous epoch intact, the run
    ``failed`` (not ``interrupted``); once there is space it resumes to the same numbers."""
    real = storage._write_all
    writes = {"n": 0}

    def full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(f".{CHECKPOINT}.tmp-"):
            writes["n"] += 1
            if writes["n"] == 2:  # the checkpoint of epoch 2: half of it fits
                real(fd, data[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(storage, "_write_all", full_disk)
    with pytest.raises(storage.DiskFullError) as err:
        train(tmp_path)
    run = Run(tmp_path / CONFIG.dir_name)
    assert "no space left on the disk" in str(err.value) and str(run.path) in str(err.value)
    assert "--out" in str(err.value) and "resumes" in str(err.value)
    assert [p.name for p in run.path.glob(".*.tmp-*")] == [], "temp file left behind"
    assert not (run.path / runs.SANE_CHECKPOINT).exists()
    assert runs.load_checkpoint(run.path / CHECKPOINT)["epoch"] == 1
    assert run.status == "failed" and "no space left" in run.error and run.epochs == 1
    monkeypatch.undo()
    assert rows(train(tmp_path)) == rows(train(tmp_path / "uninterrupted"))


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_a_file_size_limit_in_a_real_process_is_a_clean_error(tmp_path):
    """The same with a real failing write: a subprocess whose files may not exceed 16 KB (the
    checkpoint needs more), so the first checkpoint write fails with EFBIG."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    code = ("import sys, json, torch; torch.set_num_threads(1)\n"
            "from lvae.config import EvalConfig, RunConfig\nfrom lvae.training.loop import get_or_train\n"
            "get_or_train(RunConfig.from_dict(json.loads(sys.argv[2])), 2, EvalConfig(**json.loads(sys.argv[3])),"
            " root=sys.argv[1], progress=False)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps(CONFIG.to_dict()),
                           json.dumps(dataclasses.asdict(ECONFIG))], preexec_fn=limit, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert "DiskFullError" in proc.stderr and "file-size limit" in proc.stderr, proc.stderr[-2000:]
    assert "unexpected pos" not in proc.stderr
    run = Run(tmp_path / CONFIG.dir_name)
    assert [p.name for p in run.path.glob(".*.tmp-*")] == [] and not (run.path / CHECKPOINT).exists()
    assert run.status == "failed" and "file-size limit" in run.error
    assert rows(train(tmp_path, epochs=2)) == rows(train(tmp_path / "uninterrupted", epochs=2))


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
    fix = "provenance.json is corrupted.*delete it.*resumes from its checkpoint"
    run = Run(run_copy)
    assert run.status == "damaged" and re.search(fix, run.error)
    with pytest.raises(runs.RunDamagedError, match=fix):
        run.result("test_L1")
    assert run.result_text("test_L1") == "damaged"
    with pytest.raises(RunError, match=fix):
        train(run_copy.parent)  # training refuses it too, before touching anything
    (run_copy / "provenance.json").unlink()  # the fix named in the message works
    run = train(run_copy.parent)
    assert run.status == "complete" and run.epochs == 3


def test_corrupted_metrics_line_is_refused(run_copy):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0][:-5] + "#####"
    (run_copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match="line 1 is corrupted; delete the run directory"):
        Run(run_copy).metrics()
    assert Run(run_copy).status == "damaged" and "line 1 is corrupted" in Run(run_copy).error


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_one_damaged_run_does_not_hide_the_registry(trained, tmp_path, capsys):
    """A torn provenance.json or a corrupt middle line of metrics.jsonl in one run (issue 13,
    finding 3): `lvae runs` still lists every run and shows the damaged ones as damaged, with the fix."""
    from lvae import cli

    good = _copy_run(trained, tmp_path / trained.name)
    torn = _copy_run(trained, tmp_path / "torn-provenance")
    (torn / "provenance.json").write_text('{"status": "compl')
    corrupt = _copy_run(trained, tmp_path / "corrupt-metrics")
    lines = (corrupt / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{garbage"
    (corrupt / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert cli.main(["runs", "--out", str(tmp_path), "--json"]) == 0
    listed = {r["name"]: r for r in strict_json(capsys.readouterr().out)}
    assert set(listed) == {good.name, torn.name, corrupt.name}
    assert listed[good.name]["status"] == "complete" and listed[good.name]["test_L1"] is not None
    assert listed[torn.name]["status"] == "damaged" and listed[torn.name]["test_L1"] is None
    assert re.search("provenance.json is corrupted.*delete", listed[torn.name]["error"])
    assert listed[corrupt.name]["status"] == "damaged" and listed[corrupt.name]["epochs"] == 3
    assert re.search("line 2 is corrupted; delete the run directory", listed[corrupt.name]["error"])
    assert cli.main(["runs", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert all(re.search(rf"{name}\s.*{status}", table) for name, status in
               [(good.name, "complete"), (torn.name, "damaged"), (corrupt.name, "damaged")])


@pytest.mark.parametrize("loss", ["deleted", "emptied", "last row cut"])
def test_lost_metrics_rows_are_reported_as_damage(run_copy, loss):
    """A deleted or cut metrics.jsonl (issue 13, finding 9): the run is damaged, not complete, and
    neither reports a number nor trains over the lost history; the message names the fix."""
    metrics = run_copy / "metrics.jsonl"
    assert Run(run_copy).provenance["metrics_rows"] == 3  # what the run recorded
    if loss == "deleted":
        metrics.unlink()
    elif loss == "emptied":
        metrics.write_text("")
    else:
        metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:-1]))
    run = Run(run_copy)
    assert run.status == "damaged" and not run.ok
    assert re.search(r"metrics.jsonl (is missing|has \d rows), but the run recorded 3.*history is lost.*"
                     r"restore it.*or delete the run directory", run.error)
    with pytest.raises(runs.RunDamagedError, match="history is lost"):
        run.result("test_L1")
    with pytest.raises(RunError, match="history is lost"):
        train(run_copy.parent)
    assert not metrics.exists() or len(read_jsonl(metrics)) < 3  # nothing was rewritten


def test_a_complete_run_without_its_final_evaluation_is_damaged(run_copy):
    """Runs written before provenance recorded the row count (the committed ones, the grid's):
    a complete run must still have the evaluation of its final epoch."""
    prov = json.loads((run_copy / "provenance.json").read_text())
    prov.pop("metrics_rows")
    (run_copy / "provenance.json").write_text(json.dumps(prov))
    assert Run(run_copy).status == "complete"
    (run_copy / "metrics.jsonl").unlink()
    assert Run(run_copy).status == "damaged"
    assert "metrics.jsonl is missing, with the evaluation of the final epoch 3" in Run(run_copy).error


def test_every_committed_run_reads_as_complete_or_in_progress():
    """The checks above never flag the registry's committed runs (nor those being trained)."""
    for run in runs.list_runs(runs.results_dir()):
        assert run.status in ("complete", "running", "interrupted", "partial"), (run.name, run.error)
        assert run.damage() is None


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
    # meaningless values (issue 13, finding 8)
    "elbo x > 1": (lambda m: lvae.elbo(m, torch.rand(2, 12) * 255), ValueError, r"in \[0, 1\].*x / 255"),
    "elbo x < 0": (lambda m: lvae.elbo(m, torch.rand(2, 12) - 0.5), ValueError, r"got values in \[-0\.\d+"),
    "elbo x nan": (lambda m: lvae.elbo(m, torch.tensor([[float("nan")] * 12])), ValueError, "12 NaN or infinite"),
    "iw_bound x inf": (lambda m: iw_bound(m, torch.full((2, 12), float("inf")), 4), ValueError, "NaN or infinite"),
    "training_bound x > 1": (lambda m: training_bound(m, torch.full((2, 12), 2.0), 1.0, 2, 2), ValueError, r"\[0, 1\]"),
    "log_joint x nan": (lambda m: m.log_joint(torch.full((2, 12), float("nan")), [torch.rand(2, 4), torch.rand(2, 3)]),
                        ValueError, "NaN"),
    "sample_posterior x > 1": (lambda m: m.sample_posterior(torch.full((2, 12), 3.0), 2), ValueError, r"\[0, 1\]"),
    "elbo beta < 0": (lambda m: lvae.elbo(m, torch.rand(2, 12), -1.0), ValueError,
                      "beta=-1.0 must be a finite number >= 0"),
    "elbo beta nan": (lambda m: lvae.elbo(m, torch.rand(2, 12), float("nan")), ValueError, "beta=nan"),
    "training_bound beta tensor < 0": (lambda m: training_bound(m, torch.rand(2, 12), torch.tensor(-0.5)), ValueError,
                                       "beta=tensor"),
    "training_bound iw_samples=0": (lambda m: training_bound(m, torch.rand(2, 12), 1.0, 1, 0), ValueError,
                                    "iw_samples=0 must be a positive integer"),
    "iw_bound chunk_size=0": (lambda m: iw_bound(m, torch.rand(2, 12), 4, chunk_size=0), ValueError,
                              r"chunk_size=0 must be a positive integer or None \(all k samples at once\)"),
    "iw_bound chunk_size=-3": (lambda m: iw_bound(m, torch.rand(2, 12), 4, chunk_size=-3), ValueError, "chunk_size=-3"),
    "iw_bound k=2.5": (lambda m: iw_bound(m, torch.rand(2, 12), 2.5), ValueError, "k=2.5 must be >= 1"),
    "iw_bound_batched chunk_size=0": (lambda m: iw_bound_batched(m, torch.rand(2, 12), 4, 0, 2), ValueError,
                                      "chunk_size=0"),
    "iw_bound_batched batch_size=0": (lambda m: iw_bound_batched(m, torch.rand(2, 12), 4, 2, 0), ValueError,
                                      "batch_size=0 must be a positive integer"),
}


@pytest.mark.parametrize("call", list(API_CALLS))
def test_public_api_refuses_wrong_inputs_with_the_fix(model, call):
    fn, exc, match = API_CALLS[call]
    with pytest.raises(exc, match=match):
        fn(model)


def test_gaussian_likelihood_takes_any_finite_x_but_not_nan():
    model = lvae.build_model(ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 8), likelihood="gaussian"))
    x = torch.rand(2, 12) * 3 - 1  # outside [0, 1]: a density is defined there
    assert torch.isfinite(lvae.elbo(model, x)).all() and torch.isfinite(iw_bound(model, x, 4, 2)).all()
    with pytest.raises(ValueError, match="NaN or infinite"):
        lvae.elbo(model, x.masked_fill(x > 1.5, float("nan")).index_fill(1, torch.tensor([0]), float("nan")))


def test_valid_inputs_at_the_edges_are_accepted():
    model = lvae.build_model(ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 8))).eval()
    x = torch.tensor([[0.0] * 6 + [1.0] * 6])
    for beta in (0.0, 1, 0.5, torch.tensor(1.0)):
        assert torch.isfinite(training_bound(model, x, beta)).all()
    assert iw_bound(model, x, 4, chunk_size=100).shape == (1,)  # a chunk larger than k is all k at once
    assert iw_bound(model, x[:0], 4).shape == (0,)


def _replay_in_chunks(eps: list[torch.Tensor], chunk: int) -> NoiseReplay:
    """The noise of one draw of all K samples, in the order iw_bound consumes it with ``chunk``."""
    k = eps[0].shape[0]
    return NoiseReplay([e[s:s + chunk] for s in range(0, k, chunk) for e in eps])


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_iw_bound_chunk_size_changes_the_samples_not_the_estimator(inference):
    """What the iw_bound docstring states (issue 13, finding 10): the same samples give the same
    L_K whatever the chunking (rounding aside); the same generator with another chunk size draws
    other samples, so the values differ by Monte Carlo error, not by a bias."""
    torch.manual_seed(0)
    cfg = ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 8), inference=inference)
    model = lvae.build_model(cfg).eval()
    x = torch.bernoulli(torch.full((200, 12), 0.4), generator=torch.Generator().manual_seed(1))
    k = 100
    eps = draw_noise(cfg, k, len(x), torch.Generator().manual_seed(2), "cpu")
    whole = iw_bound(model, x, k, None, NoiseReplay(list(eps)))
    for chunk in (1, 7, 64, 100):
        torch.testing.assert_close(iw_bound(model, x, k, chunk, _replay_in_chunks(eps, chunk)), whole,
                                   rtol=1e-5, atol=1e-4)
    a = iw_bound(model, x, k, 7, torch.Generator().manual_seed(3))
    b = iw_bound(model, x, k, None, torch.Generator().manual_seed(3))
    diff = (a - b).double()
    assert diff.abs().max() > 1e-3  # other samples...
    assert abs(diff.mean()) < 4 * diff.std() / len(diff) ** 0.5  # ...from the same distribution
    doc = " ".join(iw_bound.__doc__.split())
    assert "does not depend on the chunk size beyond" not in doc.split("Given the same samples")[0]
    assert "draw *different* samples" in doc


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
        next(batches.train_batches(datasets.load_dataset("synthetic", subset=8), 0, 0, 0))


class Killed(Exception):
    """Stands in for the SIGKILL of tests/faults.py in this process."""


def kill():
    raise Killed


def test_faults_fire_at_the_nth_point_only(tmp_path):
    """The fault injection of tests/test_faults.py (tests/faults.py) stops at exactly the point asked
    for: the n-th rename onto a file, mid-append of a row, the n-th call of a training function."""
    real_replace, real_beta = os.replace, lvae.model.warmup.warmup_beta
    undo = faults.install("rename:provenance.json:2, append:evals.jsonl:2, after:warmup_beta:3", kill)
    try:
        target = tmp_path / "provenance.json"
        storage.atomic_write_json(target, {"a": 1})
        storage.atomic_write_json(tmp_path / "config.json", {"a": 1})  # another file: not counted
        with pytest.raises(Killed):
            storage.atomic_write_json(target, {"a": 2})
        assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.glob(".provenance.json.tmp-*"))
        storage.atomic_write_json(target, {"a": 3})
        assert json.loads(target.read_text()) == {"a": 3}
        rows = tmp_path / "evals.jsonl"
        storage.append_jsonl(rows, {"n": 1})
        with pytest.raises(Killed):
            storage.append_jsonl(rows, {"n": 2, "pad": "x" * 10})
        text = rows.read_text()
        assert text.startswith('{"n": 1}\n') and not text.endswith("\n")  # a torn last line
        lvae.model.warmup.warmup_beta(0, 10), lvae.warmup_beta(1, 10)  # counted wherever it was imported
        with pytest.raises(Killed):
            lvae.model.warmup.warmup_beta(2, 10)
    finally:
        undo()
    assert os.replace is real_replace and lvae.model.warmup.warmup_beta is lvae.warmup_beta is real_beta  # undone
    with pytest.raises(ValueError, match="expected <kind>:<target>:<n>"):
        faults.parse("checkpoint:2")


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
