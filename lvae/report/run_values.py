"""What one stored run measured, read from the run registry (read-only).

A run's metric history (:func:`history`) and its final value of a metric (:func:`final`, never a number
for a failed or unfinished run); its final L_K on the most test images (:func:`best_lk`: the
training-time evaluation or a later ``lvae eval`` of the same weights); a run read as it stood at an
epoch (:class:`RunAtEpoch`, :func:`at_epoch`); the runs of a profile keyed (variant, depth, seed)
(:func:`profile_runs`); and the labels a table shows for them (:func:`lk_label`, :func:`run_state`; the device,
:func:`lvae.registry.storage.short_device`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lvae.registry.profiles import load_profile
from lvae.registry.runs import (CHECKPOINT, MILESTONE_WEIGHTS, WEIGHTS_FP16, Run, RunError, RunFailedError,
                                RunIncompleteError, load_checkpoint)
from lvae.registry.storage import short_device
from lvae.training.profile_runs import find_run


# -- one run's values ----------------------------------------------------------------------------
def history(run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of metric ``key`` over a run's evaluations (rows without it skipped)."""
    rows = [r for r in run.metrics() if r.get(key) is not None]
    return np.array([r["epoch"] for r in rows]), np.array([r[key] for r in rows], dtype=float)


def final(run, key: str) -> Any:
    """The final value of ``key`` of a complete run; None when never measured or when the run
    failed or is unfinished (a failed run is shown as failed, never as a number)."""
    if run is None:
        return None
    try:
        return run.result(key)
    except (RunFailedError, RunIncompleteError):
        return None


def run_value(run, metric: str, n: int | None = None) -> tuple[float, float | None, int | None] | None:
    """(value, test-image s.e., images) of one complete run's final ``metric``; None when the run has
    no such number. ``test_LK`` is the L_K on exactly ``n`` test images (the most when None, see
    :func:`best_lk`); ``active_units`` the total over layers (no s.e.)."""
    if run is None or not run.ok:
        return None
    if metric == "test_LK":
        lk = best_lk(run, n)
        if lk is None or (n is not None and lk["n"] != n):
            return None
        return lk["value"], lk["se"], lk["n"]
    value = final(run, metric)
    if value is None:
        return None
    if metric == "active_units":
        return float(sum(value)), None, None
    n_images = final(run, "n_test") if metric.startswith("test_") else run.eval_config.train_subset
    return float(value), final(run, metric + "_se"), n_images


def best_lk(run, n: int | None = None) -> dict[str, Any] | None:
    """The final importance-weighted bound of a complete run on the most test images available:
    the training-time evaluation (often on a test subset) or a later ``lvae eval`` of the same
    weights (evals.jsonl), whichever used more images -- or exactly ``n`` images when given, so
    that two models are compared on the same images; among evaluations on as many images, the
    newest. Keys: value, se, k, n, seconds, source."""
    if run is None or not run.ok:
        return None
    cands = _lk_candidates(run)
    if not cands:
        return None
    if n is not None:
        cands = [c for c in cands if c["n"] == n] or [cands[0]]
    # the most images; among equals the newest (a re-run with faster code times the current code)
    return max(reversed(cands), key=lambda c: c["n"] or 0)


def _lk_candidates(run) -> list[dict[str, Any]]:
    """The L_K of a run's final weights: the last training-time L_K evaluation, then every ``lvae eval``
    of the final epoch with as many importance samples, in the order they were made (keys of :func:`best_lk`)."""
    row = next((r for r in reversed(run.metrics()) if "test_LK" in r), None)
    if row is None:
        return []
    cands = [{"value": row["test_LK"], "se": row.get("test_LK_se"), "k": row.get("iw_k"), "n": row.get("n_iw"),
              "seconds": row.get("iw_seconds"), "source": "training-time evaluation"}]
    for e in run.evals():
        if e.get("epoch") == run.epochs and e.get("test_LK") is not None and e.get("iw_k") == cands[0]["k"]:
            device = short_device(e.get("device")) or "?"
            cands.append({"value": e["test_LK"], "se": e.get("test_LK_se"), "k": e["iw_k"], "n": e.get("n_iw"),
                          "seconds": e.get("iw_seconds"), "source": f"lvae eval on {device}"})
    return cands


def lk_counts(run, k: int | None = None) -> set[int | None]:
    """The test-image counts on which a run's final weights have an L_K (with ``k`` importance
    samples; any when None): the ``n`` that :func:`best_lk` accepts."""
    return {c["n"] for c in _lk_candidates(run) if k is None or c["k"] == k}


