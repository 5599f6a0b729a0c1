"""Fault injection: SIGKILL real training processes and check that the run resumes and loses nothing.

Every test starts ``get_or_train`` in a subprocess (``tests/faults.py``), kills it (SIGKILL) at a
deterministic point chosen with a fault spec of :mod:`faults` (which patches the process, not the
product code) or at a random time, resumes the run, and asserts that the final checkpoint (model, Adam state,
epoch), the fp16 weights and every metrics row are bit-identical to those of an uninterrupted run
(timing fields aside), that no temp file is left behind and that no evaluation is lost or kept
twice. Both sides run on CPU with one thread, so the comparison is exact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import same

from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.registry.runs import CHECKPOINT, WEIGHTS_FP16, Run
from lvae.training.loop import get_or_train

REPO = Path(__file__).resolve().parent.parent
TIMING = {"epoch_seconds", "iw_seconds"}  # wall-clock fields: the only ones allowed to differ

EPOCHS = 6  # 8 steps per epoch (256 images, batch 32); evaluations at epochs 2, 4 (with L_K) and 6
CONFIG = RunConfig("fault", ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8)),
                   TrainConfig(dataset="synthetic", subset=256, batch_size=32, warmup_epochs=3))
ECONFIG = EvalConfig(every=2, iw_k=8, iw_every=4, iw_chunk=4, test_subset=64, train_subset=64)

RANDOM_EPOCHS = 12  # a longer run so that random kill times land inside training
RANDOM_CONFIG = RunConfig("fault-random", CONFIG.model,
                          TrainConfig(dataset="synthetic", subset=512, batch_size=32, warmup_epochs=4))

FAULTS = Path(__file__).resolve().parent / "faults.py"  # the worker: installs the faults, then trains


def start_worker(root: Path, fault: str | None, config: RunConfig = CONFIG, epochs: int = EPOCHS) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LVAE_RESULTS"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(FAULTS), fault or "", str(root), json.dumps(config.to_dict()),
                             json.dumps(dataclasses.asdict(ECONFIG)), str(epochs)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_worker(root: Path, fault: str | None, **kw) -> subprocess.CompletedProcess:
    proc = start_worker(root, fault, **kw)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def one_thread():
    """Same thread count as the workers, so in-process numbers are comparable bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




def snapshot(run_dir: Path) -> dict:
    """Everything a run leaves that must not depend on interruptions: checkpoint, fp16 weights,
    metrics rows, per-image values, and what provenance.json says of the run's state."""
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_image = {}
    for f in sorted(run_dir.glob("per-image-*.npz")):
        with np.load(f) as z:
            per_image[f.name] = {k: torch.from_numpy(z[k]) for k in z.files}
    prov = json.loads((run_dir / "provenance.json").read_text())
    return {"checkpoint": torch.load(run_dir / CHECKPOINT, weights_only=True),
            "fp16": torch.load(run_dir / WEIGHTS_FP16, weights_only=True), "metrics": rows, "per_image": per_image,
            "state": {k: prov.get(k) for k in ("status", "epochs", "target_epochs", "metrics_rows")}}


def assert_identical(got: dict, want: dict) -> None:
    assert [r["epoch"] for r in got["metrics"]] == [r["epoch"] for r in want["metrics"]], "evaluations lost or doubled"
    for g, w in zip(got["metrics"], want["metrics"]):
        assert g == w, f"metrics of epoch {w['epoch']} differ"
    assert got["checkpoint"]["epoch"] == want["checkpoint"]["epoch"]
    assert same(got["checkpoint"]["model"], want["checkpoint"]["model"]), "model weights differ"
    assert same(got["checkpoint"]["optimizer"], want["checkpoint"]["optimizer"]), "Adam state differs"
    assert same(got["checkpoint"], want["checkpoint"])
    assert same(got["fp16"], want["fp16"]), "fp16 weights differ"
    assert got["per_image"].keys() == want["per_image"].keys(), "per-image files lost or left over"
    assert same(got["per_image"], want["per_image"]), "per-image values differ"
    assert got["state"] == want["state"], "provenance.json says another state"


