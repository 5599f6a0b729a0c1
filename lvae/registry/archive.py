"""Moving runs between machines: ``lvae runs export`` and ``lvae runs import``.

An archive is a tar file (``.tar``, or gzip-compressed ``.tar.gz`` / ``.tgz``) that holds
``manifest.json`` and, for every run, ``<run-dir-name>/<file>``. The manifest records the archive
format, the lvae version and its run format, the git commit of the exporting code and, per run,
its config hash (the suffix of its folder name), status, epochs, provenance and the size and
SHA-256 of every file.

Export leaves out ``checkpoint.pt`` (fp32 weights and Adam state, for resuming; the largest file)
unless ``with_checkpoint``; it keeps ``model-fp16.pt``, the metrics, evaluations and per-image
values. Import extracts into a hidden folder inside the destination registry, verifies everything
there (paths, sizes, SHA-256, the config hash against the folder name, the weights' digests, the
run's status) and only then renames each run into place, so a refused import leaves nothing
behind. A run already present with identical files is left as it is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from lvae import __version__
from lvae.config import ConfigError
from lvae.registry.runs import (CHECKPOINT, FORMAT_VERSION, MILESTONE_WEIGHTS, SANE_CHECKPOINT, WEIGHTS_FP16, Run,
                                check_run_name, load_checkpoint, open_run, results_dir)
from lvae.registry.storage import RunError, check_writable, git_commit

ARCHIVE_FORMAT = 1
MANIFEST = "manifest.json"
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,199}")  # a plain, visible file name
_CHUNK = 1 << 20


class ArchiveError(RunError):
    """An archive that cannot be written or imported; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Imported:
    """One run of an archive after :func:`import_runs`."""

    name: str  # the run's folder name
    path: Path  # where it lives in the destination registry
    status: str  # complete | partial | interrupted | failed | unknown
    epochs: int
    identical: bool  # it was already there with the same files: nothing was written


# -- export --------------------------------------------------------------------------------------
def run_files(run: Run, with_checkpoint: bool = False) -> list[Path]:
    """The files of ``run`` an archive carries: every visible regular file but ``checkpoint.pt``
    (unless ``with_checkpoint``) and the temporary rollback checkpoint."""
    skip = {SANE_CHECKPOINT} | (set() if with_checkpoint else {CHECKPOINT})
    return sorted(p for p in run.path.iterdir()
                  if p.is_file() and not p.is_symlink() and _FILE_NAME.fullmatch(p.name) and p.name not in skip)


def _check_exportable(run: Run, with_checkpoint: bool) -> None:
    if run.config.dir_name != run.name:
        raise ArchiveError(f"{run.path}: its config.json hashes to {run.config.dir_name}, not to its folder name "
                           f"(the folder was renamed or config.json edited); restore it (for a committed run: "
                           f"git checkout -- {run.path}) before exporting it")
    status = run.status
    if status == "damaged":
        raise ArchiveError(f"{run.name} is damaged: {run.error}")
    fp16 = run.path / WEIGHTS_FP16
    if status == "complete" and fp16.exists() and load_checkpoint(fp16).get("epoch") not in (None, run.epochs):
        raise ArchiveError(f"{run.name}: its {WEIGHTS_FP16} holds the weights of epoch "
                           f"{load_checkpoint(fp16).get('epoch')}, not those of its last epoch {run.epochs} (it was "
                           f"stopped between two writes); resume it with the command that trained it (it rewrites "
                           f"them from its {CHECKPOINT}), then export it")
    if status == "running":
        raise ArchiveError(f"{run.name} is being trained (pid {run.provenance.get('pid', '?')}); wait for it to "
                           f"finish, then export it")
    if with_checkpoint and not (run.path / CHECKPOINT).exists():
        raise ArchiveError(f"{run.name} has no {CHECKPOINT} to include (committed runs keep only their metrics and "
                           f"fp16 weights); export it without --with-checkpoint (with_checkpoint=False)")


