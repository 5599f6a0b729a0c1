"""Command line: ``lvae train``, ``lvae eval``, ``lvae runs``, ``lvae data``, ``lvae book``.

Every ModelConfig / TrainConfig / EvalConfig field is an option (``--latent-sizes 64,32``,
``--no-batch-norm``, ``--lr 1e-3``, ``--eval-every 1``, ``--iw-k 50`` as ``lvae eval`` spells it ...).
``lvae train --profile NAME`` takes the budget from lvae/registry/profiles.yml: ``--profile cpu --variant V
--depth D [--seed S]`` is the run ``lvae.registry.profiles.experiment("cpu", V, D, S)``, the one the book reads.
:func:`lvae.registry.commands.train_command` is the inverse: the command that makes a given run.

Invalid options or values (a device this machine lacks, an --out that is a file, a subset larger
than the dataset, a warm-up the training never finishes) are refused before anything is created,
with exit 2 and a message that names the option as typed (``--eval-iw-chunk 0 must be ...``, not
the config field); run-time problems give exit 1 and a message that names the fix.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import typing
from typing import Any, Sequence

from lvae.book.build import BookError, build, parse_params, sync_notebooks
from lvae.config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.data import datasets
from lvae.data.datasets import DATASETS, DataError, load_dataset
from lvae.model.warmup import warmup_beta
from lvae.registry.archive import export_runs, import_runs
from lvae.registry.commands import cli_value, option_aliases, option_name
from lvae.registry.experiments import DEPTHS, VARIANTS
from lvae.registry.experiments import grid as named_grid
from lvae.registry.experiments import run_config
from lvae.registry.profiles import experiment, load_profile, profile_grid
from lvae.registry.runs import CHECKPOINT, WEIGHTS_FP16, check_run_name, open_run, registry_rows, results_dir
from lvae.registry.storage import RunError
from lvae.training.checkpoints import check_init_from
from lvae.training.executors import EXECUTORS, JOBS_DIR, JobOptions, require_submitit, train_grid_on
from lvae.training.grid import train_grid
from lvae.training.loop import get_or_train
from lvae.training.step import evaluate_run

_SECTIONS = (("model", ModelConfig), ("train", TrainConfig), ("eval", EvalConfig))


_OWNERS = {cls.__name__: section for section, cls in _SECTIONS}
TRAIN_USAGE = ("%(prog)s [--profile NAME | --epochs N] [--variant V] [--depth N] [--seed S] [--out DIR] "
               "[config options: %(prog)s -h lists them]")


def in_cli_terms(error: ConfigError) -> str:
    """A config error in the words of the command line: ``--eval-iw-chunk 0 must be a positive
    integer`` instead of ``iw_chunk=0 ...``; the other fields it mentions become options too."""
    section = _OWNERS.get(error.owner or "")
    if section is None or error.field is None:
        return str(error)
    cls = dict(_SECTIONS)[section]
    reason = error.reason or ""
    for f in dataclasses.fields(cls):  # a field named in the reason (e.g. latent_sizes) -> its option
        if "_" in f.name:
            reason = re.sub(rf"\b{f.name}\b", option_name(section, f.name), reason)
    reason = reason.replace(" or None", " or none")  # None is typed `none`
    return f"{option_name(section, error.field)} {cli_value(error.value)} {reason}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (e.g. 10)")
    return value


def _parse_tuple(text: str, kind: type) -> tuple:
    # ints: "64,32", "64x32" or "64-32"; a minus sign after a separator or at the start stays a sign
    parts = [p for p in re.split(r"[,x]|(?<=\d)-", text) if p.strip()] if kind is int else \
        [p for p in text.split(",") if p.strip()]
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        example = "64,32,16" if kind is int else "0.9,0.999"
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of {kind.__name__}s (e.g. {example})") from None


def _converter(hint: Any):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return lambda s: _parse_tuple(s, args[0])
    if type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        return lambda s: None if s.lower() in ("none", "null") else _typed(s, inner)
    return hint


def _typed(text: str, kind: type) -> Any:
    """``text`` as an int or float; an empty or malformed value is refused (an empty one never means none)."""
    try:
        return kind(text)
    except ValueError:
        example = "1000" if kind is int else "0.001"
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'} "
                                         f"(e.g. {example})") from None


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    for section, cls in _SECTIONS:
        group = parser.add_argument_group(f"{cls.__name__} fields")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            # only the options given appear in the namespace, so that `--subset none` can override
            dest, opt = f"{section}.{f.name}", option_name(section, f.name)
            if hints[f.name] is bool:
                group.add_argument(opt, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=f"default {f.default}")
            else:
                group.add_argument(opt, dest=dest, type=_converter(hints[f.name]), default=argparse.SUPPRESS,
                                   metavar="V", help=f"default {cli_value(f.default)}")
            for alias in option_aliases(section, f.name):  # an older spelling (--eval-iw-k): parses, not listed
                group.add_argument(alias, dest=dest, type=_converter(hints[f.name]), default=argparse.SUPPRESS,
                                   help=argparse.SUPPRESS)


def _overrides(ns: argparse.Namespace, section: str) -> dict[str, Any]:
    prefix = section + "."
    return {k[len(prefix):]: v for k, v in vars(ns).items() if k.startswith(prefix)}


def build_parser() -> argparse.ArgumentParser:
    """The ``lvae`` parser: its commands train, eval, runs, data and book (``p.commands`` maps each name to its
    parser, for errors in a command's own terms)."""
    p = argparse.ArgumentParser(prog="lvae", description="Ladder VAE replication: train, evaluate, list runs.")
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = {"train": _add_train(sub), "eval": _add_eval(sub), "runs": _add_runs(sub), "data": _add_data(sub),
                  "book": _add_book(sub)}
    return p


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``lvae train``: one run, or a grid (locally or as cluster jobs), and every config field as an option."""
    t = sub.add_parser("train", help="train (or resume) one run into the registry", usage=TRAIN_USAGE)
    t.add_argument("--variant", choices=sorted(VARIANTS), default="lvae_bn_wu",
                   help="paper variant; sets inference, batch norm and warm-up (fields below override)")
    t.add_argument("--depth", type=int, choices=DEPTHS, default=5, help="number of stochastic layers")
    t.add_argument("--epochs", type=_positive_int, default=None,
                   help="train until the run has this many epochs (required unless --profile)")
    t.add_argument("--grid", choices=("fig3",), default=None,
                   help="train the whole Fig-3 grid (4 variants x depths) at once with lvae.training.grid "
                        "(stacked models)")
    t.add_argument("--depths", default=None, help="with --grid: depths, e.g. 1,2,3 (default: 1-5)")
    t.add_argument("--profile", default=None,
                   help="budget (epochs, warm-up, evaluation, subset) from lvae/registry/profiles.yml "
                        "(smoke | cpu | paper): one run, the very run the book's chapters use; with --grid the whole "
                        "grid")
    t.add_argument("--name", default=None, help="run name (default: <dataset>-<variant>-<depth>)")
    t.add_argument("--out", default=None, help="results directory (default: $LVAE_RESULTS or ./results)")
    t.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_cluster_options(t)
    _add_config_options(t)
    return t


def _add_cluster_options(t: argparse.ArgumentParser) -> None:
    """``lvae train --grid --executor ...``: each group of stacked models as its own submitit job."""
    x = t.add_argument_group("cluster (with --grid; needs pip install -e '.[cluster]')")
    x.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="train each group of stacked models as its own submitit job into the registry: slurm (sbatch) "
                        "or local (processes on this machine, all at once)")
    x.add_argument("--slurm-partition", default=None, metavar="P", help="slurm partition (default: the cluster's)")
    x.add_argument("--slurm-time", type=_positive_int, default=None, metavar="MIN",
                   help=f"time limit of each job in minutes (default {JobOptions.time_min}; applies to local jobs "
                        f"too); a job that reaches it is requeued and resumes from its checkpoints")
    x.add_argument("--slurm-gpus", type=int, default=None, metavar="N",
                   help="GPUs per job (default: slurm's; local: 1 when this machine has a CUDA GPU)")
    x.add_argument("--slurm-cpus", type=_positive_int, default=None, metavar="N",
                   help="CPU cores per job, also torch's thread count in the job")
    x.add_argument("--slurm-mem-gb", type=float, default=None, metavar="GB", help="memory per job")
    x.add_argument("--slurm-account", default=None, metavar="A", help="slurm account")
    x.add_argument("--jobs-dir", default=JOBS_DIR, metavar="DIR",
                   help=f"job scripts and logs (default ./{JOBS_DIR}; for slurm on a file system the nodes see)")


def _add_eval(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``lvae eval``: evaluate a stored run."""
    e = sub.add_parser("eval", help="evaluate a stored run (L1, per-unit KL, importance-weighted L_K)")
    e.add_argument("run", help="run directory, name or unique prefix")
    e.add_argument("--iw-k", type=_positive_int, default=EvalConfig().iw_k,
                   help="K of the importance-weighted bound L_K (default %(default)s)")
    e.add_argument("--test-subset", type=_positive_int, default=None, help="first n test images (default: all)")
    e.add_argument("--chunk", type=_positive_int, default=EvalConfig().iw_chunk,
                   help="importance samples per chunk (default %(default)s)")
    e.add_argument("--out", default=None, help="results directory (default: $LVAE_RESULTS or ./results)")
    e.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    return e


def _add_runs(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``lvae runs``: list the registry; ``lvae runs export`` / ``import`` move runs between machines."""
    r = sub.add_parser("runs", help="list the run registry")
    r.add_argument("--out", default=None, help="results directory (default: $LVAE_RESULTS or ./results)")
    r.add_argument("--json", action="store_true")
    rs = r.add_subparsers(dest="runs_command", metavar="{export,import}")
    rx = rs.add_parser("export", help="write runs into one archive, to move them to another machine")
    rx.add_argument("names", nargs="+", metavar="NAME", help="run directory, name or unique prefix")
    rx.add_argument("-o", "--output", required=True, metavar="FILE", help="the archive to write (.tar; .tar.gz "
                    "compresses it)")
    rx.add_argument("--with-checkpoint", action="store_true",
                    help="include checkpoint.pt (fp32 weights and Adam state, to resume training; large)")
    rx.add_argument("--at-epoch", type=int, default=None, metavar="E",
                    help="each run as it stood at epoch E, a milestone it went past and kept (model-fp16-eE.pt; "
                         "the long runs of scripts/campaign.py keep 300 and 1000); allowed while it trains")
    rx.add_argument("--out", default=argparse.SUPPRESS, help="results directory to read (default: $LVAE_RESULTS or "
                    "./results)")
    ri = rs.add_parser("import", help="add the runs of an archive (lvae runs export) to the registry",
                       description="Add the runs of an archive (lvae runs export) to the registry. The archive's "
                       "manifest is checked for integrity, not origin: its SHA-256 digests show that no file was "
                       "damaged on the way, but anyone who edits a file can recompute its digest, so import only "
                       "archives from a source you trust.")
    ri.add_argument("archive", help="the archive file")
    ri.add_argument("--out", default=argparse.SUPPRESS, help="results directory to add them to (default: "
                    "$LVAE_RESULTS or ./results)")
    ri.add_argument("--allow-incomplete", action="store_true",
                    help="also import runs that are not complete (partial, interrupted, failed)")
    return r


def _add_data(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``lvae data``: download or verify a dataset."""
    d = sub.add_parser("data", help="download / verify a dataset into the cache ($LVAE_DATA)")
    d.add_argument("dataset", choices=("mnist", "omniglot", "norb"))
    d.add_argument("--path", default=None, help="local file (omniglot chardata.mat, norb .npz)")
    return d


def _add_book(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``lvae book``: execute the book's chapters and build the HTML."""
    b = sub.add_parser("book", help="execute the book's chapters with papermill and build the HTML")
    b.add_argument("--profile", default="cpu", help="budget from lvae/registry/profiles.yml (smoke | cpu | paper)")
    b.add_argument("--chapter", action="append", default=[], help="only this chapter (repeatable; default: all)")
    b.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="chapter parameter override, e.g. -p epochs=3 -p depths=[1,2]")
    b.add_argument("--results", default=None, help="run registry to read and train into (default: the "
                   "committed results/ when it holds every run, else _build/<profile>-results)")
    b.add_argument("--out", default="_build", help="build folder (default: _build)")
    b.add_argument("--no-html", action="store_true", help="execute the chapters only")
    b.add_argument("--no-strict", action="store_true", help="do not turn Sphinx warnings into errors")
    b.add_argument("--sync-notebooks", action="store_true",
                   help="only write book/*.ipynb (Colab) from book/*.md, outputs stripped, and exit")
    return b


# -- checks made before any work, in the terms of the options ------------------------------------
def _check_device(text: str | None) -> None:
    """Refuse a device this machine does not have, before anything is created."""
    if text is None:
        return
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {text} is not a device; use cpu or cuda (cuda:N for GPU N), or leave "
                          f"--device out (cuda when available, else cpu)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {text}: {why}; use --device cpu, or leave --device out")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"--device {text}: this machine has {n} CUDA GPU(s) (cuda:0 to cuda:{n - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {text}: Apple MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {text}: lvae runs on cpu or cuda (cuda:N), not {dev.type}")


