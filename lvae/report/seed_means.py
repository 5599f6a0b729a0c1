"""One model's numbers over its seeds, and differences between models.

A model is a (variant, depth); its runs are looked up by key (variant, depth, seed) in a dict such as
:func:`lvae.report.run_values.profile_runs` or :func:`lvae.training.profile_runs.grid_runs` give.
:class:`SeedMean` is one number of one model: the mean over the seeds that have it, with a 95 % CI from
their spread and the test-image s.e. (:data:`CI_NOTE` says so under a table). :func:`run_contrast`
and :func:`difference` compare models, image by image where the runs stored per-image values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from lvae.registry.runs import Run
from lvae.report.run_values import best_lk, final, lk_counts, run_state, run_value
from lvae.report.stats import Estimate, contrast, contrast_of_means, contrast_partly_paired, mean_ci


# -- the test images and importance samples runs share -------------------------------------------
def iw_k(runs: Iterable, default: int | None = None) -> int | None:
    """The importance samples K of the L_K the runs measured: the first run's that has one, else ``default``."""
    return next((r.last("iw_k") for r in runs if r is not None and r.last("iw_k")), default)


def lk_images(runs: Iterable) -> int | None:
    """The most test images on which every complete run of ``runs`` has its final L_K (training-time
    evaluation or ``lvae eval`` of the final weights), so that their L_K are means over the same
    images; None when no run has one."""
    common: set[int] | None = None
    for run in runs:
        if run is None or not run.ok:
            continue
        counts = lk_counts(run)
        if counts:
            common = counts if common is None else common & counts
    return max(common) if common else None


# -- one model over its seeds --------------------------------------------------------------------
@dataclass(frozen=True)
class SeedMean:
    """One number of one model over the seeds a profile lists: the mean over the seeds that have it,
    with a 95 % CI from their spread (:func:`lvae.report.stats.mean_ci`), and the test-image s.e."""

    metric: str
    values: dict[int, float]  # seed -> value, for the seeds with a number
    missing: dict[int, str]  # seed -> why it has none (:func:`lvae.report.run_values.run_state`)
    estimate: Estimate | None  # None when no seed has a number
    image_se: float | None  # the test-image s.e. (mean over the seeds; they share the test images)
    n_images: int | None

    @property
    def value(self) -> float | None:
        return None if self.estimate is None else self.estimate.mean

    @property
    def n_seeds(self) -> int:
        return len(self.values)

    def text(self, fmt: str = "{:.2f}") -> str | None:
        """``-98.79 ± 0.31`` (95 % CI over the seeds), or with one seed ``-98.79 ± 0.12 s.e.`` (the
        test-image s.e.; a bare number where there is none); None without a number."""
        if self.estimate is None:
            return None
        if self.n_seeds > 1:
            return self.estimate.text(fmt)
        m = self.estimate.mean
        if self.image_se is None:
            return f"{m:.0f}" if float(m).is_integer() else fmt.format(m)
        return f"{fmt.format(m)} ± {fmt.format(self.image_se)} s.e."

    def spread_text(self, fmt: str = "{:.2f}") -> str:
        """:meth:`text` without the mean: ``± 0.31`` or ``± 0.12 s.e.`` ("" without one), for prose
        that glues the mean as a number."""
        text, m = self.text(fmt), self.value
        return "" if text is None or m is None else text[len(fmt.format(m)):].strip()

    def cell(self, fmt: str = "{:.2f}", seeds: bool = True) -> tuple[str, ...] | str:
        """A table cell: :meth:`text`, then the test-image s.e. (several seeds), then the number of
        seeds ("1 seed", "3 seeds") unless ``seeds`` is False (a table with a seeds column)."""
        lines = [self.text(fmt) or "—"]
        if self.n_seeds > 1 and self.image_se is not None:
            lines.append(f"s.e. {fmt.format(self.image_se)} (images)")
        if seeds and self.n_seeds:
            lines.append(f"{self.n_seeds} seed{'s' if self.n_seeds > 1 else ''}")
        return tuple(lines) if len(lines) > 1 else lines[0]