def milestone_files(run: Run, epoch: int) -> dict[str, bytes]:
    """The files of ``run`` as it stood at ``epoch``, a milestone it went past and kept
    (``model-fp16-e<epoch>.pt``, :mod:`lvae.training.campaign`): its evaluations up to that epoch with their
    per-image values, those weights as its ``model-fp16.pt``, and its provenance at that epoch
    (complete there; ``milestone_of`` records how far the run itself had got). What it writes after
    that epoch never changes these, so the run may still be training."""
    kept = run.path / MILESTONE_WEIGHTS.format(epoch=epoch)
    if not kept.is_file():
        raise ArchiveError(f"{run.name} has no {kept.name} (kept weights of epoch {epoch}): export a milestone the "
                           f"run went past and kept (lvae.training.campaign keeps 300 and 1,000), or the finished run "
                           f"itself")
    if load_checkpoint(kept).get("epoch") != epoch:
        raise ArchiveError(f"{run.name}: {kept.name} does not hold the weights of epoch {epoch}; export it again "
                           f"once the run has rewritten it")
    rows = [r for r in run.metrics() if r.get("epoch", 0) <= epoch]
    if not rows or rows[-1].get("epoch") != epoch:
        raise ArchiveError(f"{run.name} has no evaluation at epoch {epoch}; a milestone is an evaluated epoch")
    evals = [r for r in run.evals() if r.get("epoch", 0) <= epoch]
    prov = dict(run.provenance)
    # what is known of the run at that epoch: the sessions that trained it up to there; its wall time
    # and finishing time are those of the whole run so far, kept apart
    prov["milestone_of"] = {"epochs": run.epochs, "status": run.status, "wall_seconds": prov.pop("wall_seconds", None),
                            "finished": prov.pop("finished", None)}
    prov.update({"status": "complete", "epochs": epoch, "target_epochs": epoch, "metrics_rows": len(rows),
                 "sessions": [x for x in prov.get("sessions", []) if x.get("from_epoch", 0) < epoch]})
    prov.pop("pid", None)
    out = {"config.json": (run.path / "config.json").read_bytes(),
           "provenance.json": (json.dumps(prov, indent=2, sort_keys=True) + "\n").encode(),
           "metrics.jsonl": "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode(),
           WEIGHTS_FP16: kept.read_bytes()}
    if evals:
        out["evals.jsonl"] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in evals).encode()
    # the per-image values of every evaluation up to the milestone: a committed earlier milestone's are
    # kept when this one replaces it (its budget's paired comparisons read them)
    for name in sorted({r["per_image"] for r in rows + evals if r.get("per_image")}):
        out[name] = (run.path / name).read_bytes()
    return out


def export_runs(names: Iterable[str | os.PathLike], archive: str | os.PathLike, *,
                root: str | os.PathLike | None = None, with_checkpoint: bool = False,
                at_epoch: int | None = None) -> dict[str, Any]:
    """Write the runs ``names`` (folder names, unique prefixes or paths, as :func:`lvae.registry.runs.open_run`
    takes them) of registry ``root`` into the tar file ``archive``; returns its manifest.

    The archive is written to a temp file and renamed into place. Refuses (ArchiveError, naming the
    fix) a run that is being trained, is damaged, or whose config does not hash to its folder name.
    ``at_epoch``: each run as it stood at that epoch, a milestone it went past and kept
    (:func:`milestone_files`; allowed while it trains, never with its checkpoint). Imported, such a
    run is later replaced by the same run trained further (:func:`import_runs`).
    """
    archive = _archive_path(archive)
    runs = _runs_to_export(names, root)
    if at_epoch is not None and with_checkpoint:
        raise ArchiveError("a milestone (--at-epoch) is exported without its checkpoint, which holds a later epoch; "
                           "leave out --with-checkpoint")
    entries, payloads = [], []
    now = int(datetime.now().timestamp())
    for run in runs:
        entry, members = _export_run(run, with_checkpoint, at_epoch, now)
        entries.append(entry)
        payloads += members
    manifest = {"lvae_archive": ARCHIVE_FORMAT, "lvae_version": __version__, "lvae_format": FORMAT_VERSION,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **git_commit(),
                "with_checkpoint": with_checkpoint, "runs": entries}
    _write_archive(archive, manifest, payloads)
    return manifest


def _archive_path(archive: str | os.PathLike) -> Path:
    """The archive file to write; refuses an empty name, a folder, and a folder that cannot be written to (before
    any run is read)."""
    if not str(archive).strip():
        raise ArchiveError("the archive name is empty; give the file to write, e.g. -o runs.tar")
    archive = Path(archive)
    if archive.is_dir():
        raise ArchiveError(f"{archive} is a folder; give the archive file to write, e.g. -o {archive / 'runs.tar'}")
    check_writable(archive.parent, "give -o a file in an existing, writable folder")  # before reading any run
    return archive