def _check_out(out: str | None, write: bool) -> None:
    """The registry folder (--out) must be a folder, or creatable as one (and writable to train)."""
    fix = "give a folder for the run registry with --out DIR (it is created if missing)"
    if out is not None and not str(out).strip():
        raise ConfigError(f"--out is empty; {fix}")
    path = results_dir(out)
    what = f"--out {out}" if out is not None else f"the results folder {path}"
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{what} is a symbolic link to {os.readlink(path)}, which does not exist; create that "
                          f"folder, or {fix}")
    existing = next(q for q in (path, *path.parents) if q.exists() or q == q.parent)
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ConfigError(f"{what} {where}, not a folder; {fix}")
    if write and existing.exists() and not os.access(existing, os.W_OK):
        raise ConfigError(f"{what}: {existing} is not writable; {fix}")


def _check_sizes_fit(dataset: str, subset: int | None, test_subset: int | None, subset_opt: str,
                     test_opt: str) -> None:
    """Refuse a training or test subset larger than the dataset (read from the data cache)."""
    if dataset == "synthetic" or (subset is None and test_subset is None):
        return  # synthetic data are generated at the size asked for
    try:
        full = datasets.load_dataset(dataset)
    except datasets.DataError:
        return  # the run's own data loading reports it (or does not need it: a complete run)
    for value, n, opt, what in ((subset, full.n_train, subset_opt, "training"),
                                (test_subset, full.n_test, test_opt, "test")):
        if value is not None and value > n:
            raise ConfigError(f"{opt} {value}: {dataset} has only {n:,} {what} images; give at most {n}, "
                              f"or leave {opt} out to use all of them")


