"""The runs of a profile's grid: read from the registry, and trained when missing (one by one, or
stacked with :func:`lvae.training.grid.train_grid` when the profile's ``trainer`` is ``grid``). The chapters
import :func:`get_run`, :func:`grid_runs` and :func:`seed_runs` in their set-up cell; :func:`find_run` never
trains.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch

from lvae.registry.profiles import Profile, experiment, load_profile, profile_grid
from lvae.registry.runs import Run, results_dir, stored_run
from lvae.training.grid import train_grid
from lvae.training.loop import get_or_train
from lvae.training.step import NonFiniteLossError


def get_run(profile: Profile | str, variant: str, depth: int, seed: int | None = None, *,
            progress: bool = True, root: str | os.PathLike | None = None, **train_overrides: Any):
    """The finished run of one grid model under ``profile``, trained only if it is missing.

    A run that fails (NaN/inf) is returned with status ``failed`` rather than raising, so that a
    chapter shows it as failed (see :func:`lvae.report.run_values.final`) instead of stopping the book.
    """
    p = load_profile(profile) if isinstance(profile, str) else profile
    cfg, ecfg = experiment(p, variant, depth, seed, **train_overrides)
    if not train_overrides:  # the same cell trained with another step (Profile.also_found), when finished
        other = _also_found(p, variant, depth, seed, root)
        if other is not None and other.status == "complete" and other.epochs >= p.epochs:
            return other
    keep = variant in p.keep_weights and depth == p.max_depth and (seed is None or seed == p.seeds[0])
    try:
        return get_or_train(cfg, p.epochs, ecfg, root=root, progress=progress, save_fp16=keep)
    except NonFiniteLossError:
        return Run(results_dir(root) / cfg.dir_name)


def find_run(profile: Profile | str, variant: str, depth: int, seed: int,
             root: str | os.PathLike | None = None):
    """The registry's run of one model of ``profile``, never training it: None when it was never
    started (a partial or failed run is returned as it is, to be shown as such). Where the profile's
    own key has no run, a run of the same cell trained with one of its ``also_found`` step settings
    (e.g. the compiled step of the CPU long runs, :mod:`lvae.training.campaign`) is the cell's run."""
    p = load_profile(profile) if isinstance(profile, str) else profile
    cfg, _ = experiment(p, variant, depth, seed)
    path = results_dir(root) / cfg.dir_name
    return stored_run(path) or _also_found(p, variant, depth, seed, root)


def _also_found(p: Profile, variant: str, depth: int, seed: int | None, root) -> Run | None:
    """The first run of the cell under one of the profile's ``also_found`` step settings, or None."""
    for overrides in p.also_found:
        run = stored_run(results_dir(root) / experiment(p, variant, depth, seed, **dict(overrides))[0].dir_name)
        if run is not None:
            return run
    return None


def seed_runs(profile: Profile | str, variant: str, depth: int, *, progress: bool = True,
              root: str | os.PathLike | None = None, train_all: bool = False) -> dict[int, Any]:
    """{seed: run} of one model for every seed the profile lists.

    The profile's first seed is trained when missing (:func:`get_run`); the other seeds are read
    when the registry has them and are None otherwise (``train_all``: train them too). So a
    chapter stays as fast as one seed and shows every further seed that has been trained
    (``lvae train --profile NAME --seed S``, or imported from another machine).
    """
    p = load_profile(profile) if isinstance(profile, str) else profile
    return {s: _trained_or_found(p, variant, depth, s, train_all, progress, root) for s in p.seeds}


def grid_runs(profile: Profile | str, *, progress: bool = True, root: str | os.PathLike | None = None,
              seeds: tuple[int, ...] | None = None, train_all: bool = False) -> dict[tuple[str, int, int], Any]:
    """Every run of the profile's grid, keyed by (variant, depth, seed), for ``seeds`` (default: all the
    profile lists). As in :func:`seed_runs`, only the profile's first seed is trained when missing
    (all of ``seeds`` with ``train_all``); a further seed's missing run is None."""
    p = load_profile(profile) if isinstance(profile, str) else profile
    seeds = seeds or p.seeds
    if p.trainer == "grid":  # train every missing model at once, stacked; a failed one shows as failed below
        with contextlib.suppress(NonFiniteLossError):
            train_profile(p, seeds if train_all else seeds[:1], root=root, progress=progress)
    return {(v, d, s): _trained_or_found(p, v, d, s, train_all, progress, root)
            for s in seeds for v in p.variants for d in p.depths}


def _trained_or_found(p: Profile, variant: str, depth: int, seed: int, train_all: bool, progress: bool, root):
    """The profile's first seed (every seed with ``train_all``) trained when missing; any other seed
    read when present, else None."""
    if seed == p.seeds[0] or train_all:
        return get_run(p, variant, depth, seed, progress=progress, root=root)
    return find_run(p, variant, depth, seed, root)


def train_profile(profile: Profile | str, seeds: Sequence[int] | None = None, *,
                  root: str | os.PathLike | None = None, device: str | torch.device | None = None,
                  progress: bool = True, compile: bool = False, **train_overrides: Any) -> list[Run]:
    """Train a profile's whole grid (e.g. ``paper``: 20 models x 3 seeds) with the grid trainer
    (:func:`lvae.training.grid.train_grid`); the runs land in the registry where :func:`get_run` finds them."""
    cfgs, ecfgs, keep, epochs = profile_grid(profile, seeds, **train_overrides)
    return train_grid(cfgs, epochs, ecfgs, root=root, device=device, progress=progress, save_fp16=keep,
                      compile=compile)
