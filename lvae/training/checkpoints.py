"""A run directory opened for training: restore, checkpoints, and the roll-back to a sane state.

What the epoch loop (:mod:`lvae.training.loop`) writes into a run of the registry (:mod:`lvae.registry.runs`), and
in which order, is the reliability contract that module describes: config.json when a session
starts (:func:`open_for_training`), provenance.json when it trains (:func:`mark_running`), then per
epoch the evaluation row, the checkpoint (:func:`save_checkpoint`), the link to the last sane
checkpoint (:func:`keep_as_sane`) and provenance.json; after a failure, :func:`roll_back`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from lvae.config import EvalConfig, RunConfig
from lvae.model.checkpoint_format import format_1_state_dict
from lvae.model.network import HierarchicalVAE, build_model
from lvae.registry.runs import (_LOCKED_FILES, _PER_IMAGE_FILE, CHECKPOINT, FORMAT_VERSION, SANE_CHECKPOINT,
                                WEIGHTS_FP16, Run, RunDamagedError, _load_state, _with_digest, check_run_name,
                                load_checkpoint, open_run)
from lvae.registry.storage import (_DISK_FULL, RunError, _disk_error, _fsync_dir, _now, _tmp_path, atomic_torch_save,
                                   atomic_write_bytes, atomic_write_json, cpu_model, device_description, git_commit,
                                   read_jsonl, write_jsonl)
from lvae.training.step import make_optimizer


@dataclasses.dataclass
class TrainingState:
    """A run directory opened for training: its model and optimizer, restored from the checkpoint."""

    model: HierarchicalVAE
    optimizer: torch.optim.Optimizer
    start: int  # epochs already trained
    prov: dict[str, Any]  # provenance.json, to be updated and rewritten
    pending: list[float]  # train losses since the last evaluation


def completed(path: Path, epochs: int) -> Run | None:
    """The run at ``path`` if it is complete with >= ``epochs`` and every file it reports agrees
    with its last epoch; refuses a damaged one (RunError). A run whose fp16 weights are not those of
    its checkpoint (a kill or a full disk between the two writes) is not complete: resuming it
    (:func:`open_for_training`) rewrites them."""
    if (path / "config.json").exists():
        run = Run(path)
        damage = run._damage(resumable=(path / CHECKPOINT).exists())
        if damage is not None:
            raise RunDamagedError(f"{run.name} is damaged: {damage}")
        if run.epochs >= epochs and run.status == "complete" and not _stale_fp16(path, run.epochs):
            return run
    return None


def _fp16_epoch(path: Path) -> int | None:
    """The epoch model-fp16.pt records (None: no such file, or unreadable)."""
    if not (path / WEIGHTS_FP16).exists():
        return None
    try:
        epoch = load_checkpoint(path / WEIGHTS_FP16).get("epoch")
    except RunError:
        return None
    return epoch if isinstance(epoch, int) else None


def _stale_fp16(path: Path, epoch: int) -> bool:
    """Whether the run keeps a checkpoint and fp16 weights of another epoch than ``epoch`` (or unreadable)."""
    return (path / CHECKPOINT).exists() and (path / WEIGHTS_FP16).exists() and _fp16_epoch(path) != epoch


def _sweep_temp_files(path: Path) -> None:
    """Remove the temp files a killed writer left: those of the files only the lock holder writes,
    and per-image files whose writer is dead (`lvae eval` writes them without the lock)."""
    for tmp in path.glob(".*.tmp-*"):
        target, _, pid = tmp.name[1:].rpartition(".tmp-")
        if target in _LOCKED_FILES or (_PER_IMAGE_FILE.fullmatch(target) and not _alive(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # (no permission to signal it: it exists)
        return True
    return True


def check_init_from(spec: str, root: Path) -> dict:
    """The checkpoint that ``init_from=spec`` (``"<run>@<epoch>"``) starts from, or RunError naming the fix:
    no such run, no checkpoint, or one of another epoch. Creates nothing."""
    name, _, epoch = spec.partition("@")
    parent = open_run(name, root)
    ckpt = load_checkpoint(parent.path / CHECKPOINT) if (parent.path / CHECKPOINT).exists() else None
    if ckpt is None or (epoch and int(ckpt["epoch"]) != int(epoch)):
        have = "no checkpoint" if ckpt is None else f"a checkpoint at epoch {ckpt['epoch']}"
        want = f"exactly {epoch} epochs" if epoch else "some epochs"
        raise RunError(f"init_from={spec!r}: {parent.name} has {have}; train it to {want} first (its "
                       f"{CHECKPOINT} stays where it was trained), or give --init-from RUN@EPOCH of a run that has")
    return ckpt


def open_for_training(config: RunConfig, ecfg: EvalConfig, path: Path, base: Path, dev: torch.device,
                      capturable: bool = False) -> TrainingState:
    """Prepare a locked run directory for training.

    Removes temp files left by a killed writer, writes config.json, builds the model with the
    run's seed, resumes model, optimizer and pending losses from the checkpoint (or initialises
    from ``init_from``), and drops evaluations recorded after the checkpoint (they are replayed).
    Refuses a run name that is not one folder name and a damaged run directory (RunError with the fix).
    ``capturable``: an optimizer for a step captured as a CUDA graph (:func:`lvae.training.step.make_optimizer`).
    """
    tcfg = config.train
    check_run_name(config.name)
    # every check (and every file read) comes before the first write: a refused session changes nothing
    has_ckpt = (path / CHECKPOINT).exists()
    prov: dict[str, Any] = {}
    if (path / "config.json").exists():
        run = Run(path)
        damage = run._damage(resumable=has_ckpt)  # a missing provenance.json is written anew below
        if damage is not None:
            raise RunDamagedError(f"{path.name} is damaged: {damage}")
        prov = run.provenance
    ckpt = parent = None
    if has_ckpt:
        ckpt = load_checkpoint(path / CHECKPOINT)
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
        parent = check_init_from(tcfg.init_from, base)

    _sweep_temp_files(path)  # left by a process killed mid-write; we hold the lock
    (path / SANE_CHECKPOINT).unlink(missing_ok=True)  # left by a killed session
    atomic_write_json(path / "config.json", {"format_version": FORMAT_VERSION, "run": config.to_dict(),
                                             "eval": dataclasses.asdict(ecfg)})

    torch.manual_seed(tcfg.seed)  # parameter initialisation
    model = build_model(config.model).to(dev)
    optimizer = make_optimizer(model, tcfg, capturable)
    start = 0
    pending: list[float] = []
    if ckpt is not None:
        _load_state(model, ckpt["model"], path / CHECKPOINT)
        _load_state(optimizer, ckpt["optimizer"], path / CHECKPOINT)
        start = int(ckpt["epoch"])
        pending = [float(v) for v in ckpt.get("train_losses", [])]
        if start > 0:
            prov["resumes"] = int(prov.get("resumes", 0)) + 1
        if (path / WEIGHTS_FP16).exists() and _fp16_epoch(path) != start:
            # killed (or out of space) between the fp16 weights and the checkpoint: the checkpoint decides
            save_fp16_weights(path, ckpt["model"], start)
    elif parent is not None:
        _load_state(model, parent["model"], Path(tcfg.init_from))
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
    # one record per process that trained the run: a resume on another CPU or at another thread
    # count is valid but not bit-identical to an uninterrupted run, so the record says where each part ran
    prov.setdefault("sessions", []).append({"started": _now(), "from_epoch": start, "cpu": cpu_model(),
                                            "threads": torch.get_num_threads(), "pid": os.getpid(),
                                            "git_commit": git_commit()["git_commit"]})
    prov.setdefault("started", _now())
    prov.setdefault("wall_seconds", 0.0)
    atomic_write_json(path / "provenance.json", prov)


def save_checkpoint(path: Path, model: HierarchicalVAE, optimizer, epoch: int, pending_losses: list[float],
                    save_fp16: bool) -> None:
    """checkpoint.pt (model, optimizer, epoch, pending train losses) and, with ``save_fp16``, model-fp16.pt.

    The weights are stored under ``lvae_format`` 1's keys (:func:`lvae.model.checkpoint_format.format_1_state_dict`),
    so every stored run, old or new, has one layout that any lvae of this format reads."""
    state = format_1_state_dict(model.state_dict(), model.config.inference == "ladder")
    if save_fp16:  # first: a checkpoint of epoch E means that the fp16 weights of E were written
        save_fp16_weights(path, state, epoch)
    atomic_torch_save(path / CHECKPOINT, _with_digest({
        "model": state, "optimizer": optimizer.state_dict(), "epoch": epoch,
        # train losses of the epochs since the last evaluation (its row averages them)
        "train_losses": list(pending_losses), "format_version": FORMAT_VERSION}))


def save_fp16_weights(path: Path, state: dict, epoch: int) -> None:
    """model-fp16.pt: the fp16 copy of the weights ``state`` of ``epoch``, which it records."""
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    atomic_torch_save(path / WEIGHTS_FP16, _with_digest({"model": half, "epoch": epoch}))


def init_from(spec: str, model: HierarchicalVAE, root: Path) -> None:
    """Load the weights of ``"<run>@<epoch>"`` (finetuning: ``TrainConfig.init_from``) into ``model``."""
    _load_state(model, check_init_from(spec, root)["model"], Path(spec))


def keep_as_sane(path: Path, epoch: int) -> int:
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


def roll_back(path: Path, sane_epoch: int | None, save_fp16: bool) -> tuple[int, str]:
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
            save_fp16_weights(path, load_checkpoint(path / CHECKPOINT)["model"], sane_epoch)
        return sane_epoch, f"The run keeps its checkpoint of epoch {sane_epoch}, the last sane state it reached."
    epoch = int(load_checkpoint(path / CHECKPOINT)["epoch"])  # (the link vanished: keep what there is)
    return epoch, f"The run keeps its latest checkpoint, of epoch {epoch}."