# -- lvae train ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """What ``lvae train`` (one run) will do: the run, its evaluation and its budget."""

    config: RunConfig
    eval_config: EvalConfig
    epochs: int
    save_fp16: bool
    warmup_source: str  # "variant" (its paper default), "profile" or "option" (--warmup-epochs)


def _profile_overrides(name: str, train: dict[str, Any]):
    """The profile ``name`` with the TrainConfig options that replace its own budget (--dataset,
    --subset), and the remaining overrides: (profile, warm-up option, seed option, other fields)."""
    p = load_profile(name)
    train = dict(train)
    for key in ("dataset", "subset"):
        if key in train:
            p = dataclasses.replace(p, **{key: train.pop(key)})
    return p, train.pop("warmup_epochs", None), train.pop("seed", None), train


def _with_warmup(cfg: RunConfig, warmup: int | None) -> RunConfig:
    if warmup is None:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_epochs=warmup))


def plan_train(ns: argparse.Namespace) -> TrainPlan:
    """The run ``lvae train`` (without --grid) trains; raises ConfigError naming the option (and
    warns on stderr about a warm-up longer than the training that the user or a profile chose)."""
    train, model, evals = _overrides(ns, "train"), _overrides(ns, "model"), _overrides(ns, "eval")
    if ns.depths is not None:
        raise ConfigError(f"--depths goes with --grid fig3; for one run give --depth N (now --depth {ns.depth})")
    if ns.profile:
        if model:
            opts = " ".join(option_name("model", k) for k in model)
            raise ConfigError(f"--profile fixes the architecture; drop {opts} (or drop --profile and give --epochs)")
        p, warmup, seed, rest = _profile_overrides(ns.profile, train)
        cfg, ecfg = experiment(p, ns.variant, ns.depth, seed, **rest)
        cfg = _with_warmup(cfg, warmup)
        ecfg = dataclasses.replace(ecfg, **evals)
        epochs = ns.epochs or p.epochs
        keep = ns.variant in p.keep_weights and ns.depth == p.max_depth and seed in (None, p.seeds[0])
        source = "profile" if warmup is None else "option"
    else:
        if ns.epochs is None:
            raise ConfigError("the following arguments are required: --epochs N (or --profile NAME, e.g. "
                              "--profile cpu for the committed runs' budget)")
        warmup = train.pop("warmup_epochs", None)  # an explicit --warmup-epochs wins over the variant's default
        cfg = _with_warmup(run_config(ns.variant, ns.depth, model=model, **train), warmup)
        ecfg, epochs, keep = EvalConfig(**evals), ns.epochs, True
        source = "variant" if warmup is None else "option"
    if ns.name is not None:
        check_run_name(ns.name)  # (an empty one too: it never means the default name)
        cfg = dataclasses.replace(cfg, name=ns.name)
    _check_dataset(cfg.train.dataset)
    _check_eval_subsets(cfg.train, ecfg, evals)
    _check_warmup(cfg.train.warmup_epochs, epochs, source, f"--variant {ns.variant}")
    return TrainPlan(cfg, ecfg, epochs, keep, source)


