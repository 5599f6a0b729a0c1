"""What a chapter calls: its set-up (profile, parameters, run registry), ``glue`` and tables.

Every chapter opens with the same three cells:

1. the install cell. Where ``lvae`` is not importable (Colab, a fresh Python) it clones the
   repository (``repository.url`` of ``_config.yml``, with its committed runs) and installs it with
   the ``book`` extra; everywhere it then runs :func:`install_extra`, which installs what is
   missing of the ``book`` extra (e.g. ipywidgets where lvae was installed without it);
2. the papermill ``parameters`` cell: ``profile`` and the overrides of :data:`PARAMETERS`;
3. ``P = lvae.book.setup(globals())`` (:func:`setup`): the profile with the parameters applied,
   the run registry, and the names every chapter uses.

The run registry comes from one rule, :func:`plan_registry`, which :func:`setup` evaluates in
every kernel: it survives a kernel restart and does not depend on the folder or on an environment
variable surviving. The committed runs are found in the lvae repository (:func:`repository`: the
source checkout lvae is imported from, else the folder pip installed it from). A chapter reads them
there when they hold every run it needs; otherwise it works in a scratch registry under the
repository's ``_build/`` and says first what it will train. The build itself (``lvae book``) is
:mod:`lvae.bookbuild`.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import html
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import analysis, paper, plots
from .analysis import short_device
from .datasets import DATASETS
from .profile_runs import get_run, grid_runs, seed_runs
from .profiles import available, experiment, load_profile
from .runs import RESULTS_ENV, Run, list_runs
from .storage import RunError

COMMITTED = "results"  # the committed run registry, at the repository root
SCRATCH = "_build"  # scratch registries (git-ignored): <repository>/_build/<profile>-results

# chapter parameter -> (Profile field it overrides, what it takes, an example value); None keeps the profile's
PARAMETERS: dict[str, tuple[str, str, str]] = {
    "dataset": ("dataset", "a dataset name", "mnist"),
    "depths": ("depths", "a list of depths (numbers of stochastic layers, >= 1)", "[1, 2]"),
    "epochs": ("epochs", "a positive integer", "3"),
    "warmup_epochs": ("warmup_epochs", "an integer >= 0", "1"),
    "iw_k": ("iw_k", "a positive integer", "50"),
    "test_subset": ("test_subset", "a positive integer (that many test images)", "500"),
    "iw_subset": ("iw_subset", "a positive integer (that many test images)", "100"),
    "seed": ("seeds", "an integer >= 0", "1"),
}
OVERRIDES = {name: field for name, (field, _, _) in PARAMETERS.items()}
# the names every chapter uses, put into its namespace by setup(): modules and functions imported
# above (plain imports, which the import graph and tests/test_structure.py see) or defined here
CHAPTER_NAMES = ("analysis", "paper", "plots", "glue", "table", "get_run", "grid_runs", "seed_runs")
# training-set sizes, to scale a committed run's epoch time to a subset (a rough time estimate only)
_TRAIN_IMAGES = {"mnist": 60_000}
_TEST_IMAGES = {"mnist": 10_000}


class BookError(RuntimeError):
    """The book could not be executed or built; the message names the chapter (and cell)."""


class ParameterError(BookError, ValueError):
    """A chapter parameter (papermill ``-p``/``-y``, ``lvae book -p``) has a value the chapter cannot use.

    In a notebook it shows as one line (IPython's ``_render_traceback_``), not a traceback.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


# -- parameters ----------------------------------------------------------------------------------
def _example(name: str, value: str, style: str) -> str:
    if style == "lvae book":
        return f"--profile {value}" if name == "profile" else f"-p {name}={value.replace(' ', '')}"
    return f'-p {name} "{value}" (or -y "{name}: {value}")' if "[" in value else f"-p {name} {value}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_parameter(name: str, value: Any, style: str = "papermill") -> Any:
    """The value of chapter parameter ``name`` as the profile takes it (None keeps the profile's).

    A string is read as YAML (so JSON too): papermill's ``-p depths "[1, 2]"`` passes the string
    ``"[1, 2]"``, ``-y "depths: [1, 2]"`` the list. A bad value raises ParameterError, one line naming
    the parameter and an example in the user's syntax (``style``: "papermill" or "lvae book").
    """
    if name not in PARAMETERS:
        raise ParameterError(f"unknown chapter parameter {name!r}; the parameters: {', '.join(PARAMETERS)}")
    _, what, example = PARAMETERS[name]
    raw = value
    if name == "dataset":
        what, example = f"one of {', '.join(DATASETS)}", DATASETS[0]

    def bad() -> ParameterError:
        where = "papermill parameter" if style == "papermill" else "parameter"
        return ParameterError(f"{where} {name}={raw!r} is not valid: {name} takes {what}, "
                              f"e.g. {_example(name, example, style)}")

    if isinstance(value, str) and name != "dataset":
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise bad() from None
    if value is None:
        return None
    if name == "dataset":
        if value not in DATASETS:
            raise bad()
        return value
    if name == "depths":
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items or not all(_is_int(d) and d >= 1 for d in items):
            raise bad()
        return tuple(items)
    if not _is_int(value) or value < (0 if name in ("warmup_epochs", "seed") else 1):
        raise bad()
    return (value,) if name == "seed" else value


def resolve_profile(profile: str, style: str = "papermill", **overrides: Any):
    """The profile ``profile`` with every non-None override applied (the chapter's papermill parameters)."""
    names = available()
    if not isinstance(profile, str) or profile not in names:
        where = "papermill parameter" if style == "papermill" else "option"
        raise ParameterError(f"{where} profile={profile!r} is not valid: choose one of {', '.join(names)} "
                             f"(lvae/profiles.yml), e.g. {_example('profile', 'smoke', style)}")
    unknown = sorted(set(overrides) - set(PARAMETERS))
    if unknown:
        raise ParameterError(f"unknown chapter parameter(s) {unknown}; valid: {sorted(PARAMETERS)}")
    changes = {OVERRIDES[k]: v for k, v in ((k, parse_parameter(k, v, style)) for k, v in overrides.items())
               if v is not None}
    p = load_profile(profile)
    return dataclasses.replace(p, **changes) if changes else p


# -- where the runs are --------------------------------------------------------------------------
def _is_repository(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and (path / "lvae" / "__init__.py").is_file()


def repository() -> Path | None:
    """The lvae repository this ``lvae`` comes from, or None.

    The source checkout lvae is imported from (an editable install, or the repository root on
    ``sys.path``); else the local folder pip installed it from, which pip records in the
    distribution's ``direct_url.json`` (PEP 610): the setup cell's ``pip install ./lvae-repo`` is a
    plain install into site-packages, and this is how a restarted Colab kernel still finds the
    clone. None when lvae was installed from a wheel, an index or a git URL.
    """
    package = Path(__file__).resolve().parent
    if _is_repository(package.parent):
        return package.parent
    try:
        dist = importlib.metadata.distribution("lvae")
        if Path(str(dist.locate_file("lvae/__init__.py"))).resolve() != package / "__init__.py":
            return None  # metadata of another lvae than the one imported
        info = json.loads(dist.read_text("direct_url.json") or "null")
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        return None
    if not isinstance(info, dict) or "dir_info" not in info or not str(info.get("url", "")).startswith("file:"):
        return None
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(info["url"]).path))
    return path if _is_repository(path) else None