CI_NOTE = ("Ours: mean over the seeds ± half-width of its 95 % CI over the seeds (Student t); 's.e. (images)': "
           "the standard error over the test images; with 1 seed only the latter is known.")


def seeds_cell(cells: Sequence[SeedMean], listed: int, agg=max) -> tuple[str, ...] | str:
    """"2 of 3": the seeds with a number (``agg`` over ``cells``: max for one model's columns, min
    for a comparison of models) of the seeds listed, then why the others have none."""
    n = agg((c.n_seeds for c in cells), default=0)
    missing = {}
    for c in cells:
        missing.update(c.missing)
    lines = [f"{n} of {listed}"] + [f"seed {s}: {why}" for s, why in sorted(missing.items())]
    return tuple(lines) if len(lines) > 1 else lines[0]


def seed_mean(runs: dict, variant: str, depth: int, metric: str, n: int | None = None,
              seeds: Sequence[int] | None = None) -> SeedMean:
    """``metric`` of model (variant, depth) over ``seeds`` (every seed in ``runs`` when None), each
    run looked up by its key (variant, depth, seed); ``n``: the test images of an L_K (all runs
    must have it on the same images, see :func:`lk_images`)."""
    seeds = sorted({k[2] for k in runs}) if seeds is None else list(seeds)
    vals, ses, missing, n_images = {}, [], {}, set()
    for s in seeds:
        run = runs.get((variant, depth, s))
        got = run_value(run, metric, n)
        if got is None:
            missing[s] = run_state(run) if run is None or not run.ok else f"no {metric}"
            continue
        vals[s] = got[0]
        ses.append(got[1])
        n_images.add(got[2])
    est = mean_ci(list(vals.values()), n_images=next(iter(n_images)) if len(n_images) == 1 else None) \
        if vals else None
    image_se = float(np.mean(ses)) if ses and all(e is not None for e in ses) else None
    return SeedMean(metric, vals, missing, est, image_se, est.n_images if est else None)


# -- every model of a grid -----------------------------------------------------------------------
def grid_estimates(runs: dict, metric: str, variants: Sequence[str] | None = None,
                   n: int | None = None) -> dict[str, dict[int, SeedMean]]:
    """{variant: {depth: :class:`SeedMean` of ``metric``}} over every seed in ``runs``."""
    variants = variants or list(dict.fromkeys(k[0] for k in runs))
    if metric == "test_LK" and n is None:
        n = lk_images(runs.values())
    depths = sorted({k[1] for k in runs})
    return {v: {d: seed_mean(runs, v, d, metric, n) for d in depths} for v in variants
            if any(k[0] == v for k in runs)}


def grid_table(runs: dict, metric: str) -> dict[str, dict[int, float | None]]:
    """{variant: {depth: mean over the seeds of the final ``metric``}} of the runs in ``runs`` (keyed
    (variant, depth, seed), e.g. :func:`lvae.training.profile_runs.grid_runs`)."""
    return {v: {d: e.value for d, e in by.items()} for v, by in grid_estimates(runs, metric).items()}


def best_model(runs: dict, metric: str, variants: Sequence[str], n: int | None = None) -> tuple[str, int] | None:
    """The (variant, depth) among ``variants`` with the highest mean over the seeds of ``metric``."""
    models = sorted({k[:2] for k in runs if k[0] in variants})
    scored = [(m, seed_mean(runs, *m, metric, n).value) for m in models]
    scored = [(m, v) for m, v in scored if v is not None]
    return max(scored, key=lambda mv: mv[1])[0] if scored else None


def best_depths(runs: dict, metric: str = "test_L1") -> dict[str, int]:
    """The depth with the best mean over the seeds of the final ``metric`` for each variant."""
    table = grid_table(runs, metric)
    return {v: max(ds, key=lambda d: t[d]) for v, t in table.items() if (ds := [d for d in t if t[d] is not None])}