def _check_eval_subsets(tcfg: TrainConfig, ecfg: EvalConfig, given: dict[str, Any]) -> None:
    """An --eval-iw-subset larger than the test images evaluated, or an --eval-train-subset larger
    than the training set, would be cut silently: refused (the defaults are what they are)."""
    if "iw_subset" in given and ecfg.iw_subset is not None:
        n_test = ecfg.test_subset if ecfg.test_subset is not None else _dataset_sizes(tcfg.dataset)[1]
        if n_test is not None and ecfg.iw_subset > n_test:
            raise ConfigError(f"--eval-iw-subset {ecfg.iw_subset}: L_K is computed on the first of the {n_test:,} "
                              f"test images evaluated; give at most {n_test} (or a larger --eval-test-subset)")
    if "train_subset" in given and ecfg.train_subset is not None:
        n_train = tcfg.subset if tcfg.subset is not None else _dataset_sizes(tcfg.dataset)[0]
        if n_train is not None and ecfg.train_subset > n_train:
            raise ConfigError(f"--eval-train-subset {ecfg.train_subset}: the training set has {n_train:,} images; "
                              f"give at most {n_train} (or a larger --subset)")


def _dataset_sizes(dataset: str) -> tuple[int | None, int | None]:
    """(training, test) images of ``dataset`` (None where unknown: its data are not in the cache)."""
    if dataset == "synthetic":
        return datasets._SYNTHETIC_DEFAULT_SIZES
    try:
        full = datasets.load_dataset(dataset)
    except datasets.DataError:
        return None, None
    return full.n_train, full.n_test