def _runs_to_export(names: Iterable[str | os.PathLike], root: str | os.PathLike | None) -> list[Run]:
    """The runs ``names`` of registry ``root``, each once, in the order first named; refuses none."""
    runs: dict[Path, Run] = {}
    for name in names:
        run = open_run(name, root)
        runs.setdefault(run.path.resolve(), run)
    if not runs:
        raise ArchiveError("no runs to export; name at least one (list them with `lvae runs`)")
    return list(runs.values())


def _export_run(run: Run, with_checkpoint: bool, at_epoch: int | None,
                now: int) -> tuple[dict[str, Any], list[tuple[str, bytes, int]]]:
    """The manifest entry of ``run`` and its archive members (name, bytes, mtime): its files
    (:func:`run_files`), or with ``at_epoch`` those of its milestone (:func:`milestone_files`, dated ``now``)."""
    if at_epoch is None:
        _check_exportable(run, with_checkpoint)
        contents = [(p.name, p.read_bytes(), int(p.stat().st_mtime)) for p in run_files(run, with_checkpoint)]
        status, epochs, prov = run.status, run.epochs, run.provenance
    else:
        if run.config.dir_name != run.name or run.status == "damaged":
            _check_exportable(run, False)
        snapshot = milestone_files(run, at_epoch)
        contents = [(name, data, now) for name, data in sorted(snapshot.items())]
        status, epochs, prov = "complete", at_epoch, json.loads(snapshot["provenance.json"])
    files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data, _ in contents}
    entry = {"name": run.name, "key": run.config.key, "status": status, "epochs": epochs, "provenance": prov,
             "files": files}
    return entry, [(f"{run.name}/{name}", data, mtime) for name, data, mtime in contents]


def _write_archive(archive: Path, manifest: dict[str, Any], payloads: list[tuple[str, bytes, int]]) -> None:
    """Write ``manifest.json`` and the ``payloads`` (member name, bytes, mtime) into the tar file ``archive``
    (gzip-compressed for .tar.gz / .tgz): into a temp file, synced, then renamed into place."""
    blob = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w"
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, mode, format=tarfile.PAX_FORMAT) as tar:
            for member, data, mtime in [(MANIFEST, blob, int(datetime.now().timestamp())), *payloads]:
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(data), mtime, 0o644
                tar.addfile(info, io.BytesIO(data))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, archive)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ArchiveError(f"cannot write {archive} ({e.strerror or e}); give -o a file in an existing, writable "
                           f"folder with free space") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- import --------------------------------------------------------------------------------------
_EXPORT_AGAIN = "export the runs again with `lvae runs export NAME... -o FILE` and copy the file anew"


def _safe_member(archive: Path, m: tarfile.TarInfo) -> None:
    """Refuse anything `lvae runs export` does not write: links, folders, devices, absolute paths,
    '..', hidden or odd names, more than one folder level."""
    parts = m.name.split("/")
    ok = m.isreg() and not m.name.startswith("/") and ".." not in parts and (
        parts == [MANIFEST] or (len(parts) == 2 and _is_run_name(parts[0]) and bool(_FILE_NAME.fullmatch(parts[1]))))
    if not ok:
        kind = "a file" if m.isreg() else "a link" if m.issym() or m.islnk() else "a folder" if m.isdir() else \
            "a special file"
        raise ArchiveError(f"{archive} holds {kind} at the unsafe path {m.name!r} (absolute, with '..', or not "
                           f"<run>/<file>): refusing to import it; import only archives that `lvae runs export` wrote")


def _is_run_name(name: str) -> bool:
    try:
        check_run_name(name)
    except ConfigError:
        return False
    return True