# -- a run as it stood at an epoch ---------------------------------------------------------------
class RunAtEpoch(Run):
    """A run read as it stood at ``epoch`` (a budget is a profile and an epoch): its metrics up to that
    epoch, its evaluations and per-image values of that epoch, complete when the run reached that epoch
    with an evaluation there. A run that failed or is damaged stays so (a failed run is never a number,
    even from before it failed)."""

    def __init__(self, run: Run, epoch: int):
        super().__init__(run.path)
        self.base, self.at = run, int(epoch)

    def __repr__(self) -> str:
        return f"RunAtEpoch({self.name!r}, epoch={self.at}, status={self.status!r})"

    @property
    def epochs(self) -> int:
        return min(self.at, self.base.epochs)

    def metrics(self) -> list[dict]:
        return [r for r in self.base.metrics() if r.get("epoch", 0) <= self.at]

    def evals(self) -> list[dict]:
        return [r for r in self.base.evals() if r.get("epoch", 0) <= self.at]

    @property
    def status(self) -> str:
        status = self.base.status
        if status in ("failed", "damaged"):
            return status
        if self.base.epochs >= self.at and any(r.get("epoch") == self.at for r in self.metrics()):
            return "complete"
        return "partial" if status == "complete" else status

    def damage(self) -> str | None:
        return self.base.damage()

    def weights(self) -> tuple[Path, dict]:
        """(file, payload) of this run's weights of epoch ``at``: the milestone's kept weights
        (``model-fp16-e<at>.pt``), else the run's own checkpoint or fp16 weights when they are of that
        epoch (:meth:`load_model` loads them). A RunError names the epochs there are weights of otherwise."""
        kept = self.path / MILESTONE_WEIGHTS.format(epoch=self.at)
        if kept.exists():
            return kept, load_checkpoint(kept)
        found = {}
        for name in (CHECKPOINT, WEIGHTS_FP16):
            if (self.path / name).exists():
                payload = load_checkpoint(self.path / name)
                if payload.get("epoch") == self.at:
                    return self.path / name, payload
                found[name] = payload.get("epoch")
        have = ", ".join(f"{name}: epoch {e}" for name, e in found.items()) or "no weights"
        raise RunError(f"{self.path} has no weights of epoch {self.at} ({have}); a run that trains past a "
                       f"milestone keeps them as {MILESTONE_WEIGHTS.format(epoch=self.at)} "
                       f"(lvae.training.campaign), and `lvae runs export --at-epoch {self.at}` carries them")


def at_epoch(run, epoch: int | None):
    """``run`` as it stood at ``epoch`` (:class:`RunAtEpoch`); the run itself when ``epoch`` is None or
    its own final epoch."""
    if run is None or epoch is None or (run.epochs == epoch and not isinstance(run, RunAtEpoch)):
        return run
    return RunAtEpoch(getattr(run, "base", run), epoch)


# -- the runs of a profile -----------------------------------------------------------------------
Key = tuple  # (variant, depth, seed): how every run of a profile is looked up


def profile_runs(profile, root=None, variants: Sequence[str] | None = None,
                 depths: Sequence[int] | None = None) -> dict[Key, Any]:
    """Every (variant, depth, seed) of ``profile`` (all its seeds) -> its run or None, read-only
    (:func:`lvae.training.profile_runs.find_run`; :func:`lvae.training.profile_runs.grid_runs` trains what is
    missing instead)."""
    p = load_profile(profile) if isinstance(profile, str) else profile
    return {(v, d, s): find_run(p, v, d, s, root) for s in p.seeds for v in (variants or p.variants)
            for d in (depths or p.depths)}


def first_complete_run(runs: dict, model: tuple | None):
    """The complete run of ``model`` (variant, depth) in ``runs`` with the lowest seed; None when it has
    none (or ``model`` is None)."""
    return next((r for k, r in sorted(runs.items(), key=lambda kv: kv[0][2]) if model and k[:2] == model
                 and r is not None and r.ok), None)


# -- labels --------------------------------------------------------------------------------------
def model_label(run, label: str) -> str:
    """``label``, marked with the run's status unless it completed."""
    return label if run is None or run.ok else f"{label} ({run.status})"


def run_state(run) -> str:
    """Why a run has no number: "not run", or its status with its epochs ("partial, 6 of 30 epochs")."""
    if run is None:
        return "not run"
    target = run.provenance.get("target_epochs")
    return f"{run.status}, {run.epochs} of {target} epochs" if target else run.status


def lk_label(k: int | None, n: int | None) -> str:
    """``L5000 (500 images)``: every L_K says how many test images it covers."""
    return f"L{k or 'K'} ({n:,} images)" if n else f"L{k or 'K'}"