def _check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"--dataset {name} is not valid; choose one of {', '.join(DATASETS)}")


def _check_warmup(warmup: int, epochs: int, source: str, subject: str) -> None:
    """A warm-up longer than the training leaves beta < 1 to the end: refused for one run when it is
    the variant's paper default (a trap), a warning with the numbers when the user or a profile chose
    it, and for a grid (whose warm-up variants are half of its models)."""
    if warmup <= 0 or epochs > warmup:
        return
    beta = warmup_beta(epochs - 1, warmup)
    numbers = (f"the warm-up lasts {warmup} epochs but --epochs is {epochs}: beta reaches only {beta:.3f} in the "
               f"last epoch (beta = 1 from epoch {warmup + 1} on)")
    if source == "variant" and subject.startswith("--variant"):
        raise ConfigError(f"{subject} warms up over the paper's {warmup} epochs; {numbers}. Give "
                          f"--warmup-epochs {epochs * 3 // 10} (any N < {epochs}; the cpu profile warms up over 3 "
                          f"of its 10 epochs), or --profile cpu; to train toward the paper's budget in stages, give "
                          f"--warmup-epochs {warmup} explicitly")
    origin = {"option": "--warmup-epochs", "profile": "the profile"}.get(source, "the paper's default; set it "
                                                                               "with --warmup-epochs")
    print(f"lvae train: warning: {subject}: {numbers} ({origin}); not fully warmed up", file=sys.stderr)


