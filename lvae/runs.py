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
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from . import data as datasets
from .config import EvalConfig, RunConfig
from .models import HierarchicalVAE, build_model
from .train import NonFiniteLossError, default_device, evaluate, make_optimizer, train_epoch

RESULTS_ENV = "LVAE_RESULTS"
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
WEIGHTS_FP16 = "model-fp16.pt"


class RunError(RuntimeError):
    """A problem with a stored run; the message names the fix."""


class RunLockedError(RunError):
    """Another process is training this run."""


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


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines of a JSON-lines file; a torn (unparsable) last line is ignored."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn last line from a killed writer
            raise RunError(f"{path}: line {i + 1} is corrupted; delete the run directory to retrain it")
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def append_jsonl(path: Path, row: dict) -> None:
    rows = read_jsonl(path)  # drops a torn last line before appending
    write_jsonl(path, rows + [row])


# -- provenance ----------------------------------------------------------------------------------
def git_commit() -> dict[str, Any]:
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
class Run:
    """A run directory of the registry (read side)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise RunError(f"{self.path} is not a run directory (no config.json); list runs with `lvae runs`")
        stored = json.loads((self.path / "config.json").read_text())
        version = stored.get("format_version")
        if version != FORMAT_VERSION:
            raise RunError(
                f"{self.path} was written by an incompatible lvae (format_version {version}, this lvae reads "
                f"{FORMAT_VERSION}); move it away or delete it to retrain"
            )
        self.config = RunConfig.from_dict(stored["run"])
        self.eval_config = EvalConfig(**stored.get("eval", {}))

    def __repr__(self) -> str:
        return f"Run({self.path.name!r}, epochs={self.epochs}, status={self.status!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def provenance(self) -> dict[str, Any]:
        p = self.path / "provenance.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @property
    def status(self) -> str:
        return self.provenance.get("status", "unknown")

    @property
    def epochs(self) -> int:
        return int(self.provenance.get("epochs", 0))

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    def last(self, key: str) -> Any:
        """The latest evaluation's value of ``key`` (None if never measured)."""
        for row in reversed(self.metrics()):
            if key in row:
                return row[key]
        return None

    def evals(self) -> list[dict]:
        return read_jsonl(self.path / "evals.jsonl")

    def load_model(self, device: str | torch.device = "cpu") -> HierarchicalVAE:
        """The trained model in eval mode (fp32), from the full checkpoint or the fp16 weights."""
        model = build_model(self.config.model)
        ckpt, fp16 = self.path / CHECKPOINT, self.path / WEIGHTS_FP16
        if ckpt.exists():
            state = _load(ckpt)["model"]
        elif fp16.exists():
            state = {k: (v.float() if v.is_floating_point() else v) for k, v in _load(fp16)["model"].items()}
        else:
            raise RunError(f"{self.path} has no weights ({CHECKPOINT} or {WEIGHTS_FP16}); retrain it with get_or_train")
        model.load_state_dict(state)
        return model.to(device).eval()


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise RunError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to retrain the run") from e


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
def run_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run directory; a second trainer gets RunLockedError at once."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise RunLockedError(
                    f"{path.name} is being trained by another process (pid {holder}); wait for it to finish "
                    f"or stop it, then run again"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _save_checkpoint(path: Path, model: HierarchicalVAE, optimizer, epoch: int, save_fp16: bool) -> None:
    atomic_torch_save(path / CHECKPOINT, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "epoch": epoch, "format_version": FORMAT_VERSION})
    if save_fp16:
        half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        atomic_torch_save(path / WEIGHTS_FP16, {"model": half, "epoch": epoch})


def _init_from(spec: str, model: HierarchicalVAE, root: Path) -> None:
    name, _, epoch = spec.partition("@")
    parent = open_run(name, root)
    ckpt = _load(parent.path / CHECKPOINT) if (parent.path / CHECKPOINT).exists() else None
    if ckpt is None or (epoch and int(ckpt["epoch"]) != int(epoch)):
        have = None if ckpt is None else ckpt["epoch"]
        raise RunError(f"init_from={spec!r}: {parent.name} has a checkpoint at epoch {have}; train it to "
                       f"exactly {epoch} epochs first")
    model.load_state_dict(ckpt["model"])