def _complete(path: Path, epochs: int):
    """The run at ``path`` when it is complete with at least ``epochs`` epochs, else None."""
    if not (path / "config.json").exists():
        return None
    try:
        run = Run(path)
        return run if run.status == "complete" and run.epochs >= epochs else None
    except (RunError, OSError, ValueError, KeyError):
        return None


def profile_configs(P) -> list:
    """The RunConfigs a chapter may train under profile ``P``: its grid (variants x depths) for its
    first seed. Further seeds are only read when present (:func:`lvae.profile_runs.grid_runs`)."""
    return [experiment(P, v, d, s)[0] for s in P.seeds[:1] for v in P.variants for d in P.depths]


def _minutes(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _estimate(cfg, P, references: list) -> tuple[float, str] | None:
    """(seconds, device) to train ``cfg`` for ``P.epochs`` epochs and evaluate it, scaled from a
    complete committed run of the same model, or None when there is none to scale from."""
    tcfg = cfg.train
    for ref in references:
        rcfg = ref.config
        if rcfg.model != cfg.model or rcfg.train.dataset != tcfg.dataset:
            continue
        rows = ref.metrics()
        epoch_s = [r["epoch_seconds"] for r in rows if r.get("epoch_seconds")]
        full = _TRAIN_IMAGES.get(tcfg.dataset)
        if not epoch_s or (full is None and tcfg.subset != rcfg.train.subset):
            continue
        scale = (tcfg.subset or full) / (rcfg.train.subset or full) if full else 1.0
        seconds = sum(epoch_s) / len(epoch_s) * scale * P.epochs
        iw = [r for r in rows if r.get("iw_seconds") and r.get("iw_k") and r.get("n_iw")]
        # the test-L1 / train-L1 evaluations: the rest of the reference's wall time, per image evaluated
        rest = (ref.provenance.get("wall_seconds") or 0) - sum(epoch_s) - sum(r["iw_seconds"] for r in iw)
        ref_images = sum(r.get("n_test", 0) + (ref.eval_config.train_subset or 0) for r in rows)
        test = _TEST_IMAGES.get(tcfg.dataset)
        if rest > 0 and ref_images and test and full:
            n_evals = P.epochs // P.eval_every + (P.epochs % P.eval_every > 0)
            seconds += rest / ref_images * n_evals * ((P.test_subset or test) + (P.eval_train_subset or full))
        if iw:  # the importance-weighted evaluation(s): final, and every iw_every epochs
            # a plan, not a report: the K the run to train will use (P.iw_k) over the K the reference measured
            n_iw = P.iw_subset or P.test_subset or _TEST_IMAGES.get(tcfg.dataset, iw[-1]["n_iw"])
            n_evals = 1 + (P.epochs - 1) // P.iw_every if P.iw_every else 1
            seconds += n_evals * iw[-1]["iw_seconds"] * (P.iw_k * n_iw) / (iw[-1]["iw_k"] * iw[-1]["n_iw"])
        return seconds, short_device(ref.provenance.get("device")) or "unknown device"
    return None


@dataclasses.dataclass(frozen=True)
class RegistryPlan:
    """Where a chapter reads and trains runs, and what it will train there (see :func:`plan_registry`)."""

    path: Path  # the registry: read, and trained into when a run is missing
    source: str  # "env" ($LVAE_RESULTS), "committed" or "scratch"
    why: str  # why this registry, one clause
    reuse: tuple[Path, ...] = ()  # complete committed runs that apply() copies into a scratch registry
    train: tuple[tuple[str, int, float | None, str | None], ...] = ()  # (run, epochs, seconds, device)

    def describe(self) -> str:
        """One paragraph for the reader: the registry, and what will be trained, how long, before it is."""
        head = f"Run registry: {self.path} ({self.why})"
        if self.reuse:
            head += f"; {len(self.reuse)} committed run(s) copied into it"
        if not self.train:
            return head + ". Every run this chapter reads is there: nothing to train."
        names = ", ".join(f"{name} ({epochs} epochs{', ' + _minutes(s) if s is not None else ''})"
                          for name, epochs, s, _ in self.train)
        known = [(s, dev) for _, _, s, dev in self.train if s is not None]
        seconds = sum(s for s, _ in known)
        total = (f"{'about ' if seconds >= 60 else ''}{_minutes(seconds)} in all at the speed of the committed runs "
                 f"({known[0][1]})" if known else "no committed run of these models to estimate the time from")
        unknown = len(self.train) - len(known)
        if known and unknown:
            total += f", plus {unknown} run(s) with no estimate"
        return (f"{head}. This chapter first trains {len(self.train)} run(s) that are not there: {names}; {total}. "
                f"Interrupt the kernel to stop: a run resumes from its last checkpoint.")

    def apply(self) -> None:
        """Copy the reusable committed runs into the scratch registry (without their checkpoints) and
        make this registry the process's default (``$LVAE_RESULTS``, which ``lvae.runs`` reads)."""
        for src in self.reuse:
            dst = self.path / src.name
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{src.name}.copy-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoint.pt", ".lock", ".*.tmp-*"))
            try:
                os.replace(tmp, dst)
            except OSError:  # another process copied it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
        os.environ[RESULTS_ENV] = str(self.path)
        global _registry_set_by_setup
        _registry_set_by_setup = None if self.source == "env" else str(self.path)


_registry_set_by_setup: str | None = None  # $LVAE_RESULTS as setup() set it (not the user's choice)


def plan_registry(P) -> RegistryPlan:
    """The run registry for profile ``P``, by one rule:

    1. ``$LVAE_RESULTS`` when it was set outside the chapter: you asked for that registry
       (``lvae book --results DIR`` sets it);
    2. else the committed registry ``<repository>/results`` when it holds every run the chapter
       reads (:func:`profile_configs`), complete: the chapter only reads;
    3. else a scratch registry, ``<repository>/_build/<profile>-results`` (git-ignored), into which
       the complete committed runs it can reuse are copied; the rest is trained there. Without a
       repository (lvae installed from an index or a wheel) it is ``~/.cache/lvae/<profile>-results``.

    So runs of any other profile or parameters never land in ``results/`` unless you ask for it.
    """
    configs = profile_configs(P)
    repo = repository()
    committed = repo / COMMITTED if repo is not None else None
    have = {c.dir_name for c in configs if committed is not None and _complete(committed / c.dir_name, P.epochs)}
    env = os.environ.get(RESULTS_ENV)
    reuse: list[Path] = []
    if env and env != _registry_set_by_setup:
        path, source, why = Path(env), "env", f"${RESULTS_ENV}"
    elif committed is not None and len(have) == len(configs):
        path, source, why = committed, "committed", "the committed runs"
    else:
        source = "scratch"
        if repo is not None:
            path = repo / SCRATCH / f"{P.name}-results"
            why = (f"a scratch registry: {len(configs) - len(have)} of the {len(configs)} runs of profile "
                   f"{P.name!r} with these parameters are not among the committed runs in {committed}")
        else:
            path = Path.home() / ".cache" / "lvae" / f"{P.name}-results"
            why = ("a scratch registry: this lvae was not installed from a clone of the repository, so the "
                   "committed runs are not here (git clone the repository and pip install the clone)")
        reuse = [committed / name for name in sorted(have) if _complete(path / name, P.epochs) is None]
    reused = {p.name for p in reuse}
    missing = [c for c in configs if c.dir_name not in reused and _complete(path / c.dir_name, P.epochs) is None]
    train = []
    if missing:
        references = [r for r in (list_runs(committed) if committed is not None else []) if r.status == "complete"]
        for c in missing:
            est = _estimate(c, P, references)
            train.append((c.dir_name, P.epochs, est[0] if est else None, est[1] if est else None))
    return RegistryPlan(path, source, why, tuple(reuse), tuple(train))


# -- the chapter's set-up ------------------------------------------------------------------------
def setup(namespace: dict[str, Any]):
    """The chapter's set-up cell: ``P = lvae.book.setup(globals())``. Returns the profile ``P``.

    Reads ``profile`` and the chapter parameters (:data:`PARAMETERS`) from ``namespace`` (the
    notebook's globals, where papermill injects them) and checks them (a bad value is one line
    naming the parameter, with an example); picks the run registry (:func:`plan_registry`) and
    prints it, with what will be trained and roughly how long, before anything is; puts the names
    every chapter uses into ``namespace`` (:data:`CHAPTER_NAMES`); selects inline figures and
    glues ``budget`` and ``profile`` for the prose.
    """
    if "profile" not in namespace:
        raise ParameterError("the chapter's parameters cell defines no `profile`; add profile = \"cpu\"")
    params = {k: namespace[k] for k in PARAMETERS if k in namespace}
    P = resolve_profile(namespace["profile"], **params)
    plan = plan_registry(P)
    plan.apply()
    print(plan.describe())
    namespace.update({name: globals()[name] for name in CHAPTER_NAMES})
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None:
        with contextlib.suppress(NotImplementedError):  # a bare InteractiveShell (no kernel) has no GUI hook
            shell.run_line_magic("matplotlib", "inline")
    glue("budget", P.budget())
    glue("profile", P.name)
    return P


def _requirement_installed(requirement: str) -> bool:
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if name is None:
        return True
    try:
        version = importlib.metadata.version(name.group(1))
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return True  # installed; its version is not checked without `packaging`
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def extra_requirements(extra: str = "book") -> list[str]:
    """The requirements of lvae's optional ``extra`` (pyproject.toml), without their markers."""
    out = []
    for req in importlib.metadata.requires("lvae") or []:
        spec, _, marker = req.partition(";")
        if re.search(r"""extra\s*==\s*["']""" + re.escape(extra) + """["']""", marker):
            out.append(spec.strip())
    return out


def install_extra(extra: str = "book") -> None:
    """Install (pip) the requirements of lvae's ``extra`` that are missing or too old.

    For the install cell: lvae installed without the ``book`` extra lacks e.g. ipywidgets, which
    the latent chapter needs. Nothing is installed when everything is there.
    """
    missing = [r for r in extra_requirements(extra) if not _requirement_installed(r)]
    if missing:
        print(f"Installing what the chapters need from lvae's {extra!r} extra: {' '.join(missing)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
        importlib.invalidate_caches()


# -- helpers for chapters ------------------------------------------------------------------------
class _Text(str):
    """A string whose repr is itself, so ``{glue:text}`` prints it without quotes."""

    def __repr__(self) -> str:
        return str(self)


def glue(name: str, value: Any, display: bool = False) -> None:
    """myst-nb's ``glue`` (numbers in prose); a no-op where myst-nb is not installed (Colab).

    Floats are glued as Python floats (format them in the prose: ``{glue:text}`name:.2f```),
    strings without quotes. myst-nb reads a glued text as a Python literal where it can, so a string
    such as ``"10,000"`` would print as ``(10, 0)``: such strings are refused (glue the number and
    format it in the prose, ``{glue:text}`name:,```).
    """
    if isinstance(value, str):
        try:
            literal = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            literal = value
        if isinstance(literal, (tuple, list, dict, set)):
            raise BookError(f"glue({name!r}, {value!r}): the book would print this as {literal!r}; glue the "
                            f"number itself and format it in the prose, e.g. {{glue:text}}`{name}:,`")
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    if isinstance(value, str):
        value = _Text(value)
    elif hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    _glue(name, value, display=display)


class Table:
    """A small HTML table (``_repr_html_``) with a caption; ``None`` cells print as an em dash, a
    tuple cell as one line per item."""

    def __init__(self, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, caption: str = "",
                 fmt: str = "{:.2f}"):
        self.rows = list(rows)
        self.columns = list(columns or (self.rows[0].keys() if self.rows else []))
        self.caption, self.fmt = caption, fmt

    def _cell(self, v: Any, line_break: str = "<br>") -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return self.fmt.format(v)
        if isinstance(v, tuple):
            return line_break.join(self._cell(x, line_break) for x in v)
        return html.escape(str(v))

    def _td(self, v: Any) -> str:
        """One cell. lvae.css keeps a short value on one line (``-85.23``, ``not run``,
        ``64-32-16-8``, ``cpu, 2 threads``); a cell with a line longer than 14 characters is a
        phrase, which may wrap where the table is too wide for the page."""
        lines = v if isinstance(v, tuple) else (v,)
        phrase = any(len(self._cell(x, " ")) > 14 for x in lines)
        return f'<td class="lvae-phrase">{self._cell(v)}</td>' if phrase else f"<td>{self._cell(v)}</td>"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(self._td(r.get(c)) for c in self.columns) + "</tr>" for r in self.rows)
        cap = f'<p class="lvae-caption">{html.escape(self.caption)}</p>' if self.caption else ""
        return (f'<div class="lvae-table-wrap"><table class="lvae-table"><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>{cap}</div>")

    def __repr__(self) -> str:
        lines = [" | ".join(self.columns)] + [" | ".join(self._cell(r.get(c), " ") for c in self.columns)
                                              for r in self.rows]
        return (self.caption + "\n" if self.caption else "") + "\n".join(lines)


def show_source(obj: Any):
    """The source of a library function without its docstring, as highlighted code (for chapters
    that show "the few lines that implement it")."""
    from IPython.display import Code

    src = textwrap.dedent(inspect.getsource(obj))
    node = ast.parse(src).body[0]
    lines = src.splitlines()
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = body[0]
        lines = lines[:doc.lineno - 1] + lines[doc.end_lineno:]
    return Code("\n".join(lines), language="python")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, caption: str = "",
          fmt: str = "{:.2f}") -> Table:
    return Table(rows, columns, caption, fmt)

