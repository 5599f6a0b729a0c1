"""A run in flight resumes bit-identically across a change of the code.

``tests/data/resume-across-c554150/run`` is a small run (the LVAE of tests/test_campaign.py's stand-in:
synthetic data, two stochastic layers, batch norm, warm-up over 2 epochs) trained for 2 epochs by the
code of commit c554150, the code that trains the long runs of :mod:`lvae.training.campaign` until
they finish. That code then resumed the same run to 4 epochs on the machine named in
``expected.json``, and this records the SHA-256 of the result (weights, Adam state, epoch and every
metrics row but the timings). The current code must resume the stored run to the same numbers: it
reads the old checkpoint, and its step, evaluation and checkpoint writing keep the old numbers.

The fixture is kept small (about 100 KB); the long runs' own checkpoints are never committed. The
digest is machine-specific (float32 rounding depends on the CPU's vector extensions), so on another
CPU the test skips: it cannot be recorded again without the old code.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.registry.runs import Run
from lvae.registry.storage import cpu_model
from lvae.training.loop import get_or_train

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = Path(__file__).parent / "data" / "resume-across-c554150"
MODEL = ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8), inference="ladder", batch_norm=True)
EVAL = EvalConfig(every=1, iw_k=8, iw_chunk=4, iw_subset=16, train_subset=64)
CONFIG = RunConfig("resume-across", MODEL,
                   TrainConfig(dataset="synthetic", subset=96, batch_size=32, warmup_epochs=2, seed=0))


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        h.update(str((value.dtype, tuple(value.shape))).encode())
        h.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        for v in value:
            _feed(h, v)
    elif isinstance(value, float):
        h.update(value.hex().encode())
    else:
        h.update(repr(value).encode())


def run_digest(path: Path) -> str:
    """SHA-256 of a run's checkpoint (weights, Adam state, epoch, losses) and its metrics rows
    without their timings (``*seconds*``)."""
    ck = torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    _feed(h, {k: ck[k] for k in ("model", "optimizer", "epoch", "train_losses")})
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    _feed(h, [{k: v for k, v in r.items() if "seconds" not in k} for r in rows])
    return h.hexdigest()


def test_the_fixture_is_the_run_of_this_config():
    assert Run(FIXTURE / "run").config == CONFIG
    assert Run(FIXTURE / "run").epochs == 2
    assert json.loads((FIXTURE / "run" / "provenance.json").read_text())["git_commit"].startswith("c554150")


def test_a_run_trained_by_the_old_code_resumes_to_the_old_codes_numbers(tmp_path):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    fingerprint = f"torch {torch.__version__}; {cpu_model()}"
    if fingerprint not in expected:
        pytest.skip(f"the old code's numbers were recorded on {sorted(expected)}, not on {fingerprint!r}")
    shutil.copytree(FIXTURE / "run", tmp_path / CONFIG.dir_name)
    run = get_or_train(CONFIG, expected[fingerprint]["epochs"], EVAL, root=tmp_path, progress=False)
    assert run.epochs == expected[fingerprint]["epochs"] and run.status == "complete"
    sessions = run.provenance["sessions"]
    assert [s["from_epoch"] for s in sessions] == [0, 2], "the run was not resumed from its stored epoch 2"
    assert sessions[0]["git_commit"].startswith("c554150")
    assert run_digest(run.path) == expected[fingerprint]["run_digest"]