def get_or_train(config: RunConfig, epochs: int, eval_config: EvalConfig | None = None, *,
                 root: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 progress: bool = True, save_fp16: bool = True, data: datasets.ImageData | None = None,
                 stop_after: int | None = None) -> Run:
    """Return the run of ``config`` with at least ``epochs`` epochs, training or resuming as needed.

    ``stop_after`` stops (cleanly, with a checkpoint) after that many new epochs: for tests and
    for splitting long runs over sessions.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    ecfg = eval_config or EvalConfig()
    base = results_dir(root)
    path = base / config.dir_name
    if (path / "config.json").exists():
        run = Run(path)
        if run.epochs >= epochs and run.status == "complete":
            return run
    dev = torch.device(device) if device is not None else default_device()
    with run_lock(path):
        return _train_locked(config, epochs, ecfg, path, base, dev, progress, save_fp16, data, stop_after)


def _train_locked(config, epochs, ecfg, path, base, dev, progress, save_fp16, data, stop_after) -> Run:
    tcfg, mcfg = config.train, config.model
    atomic_write_json(path / "config.json", {"format_version": FORMAT_VERSION, "run": config.to_dict(),
                                             "eval": dataclasses.asdict(ecfg)})
    prov = json.loads((path / "provenance.json").read_text()) if (path / "provenance.json").exists() else {}
    if data is None:
        data = datasets.load_dataset(tcfg.dataset, subset=tcfg.subset, test_subset=ecfg.test_subset,
                                     test_seed=tcfg.test_seed)
    if data.x_dim != mcfg.x_dim or data.likelihood != mcfg.likelihood:
        raise RunError(f"dataset {tcfg.dataset!r} has x_dim={data.x_dim}, likelihood={data.likelihood!r} but the "
                       f"model expects x_dim={mcfg.x_dim}, likelihood={mcfg.likelihood!r}; fix ModelConfig")

    torch.manual_seed(tcfg.seed)  # parameter initialisation
    model = build_model(mcfg).to(dev)
    optimizer = make_optimizer(model, tcfg)
    start = 0
    if (path / CHECKPOINT).exists():
        ckpt = _load(path / CHECKPOINT)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["epoch"])
    elif prov.get("epochs", 0) > 0:
        warnings.warn(f"{path.name}: no {CHECKPOINT} to resume from (only the fp16 weights travel with the "
                      f"repository); retraining from scratch", stacklevel=3)
        prov = {}
    elif tcfg.init_from:
        _init_from(tcfg.init_from, model, base)
    # evaluations made after the checkpoint (by a process killed later) are replayed, not kept twice
    write_jsonl(path / "metrics.jsonl", [r for r in read_jsonl(path / "metrics.jsonl") if r["epoch"] <= start])

    prov.update({"status": "running", "pid": os.getpid(), "seed": tcfg.seed, "device": device_description(dev),
                 "torch": torch.__version__, "python": sys.version.split()[0], "lvae_format": FORMAT_VERSION,
                 "epochs": start, "target_epochs": epochs, **git_commit()})
    prov.setdefault("started", _now())
    prov.setdefault("wall_seconds", 0.0)
    atomic_write_json(path / "provenance.json", prov)

    from tqdm.auto import tqdm

    end = epochs if stop_after is None else min(epochs, start + stop_after)
    n_batches = datasets.num_batches(len(data.x_train), tcfg.batch_size)
    bar = tqdm(total=(end - start) * n_batches, desc=path.name, unit="step", disable=not progress, leave=False)
    train_losses: list[float] = []
    try:
        for epoch in range(start, end):
            t0 = time.perf_counter()
            res = train_epoch(model, optimizer, data, epoch, tcfg, dev, bar)
            train_losses.append(res.train_loss)
            done = epoch + 1
            row = None
            if done % ecfg.every == 0 or done == epochs:
                with_iw = done == epochs or (ecfg.iw_every > 0 and done % ecfg.iw_every == 0)
                row = {"epoch": done, "beta": res.beta, "lr": res.lr,
                       "train_loss": sum(train_losses) / len(train_losses),
                       **evaluate(model, data, tcfg, ecfg, epoch, with_iw, dev)}
                train_losses = []
            _save_checkpoint(path, model, optimizer, done, save_fp16)
            if row is not None:
                row["epoch_seconds"] = res.seconds
                append_jsonl(path / "metrics.jsonl", row)
            prov["wall_seconds"] += time.perf_counter() - t0
            prov["epochs"] = done
            atomic_write_json(path / "provenance.json", prov)
            bar.set_postfix(epoch=done, loss=f"{res.train_loss:.2f}", beta=f"{res.beta:.2f}")
    except NonFiniteLossError as e:
        prov.update({"status": "failed", "error": str(e), "finished": _now()})
        atomic_write_json(path / "provenance.json", prov)
        raise
    finally:
        bar.close()
    prov.update({"status": "complete" if prov["epochs"] >= epochs else "partial", "finished": _now()})
    prov.pop("error", None)
    atomic_write_json(path / "provenance.json", prov)
    return Run(path)


def record_eval(run: Run, row: dict) -> None:
    """Append a stand-alone evaluation (``lvae eval``) to the run's evals.jsonl."""
    append_jsonl(run.path / "evals.jsonl", {"time": _now(), **row})


def evaluate_run(run: Run, iw_samples: int = 5000, test_subset: int | None = None, iw_chunk: int = 500,
                 device: str | torch.device | None = None, save: bool = True) -> dict:
    """Evaluate a stored run's final weights (L1s, per-unit KL, L_K) and record it in evals.jsonl."""
    dev = torch.device(device) if device is not None else default_device()
    tcfg = run.config.train
    ecfg = dataclasses.replace(run.eval_config, iw_samples=iw_samples, test_subset=test_subset, iw_chunk=iw_chunk)
    data = datasets.load_dataset(tcfg.dataset, subset=tcfg.subset, test_subset=test_subset, test_seed=tcfg.test_seed)
    model = run.load_model(dev)
    t0 = time.perf_counter()
    row = {"epoch": run.epochs, **evaluate(model, data, tcfg, ecfg, run.epochs - 1, True, dev),
           "device": device_description(dev), "seconds": time.perf_counter() - t0}
    if save:
        record_eval(run, row)
    return row
