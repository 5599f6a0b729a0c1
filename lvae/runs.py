"""The run registry: every number the book shows comes from a run stored here.

A run is keyed by a hash of its full :class:`~lvae.config.RunConfig` and lives in
``<results>/<name>-<key>/``::

    config.json        the RunConfig (+ the EvalConfig last used, for information)
    metrics.jsonl      one JSON line per evaluation (append-only; a torn last line is ignored)
    provenance.json    status, git commit, torch version, device, seed, wall time, timestamps
    checkpoint.pt      full fp32 state (model, optimizer, epoch) for exact resume (git-ignored)
    model-fp16.pt      fp16 weights for analysis chapters (small; committed for the book)

:func:`get_or_train` reuses a run that already has >= the requested epochs, resumes one that
has fewer from its checkpoint, and trains otherwise. Files are written atomically (temp file,
fsync, rename) and a run directory is locked while a process trains it.

Reliability contract (tests/test_faults.py kills real training processes to check it):

* A process killed at any point (mid-step, mid-evaluation, between a temp file and its rename)
  leaves a run that :func:`get_or_train` resumes from its last checkpoint and finishes with
  bit-identical weights, optimizer state and metrics (CPU, same thread count). Evaluations
  are written *before* the checkpoint of their epoch, so a kill in between replays them.
* ``checkpoint.pt`` and ``model-fp16.pt`` carry a SHA-256 digest of their content; a damaged
  file is refused with :class:`RunError` naming the fix, never silently loaded.
* NaN/inf in the loss, parameters made non-finite by non-finite gradients, or an evaluation that
  is not sane (:func:`lvae.train.evaluation_problem`: non-finite, a bound more than 10 times
  below the trivial model's, or a training bound that keeps getting worse after warm-up) stop
  the run with :class:`~lvae.train.NonFiniteLossError` (:class:`~lvae.train.DivergedError` for
  an evaluation) naming the epoch and the fix. The insane evaluation is not recorded; the run
  keeps the checkpoint of its last sane evaluation in that session (or the one the session
  resumed from; none for a fresh run) and is marked ``failed``. :meth:`Run.result` refuses to
  give a failed (or unfinished) run's number; :meth:`Run.result_text` renders it as ``failed``.
* A full disk (or quota, or file-size limit) stops training with :class:`DiskFullError`, which
  names the folder; the temp file is removed, every stored file keeps its last complete
  version, and the run (``failed``) resumes once there is space.
* No file holds a bare ``NaN``: a non-finite number (e.g. the standard error of one image) is
  written as ``null``. Rows are appended to metrics.jsonl / evals.jsonl under a lock, so
  concurrent writers (two ``lvae eval`` of one run) lose none.
* ``Run.status`` is ``complete``, ``partial`` (stopped cleanly by ``stop_after``), ``running``
  (a live process holds the lock), ``interrupted`` (its process died), ``failed``, ``damaged``
  (a stored file is unreadable, or metrics.jsonl lost rows the run recorded: :meth:`Run.damage`
  names the fix) or ``unknown``.

Test-only fault injection: ``LVAE_FAULT=<point>:<n>[,<point>:<n>...]`` SIGKILLs the process the
n-th time it reaches ``point`` (see :func:`_test_fault_hook`). Unset, it costs one environment
lookup per file write and nothing per training step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from . import data as datasets
from .config import ConfigError, EvalConfig, RunConfig
from .models import HierarchicalVAE, build_model
from .train import (DivergedError, NonFiniteLossError, default_device, evaluate, evaluation_problem, make_optimizer,
                    train_epoch)

RESULTS_ENV = "LVAE_RESULTS"
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
WEIGHTS_FP16 = "model-fp16.pt"
PER_IMAGE = "per-image-e{epoch}-L{k}-n{n}.npz"  # per-test-image L1 (all test images) and L_K (the first n)
# a hard link to the checkpoint a failing session rolls back to (its last sane evaluation, or the one
# it resumed from); it exists only while a session trains (and after a kill, until the next one starts)
SANE_CHECKPOINT = "checkpoint-sane.pt"
FAULT_ENV = "LVAE_FAULT"
# files of a run directory that only the lock holder writes (its stale temp files are removed on resume)
_LOCKED_FILES = ("config.json", "provenance.json", "metrics.jsonl", CHECKPOINT, WEIGHTS_FP16, SANE_CHECKPOINT)
# a run name is one folder name: no separator, no "..", nothing hidden or option-like
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,99}")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FAULT_POINTS = {"config.json": "config", "provenance.json": "provenance", "metrics.jsonl": "metrics",
                 CHECKPOINT: "checkpoint", WEIGHTS_FP16: "fp16", "evals.jsonl": "evals"}


class RunError(RuntimeError):
    """A problem with a stored run; the message names the fix."""


class RunLockedError(RunError):
    """Another process is training this run."""


class RunFailedError(RunError):
    """The run stopped with an error (e.g. NaN); it has no result to report."""


class RunIncompleteError(RunError):
    """The run has not (yet) reached its target epochs; it has no final result to report."""


class RunDamagedError(RunIncompleteError):
    """A stored file of the run is unreadable or lost rows; the message names the fix."""


class DiskFullError(RunError):
    """A write failed for lack of space (or quota, or the file-size limit); nothing was lost."""


# -- test-only fault injection -------------------------------------------------------------------
_fault_counts: dict[str, int] = {}


def _test_fault_hook(point: str) -> None:
    """TEST-ONLY: SIGKILL this process the n-th time it reaches ``point`` if ``$LVAE_FAULT`` asks.

    ``LVAE_FAULT="checkpoint:2"`` kills during the 2nd checkpoint write (temp file written and
    fsynced, not yet renamed); several comma-separated points are allowed. Points:

    * ``step`` -- after an optimizer step (counted over the process; only when the variable is set
      at the start of training is the progress bar wrapped to count steps),
    * ``eval`` -- after an evaluation was computed, before its metrics row is written,
    * ``config`` / ``provenance`` / ``metrics`` / ``checkpoint`` / ``fp16`` / ``evals`` -- mid-write
      of that file, between the fsynced temp file and its rename.

    The counts are per process, so a resumed process counts from 1 again.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    n = _fault_counts[point] = _fault_counts.get(point, 0) + 1
    for item in spec.split(","):
        name, _, at = item.strip().partition(":")
        if not (at or "1").isdigit():
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected <point>:<n>[,<point>:<n>...], e.g. checkpoint:2")
        if name == point and n == int(at or 1):
            os.kill(os.getpid(), signal.SIGKILL)