def _read_manifest(archive: Path, blob: bytes) -> dict[str, Any]:
    damaged = f"{archive} has a damaged manifest.json"
    try:
        manifest = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArchiveError(f"{damaged} (not JSON); {_EXPORT_AGAIN}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
        raise ArchiveError(f"{damaged} (no list of runs); {_EXPORT_AGAIN}")
    version = manifest.get("lvae_archive")
    if version != ARCHIVE_FORMAT:
        raise ArchiveError(f"{archive} has archive format {version!r}; this lvae ({__version__}) reads format "
                           f"{ARCHIVE_FORMAT}: import it with the lvae that exported it (pip install -e . at "
                           f"commit {manifest.get('git_commit')})")
    if manifest.get("lvae_format") != FORMAT_VERSION:
        raise ArchiveError(f"{archive} holds runs of format {manifest.get('lvae_format')!r}; this lvae reads run "
                           f"format {FORMAT_VERSION}: import it with the lvae that exported it (commit "
                           f"{manifest.get('git_commit')})")
    names = set()
    for entry in manifest["runs"]:
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and _is_run_name(entry["name"])
              and isinstance(entry.get("key"), str) and isinstance(entry.get("files"), dict)
              and all(isinstance(f, str) and _FILE_NAME.fullmatch(f) and isinstance(v, dict)
                      and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
                      for f, v in entry["files"].items()))
        if not ok or entry["name"] in names:
            raise ArchiveError(f"{damaged} (a run entry is malformed or repeated); {_EXPORT_AGAIN}")
        names.add(entry["name"])
    return manifest


