"""lvae.report.stats against closed forms: scipy's t-tests and hand-computed standard errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from lvae.report.stats import Estimate, contrast, contrast_of_means, mean_ci, paired_difference

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


def test_contrast_of_means_without_image_errors_is_welchs_se_with_the_smallest_seed_df():
    """Welch's standard error, but Hsu's df (the smaller side's S - 1), not Welch-Satterthwaite's (issue 18, finding 6)."""
    a, b = [12.0, 15.0, 13.0], [9.0, 10.0, 12.0, 8.0]
    e = contrast_of_means([(1, a, None), (-1, b, None)])
    se = math.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 4)
    assert e.mean == pytest.approx(np.mean(a) - np.mean(b)) and e.se == pytest.approx(se) and e.df == 2
    assert e.hi - e.mean == pytest.approx(st.t.ppf(0.975, 2) * se)
    welch = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert e.lo < welch[0] and e.hi > welch[1]  # wider than Welch-Satterthwaite's


def test_contrast_of_means_adds_the_test_image_error_and_one_seed_is_flagged():
    e = contrast_of_means([(1, [-98.0], [0.3]), (-1, [-98.5], [0.4])], n_images=10_000)
    assert e.mean == pytest.approx(0.5) and e.se == pytest.approx(0.5) and not e.seed_se_known
    assert e.hi - e.mean == pytest.approx(st.t.ppf(0.975, 9999) * 0.5, rel=1e-3)
    nothing = contrast_of_means([(1, [3.0], None)])  # one seed of a count: nothing known about its spread
    assert math.isnan(nothing.half_width) and nothing.n_seeds == 1
    same = contrast_of_means([(1, [5.0, 5.0], None)])  # equal values of a continuous quantity: zero width
    assert same.lo == same.hi == 5.0 and same.seed_se_known


def test_estimate_excludes_and_text():
    e = Estimate(0.4, 0.1, 0.2, 0.6, 3)
    assert e.excludes(0) and not e.excludes(0.5) and e.text() == "0.40 ± 0.20"


def test_partly_paired_with_every_seed_paired_is_the_paired_contrast():
    """With per-image values for every seed, the seed-mean form and the image-by-image form are one estimate."""
    from lvae.report.stats import contrast, contrast_partly_paired

    rng = np.random.default_rng(3)
    a = [rng.normal(0.3 + 0.05 * s, 1.0, 400) for s in range(3)]
    b = [x - 0.2 + rng.normal(0, 0.2, 400) for x in a]
    full = contrast([(1, a), (-1, b)])
    part = contrast_partly_paired([(1, [x.mean() for x in a], a), (-1, [x.mean() for x in b], b)], 400)
    assert (part.mean, part.se, part.lo, part.hi) == pytest.approx((full.mean, full.se, full.lo, full.hi))
    fewer = contrast_partly_paired([(1, [x.mean() for x in a], a[1:]), (-1, [x.mean() for x in b], b[1:])], 400)
    assert fewer.mean == pytest.approx(full.mean) and fewer.n_seeds == 3


# -- issue 18 ----------------------------------------------------------------------------------------
def test_equal_counts_in_every_seed_are_not_certain():
    """Finding 5: three seeds with the same count (2 active layers) give no zero-width interval, and 0 vs 0
    units is not "at most 0" with certainty."""
    e = contrast_of_means([(1, [2.0, 2.0, 2.0], None)], resolution=1.0)
    assert e.half_width > 0.5  # not within 2 +- 0.5 "for certain"
    assert e.se == pytest.approx(math.sqrt(1 / 12 / 3)) and e.df == 2
    zero = contrast_of_means([(1, [0.0, 0.0, 0.0], None), (-1, [0.0, 0.0, 0.0], None)], resolution=1.0)
    assert zero.lo < 0 < zero.hi
    spread = contrast_of_means([(1, [1.0, 4.0, 7.0], None)], resolution=1.0)  # a real spread is kept as it is
    assert spread.se == pytest.approx(np.std([1, 4, 7], ddof=1) / math.sqrt(3))


def _coverage(seed_sd_a, seed_sd_b, reps=3000, n=500, image_sd=8.7 * math.sqrt(500 / 10_000) / math.sqrt(2),
              truth=0.1, welch_satterthwaite=False):
    """How often the 95 % interval of A - B (3 seeds each, paired on ``n`` images) covers the true difference.

    Each run's per-image value: the image's difficulty (shared by every run), the model's true mean, a
    seed offset and per-image noise. ``image_sd`` gives the measured test-image spread: a one-seed
    difference LVAE+BN+WU-5 - VAE+BN+WU-5 at profile cpu has a per-image sd of 8.7 nats over 10,000
    images (scaled here to ``n`` images with the same standard error)."""
    rng = np.random.default_rng(18)
    difficulty = rng.normal(0, 5, n)
    hits = 0
    for _ in range(reps):
        a = [difficulty + truth + rng.normal(0, seed_sd_a) + rng.normal(0, image_sd, n) for _ in range(3)]
        b = [difficulty + rng.normal(0, seed_sd_b) + rng.normal(0, image_sd, n) for _ in range(3)]
        e = contrast([(1, a), (-1, b)])
        lo, hi = e.lo, e.hi
        if welch_satterthwaite:
            A, B = np.stack(a), np.stack(b)
            parts = [((A.mean(0) - B.mean(0)).var(ddof=1) / n, n - 1), (A.mean(1).var(ddof=1) / 3, 2),
                     (B.mean(1).var(ddof=1) / 3, 2)]
            var = sum(p for p, _ in parts)
            h = st.t.ppf(0.975, var ** 2 / sum(p * p / k for p, k in parts)) * math.sqrt(var)
            lo, hi = e.mean - h, e.mean + h
        hits += lo <= truth <= hi
    return hits / reps


def test_the_intervals_keep_95_percent_coverage_with_three_seeds():
    """Finding 6: models with a known true difference, 3 seeds each, the measured spreads. The seed spread of
    test L1 at profile cpu: sd 0.12 (LVAE+BN+WU-5) and 0.12 (VAE+BN+WU-5) nats over seeds 0-2; three seeds
    cannot tell those apart from spreads 5 times apart (the 95 % range of a ratio of two sds from 3 seeds
    each is about 1/6 to 6), so the interval must hold its coverage there too."""
    assert _coverage(0.103, 0.103) >= 0.95  # the measured spreads (0.103 + the image noise's share = 0.12)
    assert _coverage(0.103, 0.5) >= 0.95  # one model's seeds 5 times more spread out
    assert _coverage(0.103, 0.5, welch_satterthwaite=True) < 0.95  # the Welch-Satterthwaite df does not hold it


def test_a_one_seed_estimate_borrows_the_seed_term():
    """A budget with one seed takes its seed term from the same comparison measured over three seeds."""
    from lvae.report.stats import with_seed_term

    three = mean_ci([1.0, 1.4, 0.9])
    one = contrast([(1, [RNG.normal(2.0, 1.0, 400)])])
    assert not mean_ci([2.0]).seed_se_known
    both = with_seed_term(one, three.seed_var, three.seed_df)
    assert both.seed_se_known and both.df == 2 and both.mean == one.mean
    assert both.se == pytest.approx(math.sqrt(one.se ** 2 + np.var([1.0, 1.4, 0.9], ddof=1)))
    assert with_seed_term(one, None, None) is one


def test_at_level_widens_for_a_bonferroni_level():
    e = mean_ci([1.0, 1.4, 0.9])
    wide = e.at_level(1 - 0.05 / 10)
    assert wide.mean == e.mean and wide.half_width == pytest.approx(e.half_width * st.t.ppf(1 - 0.0025, 2)
                                                                    / st.t.ppf(0.975, 2))
