"""Uncertainty of our numbers: means over seeds with confidence intervals, and paired differences.

Two sources of uncertainty sit behind every number the book compares with the paper:

- **training seeds**: a model trained again with another seed scores differently. With S seeds
  the mean's standard error is sd/sqrt(S), and the interval uses Student's t with S - 1 degrees of
  freedom (with S = 1 this part is unknown);
- **test images**: a bound is a mean over N test images; its standard error is sd/sqrt(N).

:func:`mean_ci` gives a quantity's mean over seeds with a CI from the seeds.
:func:`paired_difference` compares two models image by image on the same test images (the
per-image values each run stores, see :func:`lvae.registry.runs.save_per_image`): the per-image spread of the
differences is much smaller than either model's own, so small margins can be resolved. Its
interval combines both sources.

**Degrees of freedom.** A seed part estimated from S seeds has S - 1 degrees of freedom (2 with three
seeds). The Welch-Satterthwaite df of a sum of such parts is itself estimated from those few seeds
and comes out at 4-6.5 for a contrast of two models with three seeds each, which is too liberal:
with the measured seed and image spreads its 95 % interval covers the true difference less than
95 % of the time (``tests/test_stats.py`` simulates it). Every interval here therefore uses the
smallest df of its seed parts (Hsu's conservative rule for the Behrens-Fisher problem), which keeps
the coverage at or above 95 %; an estimate without a seed part (one seed, or quantities that are
not seed means) takes the test images' df.

**Counts** (active units, active layers) are integers: three seeds with the same count have a sample
variance of 0, which is no evidence of a variance of 0. ``resolution`` (1 for a count) sets a
floor on each model's seed variance, that of a value rounded to the count's unit
(resolution^2 / 12), so equal counts never give a zero-width interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy import stats as _st

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error and a two-sided confidence interval.

    ``n_seeds``: the training seeds behind it; ``n_images``: the test images (None when the
    quantity is not a per-image mean, e.g. a count of active units). ``seed_se_known`` is False
    when only one seed exists, so the interval covers the test images only.
    """

    mean: float
    se: float
    lo: float
    hi: float
    n_seeds: int
    n_images: int | None = None
    seed_se_known: bool = True
    level: float = LEVEL
    df: float = math.inf  # degrees of freedom of the interval (see the module docstring)
    # the variance over training seeds of one seed's value of this quantity (sum_j w_j^2 var_s,j, not
    # divided by the seeds), and its df: what a budget with a single seed borrows (:func:`with_seed_term`)
    seed_var: float | None = None
    seed_df: float | None = None
    borrowed: bool = False  # the seed term comes from the same quantity at another budget (with_seed_term)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes(self, value: float = 0.0) -> bool:
        """True when the interval lies entirely above or entirely below ``value``."""
        return self.lo > value or self.hi < value

    def at_level(self, level: float) -> "Estimate":
        """The same estimate with its interval at another confidence ``level`` (same df), e.g. the
        Bonferroni level of a claim made of several parts."""
        if level == self.level or not math.isfinite(self.half_width):
            return self
        q_old, q_new = _quantile(self.level, self.df), _quantile(level, self.df)
        h = self.half_width * q_new / q_old if q_old > 0 else self.half_width
        return replace(self, lo=self.mean - h, hi=self.mean + h, level=level)

    def text(self, fmt: str = "{:.2f}") -> str:
        """``-98.79 ± 0.31`` (half-width of the CI), or the bare mean when no interval exists."""
        if not math.isfinite(self.half_width):
            return fmt.format(self.mean)
        return f"{fmt.format(self.mean)} ± {fmt.format(self.half_width)}"


def _t(level: float, df: float) -> float:
    return float(_st.t.ppf(0.5 + level / 2, df)) if df > 0 and math.isfinite(df) else float("nan")


def _quantile(level: float, df: float) -> float:
    """The two-sided quantile of Student's t with ``df`` (the normal's for an infinite df)."""
    return _t(level, df) if math.isfinite(df) else float(_st.norm.ppf(0.5 + level / 2))