def _extract(archive: Path, staging: Path) -> dict[str, Any]:
    """Check every member of ``archive``, copy the files into ``staging`` verifying size and
    SHA-256 against the manifest; returns the manifest."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            seen: set[str] = set()
            for m in members:
                _safe_member(archive, m)
                if m.name in seen:
                    raise ArchiveError(f"{archive} holds {m.name} twice; {_EXPORT_AGAIN}")
                seen.add(m.name)
            if MANIFEST not in seen:
                raise ArchiveError(f"{archive} has no {MANIFEST}: it is not an archive of `lvae runs export`; "
                                   f"{_EXPORT_AGAIN}")
            manifest = _read_manifest(archive, tar.extractfile(MANIFEST).read())
            expected = {f"{e['name']}/{f}": v for e in manifest["runs"] for f, v in e["files"].items()}
            for m in members:
                if m.name == MANIFEST:
                    continue
                if m.name not in expected:
                    raise ArchiveError(f"{archive} holds {m.name}, which its manifest does not list (the archive "
                                       f"was altered); {_EXPORT_AGAIN}")
                _copy_verified(archive, tar, m, staging / m.name, expected[m.name])
            missing = sorted(set(expected) - seen)
            if missing:
                raise ArchiveError(f"{archive} lacks {', '.join(missing)}, listed in its manifest (the archive is "
                                   f"incomplete); {_EXPORT_AGAIN}")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        detail = (str(e).strip().splitlines() or [""])[-1].lstrip("- ")  # tarfile lists every method it tried
        raise ArchiveError(f"{archive} is not a readable tar archive ({type(e).__name__}: {detail}; truncated or "
                           f"damaged in transfer); {_EXPORT_AGAIN}") from None
    return manifest


def _copy_verified(archive: Path, tar: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, meta: dict) -> None:
    dest.parent.mkdir(exist_ok=True)
    h, size = hashlib.sha256(), 0
    src = tar.extractfile(m)
    with open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if size != meta["size"] or h.hexdigest() != meta["sha256"]:
        raise ArchiveError(f"{archive}: {m.name} does not match its SHA-256 in the manifest (damaged in "
                           f"transfer); {_EXPORT_AGAIN}")


def _verify_run(path: Path, entry: dict, allow_incomplete: bool) -> Run:
    """The staged run at ``path``, refused unless it is readable, hashes to its folder name, has
    intact weights and (unless ``allow_incomplete``) is complete."""
    name = entry["name"]
    try:
        run = Run(path)
    except RunError as e:
        raise ArchiveError(f"run {name} of the archive cannot be read by this lvae: {e}") from None
    if run.config.dir_name != name or run.config.key != entry["key"]:
        raise ArchiveError(f"run {name} of the archive: its config.json hashes to {run.config.dir_name}, not to its "
                           f"folder name (the folder was renamed or config.json edited where it was exported); "
                           f"restore the run there and export it again")
    status = run.status
    if status == "damaged":
        raise ArchiveError(f"run {name} of the archive is damaged: {run.error}")
    if status != "complete" and not allow_incomplete:
        prov = run.provenance
        raise ArchiveError(f"run {name} is {status} ({run.epochs} of {prov.get('target_epochs', '?')} epochs), not "
                           f"complete: finish it where it was trained and export it again, or import it as it is "
                           f"with --allow-incomplete (allow_incomplete=True)")
    weights = sorted(path.glob("*.pt"))
    try:
        for p in weights:
            load_checkpoint(p)
        if weights:
            run.load_model()
    except RunError as e:
        raise ArchiveError(f"run {name} of the archive has damaged weights ({e}); export it again from a "
                           f"registry where `lvae eval {name}` works") from None
    return run


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _differences(dest: Path, entry: dict) -> list[str]:
    """The archived files of ``entry`` that the local run ``dest`` lacks or holds with other content."""
    return [f for f, meta in sorted(entry["files"].items())
            if not (dest / f).is_file() or _sha256(dest / f) != meta["sha256"]]


def import_runs(archive: str | os.PathLike, *, root: str | os.PathLike | None = None,
                allow_incomplete: bool = False) -> list[Imported]:
    """Add the runs of ``archive`` (written by :func:`export_runs`) to registry ``root``.

    All or nothing: the archive is extracted into a hidden folder of the registry and verified
    there; any refusal (ArchiveError, naming the fix) removes it and leaves the registry as it
    was. Refused: a damaged archive (unreadable tar, a SHA-256 or size mismatch, a missing or
    unlisted file), unsafe paths, a run whose config does not hash to its folder name, a run that
    is not complete unless ``allow_incomplete``, and a run already in the registry with different
    files, unless the archived one is that run trained further (:func:`_extends`: more epochs, the
    local evaluations as the prefix of its own), which replaces it. A run already there with
    identical files is left alone (``Imported.identical``).
    """
    archive = Path(archive)
    if not archive.is_file():
        raise ArchiveError(f"{archive} is not a file; give the archive that `lvae runs export NAME... -o FILE` wrote")
    base = results_dir(root)
    created = [p for p in (base, *base.parents) if not p.exists()]
    try:
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".lvae-import-", dir=base))
    except OSError as e:
        _remove_empty(created)
        raise ArchiveError(f"cannot write into the registry {base} ({e.strerror or e}); give a writable folder "
                           f"with --out DIR (root= in Python)") from None
    moved: list[tuple[Path, Path]] = []
    try:
        manifest = _extract(archive, staging)
        out, moves = [], []
        for entry in manifest["runs"]:
            run = _verify_run(staging / entry["name"], entry, allow_incomplete)
            dest = base / entry["name"]
            identical = dest.exists()
            if identical:
                differ = _differences(dest, entry)
                if differ and _extends(run, dest):  # the same run, trained further: it replaces the local one
                    moves.append((dest, staging / f".replaced-{entry['name']}"))
                    identical = False
                elif differ:
                    raise ArchiveError(f"{entry['name']} already exists in {base} with other contents "
                                       f"({', '.join(differ)} differ or are missing there); move that run away or "
                                       f"delete it to replace it, or import into another registry with --out DIR")
            if not identical:
                moves.append((run.path, dest))
            out.append(Imported(entry["name"], dest, run.status, run.epochs, identical))
        for src, dest in moves:
            os.rename(src, dest)  # refuses a folder created there meanwhile (unless empty)
            moved.append((src, dest))
    except BaseException as e:
        for src, dest in reversed(moved):
            os.rename(dest, src)
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        if isinstance(e, OSError):
            raise ArchiveError(f"cannot import into {base} ({e.strerror or e}); nothing was imported. Give a writable "
                               f"folder with free space with --out DIR") from None
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return out


def _extends(staged: Run, local: Path) -> bool:
    """Whether the archived run ``staged`` is the local run at ``local`` trained further: more epochs,
    the same configuration, the local evaluation rows (metrics.jsonl, evals.jsonl) as the prefix of
    its own, and every other local file but the ones that follow the last epoch (provenance.json,
    model-fp16.pt) present in it with the same bytes."""
    try:
        mine = Run(local)
        if mine.damage() is not None or staged.epochs <= mine.epochs:
            return False
        if mine.config.to_dict() != staged.config.to_dict():
            return False
        for rows in ("metrics", "evals"):
            have, new = getattr(mine, rows)(), getattr(staged, rows)()
            if new[:len(have)] != have:
                return False
    except (RunError, OSError, ValueError):
        return False
    follows_last_epoch = {"provenance.json", "config.json", "metrics.jsonl", "evals.jsonl", WEIGHTS_FP16}
    for f in local.iterdir():
        if f.name in follows_last_epoch or f.name.startswith("."):
            continue
        twin = staged.path / f.name
        if not f.is_file() or not twin.is_file() or _sha256(f) != _sha256(twin):
            return False
    return True


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders an import created (innermost first) if they are still empty."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            return
