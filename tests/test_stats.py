"""lvae.stats against closed forms: scipy's t-tests and hand-computed standard errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from lvae.stats import Estimate, contrast, contrast_of_means, mean_ci, paired_difference

RNG = np.random.default_rng(0)


def test_mean_ci_is_the_one_sample_t_interval():
    v = [-98.1, -98.9, -98.4]
    e = mean_ci(v)
    lo, hi = st.ttest_1samp(v, 0).confidence_interval(0.95)
    assert e.mean == pytest.approx(np.mean(v)) and e.n_seeds == 3 and e.seed_se_known
    assert (e.lo, e.hi) == (pytest.approx(lo), pytest.approx(hi))
    assert e.se == pytest.approx(np.std(v, ddof=1) / math.sqrt(3))


def test_mean_ci_one_seed_has_no_interval_and_refuses_a_failed_run():
    e = mean_ci([-98.0])
    assert e.mean == -98.0 and not e.seed_se_known and math.isnan(e.lo) and e.text() == "-98.00"
    with pytest.raises(ValueError, match="failed run"):
        mean_ci([-98.0, float("nan")])


def test_paired_difference_one_seed_each_is_the_paired_t_interval():
    a, b = RNG.normal(-90, 5, 400), RNG.normal(-90.3, 5, 400)
    e = paired_difference([a], [b])
    lo, hi = st.ttest_rel(a, b).confidence_interval(0.95)
    assert e.mean == pytest.approx(np.mean(a - b))
    assert (e.lo, e.hi) == (pytest.approx(lo), pytest.approx(hi))
    assert e.n_images == 400 and e.n_seeds == 1 and not e.seed_se_known


def test_paired_difference_adds_the_seed_variance_of_each_side():
    a = [RNG.normal(-90, 5, 300) + s for s in (0.0, 0.4, -0.2)]
    b = [RNG.normal(-91, 5, 300) + s for s in (0.1, -0.3)]
    e = paired_difference(a, b)
    d = np.mean(a, 0) - np.mean(b, 0)
    var = d.var(ddof=1) / 300 + np.var([x.mean() for x in a], ddof=1) / 3 + np.var([x.mean() for x in b], ddof=1) / 2
    assert e.se == pytest.approx(math.sqrt(var)) and e.seed_se_known and e.n_seeds == 2


def test_contrast_with_weights_plus_minus_one_is_paired_difference():
    a = [RNG.normal(-90, 5, 200) for _ in range(3)]
    b = [RNG.normal(-91, 5, 200) for _ in range(3)]
    assert contrast([(1, a), (-1, b)]) == paired_difference(a, b)


def test_contrast_of_one_model_with_one_seed_is_the_one_sample_interval_over_images():
    x = RNG.normal(-90, 5, 250)
    e = contrast([(1, [x])])
    lo, hi = st.ttest_1samp(x, 0).confidence_interval(0.95)
    assert (e.mean, e.lo, e.hi) == (pytest.approx(x.mean()), pytest.approx(lo), pytest.approx(hi))


def test_contrast_second_difference_by_hand():
    x1, x2, x3 = (RNG.normal(m, 1, 100) for m in (-100, -95, -93))
    e = contrast([(1, [x3]), (-2, [x2]), (1, [x1])])
    d = x3 - 2 * x2 + x1
    assert e.mean == pytest.approx(d.mean()) and e.se == pytest.approx(d.std(ddof=1) / 10)


def test_contrast_refuses_different_test_images():
    with pytest.raises(ValueError, match="same test images"):
        contrast([(1, [np.zeros(3)]), (-1, [np.zeros(4)])])


def test_contrast_of_means_without_image_errors_is_welchs_interval():
    a, b = [12.0, 15.0, 13.0], [9.0, 10.0, 12.0, 8.0]
    e = contrast_of_means([(1, a, None), (-1, b, None)])
    lo, hi = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert e.mean == pytest.approx(np.mean(a) - np.mean(b))
    assert (e.lo, e.hi) == (pytest.approx(lo), pytest.approx(hi))


def test_contrast_of_means_adds_the_test_image_error_and_one_seed_is_flagged():
    e = contrast_of_means([(1, [-98.0], [0.3]), (-1, [-98.5], [0.4])], n_images=10_000)
    assert e.mean == pytest.approx(0.5) and e.se == pytest.approx(0.5) and not e.seed_se_known
    assert e.hi - e.mean == pytest.approx(st.t.ppf(0.975, 9999) * 0.5, rel=1e-3)
    nothing = contrast_of_means([(1, [3.0], None)])  # one seed of a count: nothing known about its spread
    assert math.isnan(nothing.half_width) and nothing.n_seeds == 1
    same = contrast_of_means([(1, [5.0, 5.0], None)])  # equal counts in every seed: a zero-width interval
    assert same.lo == same.hi == 5.0 and same.seed_se_known


def test_estimate_excludes_and_text():
    e = Estimate(0.4, 0.1, 0.2, 0.6, 3)
    assert e.excludes(0) and not e.excludes(0.5) and e.text() == "0.40 ± 0.20"


def test_partly_paired_with_every_seed_paired_is_the_paired_contrast():
    """With per-image values for every seed, the seed-mean form and the image-by-image form are one estimate."""
    from lvae.stats import contrast, contrast_partly_paired

    rng = np.random.default_rng(3)
    a = [rng.normal(0.3 + 0.05 * s, 1.0, 400) for s in range(3)]
    b = [x - 0.2 + rng.normal(0, 0.2, 400) for x in a]
    full = contrast([(1, a), (-1, b)])
    part = contrast_partly_paired([(1, [x.mean() for x in a], a), (-1, [x.mean() for x in b], b)], 400)
    assert (part.mean, part.se, part.lo, part.hi) == pytest.approx((full.mean, full.se, full.lo, full.hi))
    fewer = contrast_partly_paired([(1, [x.mean() for x in a], a[1:]), (-1, [x.mean() for x in b], b[1:])], 400)
    assert fewer.mean == pytest.approx(full.mean) and fewer.n_seeds == 3
