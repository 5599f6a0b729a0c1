"""How a run's configuration is spelled on the ``lvae`` command line: the option of each config
field, a value as it is typed, and the ``lvae train`` command that recreates a given run (the
profile's short form when a profile of lvae/registry/profiles.yml makes it). The CLI parses with these
names; error messages anywhere in the library quote the commands they build.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any

from lvae.config import ConfigError, EvalConfig, RunConfig
from lvae.registry.experiments import DEPTHS, VARIANTS, run_config
from lvae.registry.profiles import available, experiment, load_profile


def opt(name: str) -> str:
    return "--" + name.replace("_", "-")


# evaluation fields whose option has no ``--eval-`` prefix: spelled as ``lvae eval`` spells them
# (``--iw-k``); the prefixed spelling (``--eval-iw-k``) still parses, as a hidden alias
UNPREFIXED_EVAL_FIELDS = ("iw_k",)


def option_name(section: str, field: str) -> str:
    """The ``lvae train`` option of config field ``field`` of ``section`` (model | train | eval):
    ``--field-name``, with ``--eval-`` before an evaluation field (but ``--iw-k``, as in ``lvae eval``)."""
    return opt("eval_" + field) if section == "eval" and field not in UNPREFIXED_EVAL_FIELDS else opt(field)


def option_aliases(section: str, field: str) -> list[str]:
    """Older spellings of the option of ``field`` that still parse (hidden from ``-h``): ``--eval-iw-k``."""
    return [opt("eval_" + field)] if section == "eval" and field in UNPREFIXED_EVAL_FIELDS else []


def cli_value(value: Any) -> str:
    """``value`` as it is typed on the command line (the inverse of the option converters)."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def option_args(section: str, field: str, value: Any) -> list[str]:
    opt = option_name(section, field)
    if isinstance(value, bool):
        return [opt if value else "--no-" + opt[2:]]
    return [opt, cli_value(value)]


def train_command(config: RunConfig, epochs: int, eval_config: EvalConfig | None = None,
                  out: str | os.PathLike | None = None) -> str:
    """The ``lvae train`` command that trains exactly ``config`` (same name and run key) for
    ``epochs`` epochs: ``--profile P --variant V --depth D [--seed S]`` when a profile of
    lvae/registry/profiles.yml makes this run, else the variant and depth with every differing option.
    ``eval_config`` adds the ``--eval-*`` options that differ from the profile's (or the defaults)."""
    tail = [] if out is None else ["--out", str(out)]
    depth = config.model.n_layers
    for name in available() if depth in DEPTHS else ():
        try:
            p = load_profile(name)
        except ConfigError:
            continue
        seed = None if config.train.seed == p.seeds[0] else config.train.seed
        for variant in VARIANTS:
            try:
                cfg, ecfg = experiment(p, variant, depth, seed)
            except (ConfigError, TypeError, ValueError):
                continue
            if dataclasses.replace(cfg, name=config.name) != config:
                continue
            args = ["lvae", "train", "--profile", name, "--variant", variant, "--depth", str(depth)]
            args += [] if seed is None else ["--seed", str(seed)]
            args += [] if cfg.name == config.name else ["--name", config.name]
            args += [] if epochs == p.epochs else ["--epochs", str(epochs)]
            return shlex.join(args + eval_args(eval_config, ecfg) + tail)
    variant = min(VARIANTS, key=lambda v: (VARIANTS[v]["inference"] != config.model.inference,
                                           VARIANTS[v]["batch_norm"] != config.model.batch_norm,
                                           VARIANTS[v]["warmup"] != (config.train.warmup_epochs > 0)))
    base_depth = min(depth, max(DEPTHS))
    base = run_config(variant, base_depth, dataset=config.train.dataset)
    args = ["lvae", "train", "--variant", variant, "--depth", str(base_depth), "--epochs", str(epochs)]
    for section in ("model", "train"):
        ours, theirs = getattr(config, section), getattr(base, section)
        for f in dataclasses.fields(ours):
            value = getattr(ours, f.name)
            explicit_warmup = f.name == "warmup_epochs" and value > 0  # explicit: never refused as a trap
            if f.name != "dataset" and (value != getattr(theirs, f.name) or explicit_warmup):
                args += option_args(section, f.name, value)
    if config.train.dataset != "mnist":
        args += ["--dataset", config.train.dataset]
    if config.name != base.name:
        args += ["--name", config.name]
    return shlex.join(args + eval_args(eval_config, EvalConfig()) + tail)


def eval_args(ecfg: EvalConfig | None, base: EvalConfig) -> list[str]:
    if ecfg is None:
        return []
    return [a for f in dataclasses.fields(ecfg) if getattr(ecfg, f.name) != getattr(base, f.name)
            for a in option_args("eval", f.name, getattr(ecfg, f.name))]
