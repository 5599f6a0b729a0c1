"""A chapter's parameters and the run registry it reads: what ``lvae book`` and a chapter's set-up
both decide before anything runs (no figures, no widgets: the command line imports this).

* :data:`PARAMETERS` -- the overrides a chapter's papermill ``parameters`` cell takes, and
  :func:`parse_parameter` / :func:`resolve_profile`, which check them and apply them to a profile;
* :func:`plan_registry` -- the one rule that picks the registry: the committed ``results/`` of the
  lvae repository (:func:`lvae.registry.runs.repository`) when they hold every run the chapter
  needs, else a scratch registry under the repository's ``_build/``, with what it will train and
  an estimate of how long (:class:`RegistryPlan`);
* :func:`chapter_profile` -- both together: the profile a chapter's set-up returns
  (:class:`ChapterProfile`, the profile with the parameters applied and its ``plan``).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from lvae.data.datasets import DATASETS
from lvae.registry.profiles import Profile, available, experiment, load_profile
from lvae.registry.runs import COMMITTED, RESULTS_ENV, list_runs, repository, stored_run
from lvae.registry.storage import RunError, short_device

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
                             f"(lvae/registry/profiles.yml), e.g. {_example('profile', 'smoke', style)}")
    unknown = sorted(set(overrides) - set(PARAMETERS))
    if unknown:
        raise ParameterError(f"unknown chapter parameter(s) {unknown}; valid: {sorted(PARAMETERS)}")
    changes = {OVERRIDES[k]: v for k, v in ((k, parse_parameter(k, v, style)) for k, v in overrides.items())
               if v is not None}
    p = load_profile(profile)
    return dataclasses.replace(p, **changes) if changes else p


# -- where the runs are --------------------------------------------------------------------------
def _complete(path: Path, epochs: int):
    """The run at ``path`` when it is complete with at least ``epochs`` epochs, else None."""
    try:
        run = stored_run(path)
        return run if run is not None and run.status == "complete" and run.epochs >= epochs else None
    except (RunError, OSError, ValueError, KeyError):
        return None


def profile_configs(P) -> list:
    """The RunConfigs a chapter may train under profile ``P``: its grid (variants x depths) for its
    first seed. Further seeds are only read when present (:func:`lvae.training.profile_runs.grid_runs`)."""
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
        make this registry the process's default (``$LVAE_RESULTS``, which ``lvae.registry.runs`` reads)."""
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
@dataclasses.dataclass(frozen=True)
class ChapterProfile(Profile):
    """The profile a chapter runs with: a :class:`lvae.registry.profiles.Profile` with the chapter's
    parameters applied, and ``plan``, the run registry it reads (:class:`RegistryPlan`). It is a
    profile: ``P.depths``, ``P.budget()``, ``grid_runs(P)`` work as with any other."""

    plan: RegistryPlan | None = dataclasses.field(default=None, compare=False, repr=False)


def chapter_profile(profile: str, **parameters: Any) -> ChapterProfile:
    """The profile ``profile`` with the chapter parameters ``parameters`` applied (:func:`resolve_profile`:
    None keeps the profile's value, a bad value raises ParameterError) and its run registry
    (:func:`plan_registry`), which is not applied yet (:meth:`RegistryPlan.apply`)."""
    p = resolve_profile(profile, **parameters)
    fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(Profile)}
    return ChapterProfile(**fields, plan=plan_registry(p))
