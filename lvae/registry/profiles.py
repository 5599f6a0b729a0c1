"""Execution profiles: the budgets (``smoke``, ``cpu``, ``paper``) that the book's chapters run with.

A profile names a dataset, the depths and variants of the Fig 3 grid, epochs, warm-up, seeds, the
evaluation budget and its trainer (``single``: a chapter trains a missing run by itself; ``grid``:
every missing model of the grid at once, stacked, with :func:`lvae.training.grid.train_grid`).
:func:`experiment` turns a profile + variant + depth into the exact :class:`~lvae.config.RunConfig`
and :class:`~lvae.config.EvalConfig`, and :mod:`lvae.training.profile_runs` finds or trains it in the registry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from lvae.config import ConfigError, EvalConfig, RunConfig, TrainConfig
from lvae.registry.experiments import DEPTHS, FIG3_VARIANTS, VARIANTS, run_config

PROFILE_FILE_ENV = "LVAE_PROFILES"
_KEYS = {"description", "dataset", "subset", "epochs", "warmup_epochs", "depths", "variants", "seeds",
         "eval_every", "eval_train_subset", "test_subset", "iw_k", "iw_every", "iw_subset", "keep_weights", "train", "trainer",
         "also_found", "milestones"}
TRAINERS = ("single", "grid")  # how grid_runs trains the missing runs: one by one, or stacked (lvae.training.grid)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    dataset: str
    subset: int | None
    epochs: int
    warmup_epochs: int
    depths: tuple[int, ...]
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    eval_every: int
    eval_train_subset: int | None
    test_subset: int | None
    iw_k: int
    iw_every: int
    iw_subset: int | None
    keep_weights: tuple[str, ...]
    train: tuple[tuple[str, Any], ...] = ()  # TrainConfig overrides, e.g. (("precision", "bf16"),)
    trainer: str = "single"  # one of TRAINERS
    # TrainConfig overrides under which a cell's run also counts as this profile's: the same protocol
    # with another implementation of the step, e.g. ((("compile", True),),) for the CPU long runs
    also_found: tuple[tuple[tuple[str, Any], ...], ...] = ()
    # epochs on the way (the last: ``epochs``) at which the book reads this profile's runs as budgets of
    # their own, each run as it stood then (lvae.report.budgets.budget_runs); empty: the profile's epochs only
    milestones: tuple[int, ...] = ()

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def budget(self, epochs: int | None = None, step: str | None = None, n_iw: int | None = None,
               seeds: Sequence[int] | None = None) -> str:
        """One sentence stating the budget, for captions next to our numbers: training length (at
        ``epochs`` when the runs are read before the profile's end), data, seeds, the training step's
        precision and compilation (``step``: as the runs record it, e.g. "fp32, compiled"), and the
        L_K evaluation (``n_iw``: the test images the runs' L_K covers, when known); ``seeds``: those of
        the runs read (default: the profile's), e.g. the one seed that went on to a later milestone."""
        n_train = "all 60,000" if self.subset is None else f"{self.subset:,}"
        n_iw = f"{n_iw:,}" if n_iw is not None else \
            "all" if self.iw_subset is None and self.test_subset is None else f"{self.iw_subset or self.test_subset:,}"
        train = dict(self.train)
        step = f"{step} training step" if step is not None else \
            f"{train.get('precision', 'fp32')} training step{', compiled' if train.get('compile') else ''}"
        at = f"{self.epochs} epochs" if epochs is None or epochs == self.epochs else f"{epochs} of {self.epochs} epochs"
        seeds = ", ".join(map(str, self.seeds if seeds is None else seeds))
        return (f"profile '{self.name}': {at} (warm-up {self.warmup_epochs}) on {n_train} training "
                f"images, seed(s) {seeds}, {step}, L_{self.iw_k} on {n_iw} test images")


def _profile_file() -> Path:
    if os.environ.get(PROFILE_FILE_ENV):
        return Path(os.environ[PROFILE_FILE_ENV])
    return Path(str(resources.files("lvae.registry") / "profiles.yml"))


def available() -> list[str]:
    return list(yaml.safe_load(_profile_file().read_text()))


def load_profile(name: str) -> Profile:
    """The profile ``name`` from profiles.yml; unknown names and keys are refused with the valid ones."""
    table = yaml.safe_load(_profile_file().read_text())
    if name not in table:
        raise ConfigError(f"unknown profile {name!r}; choose one of {sorted(table)} (defined in {_profile_file()})")
    raw: dict[str, Any] = table[name]
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"profile {name!r} has unknown keys {sorted(unknown)}; valid keys: {sorted(_KEYS)}")
    bad = [v for v in raw.get("variants", ()) if v not in VARIANTS]
    if bad:
        raise ConfigError(f"profile {name!r}: unknown variants {bad}; choose from {sorted(VARIANTS)}")
    if raw.get("trainer", TRAINERS[0]) not in TRAINERS:
        raise ConfigError(f"profile {name!r}: trainer {raw['trainer']!r} is not one of {list(TRAINERS)}")
    raw = {**defaults(), **raw}
    return Profile(
        name=name, description=raw["description"], dataset=raw["dataset"],
        subset=raw["subset"], epochs=int(raw["epochs"]), warmup_epochs=int(raw["warmup_epochs"]),
        depths=tuple(raw["depths"]), variants=tuple(raw["variants"]),
        seeds=tuple(raw["seeds"]), eval_every=int(raw["eval_every"]),
        eval_train_subset=raw["eval_train_subset"], test_subset=raw["test_subset"],
        iw_k=int(raw["iw_k"]), iw_every=int(raw["iw_every"]),
        iw_subset=raw["iw_subset"], keep_weights=tuple(raw["keep_weights"]),
        train=tuple(sorted((raw["train"] or {}).items())), trainer=raw["trainer"],
        also_found=tuple(tuple(sorted(d.items())) for d in raw["also_found"] or ()),
        milestones=tuple(int(e) for e in raw["milestones"] or ()),
    )


def defaults() -> dict[str, Any]:
    """What a profile that omits a key gets: for a config field, the config's own default
    (:mod:`lvae.config` is the one source: e.g. the paper's warm-up ``TrainConfig().warmup_epochs`` and
    ``EvalConfig().iw_k``); ``epochs`` has none (a profile must give it)."""
    t, e = TrainConfig(), EvalConfig()
    return {"description": "", "dataset": t.dataset, "subset": t.subset, "warmup_epochs": t.warmup_epochs,
            "depths": DEPTHS, "variants": FIG3_VARIANTS, "seeds": (t.seed,), "eval_every": e.every,
            "eval_train_subset": e.train_subset, "test_subset": e.test_subset, "iw_k": e.iw_k,
            "iw_every": e.iw_every, "iw_subset": e.iw_subset, "keep_weights": (), "train": None,
            "trainer": TRAINERS[0], "also_found": None,
            "milestones": None}


def experiment(profile: Profile | str, variant: str, depth: int, seed: int | None = None,
               **train_overrides: Any) -> tuple[RunConfig, EvalConfig]:
    """The (RunConfig, EvalConfig) of one model of the profile's grid."""
    p = load_profile(profile) if isinstance(profile, str) else profile
    seed = p.seeds[0] if seed is None else seed
    overrides = {"subset": p.subset, "seed": seed, **dict(p.train), **train_overrides}
    cfg = run_config(variant, depth, dataset=p.dataset, warmup_epochs=p.warmup_epochs, **overrides)
    if seed != 0:
        cfg = RunConfig(name=f"{cfg.name}-s{seed}", model=cfg.model, train=cfg.train)
    ecfg = EvalConfig(every=p.eval_every, iw_k=p.iw_k, iw_every=p.iw_every, test_subset=p.test_subset,
                      iw_subset=p.iw_subset, train_subset=p.eval_train_subset)
    return cfg, ecfg


def profile_grid(profile: Profile | str, seeds: Sequence[int] | None = None, **train_overrides: Any):
    """(configs, eval configs, keep-fp16 flags, epochs) of a profile's whole Fig-3 grid (every seed),
    exactly the runs that :func:`lvae.training.profile_runs.get_run` would train one by one."""
    p = load_profile(profile) if isinstance(profile, str) else profile
    cfgs, ecfgs, keep = [], [], []
    for s in (seeds or p.seeds):
        for v in p.variants:
            for d in p.depths:
                c, e = experiment(p, v, d, s, **train_overrides)
                cfgs.append(c)
                ecfgs.append(e)
                keep.append(v in p.keep_weights and d == p.max_depth)
    return cfgs, ecfgs, keep, p.epochs


