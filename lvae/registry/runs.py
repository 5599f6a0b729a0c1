"""The run registry: every number the book shows comes from a run stored here.

A run is keyed by a hash of its full :class:`~lvae.config.RunConfig` and lives in
``<results>/<name>-<key>/``::

    config.json        the RunConfig (+ the EvalConfig last used, for information)
    metrics.jsonl      one JSON line per evaluation (append-only; a torn last line is ignored)
    provenance.json    status, git commit, torch version, device, seed, wall time, timestamps
    checkpoint.pt      full fp32 state (model, optimizer, epoch) for exact resume (git-ignored)
    model-fp16.pt      fp16 weights for analysis chapters (small; committed for the book)

:func:`lvae.training.loop.get_or_train` reuses a run that already has >= the requested epochs, resumes
one that has fewer from its checkpoint, and trains otherwise. Files are written atomically (temp
file, fsync, rename: :mod:`lvae.registry.storage`) and a run directory is locked while a process trains it.

Reliability contract (tests/test_faults.py kills real training processes, at points that
tests/faults.py injects, to check it):

* A process killed at any point (mid-step, mid-evaluation, between a temp file and its rename)
  leaves a run that :func:`~lvae.training.loop.get_or_train` resumes from its last checkpoint and finishes with
  bit-identical weights, optimizer state and metrics (CPU, same thread count). Evaluations
  are written *before* the checkpoint of their epoch, so a kill in between replays them.
* ``checkpoint.pt`` and ``model-fp16.pt`` carry a SHA-256 digest of their content; a damaged
  file is refused with :class:`~lvae.registry.storage.RunError` naming the fix, never silently loaded.
* NaN/inf in the loss, parameters made non-finite by non-finite gradients, or an evaluation that
  is not sane (:func:`lvae.training.step.evaluation_problem`: non-finite, a bound more than 10 times
  below the trivial model's, or a training bound that keeps getting worse after warm-up) stop
  the run with :class:`~lvae.training.step.NonFiniteLossError` (:class:`~lvae.training.step.DivergedError` for
  an evaluation) naming the epoch and the fix. The insane evaluation is not recorded; the run
  keeps the checkpoint of its last sane evaluation in that session (or the one the session
  resumed from; none for a fresh run) and is marked ``failed``. :meth:`Run.result` refuses to
  give a failed (or unfinished) run's number; :meth:`Run.result_text` renders it as ``failed``.
* A full disk (or quota, or file-size limit) stops training with :class:`~lvae.registry.storage.DiskFullError`, which
  names the folder; the temp file is removed, every stored file keeps its last complete
  version, and the run (``failed``) resumes once there is space.
* No file holds a bare ``NaN``: a non-finite number (e.g. the standard error of one image) is
  written as ``null``. Rows are appended to metrics.jsonl / evals.jsonl under a lock, so
  concurrent writers (two ``lvae eval`` of one run) lose none.
* ``Run.status`` is ``complete``, ``partial`` (stopped cleanly by ``stop_after``), ``running``
  (a live process holds the lock), ``interrupted`` (its process died), ``failed``, ``damaged``
  (a stored file is unreadable, or metrics.jsonl lost rows the run recorded: :meth:`Run.damage`
  names the fix) or ``unknown``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import torch

from lvae.config import ConfigError, EvalConfig, RunConfig, upgrade_eval_config
from lvae.model.network import HierarchicalVAE, build_model
from lvae.registry.commands import train_command
from lvae.registry.storage import (RunError, _finite_or_none, _lock_held, _now, append_jsonl, atomic_write_bytes,
                                   read_jsonl)

RESULTS_ENV = "LVAE_RESULTS"
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
WEIGHTS_FP16 = "model-fp16.pt"
MILESTONE_WEIGHTS = "model-fp16-e{epoch}.pt"  # the fp16 weights a run kept of an epoch it went past
PER_IMAGE = "per-image-e{epoch}-L{k}-n{n}.npz"  # per-test-image L1 (all test images) and L_K (the first n)
# a hard link to the checkpoint a failing session rolls back to (its last sane evaluation, or the one
# it resumed from); it exists only while a session trains (and after a kill, until the next one starts)
SANE_CHECKPOINT = "checkpoint-sane.pt"
_PER_IMAGE_FILE = re.compile(r"per-image-e\d+-L\d+-n\d+\.npz")
# files of a run directory that only the lock holder writes (its stale temp files are removed on resume)
_LOCKED_FILES = ("config.json", "provenance.json", "metrics.jsonl", CHECKPOINT, WEIGHTS_FP16, SANE_CHECKPOINT)
# a run name is one folder name: no separator, no "..", nothing hidden or option-like
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,99}")


# the fields of provenance.json that the registry reads, with their types (a wrongly typed one is damage)
_PROVENANCE_TYPES = (("status", str, "a status"), ("epochs", int, "an integer"), ("target_epochs", int, "an integer"),
                     ("metrics_rows", int, "an integer"), ("resumes", int, "an integer"),
                     ("wall_seconds", (int, float), "a number"), ("error", str, "a message"),
                     ("sessions", list, "a list"))
_PROVENANCE_REQUIRED = ("status", "epochs", "target_epochs", "metrics_rows", "wall_seconds")  # never null


class RunFailedError(RunError):
    """The run stopped with an error (e.g. NaN); it has no result to report."""


class RunIncompleteError(RunError):
    """The run has not (yet) reached its target epochs; it has no final result to report."""


class RunDamagedError(RunIncompleteError):
    """A stored file of the run is unreadable or lost rows; the message names the fix."""


COMMITTED = "results"  # the committed run registry, at the repository root


def results_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$LVAE_RESULTS``, else ``results/`` at the repository root (or cwd)."""
    if override is not None:
        return Path(override)
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    root = Path(__file__).resolve().parents[2]
    return root / "results" if (root / "pyproject.toml").exists() else Path.cwd() / "results"


