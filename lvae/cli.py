"""Command line: ``lvae train``, ``lvae eval``, ``lvae runs``, ``lvae data``, ``lvae book``.

Every ModelConfig / TrainConfig / EvalConfig field is an option (``--latent-sizes 64,32``,
``--no-batch-norm``, ``--lr 1e-3`` ...). Invalid options or values are refused with a message
before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from typing import Any, Sequence

from .config import ConfigError, EvalConfig, ModelConfig, TrainConfig
from .experiments import DEPTHS, VARIANTS, run_config

_SECTIONS = (("model", ModelConfig), ("train", TrainConfig), ("eval", EvalConfig))


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_tuple(text: str, kind: type) -> tuple:
    # ints: "64,32", "64x32" or "64-32"; a minus sign after a separator or at the start stays a sign
    parts = [p for p in re.split(r"[,x]|(?<=\d)-", text) if p.strip()] if kind is int else \
        [p for p in text.split(",") if p.strip()]
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of {kind.__name__}s (e.g. 64,32,16)") from None


def _converter(hint: Any):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return lambda s: _parse_tuple(s, args[0])
    if type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        return lambda s: None if s.lower() in ("none", "null", "") else inner(s)
    return hint


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    for section, cls in _SECTIONS:
        group = parser.add_argument_group(f"{cls.__name__} fields")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dest = f"{section}.{f.name}"
            if section == "eval":
                opt = _opt("eval_" + f.name)
            else:
                opt = _opt(f.name)
            if hints[f.name] is bool:
                group.add_argument(opt, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                   help=f"default {f.default}")
            else:
                group.add_argument(opt, dest=dest, type=_converter(hints[f.name]), default=None, metavar="V",
                                   help=f"default {f.default}")


def _overrides(ns: argparse.Namespace, section: str) -> dict[str, Any]:
    prefix = section + "."
    return {k[len(prefix):]: v for k, v in vars(ns).items() if k.startswith(prefix) and v is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvae", description="Ladder VAE replication: train, evaluate, list runs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) one run into the registry")
    t.add_argument("--variant", choices=sorted(VARIANTS), default="lvae_bn_wu",
                   help="paper variant; sets inference, batch norm and warm-up (fields below override)")
    t.add_argument("--depth", type=int, choices=DEPTHS, default=5, help="number of stochastic layers")
    t.add_argument("--epochs", type=int, default=None,
                   help="train until the run has this many epochs (required unless --profile)")
    t.add_argument("--grid", choices=("fig3",), default=None,
                   help="train the whole Fig-3 grid (4 variants x depths) at once with lvae.grid (stacked models)")
    t.add_argument("--depths", default=None, help="with --grid: depths, e.g. 1,2,3 (default: 1-5)")
    t.add_argument("--profile", default=None,
                   help="with --grid: budgets, depths, variants and seeds from lvae/profiles.yml (smoke | cpu | paper)")
    t.add_argument("--name", default=None, help="run name (default: <dataset>-<variant>-<depth>)")
    t.add_argument("--out", default=None, help="results directory (default: $LVAE_RESULTS or ./results)")
    t.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_options(t)

    e = sub.add_parser("eval", help="evaluate a stored run (L1, per-unit KL, importance-weighted L_K)")
    e.add_argument("run", help="run directory, name or unique prefix")
    e.add_argument("--iw", type=int, default=5000, help="importance samples K (default 5000)")
    e.add_argument("--test-subset", type=int, default=None, help="first n test images (default: all)")
    e.add_argument("--chunk", type=int, default=500, help="importance samples per chunk")
    e.add_argument("--out", default=None)
    e.add_argument("--device", default=None)

    r = sub.add_parser("runs", help="list the run registry")
    r.add_argument("--out", default=None)
    r.add_argument("--json", action="store_true")

    d = sub.add_parser("data", help="download / verify a dataset into the cache ($LVAE_DATA)")
    d.add_argument("dataset", choices=("mnist", "omniglot", "norb"))
    d.add_argument("--path", default=None, help="local file (omniglot chardata.mat, norb .npz)")

    b = sub.add_parser("book", help="execute the book's chapters with papermill and build the HTML")
    b.add_argument("--profile", default="cpu", help="budget from lvae/profiles.yml (smoke | cpu | paper)")
    b.add_argument("--chapter", action="append", default=[], help="only this chapter (repeatable; default: all)")
    b.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="chapter parameter override, e.g. -p epochs=3 -p depths=[1,2]")
    b.add_argument("--results", default=None, help="run registry (default: results/; smoke: _build/smoke-results)")
    b.add_argument("--out", default="_build", help="build folder (default: _build)")
    b.add_argument("--no-html", action="store_true", help="execute the chapters only")
    b.add_argument("--no-strict", action="store_true", help="do not turn Sphinx warnings into errors")
    b.add_argument("--sync-notebooks", action="store_true",
                   help="only write book/*.ipynb (Colab) from book/*.md, outputs stripped, and exit")
    return p


def _train_grid(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .experiments import grid
    from .grid import profile_grid, train_grid

    train, model = _overrides(ns, "train"), _overrides(ns, "model")
    try:
        if ns.profile:
            if model:
                raise ConfigError("--profile fixes the architecture; drop the model options")
            cfgs, ecfgs, keep, epochs = profile_grid(ns.profile, **train)
            epochs = ns.epochs or epochs
        else:
            if ns.epochs is None or ns.epochs < 1:
                raise ConfigError("--grid needs --epochs N (>= 1) or --profile NAME")
            depths = tuple(int(d) for d in ns.depths.split(",")) if ns.depths else DEPTHS
            cfgs = grid(ns.grid, depths=depths, model=model or None, **train)
            ecfgs, keep, epochs = EvalConfig(**_overrides(ns, "eval")), True, ns.epochs
    except (ConfigError, TypeError, ValueError) as e:
        parser.error(str(e))
    runs = train_grid(cfgs, epochs, ecfgs, root=ns.out, device=ns.device, progress=not ns.quiet, save_fp16=keep)
    rows = []
    for run in runs:
        last = run.metrics()[-1] if run.metrics() else {}
        rows.append({"run": str(run.path), "epochs": run.epochs, "status": run.status,
                     **{k: last[k] for k in ("test_L1", "test_LK", "iw_k") if k in last}})
    print(json.dumps(rows, indent=2))
    return 0


def _train(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .runs import get_or_train

    if ns.grid or ns.profile:
        if not ns.grid:
            parser.error("--profile goes with --grid fig3")
        return _train_grid(ns, parser)
    if ns.epochs is None:
        parser.error("the following arguments are required: --epochs")

    train = _overrides(ns, "train")
    model = _overrides(ns, "model")  # --latent-sizes/--hidden-sizes override --depth's paper sizes
    try:
        cfg = run_config(ns.variant, ns.depth, model=model,
                         **{k: v for k, v in train.items() if k != "warmup_epochs"})
        if "warmup_epochs" in train:  # an explicit --warmup-epochs wins over the variant's default
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_epochs=train["warmup_epochs"]))
        if ns.name:
            cfg = dataclasses.replace(cfg, name=ns.name)
        ecfg = EvalConfig(**_overrides(ns, "eval"))
        if ns.epochs < 1:
            raise ConfigError(f"--epochs {ns.epochs} must be >= 1")
    except (ConfigError, TypeError) as e:
        parser.error(str(e))
    run = get_or_train(cfg, ns.epochs, ecfg, root=ns.out, device=ns.device, progress=not ns.quiet)
    last = run.metrics()[-1] if run.metrics() else {}
    print(json.dumps({"run": str(run.path), "epochs": run.epochs, "status": run.status,
                      **{k: last[k] for k in ("train_L1", "test_L1", "test_LK", "test_LK_se", "iw_k") if k in last}},
                     indent=2))
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from .runs import evaluate_run, open_run

    row = evaluate_run(open_run(ns.run, ns.out), ns.iw, ns.test_subset, ns.chunk, ns.device, progress=True)
    print(json.dumps({k: v for k, v in row.items() if k != "kl_units"}, indent=2))
    return 0


def _runs(ns: argparse.Namespace) -> int:
    from .runs import list_runs

    rows = []
    for run in list_runs(ns.out):
        rows.append(run.summary())  # a failed run shows its error, never a number
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no runs yet; train one with `lvae train --epochs N`")
        return 0

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    print(f"{'run':44s} {'epochs':>6s} {'status':>9s} {'test L1':>9s} {'test LK':>9s} {'K':>5s}")
    for r in rows:
        print(f"{r['name']:44s} {r['epochs']:6d} {r['status']:>9s} {fmt(r['test_L1']):>9s} "
              f"{fmt(r['test_LK']):>9s} {fmt(r['iw_k']):>5s}")
    return 0


def _data(ns: argparse.Namespace) -> int:
    from .data import load_dataset

    d = load_dataset(ns.dataset, path=ns.path)
    print(f"{ns.dataset}: {len(d.x_train)} train, {len(d.x_test)} test, x_dim {d.x_dim}, {d.likelihood}")
    return 0


def _book(ns: argparse.Namespace) -> int:
    from .book import BookError, build, parse_params, sync_notebooks

    if ns.sync_notebooks:
        print("updated:", ", ".join(sync_notebooks()) or "nothing (in sync)")
        return 0
    try:
        build(ns.profile, ns.chapter, parse_params(ns.param), results=ns.results, out=ns.out,
              html=not ns.no_html, strict=not ns.no_strict)
    except BookError as e:
        print(f"lvae book: error: {e}", file=sys.stderr)
        return 2
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .runs import RunError

    return RunError, DataError, FloatingPointError  # FloatingPointError: NonFiniteLossError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return _dispatch(ns, parser)
    except ConfigError as e:  # a bad value found after parsing (e.g. an unknown dataset): exit 2
        parser.error(str(e))
    except _user_errors() as e:  # damaged/locked run, missing data, NaN: exit 1 with the fix, no traceback
        print(f"lvae {ns.command}: error: {e}", file=sys.stderr)
        return 1


def _dispatch(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if ns.command == "train":
        return _train(ns, parser)
    if ns.command == "eval":
        return _eval(ns)
    if ns.command == "runs":
        return _runs(ns)
    if ns.command == "book":
        return _book(ns)
    return _data(ns)


if __name__ == "__main__":
    sys.exit(main())