def _train_grid(ns: argparse.Namespace) -> int:
    _check_cluster_options(ns)
    if ns.executor:
        require_submitit(ns.executor)  # before any work: the install command
    train, model, evals = _overrides(ns, "train"), _overrides(ns, "model"), _overrides(ns, "eval")
    if ns.name:
        raise ConfigError("--name names one run; drop it with --grid (grid runs are named <dataset>-<variant>-<depth>)")
    if ns.profile:
        if model:
            opts = " ".join(option_name("model", k) for k in model)
            raise ConfigError(f"--profile fixes the architecture; drop {opts}")
        p, warmup, seed, rest = _profile_overrides(ns.profile, train)
        cfgs, ecfgs, keep, epochs = profile_grid(p, None if seed is None else (seed,), **rest)
        cfgs = [_with_warmup(c, warmup) for c in cfgs]
        ecfgs = [dataclasses.replace(e, **evals) for e in ecfgs]
        epochs, source = ns.epochs or epochs, "profile" if warmup is None else "option"
    else:
        if ns.epochs is None:
            raise ConfigError("--grid needs --epochs N or --profile NAME")
        try:
            depths = tuple(int(d) for d in ns.depths.split(",")) if ns.depths is not None else DEPTHS
        except ValueError:
            depths = ()
        if not depths or not set(depths) <= set(DEPTHS):
            raise ConfigError(f"--depths {ns.depths} is not a list of depths {DEPTHS[0]}-{DEPTHS[-1]} (e.g. 1,2,3)")
        warmup = train.pop("warmup_epochs", None)
        cfgs = [_with_warmup(c, warmup) for c in named_grid(ns.grid, depths=depths, model=model or None, **train)]
        ecfgs, keep, epochs = EvalConfig(**evals), True, ns.epochs
        source = "variant" if warmup is None else "option"
    for c in cfgs:
        _check_dataset(c.train.dataset)
    _check_warmup(max(c.train.warmup_epochs for c in cfgs), epochs, source, "the warm-up variants of --grid fig3")
    if ns.executor != "slurm":  # a slurm job's device is its node's
        _check_device(ns.device)
    _check_out(ns.out, write=True)
    if ns.executor:
        options = JobOptions(ns.slurm_partition, ns.slurm_time or JobOptions.time_min, ns.slurm_gpus, ns.slurm_cpus,
                             ns.slurm_mem_gb, ns.slurm_account)
        runs = train_grid_on(ns.executor, cfgs, epochs, ecfgs, root=ns.out, device=ns.device, save_fp16=keep,
                             folder=ns.jobs_dir, options=options, log=None if ns.quiet else _stderr)
    else:
        runs = train_grid(cfgs, epochs, ecfgs, root=ns.out, device=ns.device, progress=not ns.quiet, save_fp16=keep)
    rows = []
    for run in runs:
        last = run.metrics()[-1] if run.metrics() else {}
        rows.append({"run": str(run.path), "epochs": run.epochs, "status": run.status,
                     **{k: last[k] for k in ("test_L1", "test_LK", "iw_k") if k in last}})
    print(json.dumps(rows, indent=2))
    return 0


def _train(ns: argparse.Namespace) -> int:
    if ns.grid:
        return _train_grid(ns)
    _check_cluster_options(ns)
    plan = plan_train(ns)
    cfg, ecfg = plan.config, plan.eval_config
    _check_device(ns.device)
    _check_out(ns.out, write=True)
    _check_sizes_fit(cfg.train.dataset, cfg.train.subset, ecfg.test_subset, "--subset", "--eval-test-subset")
    path = results_dir(ns.out) / cfg.dir_name
    if cfg.train.init_from and not (path / CHECKPOINT).exists():  # a fresh run: its parent, before its folder
        check_init_from(cfg.train.init_from, results_dir(ns.out))
    run = get_or_train(cfg, plan.epochs, ecfg, root=ns.out, device=ns.device, progress=not ns.quiet,
                       save_fp16=plan.save_fp16)
    last = run.metrics()[-1] if run.metrics() else {}
    print(json.dumps({"run": str(run.path), "epochs": run.epochs, "status": run.status,
                      **{k: last[k] for k in ("train_L1", "test_L1", "test_LK", "test_LK_se", "iw_k") if k in last}},
                     indent=2))
    return 0