# -- differences between models ------------------------------------------------------------------
def run_contrast(terms: Sequence[tuple[float, Sequence[Run]]], metric: str, k: int | None = None,
                 n: int | None = None) -> tuple[Estimate | None, str]:
    """sum_j w_j * model j's final ``metric``, each model the mean over its runs (one per seed).

    ``terms``: ``(w_j, the complete runs of model j, at least one)``; ``metric``: ``test_L1``, or
    ``test_LK`` with ``k`` importance samples (any when None) on ``n`` test images (None: the most
    on which every run has per-image values, else an L_K, see :func:`lvae.report.run_values.lk_counts`). Image by image
    (:func:`lvae.report.stats.contrast`) when every run stored per-image values on the same images; when
    only some did, but each model has one, the seed means with the test-image part paired on those
    (:func:`lvae.report.stats.contrast_partly_paired`); otherwise the seed means with each run's test-image
    s.e. (:func:`lvae.report.stats.contrast_of_means`). Returns (estimate, how it was computed), or
    (None, why) when the runs have no L_K on common test images.
    """
    weights = [float(w) for w, _ in terms]
    runs = [list(rs) for _, rs in terms]
    allruns = [r for rs in runs for r in rs]
    if metric == "test_L1":
        per = [[r.per_image() for r in rs] for rs in runs]
        if all(p is not None for ps in per for p in ps) and len({p["test_L1"].size for ps in per for p in ps}) == 1:
            return contrast([(w, [p["test_L1"] for p in ps]) for w, ps in zip(weights, per)]), _paired(terms)
        n = final(allruns[0], "n_test")
        values = [[final(r, metric) for r in rs] for rs in runs]
        ses = [[final(r, metric + "_se") for r in rs] for rs in runs]
        have = [[p["test_L1"] for p in ps if p is not None and p["test_L1"].size == n] for ps in per]
    else:
        if n is None:
            common = (set.intersection(*[r.per_image_sizes(k) for r in allruns])
                      or set.intersection(*[lk_counts(r, k) - {None} for r in allruns]))
            if not common:
                return None, f"no L{k or 'K'} on common test images"
            n = max(common)
        per = [[r.per_image(k, n) for r in rs] for rs in runs]
        if all(p is not None for ps in per for p in ps):
            return contrast([(w, [p["test_LK"] for p in ps]) for w, ps in zip(weights, per)]), _paired(terms)
        lks = [[best_lk(r, n) for r in rs] for rs in runs]
        values = [[x["value"] for x in xs] for xs in lks]
        ses = [[x["se"] for x in xs] for xs in lks]
        have = [[p["test_LK"] for p in ps if p is not None] for ps in per]
    missing = sorted({r.name for rs, ps in zip(runs, per) for r, p in zip(rs, ps) if p is None})
    if len(terms) > 1 and all(have):
        est = contrast_partly_paired([(w, v, h) for w, v, h in zip(weights, values, have)], n)
        return est, (f"seed means; test-image spread paired per image on the {len(allruns) - len(missing)} of "
                     f"{len(allruns)} runs with per-image values")
    est = contrast_of_means([(w, v, s if all(e is not None for e in s) else None)
                             for w, v, s in zip(weights, values, ses)], n_images=n)
    what = "unpaired difference of seed means" if len(terms) > 1 else "mean over seeds"
    return est, f"{what} ({len(missing)} of {len(allruns)} runs have no per-image values)"


def _paired(terms) -> str:
    return "paired per test image" if len(terms) > 1 else "mean over seeds"


def difference(runs: dict, a: tuple[str, int], b: tuple[str, int], metric: str,
               n: int | None = None) -> Estimate | None:
    """Model a minus model b, each (variant, depth) over its seeds in ``runs`` that have the number
    (:func:`seed_mean`), by :func:`run_contrast`: image by image where the runs stored per-image
    values. ``metric``: ``test_L1`` or ``test_LK`` (on ``n`` test images). None when a side has no number."""
    sides = [seed_mean(runs, *m, metric, n) for m in (a, b)]
    if any(sm.estimate is None for sm in sides):
        return None
    terms = [(w, [runs[(*m, s)] for s in sm.values]) for w, m, sm in zip((1.0, -1.0), (a, b), sides)]
    return run_contrast(terms, metric, n=n if metric == "test_LK" else None)[0]
