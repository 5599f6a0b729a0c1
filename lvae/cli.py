"""Command line: ``lvae train``, ``lvae eval``, ``lvae runs``, ``lvae data``.

Every ModelConfig / TrainConfig / EvalConfig field is an option (``--latent-sizes 64,32``,
``--no-batch-norm``, ``--lr 1e-3`` ...). Invalid options or values are refused with a message
before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any, Sequence

from .config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig
from .experiments import DEPTHS, VARIANTS, run_config

_SECTIONS = (("model", ModelConfig), ("train", TrainConfig), ("eval", EvalConfig))


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_tuple(text: str, kind: type) -> tuple:
    parts = [p for p in text.replace("-", ",").replace("x", ",").split(",") if p.strip()] if kind is int else \
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
    t.add_argument("--epochs", type=int, required=True, help="train until the run has this many epochs")
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
    return p


def _train(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .runs import get_or_train

    train = _overrides(ns, "train")
    try:
        cfg = run_config(ns.variant, ns.depth, model=_overrides(ns, "model"),
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

    row = evaluate_run(open_run(ns.run, ns.out), ns.iw, ns.test_subset, ns.chunk, ns.device)
    print(json.dumps({k: v for k, v in row.items() if k != "kl_units"}, indent=2))
    return 0


def _runs(ns: argparse.Namespace) -> int:
    from .runs import list_runs

    rows = []
    for run in list_runs(ns.out):
        rows.append({"name": run.name, "epochs": run.epochs, "status": run.status,
                     "test_L1": run.last("test_L1"), "test_LK": run.last("test_LK"), "iw_k": run.last("iw_k")})
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "train":
        return _train(ns, parser)
    if ns.command == "eval":
        return _eval(ns)
    if ns.command == "runs":
        return _runs(ns)
    return _data(ns)


if __name__ == "__main__":
    sys.exit(main())