def _eval(ns: argparse.Namespace) -> int:
    _check_device(ns.device)
    _check_out(ns.out, write=False)
    run = open_run(ns.run, ns.out)
    if not any((run.path / f).exists() for f in (CHECKPOINT, WEIGHTS_FP16)):
        run.load_model()  # no weights: says which command recreates them, before any data is loaded
    _check_sizes_fit(run.config.train.dataset, None, ns.test_subset, "--subset", "--test-subset")
    row = evaluate_run(run, ns.iw_k, ns.test_subset, ns.chunk, ns.device, progress=True)
    print(json.dumps({k: v for k, v in row.items() if k != "kl_units"}, indent=2))
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _check_cluster_options(ns: argparse.Namespace) -> None:
    """--executor goes with --grid, the job options with --executor (partition and account with slurm)."""
    given = [opt for opt, v in (("--executor", ns.executor), ("--slurm-partition", ns.slurm_partition),
                                ("--slurm-account", ns.slurm_account), ("--slurm-time", ns.slurm_time),
                                ("--slurm-gpus", ns.slurm_gpus), ("--slurm-cpus", ns.slurm_cpus),
                                ("--slurm-mem-gb", ns.slurm_mem_gb)) if v is not None]
    if given and not ns.grid:
        raise ConfigError(f"{given[0]} goes with --grid fig3 (one job per group of the grid); for one run drop it")
    if given and not ns.executor:
        raise ConfigError(f"{given[0]} goes with --executor slurm (or local); add it, or drop {given[0]}")
    slurm_only = [opt for opt in ("--slurm-partition", "--slurm-account") if opt in given]
    if ns.executor == "local" and slurm_only:
        raise ConfigError(f"{slurm_only[0]} goes with --executor slurm, not local")


def _runs_export(ns: argparse.Namespace) -> int:
    if not ns.output.strip():
        raise ConfigError("-o is empty; give the archive file to write, e.g. -o runs.tar")
    manifest = export_runs(ns.names, ns.output, root=ns.out, with_checkpoint=ns.with_checkpoint,
                           at_epoch=ns.at_epoch)
    n_files = sum(len(e["files"]) for e in manifest["runs"])
    size = sum(f["size"] for e in manifest["runs"] for f in e["files"].values())
    print(f"wrote {ns.output}: {len(manifest['runs'])} run(s), {n_files} files, {size / 1e6:.1f} MB")
    for e in manifest["runs"]:
        if e["status"] != "complete":
            print(f"note: {e['name']} is {e['status']}; importing it needs --allow-incomplete")
    return 0


def _runs_import(ns: argparse.Namespace) -> int:
    _check_out(ns.out, write=True)
    for r in import_runs(ns.archive, root=ns.out, allow_incomplete=ns.allow_incomplete):
        state = f"{r.status}, {r.epochs} epochs"
        if r.identical:
            print(f"{r.name}: already in {r.path.parent} with identical files ({state}); nothing to do")
        else:
            print(f"imported {r.name} ({state}) into {r.path.parent}")
    return 0


def _runs(ns: argparse.Namespace) -> int:
    if ns.runs_command == "export":
        return _runs_export(ns)
    if ns.runs_command == "import":
        return _runs_import(ns)
    _check_out(ns.out, write=False)
    rows = registry_rows(ns.out)  # a failed or damaged run shows its error, never a number
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
        if r.get("error"):  # failed or damaged: what happened and the fix
            print(f"    {r['status']}: {r['error']}")
    return 0


def _data(ns: argparse.Namespace) -> int:
    d = load_dataset(ns.dataset, path=ns.path)
    print(f"{ns.dataset}: {len(d.x_train)} train, {len(d.x_test)} test, x_dim {d.x_dim}, {d.likelihood}")
    return 0


def _book(ns: argparse.Namespace) -> int:
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
    return RunError, DataError, FloatingPointError  # FloatingPointError: NonFiniteLossError


# what Ctrl-C leaves, said in one line instead of a traceback
_INTERRUPTED = {"train": "the run resumes from its last checkpoint: run the same command again",
                "eval": "nothing was recorded", "book": "no partial notebook was kept; run the same command again",
                "data": "the download resumes when you run the same command again"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command (its usage), not by the top-level parser
        parser.commands[ns.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _dispatch(ns)
    except ConfigError as e:  # a bad value found after parsing: exit 2, in the command's own usage and terms
        parser.commands[ns.command].error(in_cli_terms(e))
    except _user_errors() as e:  # damaged/locked run, missing data, NaN: exit 1 with the fix, no traceback
        print(f"lvae {ns.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nlvae {ns.command}: interrupted; {_INTERRUPTED.get(ns.command, 'nothing was changed')}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (`lvae runs | head -3`): nothing more to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _dispatch(ns: argparse.Namespace) -> int:
    if ns.command == "train":
        return _train(ns)
    if ns.command == "eval":
        return _eval(ns)
    if ns.command == "runs":
        return _runs(ns)
    if ns.command == "book":
        return _book(ns)
    return _data(ns)


if __name__ == "__main__":
    sys.exit(main())