def _is_repository(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and (path / "lvae" / "__init__.py").is_file()


def repository() -> Path | None:
    """The lvae repository this ``lvae`` comes from, or None.

    The source checkout lvae is imported from (an editable install, or the repository root on
    ``sys.path``); else the local folder pip installed it from, which pip records in the
    distribution's ``direct_url.json`` (PEP 610): the setup cell's ``pip install ./lvae-repo`` is a
    plain install into site-packages, and this is how a restarted Colab kernel still finds the
    clone. None when lvae was installed from a wheel, an index or a git URL.
    """
    package = Path(__file__).resolve().parents[1]
    if _is_repository(package.parent):
        return package.parent
    try:
        dist = importlib.metadata.distribution("lvae")
        if Path(str(dist.locate_file("lvae/__init__.py"))).resolve() != package / "__init__.py":
            return None  # metadata of another lvae than the one imported
        info = json.loads(dist.read_text("direct_url.json") or "null")
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        return None
    if not isinstance(info, dict) or "dir_info" not in info or not str(info.get("url", "")).startswith("file:"):
        return None
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(info["url"]).path))
    return path if _is_repository(path) else None


# -- a stored run --------------------------------------------------------------------------------
def _read_json(path: Path, fix: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is corrupted ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path} is corrupted (not a JSON object); {fix}")
    return obj


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
            self.eval_config = EvalConfig(**upgrade_eval_config(stored.get("eval", {})))
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
        fix = f"delete it (the run resumes from its {CHECKPOINT}) or delete the run directory"
        prov = _read_json(p, fix)
        for key, kinds, what in _PROVENANCE_TYPES:
            value = prov.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)) \
                    or value is None and key in prov and key in _PROVENANCE_REQUIRED:
                raise RunError(f"{p} is corrupted ({key!r} is {value!r}, not {what}); {fix}")
        if isinstance(prov.get("epochs"), int) and prov["epochs"] < 0:
            raise RunError(f"{p} is corrupted ('epochs' is {prov['epochs']}, not a count of epochs); {fix}")
        return prov

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
        metrics.jsonl is unreadable, provenance.json is missing while the run recorded evaluations,
        or metrics.jsonl lost rows (deleted, truncated): it has fewer rows than the run recorded, or a
        complete run lacks the evaluation of its final epoch."""
        return self._damage(resumable=False)

    def _damage(self, resumable: bool) -> str | None:
        """:meth:`damage`; ``resumable``: leave out a missing provenance.json, which resuming the run
        from its checkpoint writes anew (:func:`lvae.training.checkpoints.open_for_training`)."""
        try:
            prov = self.provenance
            rows = self.metrics()
        except RunError as e:
            return str(e)
        metrics = self.path / "metrics.jsonl"
        if not (self.path / "provenance.json").exists() and rows and not resumable:
            resume = (f"resume it (the same `lvae train` command: it resumes from its {CHECKPOINT} and writes "
                      f"provenance.json anew), " if (self.path / CHECKPOINT).exists() else "")
            return (f"{self.path / 'provenance.json'} is missing, but metrics.jsonl holds {len(rows)} evaluation(s): "
                    f"its status and provenance are lost; {resume}restore it from a copy (for a committed run: git "
                    f"checkout -- {self.path / 'provenance.json'}) or delete the run directory to retrain it")
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

    def weights(self) -> tuple[Path, dict]:
        """(file, its loaded payload) of the run's weights: the full checkpoint, else the fp16 weights.
        Without either, a RunError naming the command that recreates them."""
        for name in (CHECKPOINT, WEIGHTS_FP16):
            if (self.path / name).exists():
                return self.path / name, load_checkpoint(self.path / name)
        # only the fp16 weights of a few models travel with the repository; checkpoints stay local
        scratch = Path(tempfile.gettempdir()) / "lvae-retrained"  # never overwrite this run's own record
        prov = self.provenance
        epochs = self.epochs or int(prov.get("target_epochs", 0)) or 1
        took = (f" (it took {prov['wall_seconds'] / 60:.0f} min on {prov.get('device', '?')})"
                if self.epochs and prov.get("wall_seconds") else "")
        command = train_command(self.config, epochs, self.eval_config, out=scratch)
        raise RunError(f"{self.path} has no weights ({CHECKPOINT} or {WEIGHTS_FP16}: the repository holds the "
                       f"fp16 weights of a few models only). Recreate them in a scratch registry with "
                       f"`{command}`{took} and use that run "
                       f"(e.g. `lvae eval {self.name} --out {scratch}`); in Python: lvae.training.loop.get_or_train("
                       f"run.config, {epochs}, run.eval_config, root={str(scratch)!r})")

    def load_model(self, device: str | torch.device = "cpu") -> HierarchicalVAE:
        """The trained model in eval mode (fp32), from :meth:`weights` (fp16 weights cast to fp32)."""
        path, payload = self.weights()
        model = build_model(self.config.model)
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in payload["model"].items()}
        _load_state(model, state, path)
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


def stored_run(path: str | os.PathLike) -> Run | None:
    """The run stored at ``path``, or None when nothing is stored there (no ``config.json``)."""
    path = Path(path)
    return Run(path) if (path / "config.json").exists() else None


def list_runs(root: str | os.PathLike | None = None) -> list[Run]:
    """The readable runs of the registry, by name (one whose config.json cannot be read: a warning;
    :func:`registry_rows` lists it as damaged)."""
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


def registry_rows(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One :meth:`Run.summary` per run folder of the registry (``lvae runs``), by name: a run that
    cannot be read at all (config.json torn, of another format, a file in a folder's place) is a
    ``damaged`` row with the error and its fix, never a traceback and never hidden."""
    base = results_dir(root)
    if not base.exists():
        return []
    rows = []
    for d in sorted(base.iterdir()):
        if not (d / "config.json").exists():
            continue
        try:
            rows.append(Run(d).summary())
        except (RunError, OSError) as e:
            error = str(e) if isinstance(e, RunError) else (f"{d} cannot be read ({e}); restore it from a copy "
                                                            f"or delete the run directory to retrain it")
            rows.append({"name": d.name, "epochs": 0, "status": "damaged", "test_L1": None, "test_LK": None,
                         "iw_k": None, "error": error})
    return rows


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


# -- run names and evaluation records ---------------------------------------------------------
def check_run_name(name: Any) -> None:
    """A run's name becomes a folder of the registry: it must be one folder name (letters, digits,
    ``. _ - + = @``; no ``/``, no ``..``, not hidden), so that no run lands outside the registry."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise ConfigError(f"run name {name!r} is not a single folder name: use letters, digits and . _ - + = @, "
                          f"starting with a letter, digit or _ (no '/', no '..'; at most 100 characters), "
                          f"e.g. --name my-run")


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