class _FaultingProgress:
    """TEST-ONLY progress-bar wrapper that calls the ``step`` fault hook after every optimizer step.
    Installed only when ``$LVAE_FAULT`` is set, so normal training pays nothing per step."""

    def __init__(self, bar: Any):
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)
        for _ in range(n):
            _test_fault_hook("step")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def results_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$LVAE_RESULTS``, else ``results/`` at the repository root (or cwd)."""
    if override is not None:
        return Path(override)
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    root = Path(__file__).resolve().parent.parent
    return root / "results" if (root / "pyproject.toml").exists() else Path.cwd() / "results"


# -- atomic persistence --------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _disk_error(e: OSError, path: Path) -> DiskFullError:
    """The DiskFullError, naming the folder, of a write that failed for lack of space."""
    what = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file-size limit (ulimit -f) is reached"}[e.errno]
    return DiskFullError(
        f"could not write {path}: {what} that holds {path.parent}. Nothing was lost: every file of the run keeps "
        f"its last complete version. Free some space there, or train into another folder (--out, or root= in "
        f"Python), then run the same command again: the run resumes from its last checkpoint")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temp file, fsync it, rename it over ``path``, fsync the directory.
    A failed write removes the temp file; a full disk raises :class:`DiskFullError`."""
    tmp = _tmp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise _disk_error(e, path) from e
        raise
    _test_fault_hook(_FAULT_POINTS.get(path.name, "write"))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _dumps(obj: Any, **kw: Any) -> str:
    """json.dumps that writes a non-finite float as null (never a bare NaN, which is not JSON)."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kw)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (_dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save into memory, then :func:`atomic_write_bytes` (so a full disk is an OSError here,
    not the zip writer's "unexpected pos" error)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines of a JSON-lines file; a torn (unparsable) last line is ignored."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise RunError(f"{path} is corrupted (not text); delete the run directory to retrain it") from None
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise json.JSONDecodeError("not a JSON object", line, 0)
            out.append(row)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn last line from a killed writer
            raise RunError(f"{path}: line {i + 1} is corrupted; delete the run directory to retrain it")
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace the file by ``rows`` (atomically)."""
    atomic_write_bytes(path, "".join(_dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row, holding an exclusive lock on the file: concurrent writers (two processes
    evaluating one run) lose no row. A torn last line (a writer killed mid-row) is cut off first;
    a failed write (full disk) is cut off again, so the file only ever ends with a complete row."""
    line = (_dumps(row, sort_keys=True) + "\n").encode()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                continue  # replaced (write_jsonl) or removed while we waited: append to the new file
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                size = os.pread(fd, size, 0).rfind(b"\n") + 1  # drop the torn last line
                os.ftruncate(fd, size)
            try:
                half = len(line) // 2
                _write_all(fd, line[:half])
                if os.environ.get(FAULT_ENV):  # test-only: a kill here leaves a torn last line
                    os.fsync(fd)
                    _test_fault_hook(_FAULT_POINTS.get(path.name, "write"))
                _write_all(fd, line[half:])
                os.fsync(fd)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                if e.errno in _DISK_FULL:
                    raise _disk_error(e, path) from e
                raise
            return
        finally:
            os.close(fd)  # releases the lock


# -- provenance ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def git_commit() -> dict[str, Any]:
    """The commit of the code this process runs (read once, when first asked: a long training
    process keeps reporting the code it loaded, not later edits of the working tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "lvae"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": None, "git_dirty": None}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- a stored run --------------------------------------------------------------------------------
def _read_json(path: Path, fix: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is corrupted ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path} is corrupted (not a JSON object); {fix}")
    return obj


def _lock_held(path: Path) -> bool:
    """Whether a live process holds the training lock of run directory ``path`` (probe only)."""
    try:
        fd = os.open(path / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class Run:
    """A run directory of the registry (read side).

    For numbers that go into the book use :meth:`result` / :meth:`result_text`: they refuse a
    failed or unfinished run. :meth:`last` and :meth:`metrics` are the raw log (learning curves).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise RunError(f"{self.path} is not a run directory (no config.json); list runs with `lvae runs`")
        stored = _read_json(self.path / "config.json", "delete the run directory to retrain it")
        version = stored.get("format_version")
        if version != FORMAT_VERSION:
            raise RunError(
                f"{self.path} was written by an incompatible lvae (format_version {version}, this lvae reads "
                f"{FORMAT_VERSION}); move it away or delete it to retrain"
            )
        try:
            self.config = RunConfig.from_dict(stored["run"])
            self.eval_config = EvalConfig(**stored.get("eval", {}))
        except (KeyError, TypeError, ConfigError) as e:
            raise RunError(f"{self.path / 'config.json'} does not describe a valid run ({type(e).__name__}: {e}); "
                           f"delete the run directory to retrain it") from None

    def __repr__(self) -> str:
        try:
            epochs = self.epochs
        except RunError:  # provenance.json unreadable: status says "damaged"
            epochs = "?"
        return f"Run({self.path.name!r}, epochs={epochs}, status={self.status!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def provenance(self) -> dict[str, Any]:
        p = self.path / "provenance.json"
        if not p.exists():
            return {}
        return _read_json(p, f"delete it (the run resumes from its {CHECKPOINT}) or delete the run directory")

    @property
    def status(self) -> str:
        """complete | partial | running | interrupted (its process died) | failed | damaged | unknown."""
        if self.damage() is not None:
            return "damaged"
        status = self.provenance.get("status", "unknown")
        if status == "running" and not _lock_held(self.path):
            return "interrupted"
        return status

    def damage(self) -> str | None:
        """What is wrong with the stored record, with the fix, or None: provenance.json or a line of
        metrics.jsonl is unreadable, or metrics.jsonl lost rows (deleted, truncated): it has fewer
        rows than the run recorded, or a complete run lacks the evaluation of its final epoch."""
        try:
            prov = self.provenance
            rows = self.metrics()
        except RunError as e:
            return str(e)
        metrics = self.path / "metrics.jsonl"
        fix = (f"restore it from a copy (for a committed run: git checkout -- {metrics}) or delete the run "
               f"directory to retrain it")
        recorded = prov.get("metrics_rows")
        if isinstance(recorded, int) and len(rows) < recorded:
            have = f"has {len(rows)} rows" if metrics.exists() else "is missing"
            return f"{metrics} {have}, but the run recorded {recorded}: its history is lost; {fix}"
        epochs = prov.get("epochs", 0)
        if prov.get("status") == "complete" and epochs and not any(r.get("epoch") == epochs for r in rows):
            have = "lacks" if metrics.exists() else "is missing, with"
            return f"{metrics} {have} the evaluation of the final epoch {epochs}: its history is lost; {fix}"
        return None

    @property
    def ok(self) -> bool:
        """Whether the run finished its target epochs (its numbers may be reported)."""
        return self.status == "complete"

    @property
    def error(self) -> str | None:
        """Why a failed run failed, or what is damaged and the fix (None otherwise)."""
        damage = self.damage()
        if damage is not None:
            return damage
        prov = self.provenance
        return prov.get("error") if prov.get("status") == "failed" else None

    @property
    def epochs(self) -> int:
        return int(self.provenance.get("epochs", 0))

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    def last(self, key: str) -> Any:
        """The latest evaluation's value of ``key`` (None if never measured), whatever the status:
        for learning curves and progress; report results with :meth:`result`."""
        for row in reversed(self.metrics()):
            if key in row:
                return row[key]
        return None

    def result(self, key: str) -> Any:
        """The final value of ``key`` of a complete run (None if it was never measured).

        Raises RunFailedError for a failed run and RunIncompleteError for one that is partial,
        running, interrupted or unknown, so that a failed run's number never reaches the book.
        """
        status = self.status
        if status == "failed":
            raise RunFailedError(f"{self.name} failed: {self.error}")
        if status == "damaged":
            raise RunDamagedError(f"{self.name} is damaged: {self.error}")
        if status != "complete":
            raise RunIncompleteError(f"{self.name} is {status} ({self.epochs} epochs of "
                                     f"{self.provenance.get('target_epochs', '?')}); resume it with get_or_train")
        return self.last(key)

    def result_text(self, key: str, fmt: str = "{:.2f}") -> str:
        """:meth:`result` formatted for a table: the number, or ``failed`` / ``<status>`` / ``-``."""
        try:
            value = self.result(key)
        except RunFailedError:
            return "failed"
        except RunIncompleteError:
            return self.status
        return "-" if value is None else fmt.format(value) if isinstance(value, (int, float)) else str(value)

    def summary(self) -> dict[str, Any]:
        """One row of ``lvae runs``: a failed or damaged run shows its error (with the fix), never a
        number; a non-finite number (stored by an older lvae) shows as None, never as NaN."""
        status = self.status
        try:
            epochs = self.epochs
        except RunError:  # provenance.json unreadable (the error says so)
            epochs = 0
        row: dict[str, Any] = {"name": self.name, "epochs": epochs, "status": status}
        for key in ("test_L1", "test_LK", "iw_k"):
            row[key] = None if status in ("failed", "damaged") else _finite_or_none(self.last(key))
        if status in ("failed", "damaged"):
            row["error"] = self.error
        return row

    def evals(self) -> list[dict]:
        return read_jsonl(self.path / "evals.jsonl")

    def per_image(self, k: int | None = None, n: int | None = None) -> dict[str, Any] | None:
        """Per-test-image values of the run's final weights, for paired comparisons between models.

        Returns ``{"test_L1": array, "test_LK": array, "k": K, "n": images covered by test_LK,
        "epoch": E, "source": file}`` from an evaluation of the final epoch that stored them
        (training's own final evaluation, or ``lvae eval``) with ``k`` importance samples (any when
        None) on exactly ``n`` test images (any when None): the one with the most images, training's
        own among equals. None when no such evaluation stored per-image values (runs made before
        they were recorded).
        """
        import numpy as np

        rows = [r for r in self._per_image_rows(k) if n is None or r.get("n_iw") == n]
        if not rows:
            return None
        row = max(rows, key=lambda r: r.get("n_iw", 0))  # stable: the first of equals, i.e. training's own
        with np.load(self.path / row["per_image"]) as f:
            out = {key: f[key] for key in f.files}
        return {**out, "k": row["iw_k"], "n": row["n_iw"], "epoch": row["epoch"], "source": row["per_image"]}

    def per_image_sizes(self, k: int) -> set[int]:
        """The test-image counts ``n`` for which :meth:`per_image` has L_``k`` values."""
        return {int(r["n_iw"]) for r in self._per_image_rows(k)}

    def _per_image_rows(self, k: int | None) -> list[dict]:
        """Evaluations of the final epoch whose per-image file exists, with ``k`` samples (any: None)."""
        return [r for r in self.metrics() + self.evals()
                if r.get("per_image") and r.get("epoch") == self.epochs and (k is None or r.get("iw_k") == k)
                and (self.path / r["per_image"]).exists()]

    def load_model(self, device: str | torch.device = "cpu") -> HierarchicalVAE:
        """The trained model in eval mode (fp32), from the full checkpoint or the fp16 weights."""
        model = build_model(self.config.model)
        ckpt, fp16 = self.path / CHECKPOINT, self.path / WEIGHTS_FP16
        if ckpt.exists():
            state = load_checkpoint(ckpt)["model"]
        elif fp16.exists():
            state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_checkpoint(fp16)["model"].items()}
        else:  # only the fp16 weights of a few models travel with the repository; checkpoints stay local
            import tempfile

            from .cli import train_command

            scratch = Path(tempfile.gettempdir()) / "lvae-retrained"  # never overwrite this run's own record
            prov = self.provenance
            epochs = self.epochs or int(prov.get("target_epochs", 0)) or 1
            took = (f" (it took {prov['wall_seconds'] / 60:.0f} min on {prov.get('device', '?')})"
                    if self.epochs and prov.get("wall_seconds") else "")
            command = train_command(self.config, epochs, self.eval_config, out=scratch)
            raise RunError(f"{self.path} has no weights ({CHECKPOINT} or {WEIGHTS_FP16}: the repository holds the "
                           f"fp16 weights of a few models only). Recreate them in a scratch registry with "
                           f"`{command}`{took} and use that run "
                           f"(e.g. `lvae eval {self.name} --out {scratch}`); in Python: lvae.get_or_train("
                           f"run.config, {epochs}, run.eval_config, root={str(scratch)!r})")
        _load_state(model, state, ckpt if ckpt.exists() else fp16)
        return model.to(device).eval()


def _digest(obj: Any) -> str:
    """SHA-256 of a (nested) checkpoint payload: tensors by dtype, shape and bytes; the rest by repr."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(b"D%d" % len(o))
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(b"L%d" % len(o))
            for v in o:
                walk(v)
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def _with_digest(payload: dict) -> dict:
    return {**payload, "digest": _digest(payload)}


def load_checkpoint(path: Path) -> dict:
    """torch.load a checkpoint / weights file and verify its digest (files without one are trusted)."""
    fix = "delete it to retrain the run (or restore it from a copy)"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise RunError(f"{path} is damaged ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(obj, dict) or "model" not in obj:
        raise RunError(f"{path} is damaged (no model state); {fix}")
    if "digest" in obj:
        stored = obj.pop("digest")
        if stored != _digest(obj):
            raise RunError(f"{path} is corrupted (its content does not match its SHA-256 digest); {fix}")
    version = obj.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise RunError(f"{path} has format_version {version}, this lvae reads {FORMAT_VERSION}; {fix}")
    return obj


def _load_state(module: Any, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} does not fit this run's model ({type(e).__name__}: {str(e)[:300]}); delete it "
                       f"to retrain the run") from None


def list_runs(root: str | os.PathLike | None = None) -> list[Run]:
    base = results_dir(root)
    if not base.exists():
        return []
    runs = []
    for d in sorted(base.iterdir()):
        if (d / "config.json").exists():
            try:
                runs.append(Run(d))
            except RunError as e:
                warnings.warn(str(e))
    return runs


def open_run(name: str | os.PathLike, root: str | os.PathLike | None = None) -> Run:
    """A run by directory path, directory name, or unique name prefix."""
    p = Path(name)
    if (p / "config.json").exists():
        return Run(p)
    base = results_dir(root)
    matches = [r for r in list_runs(base) if r.name == str(name)] or [
        r for r in list_runs(base) if r.name.startswith(str(name))
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunError(f"no run named {str(name)!r} in {base}; list them with `lvae runs`")
    raise RunError(f"{str(name)!r} matches several runs: {[r.name for r in matches]}; give the full name")


# -- training into the registry ------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(path: Path, retries: int = 5) -> Iterator[None]:
    """Hold an exclusive lock on a run directory; a second trainer gets RunLockedError (after
    ``retries`` short retries, which ride over a concurrent status probe)."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(retries + 1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if attempt == retries:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    raise RunLockedError(
                        f"{path.name} is being trained by another process (pid {holder}); wait for it to finish "
                        f"or stop it, then run again"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def save_checkpoint(path: Path, model: HierarchicalVAE, optimizer, epoch: int, pending_losses: list[float],
                     save_fp16: bool) -> None:
    atomic_torch_save(path / CHECKPOINT, _with_digest({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
        # train losses of the epochs since the last evaluation (its row averages them)
        "train_losses": list(pending_losses), "format_version": FORMAT_VERSION}))
    if save_fp16:
        half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        atomic_torch_save(path / WEIGHTS_FP16, _with_digest({"model": half, "epoch": epoch}))


def _init_from(spec: str, model: HierarchicalVAE, root: Path) -> None:
    name, _, epoch = spec.partition("@")
    parent = open_run(name, root)
    ckpt = load_checkpoint(parent.path / CHECKPOINT) if (parent.path / CHECKPOINT).exists() else None
    if ckpt is None or (epoch and int(ckpt["epoch"]) != int(epoch)):
        have = None if ckpt is None else ckpt["epoch"]
        raise RunError(f"init_from={spec!r}: {parent.name} has a checkpoint at epoch {have}; train it to "
                       f"exactly {epoch} epochs first")
    _load_state(model, ckpt["model"], parent.path / CHECKPOINT)


def _check_finite_parameters(model: HierarchicalVAE, epoch: int, n_batches: int, lr: float) -> None:
    """Non-finite gradients make parameters non-finite (one host sync per epoch)."""
    params = [p.detach() for p in model.parameters()]
    if bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    raise NonFiniteLossError(
        f"non-finite gradients at epoch {epoch + 1} (step {n_batches}, the last of the epoch, whose loss was "
        f"finite) made parameters {bad[:3]} non-finite; lower the learning rate (lr={lr}; --lr on the command "
        f"line) or check the data."
    )


def check_run_name(name: Any) -> None:
    """A run's name becomes a folder of the registry: it must be one folder name (letters, digits,
    ``. _ - + = @``; no ``/``, no ``..``, not hidden), so that no run lands outside the registry."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise ConfigError(f"run name {name!r} is not a single folder name: use letters, digits and . _ - + = @, "
                          f"starting with a letter, digit or _ (no '/', no '..'; at most 100 characters), "
                          f"e.g. --name my-run")


def _completed(path: Path, epochs: int) -> Run | None:
    """The run at ``path`` if it is complete with >= ``epochs``; refuses a damaged one (RunError)."""
    if (path / "config.json").exists():
        run = Run(path)
        damage = run.damage()
        if damage is not None:
            raise RunDamagedError(f"{run.name} is damaged: {damage}")
        if run.epochs >= epochs and run.status == "complete":
            return run
    return None


def get_or_train(config: RunConfig, epochs: int, eval_config: EvalConfig | None = None, *,
                 root: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 progress: bool = True, save_fp16: bool = True, data: datasets.ImageData | None = None,
                 stop_after: int | None = None) -> Run:
    """Return the run of ``config`` with at least ``epochs`` epochs, training or resuming as needed.

    ``stop_after`` stops (cleanly, with a checkpoint) after that many new epochs: for tests and
    for splitting long runs over sessions. Bad arguments and unavailable data are refused before
    the run directory is created. Raises RunLockedError when another process trains the run,
    RunError for a damaged or incompatible run directory (the message names the fix),
    NonFiniteLossError (DivergedError for an evaluation that is not sane; after marking the run
    failed) when training diverges, and DiskFullError when the disk is full.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be a positive integer")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ConfigError(f"stop_after={stop_after!r} must be a positive integer or None")
    if not isinstance(config, RunConfig):
        raise TypeError(f"get_or_train takes an lvae.RunConfig, got {type(config).__name__}")
    check_run_name(config.name)
    ecfg = eval_config or EvalConfig()
    base = results_dir(root)
    path = base / config.dir_name
    done = _completed(path, epochs)  # also refuses an incompatible or damaged run directory
    if done is not None:
        return done
    tcfg, mcfg = config.train, config.model
    if data is None:
        if tcfg.dataset not in datasets.DATASETS:
            raise ConfigError(f"dataset={tcfg.dataset!r} is not valid; choose one of {', '.join(datasets.DATASETS)}")
        data = datasets.load_dataset(tcfg.dataset, subset=tcfg.subset, test_subset=ecfg.test_subset,
                                     test_seed=tcfg.test_seed)
    if data.x_dim != mcfg.x_dim or data.likelihood != mcfg.likelihood:
        raise ConfigError(f"dataset {tcfg.dataset!r} has x_dim={data.x_dim}, likelihood={data.likelihood!r} but the "
                          f"model expects x_dim={mcfg.x_dim}, likelihood={mcfg.likelihood!r}; fix ModelConfig")
    dev = torch.device(device) if device is not None else default_device()
    with run_lock(path):
        done = _completed(path, epochs)  # another process may have finished it while we waited
        if done is not None:
            return done
        return _train_locked(config, epochs, ecfg, path, base, dev, progress, save_fp16, data, stop_after)


@dataclasses.dataclass
class TrainingState:
    """A run directory opened for training: its model and optimizer, restored from the checkpoint."""

    model: HierarchicalVAE
    optimizer: torch.optim.Optimizer
    start: int  # epochs already trained
    prov: dict[str, Any]  # provenance.json, to be updated and rewritten
    pending: list[float]  # train losses since the last evaluation


def open_for_training(config: RunConfig, ecfg: EvalConfig, path: Path, base: Path, dev: torch.device) -> TrainingState:
    """Prepare a locked run directory for training (shared by this module and :mod:`lvae.grid`).

    Removes temp files left by a killed writer, writes config.json, builds the model with the
    run's seed, resumes model, optimizer and pending losses from the checkpoint (or initialises
    from ``init_from``), and drops evaluations recorded after the checkpoint (they are replayed).
    Refuses a run name that is not one folder name and a damaged run directory (RunError with the fix).
    """
    tcfg = config.train
    check_run_name(config.name)
    if (path / "config.json").exists():
        damage = Run(path).damage()
        if damage is not None:
            raise RunDamagedError(f"{path.name} is damaged: {damage}")
    for tmp in path.glob(".*.tmp-*"):  # left by a process killed mid-write; we hold the lock
        if tmp.name[1:].partition(".tmp-")[0] in _LOCKED_FILES:
            tmp.unlink(missing_ok=True)
    (path / SANE_CHECKPOINT).unlink(missing_ok=True)  # left by a killed session
    atomic_write_json(path / "config.json", {"format_version": FORMAT_VERSION, "run": config.to_dict(),
                                             "eval": dataclasses.asdict(ecfg)})
    prov = Run(path).provenance

    torch.manual_seed(tcfg.seed)  # parameter initialisation
    model = build_model(config.model).to(dev)
    optimizer = make_optimizer(model, tcfg)
    start = 0
    pending: list[float] = []
    if (path / CHECKPOINT).exists():
        ckpt = load_checkpoint(path / CHECKPOINT)
        _load_state(model, ckpt["model"], path / CHECKPOINT)
        _load_state(optimizer, ckpt["optimizer"], path / CHECKPOINT)
        start = int(ckpt["epoch"])
        pending = [float(v) for v in ckpt.get("train_losses", [])]
        if start > 0:
            prov["resumes"] = int(prov.get("resumes", 0)) + 1
    elif prov.get("epochs", 0) > 0 and prov.get("status") == "complete":
        # a committed run: its metrics travel with the repository, its full checkpoint does not
        raise RunError(f"{path.name} is complete after {prov['epochs']} epochs but has no {CHECKPOINT} to resume "
                       f"from (only its metrics and fp16 weights are committed): training it further would "
                       f"retrain it from scratch over its recorded history. Train into another registry instead "
                       f"(lvae train --out DIR, or root=DIR in Python), or delete {path} to retrain it here.")
    elif prov.get("epochs", 0) > 0:
        warnings.warn(f"{path.name}: no {CHECKPOINT} to resume from (only the fp16 weights travel with the "
                      f"repository); retraining from scratch", stacklevel=4)
        prov = {}
    elif tcfg.init_from:
        _init_from(tcfg.init_from, model, base)
    # evaluations made after the checkpoint (by a process killed later) are replayed, not kept twice
    rows = [r for r in read_jsonl(path / "metrics.jsonl") if r.get("epoch", 0) <= start]
    write_jsonl(path / "metrics.jsonl", rows)
    prov["metrics_rows"] = len(rows)  # a later loss of rows shows as damage (Run.damage)
    return TrainingState(model, optimizer, start, prov, pending)


def mark_running(path: Path, prov: dict[str, Any], seed: int, dev: torch.device, start: int, epochs: int,
                 **extra: Any) -> None:
    """Record in provenance.json that this process now trains the run (status, environment, commit)."""
    prov.update({"status": "running", "pid": os.getpid(), "seed": seed, "device": device_description(dev),
                 "torch": torch.__version__, "python": sys.version.split()[0], "lvae_format": FORMAT_VERSION,
                 "epochs": start, "target_epochs": epochs, **extra, **git_commit()})
    prov.pop("error", None)
    prov.setdefault("started", _now())
    prov.setdefault("wall_seconds", 0.0)
    atomic_write_json(path / "provenance.json", prov)


def _train_locked(config, epochs, ecfg, path, base, dev, progress, save_fp16, data, stop_after) -> Run:
    tcfg = config.train
    st = open_for_training(config, ecfg, path, base, dev)
    model, optimizer, start, prov, pending = st.model, st.optimizer, st.start, st.prov, st.pending
    mark_running(path, prov, tcfg.seed, dev, start, epochs)

    from tqdm.auto import tqdm

    end = epochs if stop_after is None else min(epochs, start + stop_after)
    n_batches = datasets.num_batches(len(data.x_train), tcfg.batch_size)
    bar = tqdm(total=(end - start) * n_batches, desc=path.name, unit="step", disable=not progress, leave=False)
    steps = _FaultingProgress(bar) if os.environ.get(FAULT_ENV) else bar  # test-only, see _test_fault_hook
    history = read_jsonl(path / "metrics.jsonl")  # for evaluation_problem's "keeps getting worse"
    sane_epoch = _keep_as_sane(path, start) if (path / CHECKPOINT).exists() else None  # a failure rolls back to it
    try:
        for epoch in range(start, end):
            t0 = time.perf_counter()
            res = train_epoch(model, optimizer, data, epoch, tcfg, dev, steps)
            _check_finite_parameters(model, epoch, n_batches, res.lr)
            pending.append(res.train_loss)
            done = epoch + 1
            evaluated = done % ecfg.every == 0 or done == epochs
            if evaluated:
                with_iw = done == epochs or (ecfg.iw_every > 0 and done % ecfg.iw_every == 0)
                per_image: dict = {}
                row = {"epoch": done, "beta": res.beta, "lr": res.lr, "train_loss": sum(pending) / len(pending),
                       **evaluate(model, data, tcfg, ecfg, epoch, with_iw, dev, per_image=per_image),
                       "epoch_seconds": res.seconds}
                problem = evaluation_problem(row, history, config.model.x_dim, config.model.likelihood)
                if problem is not None:
                    raise DivergedError(f"the evaluation of epoch {done} is not sane: {problem}. Training diverged: "
                                        f"lower the learning rate (lr={res.lr}; --lr on the command line) or "
                                        f"check the data.")
                if with_iw:
                    row["per_image"] = save_per_image(path, row, per_image)
                _test_fault_hook("eval")
                # the row is written before the checkpoint of its epoch: a kill in between replays the epoch
                append_jsonl(path / "metrics.jsonl", row)
                history.append(row)
                pending = []
            save_checkpoint(path, model, optimizer, done, pending, save_fp16)
            if evaluated:
                sane_epoch = _keep_as_sane(path, done)
            prov["wall_seconds"] += time.perf_counter() - t0
            prov["epochs"] = done
            prov["metrics_rows"] = len(history)
            atomic_write_json(path / "provenance.json", prov)
            bar.set_postfix(epoch=done, loss=f"{res.train_loss:.2f}", beta=f"{res.beta:.2f}")
    except NonFiniteLossError as e:
        kept_epoch, kept = _roll_back(path, sane_epoch, save_fp16)
        error = f"{e} {kept}"
        prov.update({"status": "failed", "error": error, "finished": _now(), "epochs": kept_epoch,
                     "metrics_rows": len(history)})
        atomic_write_json(path / "provenance.json", prov)
        raise type(e)(error) from None
    except DiskFullError as e:
        (path / SANE_CHECKPOINT).unlink(missing_ok=True)  # frees its space
        prov.update({"status": "failed", "error": str(e), "finished": _now()})
        with contextlib.suppress(OSError, RunError):  # the disk may be too full for this one, too
            atomic_write_json(path / "provenance.json", prov)
        raise
    finally:
        bar.close()
        (path / SANE_CHECKPOINT).unlink(missing_ok=True)
    prov.update({"status": "complete" if prov["epochs"] >= epochs else "partial", "finished": _now()})
    atomic_write_json(path / "provenance.json", prov)
    return Run(path)


def _keep_as_sane(path: Path, epoch: int) -> int:
    """Hard-link the current checkpoint (of ``epoch``) as the one a failure rolls back to (no copy:
    the next checkpoint is a new file renamed over checkpoint.pt); returns ``epoch``."""
    ckpt, sane = path / CHECKPOINT, path / SANE_CHECKPOINT
    tmp = _tmp_path(sane)
    tmp.unlink(missing_ok=True)
    try:
        os.link(ckpt, tmp)
    except OSError as e:  # a file system without hard links: copy
        if e.errno in _DISK_FULL:
            raise _disk_error(e, sane) from e
        atomic_write_bytes(tmp, ckpt.read_bytes())
    os.replace(tmp, sane)
    return epoch


def _roll_back(path: Path, sane_epoch: int | None, save_fp16: bool) -> tuple[int, str]:
    """After a failure, make the checkpoint (and the fp16 weights) those of the last sane state of
    this session (none: a fresh run that reached no sane evaluation); returns the epoch kept and
    the sentence that says so."""
    sane = path / SANE_CHECKPOINT
    if sane_epoch is None:
        for name in (CHECKPOINT, WEIGHTS_FP16) if save_fp16 else (CHECKPOINT,):
            (path / name).unlink(missing_ok=True)
        return 0, "The run keeps no checkpoint: it reached no sane evaluation."
    if sane.exists():
        os.replace(sane, path / CHECKPOINT)
        _fsync_dir(path)
        if save_fp16:
            model = load_checkpoint(path / CHECKPOINT)["model"]
            half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.items()}
            atomic_torch_save(path / WEIGHTS_FP16, _with_digest({"model": half, "epoch": sane_epoch}))
        return sane_epoch, f"The run keeps its checkpoint of epoch {sane_epoch}, the last sane state it reached."
    epoch = int(load_checkpoint(path / CHECKPOINT)["epoch"])  # (the link vanished: keep what there is)
    return epoch, f"The run keeps its latest checkpoint, of epoch {epoch}."


def save_per_image(path: Path, row: dict, arrays: dict) -> str:
    """Store an evaluation's per-test-image values next to its metrics row; returns the file name.

    ``test_L1`` covers the row's ``n_test`` images and ``test_LK`` its first ``n_iw`` images, in
    test-set order, so two runs evaluated on the same images can be compared image by image.
    """
    import io

    import numpy as np

    name = PER_IMAGE.format(epoch=row["epoch"], k=row["iw_k"], n=row["n_iw"])
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    atomic_write_bytes(path / name, buf.getvalue())
    return name


def record_eval(run: Run, row: dict) -> None:
    """Append a stand-alone evaluation (``lvae eval``) to the run's evals.jsonl."""
    append_jsonl(run.path / "evals.jsonl", {"time": _now(), **row})


def evaluate_run(run: Run, iw_samples: int = 5000, test_subset: int | None = None, iw_chunk: int = 500,
                 device: str | torch.device | None = None, save: bool = True, progress: bool = False,
                 iw_subset: int | None = None) -> dict:
    """Evaluate a stored run's final weights (L1s, per-unit KL, L_K) and record it in evals.jsonl,
    with the per-test-image values (:func:`save_per_image`).

    L1 covers the first ``test_subset`` test images (all 10,000 when None); L_K the first
    ``iw_subset`` of those (all of them when None), whatever the run's own training-time
    evaluations used.
    """
    dev = torch.device(device) if device is not None else default_device()
    tcfg = run.config.train
    ecfg = dataclasses.replace(run.eval_config, iw_samples=iw_samples, test_subset=test_subset, iw_subset=iw_subset,
                               iw_chunk=iw_chunk)
    data = datasets.load_dataset(tcfg.dataset, subset=tcfg.subset, test_subset=test_subset, test_seed=tcfg.test_seed)
    model = run.load_model(dev)
    code = git_commit()  # the code loaded now, before the (long) evaluation
    t0 = time.perf_counter()
    per_image: dict = {}
    row = {"epoch": run.epochs,
           **evaluate(model, data, tcfg, ecfg, run.epochs - 1, True, dev, progress=progress, per_image=per_image),
           "device": device_description(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
           **code, "seconds": time.perf_counter() - t0}
    if save:
        row["per_image"] = save_per_image(run.path, row, per_image)
        record_eval(run, row)
    return _finite_or_none(row)  # as stored: an undefined number (one image's standard error) is None
