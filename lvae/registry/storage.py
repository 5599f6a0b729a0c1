"""Files of the run registry: atomic writes, JSON lines, the training lock, provenance.

* :func:`atomic_write_bytes` (and :func:`atomic_write_json`, :func:`atomic_torch_save`,
  :func:`write_jsonl`) writes a temp file, fsyncs it, renames it over the target and fsyncs the
  folder: a reader sees the old or the new version, never a partial file.
* :func:`append_jsonl` appends one row under an exclusive file lock and cuts off a torn last line,
  so concurrent writers lose no row; :func:`read_jsonl` ignores a torn last line.
* A full disk (or quota, or file-size limit) raises :class:`DiskFullError`, which names the folder;
  the temp file is removed and the stored file keeps its last complete version.
* No file holds a bare ``NaN``: a non-finite number is written as ``null``.
* :func:`run_lock` holds the exclusive training lock of a run directory; :func:`_lock_held` probes it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import json
import math
import os
import platform
import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class RunError(RuntimeError):
    """A problem with a stored run; the message names the fix."""


class RunLockedError(RunError):
    """Another process is training this run."""


class DiskFullError(RunError):
    """A write failed for lack of space (or quota, or the file-size limit); nothing was lost."""


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
        with contextlib.suppress(OSError):  # a read-only folder refuses the unlink too: report the first error
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise _disk_error(e, path) from e
        raise
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


def check_writable(folder: Path, fix: str) -> None:
    """Refuse, before any work, a folder this process cannot write into (a read-only file system, no
    permission): RunError ``cannot write into FOLDER (why); <fix>``. Probes with a real file."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    except OSError as e:
        raise RunError(f"cannot write into {folder} ({e.strerror or e}); {fix}") from None
    with contextlib.suppress(OSError):
        probe.unlink()


# -- JSON lines ----------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """All complete lines of a JSON-lines file; a torn (unparsable) last line is ignored."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise RunError(f"{path} is corrupted (not text); delete the run directory to retrain it") from None
    except OSError as e:  # a folder in its place, no permission to read it
        raise RunError(f"{path} cannot be read ({e.strerror or e}); restore it as a file (for a committed run: "
                       f"git checkout -- {path}) or delete the run directory to retrain it") from None
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
                _write_all(fd, line)
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


# -- the training lock of a run directory --------------------------------------------------------
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


# -- provenance ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def git_commit() -> dict[str, Any]:
    """The commit of the code this process runs (read once, when first asked: a long training
    process keeps reporting the code it loaded, not later edits of the working tree)."""
    root = Path(__file__).resolve().parents[2]
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


def short_device(device: str | None) -> str | None:
    """``device_description`` in a table cell: "cpu (x86_64, 2 threads)" -> "cpu, 2 threads"."""
    m = re.fullmatch(r"cpu \((.*), (\d+) threads\)", device or "")
    if m:
        return f"cpu, {m.group(2)} thread{'' if m.group(2) == '1' else 's'}"
    return device


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """This machine's CPU as /proc/cpuinfo names it, with the vector extensions that decide the
    numbers of a float32 step (e.g. ``"AMD EPYC 9R14 (avx512, avx512_bf16)"``)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    ext = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f in flags]
    ext = ["avx512" if f == "avx512f" else "amx" if f == "amx_tile" else f for f in ext]
    if "avx512" in ext:
        ext = [f for f in ext if f != "avx2"]
    return f"{name} ({', '.join(ext)})" if ext else name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