def mean_ci(values: Sequence[float], level: float = LEVEL, n_images: int | None = None) -> Estimate:
    """Mean over seeds, with a Student-t CI from the spread between seeds (NaN with one seed).

    ``values``: one number per seed (non-finite values are refused: a failed run has no number).
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"mean_ci got non-finite values {v.tolist()}; a failed run has no number to average")
    m = float(v.mean())
    if v.size == 1:
        return Estimate(m, float("nan"), float("nan"), float("nan"), 1, n_images, seed_se_known=False, level=level)
    se = float(v.std(ddof=1) / math.sqrt(v.size))
    h = _t(level, v.size - 1) * se
    return Estimate(m, se, m - h, m + h, int(v.size), n_images, level=level, df=v.size - 1,
                    seed_var=float(v.var(ddof=1)), seed_df=v.size - 1)


def paired_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], level: float = LEVEL) -> Estimate:
    """Mean of A - B over the same test images, each side averaged over its seeds.

    ``a`` and ``b``: one array per seed of per-image values (e.g. test L1 or L5000 per image) on the
    same test images in the same order. Per image, d_i = mean_s a_s,i - mean_s b_s,i. The standard
    error adds the test-image part var(d_i)/N and, per side with two or more seeds, the seed part
    var_s(mean_i a_s,i)/S. A side with one seed contributes no seed part, and the estimate says so
    (``seed_se_known`` False).
    """
    A, B = _stack(a, "a"), _stack(b, "b")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"paired_difference needs the same test images on both sides: {A.shape[1]} vs "
                         f"{B.shape[1]} per-image values")
    return contrast([(1.0, A), (-1.0, B)], level)


def _stack(arrays: Sequence[np.ndarray], name: str) -> np.ndarray:
    arrays = [np.asarray(x, dtype=np.float64).ravel() for x in arrays]
    if not arrays:
        raise ValueError(f"paired_difference: side {name} has no runs")
    if len({x.size for x in arrays}) != 1:
        raise ValueError(f"paired_difference: the seeds of side {name} cover different numbers of test images "
                         f"({[x.size for x in arrays]})")
    out = np.stack(arrays)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"paired_difference: side {name} has non-finite per-image values")
    return out


def contrast(terms: Sequence[tuple[float, Sequence[np.ndarray]]], level: float = LEVEL) -> Estimate:
    """A weighted sum of models, image by image: sum_j w_j * (model j's per-image value, mean over its seeds).

    ``terms``: ``(w_j, per-seed arrays of model j)``, all on the same test images in the same order.
    ``[(1, a), (-1, b)]`` is :func:`paired_difference`; ``[(1, a)]`` is one model's mean with both
    sources of uncertainty; ``[(1, d3), (-2, d2), (1, d1)]`` is the change in the gain per added
    layer. The standard error adds the test-image part var_i(d_i)/N and, per model with two or
    more seeds, w_j^2 var_s(mean_i x_j,s,i)/S_j; degrees of freedom as the module docstring says.
    ``seed_se_known`` is False when a model has a single seed (its seed part is unknown).
    """
    if not terms:
        raise ValueError("contrast needs at least one term")
    sides = [(float(w), _stack(x, f"term {j}")) for j, (w, x) in enumerate(terms)]
    sizes = {x.shape[1] for _, x in sides}
    if len(sizes) != 1:
        raise ValueError(f"contrast needs the same test images in every term: per-image values of sizes "
                         f"{[x.shape[1] for _, x in sides]}")
    n = sizes.pop()
    d = sum(w * x.mean(0) for w, x in sides)
    m = float(d.mean())
    parts = [(float(d.var(ddof=1)) / n, n - 1)] if n > 1 else []
    seed = [(w * w * float(x.mean(1).var(ddof=1)), x.shape[0]) for w, x in sides if x.shape[0] > 1]
    known = all(x.shape[0] > 1 for _, x in sides)
    return _from_parts(m, parts, seed, min(x.shape[0] for _, x in sides), n, known, level)


def contrast_of_means(terms: Sequence[tuple[float, Sequence[float], Sequence[float] | None]],
                      n_images: int | None = None, level: float = LEVEL,
                      resolution: float | None = None) -> Estimate:
    """A weighted sum of models from their per-seed results alone (no per-image values): the unpaired fallback.

    ``terms``: ``(w_j, one value per seed, each seed's test-image standard error or None)``. The
    standard error adds, per model, the seed part w_j^2 var_s/S_j (two or more seeds) and the
    test-image part w_j^2 mean_s(se_s^2): the seeds of a model share the test images, so averaging
    them does not shrink it, and the models are treated as independent although they share the test
    images (conservative: scores of two models on the same images are positively correlated).
    ``n_images``: the test images behind each value (None for quantities that are not image
    means, e.g. a count of active units, which have no test-image part). ``resolution``: the unit of
    an integer-valued quantity (1 for a count), whose seed variance is floored at resolution^2 / 12.
    """
    if not terms:
        raise ValueError("contrast_of_means needs at least one term")
    m, seed, n_seeds, known = _seed_means("contrast_of_means", [(w, v) for w, v, _ in terms], resolution)
    parts: list[tuple[float, float]] = []
    for j, (w, values, se) in enumerate(terms):
        w = float(w)
        if se is not None:
            v = np.asarray(list(values), dtype=np.float64)
            s = np.asarray(list(se), dtype=np.float64)
            if s.size != v.size or not np.all(np.isfinite(s)):
                raise ValueError(f"contrast_of_means: term {j} needs one finite standard error per seed, "
                                 f"got {s.tolist()}")
            parts.append((w * w * float((s ** 2).mean()), (n_images - 1) if n_images and n_images > 1 else math.inf))
    if not known and not any(se is not None for _, _, se in terms):
        # one seed and no test-image part: nothing is known about the spread
        return Estimate(m, float("nan"), float("nan"), float("nan"), min(n_seeds), n_images, seed_se_known=False,
                        level=level)
    return _from_parts(m, parts, seed, min(n_seeds), n_images, known, level)


def contrast_partly_paired(terms: Sequence[tuple[float, Sequence[float], Sequence[np.ndarray]]],
                           n_images: int, level: float = LEVEL) -> Estimate:
    """A weighted sum of models when only some seeds stored per-image values: the seed means of all
    seeds, with the test-image part measured image by image on the seeds that have them.

    ``terms``: ``(w_j, one value per seed (all seeds), per-image arrays of the seeds that have
    them (at least one))``. The mean and the seed part (w_j^2 var_s/S_j, two or more seeds) come
    from all seeds; the test-image part is var_i(d_i)/N of the per-image contrast d_i over the seeds
    with per-image values. Averaging fewer seeds per image leaves more seed noise in d_i, so this
    part is, if anything, too large (conservative), and much smaller than the unpaired
    :func:`contrast_of_means`, which ignores that two models are scored on the same images.
    """
    if not terms:
        raise ValueError("contrast_partly_paired needs at least one term")
    m, seed, n_seeds, known = _seed_means("contrast_partly_paired", [(w, v) for w, v, _ in terms])
    parts: list[tuple[float, float]] = []
    sides = [(float(w), _stack(arrays, f"term {j}")) for j, (w, _, arrays) in enumerate(terms)]
    if len({x.shape[1] for _, x in sides}) != 1 or sides[0][1].shape[1] != n_images:
        raise ValueError(f"contrast_partly_paired needs per-image values on the same {n_images} test images in every "
                         f"term, got sizes {[x.shape[1] for _, x in sides]}")
    d = sum(w * x.mean(0) for w, x in sides)
    if n_images > 1:
        parts.append((float(d.var(ddof=1)) / n_images, n_images - 1))
    return _from_parts(m, parts, seed, min(n_seeds), n_images, known, level)


def _seed_means(caller: str, terms, resolution: float | None = None
                ) -> tuple[float, list[tuple[float, int]], list[int], bool]:
    """sum_j w_j mean_s(values_j), the seed parts ``(w_j^2 var_s,j, S_j)`` of the terms with two or more
    seeds (var_s floored at resolution^2 / 12 for an integer quantity), the seed counts, and whether
    every term had two or more."""
    m, seed, n_seeds, known = 0.0, [], [], True
    floor = 0.0 if resolution is None else resolution ** 2 / 12
    for j, (w, values) in enumerate(terms):
        v = np.asarray(list(values), dtype=np.float64)
        if v.size == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"{caller}: term {j} has values {v.tolist()}; a failed run has no number")
        w = float(w)
        m += w * float(v.mean())
        n_seeds.append(v.size)
        if v.size > 1:
            seed.append((w * w * max(float(v.var(ddof=1)), floor), v.size))
        else:
            known = False
    return m, seed, n_seeds, known


def _from_parts(m: float, parts: list[tuple[float, float]], seed: list[tuple[float, int]], n_seeds: int,
                n_images: int | None, known: bool, level: float) -> Estimate:
    """An Estimate whose variance is a sum of independent parts: the test-image ``parts`` ``(variance,
    df)`` and the ``seed`` parts ``(w_j^2 var_s,j, S_j)``, each contributing w_j^2 var_s,j / S_j. The df
    is the smallest of the seed parts' (S_j - 1), else the image parts' (see the module docstring)."""
    seed_var = sum(v for v, _ in seed) if seed else None
    seed_df = min(k - 1 for _, k in seed) if seed else None
    allparts = parts + [(v / k, k - 1) for v, k in seed]
    if not allparts:
        return Estimate(m, float("nan"), float("nan"), float("nan"), n_seeds, n_images, seed_se_known=known,
                        level=level)
    var = sum(p for p, _ in allparts)
    se = math.sqrt(var)
    df = float(seed_df) if seed else min((k for p, k in parts), default=math.inf)
    h = _quantile(level, df) * se
    return Estimate(m, se, m - h, m + h, n_seeds, n_images, seed_se_known=known, level=level, df=df,
                    seed_var=seed_var, seed_df=seed_df)


def with_seed_term(est: Estimate, seed_var: float | None, seed_df: float | None, level: float = LEVEL) -> Estimate:
    """A one-seed ``est`` (its interval covers the test images only) with the seed term borrowed from the
    same quantity measured over several seeds elsewhere (e.g. at a shorter budget): the variance of one
    seed's value ``seed_var`` (:attr:`Estimate.seed_var`) with ``seed_df`` degrees of freedom, added to
    the test-image variance. Without a seed term the estimate is returned unchanged (seed spread unknown)."""
    if seed_var is None or seed_df is None or not seed_df > 0:
        return est
    image_var = est.se ** 2 if math.isfinite(est.se) else 0.0
    var = image_var + seed_var
    se = math.sqrt(var)
    h = _quantile(level, float(seed_df)) * se
    return Estimate(est.mean, se, est.mean - h, est.mean + h, est.n_seeds, est.n_images, seed_se_known=True,
                    level=level, df=float(seed_df), seed_var=seed_var, seed_df=seed_df, borrowed=True)