def assert_clean_finish(run_dir: Path, epochs: int) -> None:
    run = Run(run_dir)
    assert run.status == "complete" and run.epochs == epochs
    assert [p.name for p in run_dir.glob(".*.tmp-*")] == [], "temp files left behind"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run (in process, one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("reference")
        run = get_or_train(CONFIG, EPOCHS, ECONFIG, root=root, progress=False)
        assert [r["epoch"] for r in run.metrics()] == [2, 4, 6] and "test_LK" in run.metrics()[1]
        return snapshot(run.path)
    finally:
        torch.set_num_threads(before)


# point, n -> what the killed process must have left behind (checkpoint epoch, a temp file of ...)
KILL_POINTS = {
    "in:clip_gradients:13": (1, None),  # mid-step: step 13's gradients computed, the optimizer not stepped
    "in:kl_per_unit:1": (1, None),  # mid-evaluation of epoch 2 (BN statistics recomputed, L1 done)
    "in:iw_bound_batched:1": (3, None),  # mid-evaluation of epoch 4, at the importance-weighted bound
    "after:FlatAdam.step:13": (1, None),  # mid-epoch 2 (after its 5th step)
    "after:FlatAdam.step:29": (3, None),  # mid-epoch 4, after an odd epoch: the pending train losses must survive
    "after:evaluate:1": (1, None),  # epoch 2 evaluated, its row not yet written
    "append:metrics.jsonl:1": (1, "line:metrics.jsonl"),  # mid-append of epoch 2's metrics row: a torn last line
    "rename:checkpoint.pt:2": (1, CHECKPOINT),  # epoch 2's row written, its checkpoint mid-write: the row is replayed
    "rename:checkpoint.pt:3": (2, CHECKPOINT),  # mid-write of epoch 3's checkpoint (pending train losses)
    "rename:model-fp16.pt:4": (3, WEIGHTS_FP16),  # fp16 weights of epoch 4 mid-write (before its checkpoint)
    "rename:provenance.json:3": (2, "provenance.json"),  # after epoch 2, provenance mid-write
    "rename:provenance.json:8": (6, "provenance.json"),  # everything trained, the final 'complete' mid-write
    "rename:config.json:1": (None, "config.json"),  # the very first write of a fresh run
    # every write of the final epoch (6), in order (issue 19): the resume ends with all files of epoch 6
    "rename:per-image-e6-L8-n64.npz:1": (5, "per-image-e6-L8-n64.npz"),  # its per-image values mid-write
    "append:metrics.jsonl:3": (5, "line:metrics.jsonl"),  # its evaluation row mid-append
    "rename:model-fp16.pt:6": (5, WEIGHTS_FP16),  # its fp16 weights mid-write
    "rename:checkpoint.pt:6": (5, CHECKPOINT),  # its fp16 weights written, its checkpoint mid-write
    "rename:provenance.json:7": (6, "provenance.json"),  # its checkpoint written, provenance (epochs 6) mid-write
}


@pytest.mark.slow  # a real process, a book build or torch.compile
@pytest.mark.parametrize("fault", list(KILL_POINTS))
def test_kill_at_point_then_resume_is_bit_identical(fault, reference, tmp_path, one_thread):
    killed = run_worker(tmp_path, fault)
    assert killed.returncode == -signal.SIGKILL, f"the fault {fault} was not reached:\n{killed.stderr[-2000:]}"
    run_dir = tmp_path / CONFIG.dir_name
    ckpt_epoch, torn = KILL_POINTS[fault]
    if ckpt_epoch is None:
        assert not (run_dir / CHECKPOINT).exists()
    else:
        assert torch.load(run_dir / CHECKPOINT, weights_only=True)["epoch"] == ckpt_epoch
        assert Run(run_dir).status == "interrupted"  # the dead process no longer holds the lock
    if torn and torn.startswith("line:"):
        text = (run_dir / torn[5:]).read_text()
        assert text and not text.endswith("\n"), "the kill did not land mid-row"
    elif torn:
        assert list(run_dir.glob(f".{torn}.tmp-*")), "the kill did not land between the temp file and its rename"
    run = get_or_train(CONFIG, EPOCHS, ECONFIG, root=tmp_path, progress=False)  # resume
    assert_clean_finish(run.path, EPOCHS)
    assert_identical(snapshot(run.path), reference)


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_kill_the_resuming_process_too(reference, tmp_path, one_thread):
    """Two kills in a row (the second one in the resumed process), then a clean resume in a subprocess."""
    for fault in ("rename:checkpoint.pt:2", "after:FlatAdam.step:10"):
        assert run_worker(tmp_path, fault).returncode == -signal.SIGKILL
    done = run_worker(tmp_path, None)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / CONFIG.dir_name
    assert_clean_finish(run_dir, EPOCHS)
    assert Run(run_dir).provenance["resumes"] == 2
    assert_identical(snapshot(run_dir), reference)  # also: a subprocess reproduces the in-process numbers


APPENDER = """
import sys, time
from pathlib import Path
from lvae.registry.storage import append_jsonl
path, writer, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
(go.parent / f"ready-{writer}").touch()
while not go.exists():  # start together
    time.sleep(0.001)
for i in range(int(sys.argv[4])):
    append_jsonl(path, {"writer": writer, "i": i, "pad": "x" * 500})
"""


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_concurrent_appends_lose_no_row(tmp_path):
    """Processes appending to one JSON-lines file at once (two `lvae eval` of one run) lose no row
    and tear none (issue 13, finding 6: 2 x 200 rows used to leave 367)."""
    path, go, n, writers = tmp_path / "evals.jsonl", tmp_path / "go", 200, 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), str(w), str(go), str(n)], env=env,
                              stderr=subprocess.PIPE, text=True) for w in range(writers)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < writers and time.monotonic() < deadline:  # all imported
        time.sleep(0.01)
    go.touch()
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read()[-2000:]
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    assert len(rows) == writers * n
    assert sorted((r["writer"], r["i"]) for r in rows) == [(w, i) for w in range(writers) for i in range(n)]
    for w in range(writers):  # each writer's rows in its own order
        assert [r["i"] for r in rows if r["writer"] == w] == list(range(n))


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_random_time_kills(tmp_path, one_thread):
    """Up to three SIGKILLs at random times during training, then a resume: nothing lost."""
    seed = int(os.environ.get("LVAE_FAULT_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    run_dir = tmp_path / "killed" / RANDOM_CONFIG.dir_name
    landed = []
    for _ in range(3):
        proc = start_worker(tmp_path / "killed", None, config=RANDOM_CONFIG, epochs=RANDOM_EPOCHS)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # wait until it trains
            try:
                if json.loads((run_dir / "provenance.json").read_text()).get("pid") == proc.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.communicate(timeout=60)
        landed.append(proc.returncode == -signal.SIGKILL)
    run = get_or_train(RANDOM_CONFIG, RANDOM_EPOCHS, ECONFIG, root=tmp_path / "killed", progress=False)
    want = get_or_train(RANDOM_CONFIG, RANDOM_EPOCHS, ECONFIG, root=tmp_path / "reference", progress=False)
    assert_clean_finish(run.path, RANDOM_EPOCHS)
    assert_identical(snapshot(run.path), snapshot(want.path))
    print(f"random kills (seed {seed}): {sum(landed)} of {len(landed)} landed before the run finished")
