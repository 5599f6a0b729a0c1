"""Every claim of the paper (sections 3-4, Tables 1-2, Figs 2-10) with a verdict computed from our runs.

A claim is data (:class:`Claim`): where the paper makes it, its words, the paper's number or
statement, and the test that decides it on a profile's runs. :func:`evaluate` turns every claim
into a :class:`Row` for one profile: ours (mean over seeds with a 95 % CI), the seeds and test
images behind it, the budget, the verdict and how it was decided. Nothing is trained here: runs
are looked up read-only in the registry (a missing run makes its claims "not run").

The verdict rule (:func:`decide`), for an estimate with a 95 % CI and the claim's test:

* no complete run behind the estimate -> **not run** (a failed run is never a number);
* fewer than :data:`MIN_SEEDS` seeds on a side -> **unresolved at this budget**: the spread between
  training seeds is unknown, so the CI (shown) covers the test images only;
* the CI on the claim's side of its threshold -> **reproduced**; entirely on the other side ->
  **not reproduced**, except for claims about the paper's absolute numbers (``budget_limited``):
  there ours below the paper's at a smaller budget than the paper's is **unresolved at this
  budget** (more training raises our numbers); a CI across the threshold -> **unresolved at this
  budget**.

Tests: ``greater`` (the quantity > threshold, e.g. A - B > 0), ``at_most`` (the quantity <=
threshold, e.g. "does not improve": deeper - shallower <= :data:`NEGLIGIBLE_NATS`) and ``within``
(|quantity - paper's number| <= tolerance). A claim that only the paper's budget can show (no
over-fitting over 2,000 epochs) passing at a smaller budget is **unresolved at this budget**.

Multiplicity. A claim made of m parts (e.g. "improves for each additional layer") is reproduced when
every part's 95 % CI is on the claim's side: all must hold, so no correction is needed (an
intersection-union test keeps the 5 % level). It is not reproduced when a part's CI at the
Bonferroni level 1 - 0.05/m lies on the other side: with m parts one of them would otherwise fall
on the wrong side by chance far more often than 5 % of the time. A part between the two is
unresolved. Otherwise the claim takes the first of not run / unresolved that a part has
(:func:`combine`).

Counts (active units, active layers) are integers; three seeds with equal counts do not make them
certain (:func:`lvae.report.stats.contrast_of_means` with ``resolution``). One quantity belongs to one
claim: a claim whose statement repeats another's quantity points to it (``see``), and a claim that is
wholly another's quantity is **counted under another claim** (not in the counts of reproduced
and not reproduced).

A budget is a profile and an epoch (:class:`Budget`): ``evaluate("paper", epoch=300)`` reads every
run of the profile as it stood at epoch 300 (:class:`lvae.report.run_values.RunAtEpoch`); a claim whose runs
the budget lacks is not run. With one seed, ``seed_term_epoch`` borrows each part's seed term from
the same part at that epoch (several seeds; the row says so); without it the part is unresolved.

Two models are compared by :func:`lvae.report.seed_means.run_contrast`: image by image when every run on
both sides stored per-image values on the same test images, paired on the runs that did when only
some did, otherwise by an unpaired difference of seed means; the row says which.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lvae.registry.experiments import FIG3_VARIANTS, VARIANTS, finetune_config
from lvae.registry.profiles import Profile, available, experiment, load_profile
from lvae.registry.runs import COMMITTED, Run, repository, results_dir, stored_run
from lvae.registry.storage import RunError
from lvae.report import paper, stats
from lvae.report.budgets import budget_of, step_text
from lvae.report.latent_units import run_active_units
from lvae.report.run_values import at_epoch, best_lk, final, history, lk_counts, profile_runs
from lvae.report.seed_means import best_model, lk_images, run_contrast
from lvae.report.stats import Estimate, with_seed_term
from lvae.training.profile_runs import find_run
from lvae.training.step import ACTIVE_UNIT_THRESHOLD

# -- verdicts and the rule -----------------------------------------------------------------------
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
UNRESOLVED = "unresolved at this budget"
NOT_RUN = "not run"
QUALITATIVE = "qualitative (no verdict)"
SEE = "counted under another claim"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, UNRESOLVED, NOT_RUN, QUALITATIVE, SEE)

MIN_SEEDS = 2  # fewer seeds per model: the seed spread is unknown, no verdict
VALUE_TOLERANCE_NATS = 0.5  # "ours equals the paper's number": within this many nats
NEGLIGIBLE_NATS = 0.1  # "does not improve": a gain of at most this many nats
OVERFIT_DROP_NATS = 0.5  # over-fitting: final test L1 below the run's best test L1 by more than this
FEW_NEW_UNITS = 0.05  # "stable [...] only very few new units activated": at most this fraction lost, and gained
ACTIVE_LAYER_TOLERANCE = 0.5  # counts of active layers: within +-0.5 of the stated count (i.e. equal)
# "large benefits" (of batch normalisation) and "performed very poorly" (the LVAE without it): a gap larger
# than the one the paper calls "significantly higher", LVAE 5-layer minus the best VAE in test L1 (2.26 nats)
LARGE_GAP_NATS = round(paper.NUMBERS["mnist_lvae5_test_L1"].value - paper.NUMBERS["mnist_best_vae_test_L1"].value, 2)


@dataclass(frozen=True)
class Criterion:
    """What the claim asserts about a quantity: ``greater`` (> threshold), ``at_most`` (<= threshold)
    or ``within`` (|quantity - threshold| <= tolerance). ``budget_limited``: the quantity grows with
    training (an absolute log-likelihood), so falling short of the paper at a smaller budget than
    the paper's does not contradict it."""

    kind: str
    threshold: float = 0.0
    tolerance: float = 0.0
    budget_limited: bool = False
    paper_budget_only: bool = False  # holding at a smaller budget shows nothing yet (e.g. no over-fitting)

    def __post_init__(self):
        if self.kind not in ("greater", "at_most", "within"):
            raise ValueError(f"Test kind {self.kind!r}: choose 'greater', 'at_most' or 'within'")

    def text(self) -> str:
        if self.kind == "greater":
            return f"> {self.threshold:+g}"
        if self.kind == "at_most":
            return f"≤ {self.threshold:+g}"
        return f"within {self.threshold:g} ± {self.tolerance:g}"


def decide(est: Estimate | None, test: Criterion,
           at_paper_budget: bool = False,
           n_parts: int = 1) -> tuple[str, str]:
    """(verdict, reason) for ``est`` under ``test``, one of ``n_parts`` parts of a claim; the rule of the
    module docstring (a part is not reproduced only when its CI at the Bonferroni level 1 - 0.05/n_parts
    is on the other side)."""
    verdict, reason = _decide(est, test, at_paper_budget)
    if verdict == NOT_REPRODUCED and n_parts > 1:
        wide = est.at_level(1 - (1 - est.level) / n_parts)
        again, _ = _decide(wide, test, at_paper_budget)
        level = (f"the Bonferroni level {100 * wide.level:.2f} % "
                 f"for {n_parts} parts")
        if again != NOT_REPRODUCED:
            return UNRESOLVED, f"{reason} at 95 %, but not at {level}"
        reason += f" (also at {level})"
    below = test.paper_budget_only and not at_paper_budget
    if verdict == REPRODUCED and below:
        why = "but only the paper's budget can show it"
        return UNRESOLVED, f"{reason}, {why}"
    return verdict, reason


def _decide(est: Estimate | None, test: Criterion, at_paper_budget: bool) -> tuple[str, str]:
    if est is None:
        return NOT_RUN, "no complete run"
    if not est.seed_se_known or (est.n_seeds < MIN_SEEDS and not est.borrowed):
        seeds = f"{est.n_seeds} seed{'s' if est.n_seeds != 1 else ''}"
        return UNRESOLVED, (f"{seeds} (fewer than {MIN_SEEDS} on a side): "
                            f"the spread between seeds is unknown")
    if not (math.isfinite(est.lo) and math.isfinite(est.hi)):
        return UNRESOLVED, "no confidence interval"
    smaller_budget = test.budget_limited and not at_paper_budget
    short = UNRESOLVED if smaller_budget else NOT_REPRODUCED
    why_short = (" at a smaller budget than the paper's"
                 if smaller_budget else "")
    t = test.threshold
    if test.kind == "greater":
        if est.lo > t:
            return REPRODUCED, f"CI above {t:+g}"
        # a zero-width CI at the threshold (equal counts in every seed)
        # is not "greater"
        if est.hi <= t:
            return short, f"CI at or below {t:+g}{why_short}"
        return UNRESOLVED, f"CI contains {t:+g}"
    if test.kind == "at_most":
        if est.hi <= t:
            return REPRODUCED, f"CI at or below {t:+g}"
        if est.lo > t:
            return NOT_REPRODUCED, f"CI above {t:+g}"
        return UNRESOLVED, f"CI contains {t:+g}"
    lo_band, hi_band = t - test.tolerance, t + test.tolerance
    if est.lo >= lo_band and est.hi <= hi_band:
        return REPRODUCED, f"CI within ± {test.tolerance:g} of {t:g}"
    if est.hi < lo_band:
        return short, f"CI below {t:g} − {test.tolerance:g}{why_short}"
    if est.lo > hi_band:
        return NOT_REPRODUCED, f"CI above {t:g} + {test.tolerance:g}"
    return UNRESOLVED, f"CI overlaps the edge of {t:g} ± {test.tolerance:g}"


def combine(verdicts: Sequence[str]) -> str:
    """The verdict of a claim made of parts that must all hold."""
    if not verdicts:
        return NOT_RUN
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    for v in (NOT_REPRODUCED, NOT_RUN, UNRESOLVED, QUALITATIVE):
        if v in verdicts:
            return v
    raise ValueError(f"unknown verdicts {sorted(set(verdicts) - set(VERDICTS))}")


# -- claims as data ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """One claim of the paper.

    ``statement``: the paper's words (quoted closely). ``paper``: the paper's number or statement; a
    template formatted with the numbers of :mod:`lvae.report.paper` (``{mnist_lvae5_test_L1:.2f}``), so no
    number is typed twice. ``kind`` names the evaluator (:data:`EVALUATORS`) and ``args`` its
    arguments; ``dataset`` the data the claim is about (other datasets' profiles do not run it).
    """

    id: str
    where: str
    statement: str
    paper: str
    kind: str
    args: dict = field(default_factory=dict)
    dataset: str = "mnist"
    see: tuple[tuple[str, str], ...] = ()  # (claim id, what): quantities of the statement another claim tests

    def paper_text(self) -> str:
        return self.paper.format(**{k: v.value for k, v in paper.NUMBERS.items()})


MAX = "max"  # the profile's deepest model
BEST_VAE = "best_vae"  # our best bottom-up VAE (variant and depth) on the compared metric
FT, FT_IW10 = "ft", "ft_iw10"  # Table 1's finetuned LVAE (IW=1 / IW=10 during finetuning)
L1, LK = "test_L1", "test_LK"
_VAES = tuple(v for v in FIG3_VARIANTS if VARIANTS[v]["inference"] == "bottom_up")


def _t2(dataset: str) -> list[Claim]:
    out = []
    for col in paper.TABLE2_COLUMNS:
        v = paper.VARIANT_KEYS[col]
        keys = [f"t2_{dataset}_{v}_{d}" for d in range(1, 6) if f"t2_{dataset}_{v}_{d}" in paper.NUMBERS]
        out.append(Claim(
            f"t2-{dataset}-{v}", f"Table 2 ({dataset.upper()}, {col}, 1-5 layers)",
            "Test set log-likelihood scores for models trained on the OMNIGLOT and NORB datasets",
            " / ".join(f"{{{k}:g}}" for k in keys), "values", {"variant": v, "keys": keys}, dataset=dataset))
    return out


CLAIMS: tuple[Claim, ...] = (
    # -- section 3.1, Fig 3 (MNIST) ---------------------------------------------------------------
    Claim("vae-no-gain-beyond-1", "§3.1, Fig 3b",
          "the VAE without batch-normalization and warm-up does not improve for additional stochastic layers "
          "beyond one", "VAE: L1 of 2-5 layers ≤ 1 layer", "no_gain_beyond", {"variant": "vae", "base": 1}),
    Claim("vae-bn-wu-up-to-3", "§3.1, Fig 3b",
          "VAEs with batch normalization and warm-up improve performance up to three layers",
          "VAE+BN+WU: L1 of 1 < 2 < 3 layers, and 4, 5 layers ≤ 3 layers", "up_to",
          {"variant": "vae_bn_wu", "depths": (1, 2, 3), "beyond": (4, 5)}),
    Claim("vae-best-3-layers", "§3.1, Fig 3b", "the best VAE score at −87.49 using three layers",
          "best VAE: VAE+BN+WU 3-layer", "best_of",
          {"cell": ("vae_bn_wu", 3), "among": _VAES, "metric": L1, "skip": (("vae_bn_wu", 4), ("vae_bn_wu", 5))},
          see=(("vae-bn-wu-up-to-3", "VAE+BN+WU 4- and 5-layer vs 3-layer"),)),
    Claim("vae-best-L1", "§3.1, Fig 3b", "the best VAE score at −87.49 using three layers",
          "{mnist_best_vae_test_L1:.2f}", "value", {"cell": BEST_VAE, "metric": L1, "key": "mnist_best_vae_test_L1"}),
    Claim("lvae-each-layer", "§3.1, Fig 3b",
          "The LVAE models performs better improving performance for each additional layer",
          "LVAE+BN+WU: L1 of 1 < 2 < 3 < 4 < 5 layers", "chain", {"variant": "lvae_bn_wu", "depths": (1, 2, 3, 4, 5)}),
    Claim("lvae-gains-decrease", "§3.1, Fig 3b",
          "As expected the improvement in performance is decreasing for each additional layer",
          "LVAE+BN+WU: each added layer gains less than the one before", "gains_decrease",
          {"variant": "lvae_bn_wu"}),
    Claim("lvae-top-layers", "§3.1, Fig 3b",
          "we emphasize that the improvements are consistent even for the addition of the top-most layers",
          "LVAE+BN+WU: L1 of 5 layers > 4 layers", "see",
          {"claim": "lvae-each-layer", "part": "LVAE+BN+WU 5-layer − LVAE+BN+WU 4-layer (L1)"}),
    Claim("lvae-L1", "§3.1, Fig 3b", "reaching Ltest1 = −85.23 with five layers", "{mnist_lvae5_test_L1:.2f}",
          "value", {"cell": ("lvae_bn_wu", 5), "metric": L1, "key": "mnist_lvae5_test_L1"}),
    Claim("lvae-vs-vae-L1", "§3.1, Fig 3b; §4",
          "which is significantly higher than the best VAE score [...] the LVAE achieves [...] a significantly "
          "tighter lower bound on the log-likelihood Ltest1",
          "LVAE−VAE: {mnist_lvae5_test_L1:.2f} vs {mnist_best_vae_test_L1:.2f}", "compare",
          {"a": ("lvae_bn_wu", 5), "b": BEST_VAE, "metric": L1}),
    Claim("lvae-L5000", "§3.1, Fig 3c; Table 1", "reaching Ltest5000 = −82.12", "{mnist_lvae5_test_L5000:.2f}",
          "value", {"cell": ("lvae_bn_wu", 5), "metric": LK, "key": "mnist_lvae5_test_L5000"}),
    Claim("vae-best-L5000", "§3.1, Fig 3c", "compared to the best VAE at −82.74", "{mnist_best_vae_test_L5000:.2f}",
          "value", {"cell": BEST_VAE, "metric": LK, "key": "mnist_best_vae_test_L5000"}),
    Claim("lvae-vs-vae-L5000", "§3.1, Fig 3c; §4",
          "Again the LVAE models performs better than the VAE [...] increases the approximated log-likelihood "
          "compared to VAEs", "LVAE−VAE: {mnist_lvae5_test_L5000:.2f} vs {mnist_best_vae_test_L5000:.2f}",
          "compare", {"a": ("lvae_bn_wu", 5), "b": BEST_VAE, "metric": LK}),
    Claim("fig2-lvae-vs-vae", "Fig 2", "The LVAE improves performance significantly over the regular VAE.",
          "LVAE above VAE (train and test L1 curves)", "curves",
          {"a": ("lvae_bn_wu", MAX), "b": ("vae_bn_wu", MAX)}),
    Claim("no-overfitting", "§3.1, Fig 2", "We saw no signs of over-fitting for any of our models",
          "no model's test L1 falls during training (2,000 epochs)", "no_overfitting", {}),
    # -- Table 1 ----------------------------------------------------------------------------------
    Claim("t1-vs-other-models", "§3.1, Table 1",
          "the LVAE performs better than the normalizing flow VAE and importance weighted VAE and comparable to "
          "the Variational Gaussian Process VAE",
          "{t1_lvae5:.2f} vs NF {t1_vae1_nf:.2f}, IWAE {t1_iwae2_iw50:.2f}, VGP {t1_vae2_vgp:.2f}", "vs_others",
          {"cell": ("lvae_bn_wu", 5), "above": ("t1_vae1_nf", "t1_iwae2_iw50"), "near": ("t1_vae2_vgp",)}),
    Claim("t1-finetune", "§3.1, Table 1", "LVAE, 5-layer + finetuning", "{t1_lvae5_ft:.2f}", "value",
          {"cell": FT, "metric": LK, "key": "t1_lvae5_ft"}),
    Claim("t1-finetune-iw10", "§3.1, Table 1", "LVAE, 5-layer + finetuning + IW=10", "{t1_lvae5_ft_iw10:.2f}",
          "value", {"cell": FT_IW10, "metric": LK, "key": "t1_lvae5_ft_iw10"}),
    Claim("t1-finetune-gain", "§3.1, Table 1",
          "fine-tuned the best performing five layer LVAE models [...] and see a slight improvements in the test "
          "set log-likelihood values", "{t1_lvae5_ft_iw10:.2f} vs {t1_lvae5:.2f}", "compare",
          {"a": FT_IW10, "b": ("lvae_bn_wu", 5), "metric": LK}),
    # -- section 3.1, Table 2, Figs 8 and 10 (OMNIGLOT, NORB) -------------------------------------
    *_t2("omniglot"),
    Claim("omniglot-lvae-best", "§3.1, Table 2",
          "shows similar trends as for MNIST with the LVAE achieving the best performance using five layers of "
          "latent variables", "LVAE+BN+WU 5-layer: {t2_omniglot_lvae_bn_wu_5:.2f}, the best of Table 2",
          "best_of", {"cell": ("lvae_bn_wu", 5), "among": FIG3_VARIANTS, "metric": LK}, dataset="omniglot"),
    Claim("omniglot-vs-iwae", "§3.1, Table 2",
          "The best log-likelihood results obtained here, −102.11, is higher than the best results from [2] at "
          "−103.38", "{t2_omniglot_lvae_bn_wu_5:.2f} vs {omniglot_best_iwae:.2f}", "vs_others",
          {"cell": ("lvae_bn_wu", 5), "above": ("omniglot_best_iwae",), "near": ()}, dataset="omniglot"),
    Claim("fig8-omniglot", "Fig 8", "OMNIGLOT log-likelihood values for VAEs and the LVAE model with different "
          "number of latent layers", "curves (no stated finding beyond Table 2)", "qualitative", {},
          dataset="omniglot"),
    Claim("fig10-omniglot-samples", "Fig 10", "OMNIGLOT samples. a) True data, b) Conditional Reconstructions and "
          "c) Samples from the prior distribution", "images", "qualitative", {}, dataset="omniglot"),
    *_t2("norb"),
    Claim("norb-lvae-vs-vae", "§3.1, Table 2", "The LVAE achieves a slightly higher score than the VAE",
          "{t2_norb_lvae_bn_wu_5:g} vs {t2_norb_vae_bn_wu_5:g} (5 layers)", "compare",
          {"a": ("lvae_bn_wu", 5), "b": ("vae_bn_wu", 5), "metric": LK}, dataset="norb"),
    Claim("norb-no-gain-beyond-3", "§3.1, Table 2",
          "none of the models see an increase in performance for more using more than three stochastic layers",
          "every model: 4-5 layers ≤ 3 layers", "no_gain_beyond",
          {"variant": FIG3_VARIANTS, "base": 3, "metric": LK}, dataset="norb"),
    # -- section 3.2, Figs 4-6 --------------------------------------------------------------------
    Claim("fig4-no-wu-stable", "§3.2, Fig 4",
          "For the models without warm-up we find that the KL-divergence for each unit is stable during all "
          "training epochs with only very few new units activated during training",
          "models without warm-up (VAE, VAE+BN, LVAE+BN): very few units lost or gained over training",
          "stable_units", {"variants": ("vae", "vae_bn", "lvae_bn")}),
    Claim("fig4-wu-pruned", "§3.2, Fig 4",
          "For the models trained with warm-up we initially see many active units which are then gradually pruned "
          "away as the variational regularization term is introduced",
          "with warm-up: more units pruned than without (same architecture)", "pruned",
          {"pairs": (("vae_bn_wu", "vae_bn"), ("lvae_bn_wu", "lvae_bn"))}),
    Claim("fig4-wu-more-active", "§3.2, Fig 4",
          "At the end of training warm-up results in more active units indicating a more distributed representation",
          "with warm-up > without", "active_diff", {"pairs": (("vae_bn_wu", "vae_bn"), ("lvae_bn_wu", "lvae_bn"))}),
    Claim("fig4-lvae-most-distributed", "§3.2, Fig 4",
          "the LVAE model produces both the deepest and most distributed latent representation",
          "LVAE+BN+WU: the most active units", "active_diff",
          {"pairs": tuple(("lvae_bn_wu", v) for v in _VAES)}),
    Claim("fig4-lvae-each-layer", "Fig 4", "we see that the LVAE activates the highest number of units in each layer",
          "LVAE+BN+WU ≥ every VAE, layer by layer", "active_per_layer", {"variants": _VAES}),
    Claim("fig4-bn-helps", "Fig 4",
          "It is clear that vanilla VAE cannot train the higher latent layers, while introducing batch "
          "normalization helps", "VAE+BN: more active units above z1 than VAE", "active_diff",
          {"pairs": (("vae_bn", "vae"),), "above_first": True}),
    Claim("fig5-vae-lower-layers", "§3.2, Fig 5",
          "The VAEs use the lower layers the most whereas the highest layers are not (or only to a limited degree) "
          "used", "VAEs: KL of z1 > KL of every higher layer", "lowest_layer_most", {"variants": _VAES}),
    Claim("fig5-lvae-higher-layers", "§3.2, Fig 5; §4",
          "Contrary to this, the LVAE puts much more importance to the higher layers [...] learns a deeper and "
          "qualitatively different latent representation", "LVAE: larger share of KL above z1 than the VAEs",
          "kl_share_diff", {"pairs": tuple(("lvae_bn_wu", v) for v in _VAES)}),
    Claim("fig6-vae-collapsed", "§3.2, Fig 6",
          "For vanilla VAE, the latent representations above the second layer are completely collapsed on a "
          "standard normal prior", "VAE: 2 layers with active units", "active_layers",
          {"variant": "vae", "count": 2}),
    Claim("fig6-bn-wu-one-layer-each", "§3.2, Fig 6",
          "Including Batch normalization and warm-up activates one additional layer each in the VAE",
          "VAE+BN: 1 more active layer than VAE; VAE+BN+WU: 1 more than VAE+BN", "active_layer_steps",
          {"steps": (("vae_bn", "vae"), ("vae_bn_wu", "vae_bn"))}),
    Claim("fig6-lvae-all-layers", "§3.2, Fig 6", "The LVAE utilizes all five latent layers",
          "LVAE+BN+WU: every layer has active units", "active_layers", {"variant": "lvae_bn_wu", "count": MAX}),
    Claim("fig6-class-clustering", "§3.2, Fig 6",
          "the latent representation shows progressively more clustering according to class, which is clearly "
          "seen in the topmost layer of this model", "PCA plots", "qualitative", {}),
    # -- Figs 7 and 9, section 4 ------------------------------------------------------------------
    Claim("fig7-lvae-without-bn", "Fig 7", "Note that the LVAE without batch normalization performed very poorly",
          "LVAE+WU far below LVAE+BN+WU", "compare",
          {"a": ("lvae_bn_wu", MAX), "b": ("lvae_wu", MAX), "metric": L1, "threshold": LARGE_GAP_NATS}),
    Claim("s4-vae-bn-wu", "§4",
          "deterministic warm-up and batch-normalization are important for optimizing deep VAEs",
          "VAE+BN+WU > VAE+BN (deepest); VAE+BN > VAE: see s4-bn-benefits", "compare_steps",
          {"steps": (("vae_bn_wu", "vae_bn"),), "metric": L1},
          see=(("s4-bn-benefits", "batch normalisation, VAE+BN − VAE"),)),
    Claim("s4-lvae-bn-wu", "§4", "deterministic warm-up and batch-normalization are important for optimizing "
          "deep [...] LVAEs", "LVAE+BN+WU > LVAE+BN (deepest); > LVAE+WU: see fig7-lvae-without-bn", "compare_steps",
          {"steps": (("lvae_bn_wu", "lvae_bn"),), "metric": L1},
          see=(("fig7-lvae-without-bn", "batch normalisation, LVAE+BN+WU − LVAE+WU"),)),
    Claim("s4-bn-benefits", "§4",
          "Especially the large benefits in generative performance and depth of learned hierarchical "
          "representations using batch normalization were surprising",
          "VAE+BN far above VAE in L1 (deepest); depth: see fig6-bn-wu-one-layer-each", "compare",
          {"a": ("vae_bn", MAX), "b": ("vae", MAX), "metric": L1, "threshold": LARGE_GAP_NATS},
          see=(("fig6-bn-wu-one-layer-each", "depth, VAE+BN − VAE layers with active units"),)),
    Claim("fig9-mnist-samples", "Fig 9", "MNIST samples. a) True data, b) Conditional Reconstructions and c) "
          "Samples from the prior distribution", "images", "qualitative", {}),
)


# -- reading the registry ------------------------------------------------------------------------
@dataclass
class Cell:
    """The complete runs of one model of a profile (one per seed), and why others are missing."""

    label: str
    runs: list[Run]
    notes: list[str]
    in_profile: bool = True


class Registry:
    """Read-only view of a profile's runs: never trains (:func:`lvae.training.profile_runs.get_run` would)."""

    def __init__(self, profile: Profile | str, root=None, seeds: Sequence[int] | None = None,
                 epoch: int | None = None):
        self.P = load_profile(profile) if isinstance(profile, str) else profile
        self.root = results_dir(root)
        self.seeds = tuple(seeds) if seeds is not None else self.P.seeds
        self.epoch = int(epoch) if epoch is not None else self.P.epochs  # every run is read at this epoch
        self._cache: dict[Any, Cell] = {}
        self.paper_epochs = load_profile("paper").epochs

    @property
    def at_paper_budget(self) -> bool:
        return self.epoch >= self.paper_epochs

    def depth(self, d) -> int:
        return self.P.max_depth if d == MAX else int(d)

    def label(self, spec) -> str:
        if spec in (FT, FT_IW10):
            return f"LVAE+BN+WU {self.P.max_depth}-layer + finetuning" + (" + IW=10" if spec == FT_IW10 else "")
        v, d = spec
        return f"{VARIANTS[v]['label']} {self.depth(d)}-layer"

    def _run_at(self, cfg=None, cell: tuple[str, int, int] | None = None) -> tuple[Run | None, str | None]:
        """The run of ``cfg`` (or of the profile's ``cell`` (variant, depth, seed), as
        :func:`lvae.training.profile_runs.find_run` finds it) read at this budget's epoch, or (None, why)."""
        try:
            if cell is not None:
                run = find_run(self.P, *cell, root=self.root)
            else:
                run = stored_run(self.root / cfg.dir_name)
        except RunError as e:
            return None, f"unreadable ({e})"
        if run is None:
            return None, "missing"
        if run.status in ("failed", "damaged"):
            return None, f"{run.status} ({run.error})"
        if run.epochs < self.epoch:
            return None, (f"at {run.epochs} of {self.epoch} epochs" if run.ok or run.epochs
                          else f"{run.status} ({run.epochs} epochs)")
        view = at_epoch(run, self.epoch)
        if not view.ok:
            return None, (f"{run.status} ({run.epochs} epochs)" if not run.ok and run.epochs == self.epoch
                          else f"no evaluation at epoch {self.epoch}")
        return view, None

    def cell(self, spec) -> Cell:
        """The complete runs of ``spec``: ``(variant, depth)`` or FT / FT_IW10 (Table 1's finetuning)."""
        key = spec if spec in (FT, FT_IW10) else (spec[0], self.depth(spec[1]))
        if key in self._cache:
            return self._cache[key]
        label = self.label(spec)
        runs, notes = [], []
        if key in (FT, FT_IW10):
            in_profile = "lvae_bn_wu" in self.P.variants and self.P.max_depth == 5
        else:
            in_profile = key[0] in self.P.variants and key[1] in self.P.depths
        if not in_profile:
            notes.append(f"profile '{self.P.name}' has no {label}")
        else:
            for s in self.seeds:
                if key in (FT, FT_IW10):
                    parent, _ = experiment(self.P, "lvae_bn_wu", 5, s)
                    cfg = finetune_config(parent, self.P.epochs)
                    if key == FT:  # finetuning without importance-weighted training samples
                        cfg = replace(cfg, name=cfg.name + "-iw1", train=replace(cfg.train, iw_samples=1))
                    run, why = self._run_at(cfg)
                else:
                    run, why = self._run_at(cell=(key[0], key[1], s))
                if run is None:
                    notes.append(f"{label} seed {s}: {why}")
                else:
                    runs.append(run)
        out = self._cache[key] = Cell(label, runs, notes, in_profile)
        return out

    def vae_cells(self, variants: Sequence[str] = _VAES) -> list[tuple[str, int]]:
        return [(v, d) for v in variants if v in self.P.variants for d in self.P.depths]


# -- quantities ----------------------------------------------------------------------------------
@dataclass
class Part:
    """One tested quantity of a claim."""

    label: str
    est: Estimate | None
    test: Criterion
    how: str  # how the estimate was computed ("paired over 10,000 test images")
    notes: list[str] = field(default_factory=list)
    epochs: int | None = None
    k: int | None = None  # importance samples of an L_K quantity
    verdict: str = ""
    reason: str = ""
    specs: tuple = ()  # the models behind it (for the budget's precision)


def metric_contrast(reg: Registry, terms: Sequence[tuple[float, Any]],
                    metric: str) -> tuple[Estimate | None, str, list[str]]:
    """sum_j w_j * model_j on ``metric`` (test_L1 or test_LK) over the complete runs of ``reg``, paired
    image by image as far as the runs stored per-image values (:func:`lvae.report.seed_means.run_contrast`).

    Returns (estimate or None when a model has no complete run, how it was computed, notes).
    """
    cells = [reg.cell(spec) for _, spec in terms]
    if any(not c.runs for c in cells):
        return None, "", [n for c in cells if not c.runs for n in c.notes]
    notes = [n for c in cells for n in c.notes]
    k, differ = measured_k(r for c in cells for r in c.runs) if metric == LK else (None, None)
    if differ:  # L_K with different K: no contrast
        return None, "", notes + [differ]
    est, how = run_contrast([(w, c.runs) for (w, _), c in zip(terms, cells)], metric, k=k)
    return (est, how, notes) if est is not None else (None, "", notes + [how])


def measured_k(runs: Iterable[Run]) -> tuple[int | None, str | None]:
    """The K of the L_K that ``runs`` measured, read from the rows that measured it (each run's final
    L_K: :func:`lvae.report.run_values.best_lk`), not from the profile. (K, None) when every run with an L_K
    used the same K (None: no run has one); (None, a note naming each K and its runs) when they differ."""
    ks: dict[int, list[str]] = {}
    for r in runs:
        lk = best_lk(r)
        if lk is not None and lk["k"] is not None:
            ks.setdefault(int(lk["k"]), []).append(r.name)
    if len(ks) <= 1:
        return next(iter(ks), None), None
    return None, "L_K measured with different K: " + "; ".join(
        f"L{k} by {', '.join(names)}" for k, names in sorted(ks.items()))


def _k(reg: Registry, specs, metric: str) -> int | None:
    """K of an L_K part: the one its models' runs measured (None for L1, or when their K differ)."""
    return None if metric == L1 else measured_k(r for s in specs for r in reg.cell(s).runs)[0]


def seed_contrast(reg: Registry, terms: Sequence[tuple[float, Any]], fn: Callable[[Run], float | None],
                  what: str, resolution: float | None = None) -> tuple[Estimate | None, str, list[str]]:
    """sum_j w_j * (mean over seeds of fn(run)) for a per-run quantity (active units, KL shares);
    ``resolution``: the unit of an integer-valued quantity (1 for a count; see :mod:`lvae.report.stats`)."""
    cells = [reg.cell(spec) for _, spec in terms]
    if any(not c.runs for c in cells):
        return None, "", [n for c in cells if not c.runs for n in c.notes]
    notes = [n for c in cells for n in c.notes]
    values = []
    for c in cells:
        v = [(r, fn(r)) for r in c.runs]
        notes += [f"{r.name}: no {what}" for r, x in v if x is None]
        values.append([x for _, x in v if x is not None])
    if any(not v for v in values):
        return None, "", notes
    est = stats.contrast_of_means([(w, v, None) for (w, _), v in zip(terms, values)], resolution=resolution)
    return est, f"{what}: difference of seed means" if len(terms) > 1 else f"{what}: mean over seeds", notes


def _active_total(run: Run, above_first: bool = False):
    act = run_active_units(run)
    return None if act is None else float(sum(act[1 if above_first else 0:]))


def _active_layers(run: Run):
    act = run_active_units(run)
    return None if act is None else float(sum(a > 0 for a in act))


def _kl_share_above_first(run: Run):
    kl = final(run, "kl_layers")
    return None if not kl or sum(kl) <= 0 else float(sum(kl[1:]) / sum(kl))


def _lowest_layer_margin(run: Run):
    kl = final(run, "kl_layers")
    return None if not kl or len(kl) < 2 else float(kl[0] - max(kl[1:]))


def _active_history(run: Run) -> np.ndarray | None:
    """[evaluations, units] booleans: which latent units were active at each evaluation (None: fewer than two)."""
    hist = [r["kl_units"] for r in run.metrics() if "kl_units" in r]
    if len(hist) < 2:
        return None
    return np.array([np.concatenate([np.asarray(layer, dtype=float) for layer in h]) for h in hist]) \
        > ACTIVE_UNIT_THRESHOLD


def _units_lost(run: Run):
    """Fraction of the latent units active at some evaluation but not at the end of training."""
    act = _active_history(run)
    return None if act is None else float((act.any(0) & ~act[-1]).sum() / act.shape[1])


def _units_gained(run: Run):
    """Fraction of the latent units inactive at the first evaluation and active at the end."""
    act = _active_history(run)
    return None if act is None else float((~act[0] & act[-1]).sum() / act.shape[1])


def _n_units(reg: Registry, spec) -> int:
    return sum(experiment(reg.P, spec[0], reg.depth(spec[1]))[0].model.latent_sizes)


def _overfit_drop(run: Run):
    rows = [r["test_L1"] for r in run.metrics() if r.get("test_L1") is not None]
    return float(max(rows) - rows[-1]) if rows else None


def _curve_mean(metric: str):
    def fn(run: Run):
        _, values = history(run, metric)
        return float(values.mean()) if values.size else None
    return fn


# -- evaluators: claim args -> parts -------------------------------------------------------------
def _best_vae(reg: Registry, metric: str) -> tuple[Any, str | None]:
    """Our best bottom-up VAE on ``metric`` (:func:`lvae.report.seed_means.best_model`): the highest mean over its
    complete seeds, every model's L_K on the same test images (the most that every run has)."""
    runs = {(*spec, i): r for spec in reg.vae_cells() for i, r in enumerate(reg.cell(spec).runs)}
    n = None
    if metric != L1:
        k = measured_k(runs.values())[0]
        common = set.intersection(*[lk_counts(r, k) - {None} for r in runs.values()] or [set()])
        n = max(common) if common else None
    best = best_model(runs, metric, _VAES, n)
    return best, None if best is None else f"our best VAE: {reg.label(best)}"


def _resolve(reg: Registry, spec, metric: str) -> tuple[Any, list[str]]:
    if spec == BEST_VAE:
        best, note = _best_vae(reg, metric)
        return best, [note] if note else [f"profile '{reg.P.name}' has no complete VAE run"]
    return spec, []


def _cmp_part(reg: Registry, a, b, metric: str, test: Criterion | None = None, label: str | None = None) -> Part:
    a, na = _resolve(reg, a, metric)
    b, nb = _resolve(reg, b, metric)
    if a is None or b is None:
        return Part(label or "A − B", None, test or Criterion("greater"), "", na + nb)
    est, how, notes = metric_contrast(reg, [(1.0, a), (-1.0, b)], metric)
    k = _k(reg, [a, b], metric)
    name = "L1" if metric == L1 else f"L{k or '_K'}"
    return Part(label or f"{reg.label(a)} − {reg.label(b)} ({name})", est, test or Criterion("greater"), how,
                na + nb + notes, _epochs(reg, [a, b]), k, specs=(a, b))


def _epochs(reg: Registry, specs) -> int | None:
    runs = [r for s in specs for r in reg.cell(s).runs]
    return max((r.epochs for r in runs), default=None)


def ev_compare(reg, a, b, metric, threshold=0.0):
    return [_cmp_part(reg, a, b, metric, Criterion("greater", threshold))]


def ev_compare_steps(reg, steps, metric):
    return [_cmp_part(reg, (hi, MAX), (lo, MAX), metric) for hi, lo in steps]


def ev_chain(reg, variant, depths):
    return [_cmp_part(reg, (variant, d2), (variant, d1), L1) for d1, d2 in zip(depths, depths[1:])]


def ev_up_to(reg, variant, depths, beyond):
    """Improves up to depths[-1] layers: the chain of ``depths``, then no gain for the ``beyond`` depths."""
    top = depths[-1]
    return ev_chain(reg, variant, depths) + [_cmp_part(reg, (variant, d), (variant, top), L1,
                                                       Criterion("at_most", NEGLIGIBLE_NATS)) for d in beyond]


def ev_curves(reg, a, b):
    """Fig 2: A's train and test L1 curves above B's: the mean over every evaluation of each run's curve."""
    return [_seed_part(reg, f"{reg.label(a)} − {reg.label(b)} ({name} L1, mean over the curve)",
                       [(1.0, a), (-1.0, b)], _curve_mean(metric), f"{name} L1 averaged over the evaluations",
                       Criterion("greater")) for name, metric in (("train", "train_L1"), ("test", "test_L1"))]


def ev_no_gain_beyond(reg, variant, base, metric=L1):
    variants = (variant,) if isinstance(variant, str) else variant
    return [_cmp_part(reg, (v, d), (v, base), metric, Criterion("at_most", NEGLIGIBLE_NATS))
            for v in variants for d in range(base + 1, 6)]


def ev_gains_decrease(reg, variant):
    parts = []
    for d in range(1, 4):
        specs = [(variant, d + 1), (variant, d), (variant, d + 2)]
        est, how, notes = metric_contrast(reg, [(2.0, specs[0]), (-1.0, specs[1]), (-1.0, specs[2])], L1)
        parts.append(Part(f"gain {d}→{d + 1} − gain {d + 1}→{d + 2} (L1)", est, Criterion("greater"), how, notes,
                          _epochs(reg, specs), specs=tuple(specs)))
    return parts


def ev_best_of(reg, cell, among, metric, skip=()):
    others = [(v, d) for v in among if v in reg.P.variants for d in reg.P.depths if (v, d) not in (cell, *skip)]
    if not others:  # not in the profile: not run
        others = [(v, d) for v in among for d in range(1, 6) if (v, d) not in (cell, *skip)]
    return [_cmp_part(reg, o, cell, metric, Criterion("at_most", NEGLIGIBLE_NATS)) for o in others]


def ev_value(reg, cell, metric, key):
    ref = paper.get(key)
    spec, notes = _resolve(reg, cell, metric)
    test = Criterion("within", ref.value, VALUE_TOLERANCE_NATS, budget_limited=True)
    if spec is None:
        return [Part(ref.model, None, test, "", notes)]
    est, how, n2 = metric_contrast(reg, [(1.0, spec)], metric)
    return [Part(reg.label(spec), est, test, how, notes + n2, _epochs(reg, [spec]), _k(reg, [spec], metric),
                 specs=(spec,))]


def ev_values(reg, variant, keys):
    parts = []
    for key in keys:
        d = int(key.rsplit("_", 1)[1])
        parts += ev_value(reg, (variant, d), LK, key)
    return parts


def ev_vs_others(reg, cell, above, near):
    est, how, notes = metric_contrast(reg, [(1.0, cell)], LK)
    ep, iw_k = _epochs(reg, [cell]), _k(reg, [cell], LK)
    parts = [Part(f"ours − {paper.get(k).model}", None if est is None else _shift(est, paper.get(k).value),
                  Criterion("greater", 0.0, budget_limited=True), how, notes, ep, iw_k, specs=(cell,))
             for k in above]
    parts += [Part(f"ours vs {paper.get(k).model}", est, Criterion("within", paper.get(k).value, VALUE_TOLERANCE_NATS,
                                                              budget_limited=True), how, notes, ep, iw_k,
                   specs=(cell,)) for k in near]
    return parts


def _shift(est: Estimate, by: float) -> Estimate:
    return replace(est, mean=est.mean - by, lo=est.lo - by, hi=est.hi - by)


def _seed_part(reg, label, terms, fn, what, test, resolution=None) -> Part:
    est, how, notes = seed_contrast(reg, terms, fn, what, resolution)
    return Part(label, est, test, how, notes, _epochs(reg, [s for _, s in terms]), specs=tuple(s for _, s in terms))


COUNT = 1.0  # the resolution of a count (active units, layers with active units)


def ev_active_diff(reg, pairs, above_first=False):
    """Every pair is a part; a pair whose models the profile lacks is a part that is not run."""
    fn = (lambda r: _active_total(r, above_first))
    what = "active units above z1" if above_first else "active units"
    return [_seed_part(reg, f"{reg.label((a, MAX))} − {reg.label((b, MAX))} ({what})",
                       [(1.0, (a, MAX)), (-1.0, (b, MAX))], fn, what, Criterion("greater"), COUNT) for a, b in pairs]


def ev_active_per_layer(reg, variants):
    parts = []
    for v in variants:
        for i in range(reg.P.max_depth):
            def fn(r, i=i):
                act = run_active_units(r)
                return None if act is None else float(act[i])
            parts.append(_seed_part(reg, f"z{i + 1}: {reg.label((v, MAX))} − LVAE+BN+WU (active units)",
                                    [(1.0, (v, MAX)), (-1.0, ("lvae_bn_wu", MAX))], fn, f"active units of z{i + 1}",
                                    Criterion("at_most", 0.0), COUNT))
    return parts


def ev_kl_share_diff(reg, pairs):
    return [_seed_part(reg, f"{reg.label((a, MAX))} − {reg.label((b, MAX))} (KL share above z1)",
                       [(1.0, (a, MAX)), (-1.0, (b, MAX))], _kl_share_above_first, "share of KL above z1",
                       Criterion("greater")) for a, b in pairs]


def ev_lowest_layer_most(reg, variants):
    return [_seed_part(reg, f"{reg.label((v, MAX))}: KL(z1) − max KL(z≥2) [nats]", [(1.0, (v, MAX))],
                       _lowest_layer_margin, "KL of z1 minus the largest higher layer's", Criterion("greater"))
            for v in variants]


def ev_active_layers(reg, variant, count):
    n = reg.P.max_depth if count == MAX else count
    return [_seed_part(reg, f"{reg.label((variant, MAX))}: layers with active units", [(1.0, (variant, MAX))],
                       _active_layers, "layers with active units", Criterion("within", n, ACTIVE_LAYER_TOLERANCE),
                       COUNT)]


def ev_active_layer_steps(reg, steps):
    return [_seed_part(reg, f"{reg.label((a, MAX))} − {reg.label((b, MAX))} (layers with active units)",
                       [(1.0, (a, MAX)), (-1.0, (b, MAX))], _active_layers, "layers with active units",
                       Criterion("within", 1, ACTIVE_LAYER_TOLERANCE), COUNT) for a, b in steps]


def ev_pruned(reg, pairs):
    """Warm-up prunes: the fraction of units lost over training (active at some evaluation, not at the end)
    with warm-up minus without, same architecture; a pair the profile lacks is a part that is not run."""
    return [_seed_part(reg, f"{reg.label((a, MAX))} − {reg.label((b, MAX))} (units lost, fraction)",
                       [(1.0, (a, MAX)), (-1.0, (b, MAX))], _units_lost,
                       "fraction of units active at some evaluation but not at the end", Criterion("greater"),
                       COUNT / _n_units(reg, (a, MAX))) for a, b in pairs]


def ev_stable_units(reg, variants):
    """Without warm-up each unit is stable: very few units lost, and very few gained, over training."""
    parts = []
    for v in variants:
        res = COUNT / _n_units(reg, (v, MAX))
        parts += [_seed_part(reg, f"{reg.label((v, MAX))}: units lost over training (fraction)", [(1.0, (v, MAX))],
                             _units_lost, "fraction of units active at some evaluation but not at the end",
                             Criterion("at_most", FEW_NEW_UNITS), res),
                  _seed_part(reg, f"{reg.label((v, MAX))}: units gained over training (fraction)", [(1.0, (v, MAX))],
                             _units_gained, "fraction of units inactive at the first evaluation, active at the end",
                             Criterion("at_most", FEW_NEW_UNITS), res)]
    return parts


def ev_no_overfitting(reg):
    cells = [(v, d) for v in reg.P.variants for d in reg.P.depths]
    return [_seed_part(reg, f"{reg.label(c)}: best − final test L1", [(1.0, c)], _overfit_drop,
                       "best minus final test L1 over training",
                       Criterion("at_most", OVERFIT_DROP_NATS, paper_budget_only=True)) for c in cells]


EVALUATORS: dict[str, Callable[..., list[Part]]] = {
    "compare": ev_compare, "compare_steps": ev_compare_steps, "chain": ev_chain, "no_gain_beyond": ev_no_gain_beyond,
    "gains_decrease": ev_gains_decrease, "best_of": ev_best_of, "value": ev_value, "values": ev_values,
    "vs_others": ev_vs_others, "active_diff": ev_active_diff, "active_per_layer": ev_active_per_layer,
    "kl_share_diff": ev_kl_share_diff, "lowest_layer_most": ev_lowest_layer_most, "active_layers": ev_active_layers,
    "active_layer_steps": ev_active_layer_steps, "pruned": ev_pruned, "stable_units": ev_stable_units,
    "no_overfitting": ev_no_overfitting, "up_to": ev_up_to, "curves": ev_curves,
}
CLAIMS_BY_ID: dict[str, Claim] = {c.id: c for c in CLAIMS}


# -- rows ----------------------------------------------------------------------------------------
MAX_PARTS_SHOWN = 3  # a claim with more parts shows only the part that decides its verdict
COLUMNS = ("claim", "paper", "ours (95 % CI)", "n", "budget", "verdict", "how decided")


@dataclass
class Row:
    """One claim evaluated on one profile."""

    claim: Claim
    profile: str
    verdict: str
    parts: list[Part]
    reason: str  # why this verdict (not run: which runs are missing)
    warmup: int = 0  # the profile's warm-up epochs (for the budget column)
    precision: str = ""  # the training step of the budget's runs ("fp32", "bf16, compiled")

    @property
    def id(self) -> str:
        return self.claim.id

    def deciding_part(self) -> Part | None:
        """The first part whose verdict is the claim's (the one "how decided" describes)."""
        return next((p for p in self.parts if p.verdict == self.verdict), self.parts[0] if self.parts else None)

    def shown_parts(self) -> list[Part]:
        if len(self.parts) <= MAX_PARTS_SHOWN:
            return self.parts
        return [self.deciding_part()]

    def as_dict(self) -> dict[str, Any]:
        """A table row for the book (see :data:`COLUMNS`)."""
        shown = [p for p in self.shown_parts() if p.est is not None]
        more = f" (1 of {len(self.parts)} parts)" if len(self.parts) > MAX_PARTS_SHOWN and shown else ""
        ours = tuple(f"{p.label}: {_est_text(p)}" for p in shown)
        n = {(p.est.n_seeds, p.est.n_images) for p in shown}
        return {
            "claim": (f"{self.claim.where} [{self.id}]", f"“{self.claim.statement}”"),
            "paper": self.claim.paper_text(),
            "ours (95 % CI)": (ours[0] + more,) + ours[1:] if ours else "—",
            "n": ", ".join(_n_text(s, i) for s, i in sorted(n, key=str)) or "—",
            "budget": self.budget() or "—",
            "verdict": self.verdict,
            "how decided": self.reason,
        }

    def budget(self) -> str | None:
        parts = [p for p in self.parts if p.est is not None]
        eps = {p.epochs for p in parts if p.epochs}
        ks = {p.k for p in parts if p.k}
        if not eps:
            return None
        text = f"{'/'.join(map(str, sorted(eps)))} epochs (warm-up {self.warmup})"
        text += f", L{'/'.join(map(str, sorted(ks)))}" if ks else ""
        return text + (f", {self.precision}" if self.precision else "")

    @property
    def estimate(self) -> Estimate | None:
        """The estimate of a one-part claim (None otherwise or when not run)."""
        return self.parts[0].est if len(self.parts) == 1 else None


def _n_text(seeds: int, images: int | None) -> str:
    text = f"{seeds} seed{'s' if seeds != 1 else ''}"
    return text + (f" × {images:,} images" if images else "")


def _est_text(p: Part) -> str:
    """``+0.41 ± 0.12``; a CI that leaves out the seed spread says so; no CI: the bare mean."""
    e = p.est
    mean = f"{e.mean:+.2f}" if p.test.kind != "within" else f"{e.mean:.2f}"
    if not math.isfinite(e.half_width):
        return mean
    text = f"{mean} ± {e.half_width:.2f}"
    return text if e.seed_se_known else text + " (test images only)"


def _summarize(notes: Sequence[str], list_up_to: int = 2) -> str:
    """Notes on runs left out, grouped by why: "12 runs missing; VAE 5-layer seed 1: failed (...)"."""
    groups: dict[str, list[str]] = {}
    for note in dict.fromkeys(notes):
        label, sep, why = note.partition(": ")
        key = (why if why.startswith("at ") else why.split(" ")[0]) if sep and " seed " in label else note
        groups.setdefault(key, []).append(note)
    out = []
    for key, items in groups.items():
        if len(items) <= list_up_to or key == "failed":
            out += items
        else:
            out.append(f"{len(items)} runs {key}")
    return "; ".join(out)


def _precision(reg: Registry, parts: Sequence[Part]) -> str:
    """The training step of the runs behind ``parts``: "fp32", "bf16", with ", compiled" where it was."""
    steps = set()
    for p in parts:
        for spec in p.specs:
            for r in reg.cell(spec).runs:
                t = r.config.train
                steps.add(f"{t.precision}{', compiled' if getattr(t, 'compile', False) else ''}")
    return " / ".join(sorted(steps))


def evaluate_claim(claim: Claim, reg: Registry, seed_term: Registry | None = None) -> Row:
    """``claim`` on the runs of ``reg``'s budget; ``seed_term``: the same profile at another epoch with
    several seeds, whose parts lend their seed term to the parts that have one seed here."""
    if claim.dataset != reg.P.dataset:
        return Row(claim, reg.P.name, NOT_RUN, [],
                   f"profile '{reg.P.name}' trains {reg.P.dataset.upper()}; the claim is about "
                   f"{claim.dataset.upper()} (no {claim.dataset.upper()} profile)")
    if claim.kind == "qualitative":
        return Row(claim, reg.P.name, QUALITATIVE, [], "a figure without a measurable statement; shown in the book")
    if claim.kind == "see":
        target = evaluate_claim(CLAIMS_BY_ID[claim.args["claim"]], reg, seed_term)
        part = next((p for p in target.parts if p.label == claim.args["part"]), None)
        which = f"part '{claim.args['part']}' of {target.id}"
        state = part.verdict if part is not None else target.verdict
        return Row(claim, reg.P.name, SEE, [part] if part is not None else [],
                   f"the same quantity as {which} (there: {state}); counted once, under {target.id}",
                   reg.P.warmup_epochs, target.precision)
    parts = EVALUATORS[claim.kind](reg, **{k: v for k, v in claim.args.items()})
    if seed_term is not None:
        _borrow_seed_terms(parts, EVALUATORS[claim.kind](seed_term, **claim.args), seed_term)
    for p in parts:
        p.verdict, p.reason = decide(p.est, p.test, reg.at_paper_budget and (p.epochs or 0) >= reg.paper_epochs,
                                     len(parts))
    verdict = combine([p.verdict for p in parts])
    deciding = next((p for p in parts if p.verdict == verdict), parts[0])
    if verdict == NOT_RUN:
        notes = [n for p in parts if p.est is None for n in p.notes if not n.startswith("our best")]
        reason = _summarize(notes) or deciding.reason
    else:
        n = len(parts)
        test = deciding.test.text() + (f" for each of {n} parts" if n > 1 else "")
        which = f"{deciding.label}: " if n > 1 and verdict != REPRODUCED else ""
        reason = f"test {test}; {which}{deciding.reason}" + (f"; {deciding.how}" if deciding.how else "")
        best = [x for x in deciding.notes if x.startswith("our best")]
        left_out = [x for p in parts for x in p.notes if not x.startswith("our best")]
        reason += "".join(f"; {x}" for x in best)
        if left_out:
            reason += "; left out: " + _summarize(left_out)
    reason += "".join(f"; {what}: see {cid}" for cid, what in claim.see)
    return Row(claim, reg.P.name, verdict, parts, reason, reg.P.warmup_epochs, _precision(reg, parts))


def _borrow_seed_terms(parts: Sequence[Part], reference: Sequence[Part], ref: Registry) -> None:
    """Give each one-seed part the seed term of the same part (by label) at the reference budget."""
    by_label = {p.label: p for p in reference}
    for p in parts:
        if p.est is None or p.est.seed_se_known:
            continue
        r = by_label.get(p.label)
        at = f"{ref.epoch} epochs"
        if r is None or r.est is None or r.est.seed_var is None or r.est.n_seeds < MIN_SEEDS:
            seeds = "no complete runs" if r is None or r.est is None else f"{r.est.n_seeds} seed(s)"
            p.how += f"; no seed term: the same comparison at {at} has {seeds}"
            continue
        p.est = with_seed_term(p.est, r.est.seed_var, r.est.seed_df)
        p.how += f"; seed term from the same comparison at {at} ({r.est.n_seeds} seeds)"


def evaluate(profile: Profile | str, root=None, seeds: Sequence[int] | None = None,
             claims: Sequence[Claim] = CLAIMS, epoch: int | None = None,
             seed_term_epoch: int | None = None) -> list[Row]:
    """Every claim on ``profile``'s runs in the registry at ``root`` (read-only; nothing is trained),
    each run read at ``epoch`` (default: the profile's epochs), e.g. ``evaluate("paper", epoch=300)``.
    ``seed_term_epoch``: where a part has one seed, its seed term comes from the same part at that
    epoch (``evaluate("paper", epoch=2000, seed_term_epoch=300)``); without one it is unresolved."""
    reg = Registry(profile, root, seeds, epoch)
    ref = Registry(profile, root, seeds, seed_term_epoch) if seed_term_epoch is not None else None
    return [evaluate_claim(c, reg, ref) for c in claims]


@dataclass(frozen=True)
class Budget:
    """A budget: a profile's runs read at one epoch (None: the profile's epochs), with the epoch that
    lends a seed term to one-seed parts. ``Budget("paper", 2000, seed_term_epoch=300)``."""

    profile: str
    epoch: int | None = None
    seed_term_epoch: int | None = None

    @property
    def name(self) -> str:
        return self.profile if self.epoch is None else f"{self.profile}, {self.epoch} epochs"

    def evaluate(self, root=None) -> list[Row]:
        return evaluate(self.profile, root, epoch=self.epoch, seed_term_epoch=self.seed_term_epoch)

    def text(self, root=None) -> str:
        """The budget sentence for captions (:meth:`lvae.registry.profiles.Profile.budget`) at this epoch, with the
        training step and the L_K test images of the runs that reached it (registry ``root``)."""
        p = load_profile(self.profile)
        runs = [at_epoch(r, self.epoch) for r in profile_runs(p, root).values() if r is not None]
        runs = [r for r in runs if r.ok]
        seeds = sorted({r.config.train.seed for r in runs}) or None  # those that reached the epoch
        text = p.budget(self.epoch, step_text(runs) if runs else None, lk_images(runs), seeds)
        if self.seed_term_epoch is not None:
            text += (f"; a comparison with one seed takes its seed term from the same comparison at "
                     f"{self.seed_term_epoch} epochs")
        return text


# the paper's budget on the way: seeds 0-2 at 300 epochs; seed 0 at 2,000 (seed term from 300 epochs)
PAPER_BUDGETS = (Budget("paper", 300), Budget("paper", 2000, seed_term_epoch=300))


def budget_of_runs(name: str, runs: dict) -> Budget:
    """The :class:`Budget` of an entry of :func:`lvae.report.budgets.budget_runs`: a profile at its epochs, or,
    for a profile with milestones, at one of them, a one-seed part borrowing its seed term from the first."""
    p, epoch = budget_of(name, runs)
    if not p.milestones:
        return Budget(p.name)
    first = p.milestones[0]
    return Budget(p.name, epoch, seed_term_epoch=first if epoch != first else None)


def budget_verdicts(budgets: dict[str, dict], ids: Sequence[str] = ("lvae-L1", "lvae-L5000"),
                    root=None) -> dict[str, dict[str, str]]:
    """{budget name: {claim id: verdict}} of the claims ``ids`` at every budget of
    :func:`lvae.report.budgets.budget_runs` (for :func:`lvae.report.budgets.paper_gap_rows`)."""
    chosen = [CLAIMS_BY_ID[i] for i in ids]
    out = {}
    for name, runs in budgets.items():
        b = budget_of_runs(name, runs)
        rows = evaluate(b.profile, root, claims=chosen, epoch=b.epoch, seed_term_epoch=b.seed_term_epoch)
        out[name] = {r.id: r.verdict for r in rows}
    return out


def verdict_counts(evaluated: Sequence[Row]) -> dict[str, int]:
    return {v: sum(r.verdict == v for r in evaluated) for v in VERDICTS}


def summary_rows(by_profile: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per claim, one verdict column per profile: the verdicts at a glance.

    ``by_profile``: profile name -> its rows (or its :class:`Evaluation`, as :func:`book_evaluations` gives).
    """
    by_profile = {k: getattr(v, "rows", v) for k, v in by_profile.items()}
    names = list(by_profile)
    first = by_profile[names[0]]
    out = []
    for i, r in enumerate(first):
        row = {"claim": f"{r.claim.where} [{r.id}]", "paper": r.claim.paper_text()}
        for name in names:
            row[name] = by_profile[name][i].verdict
        out.append(row)
    return out


def profiles_with_runs(root=None, names: Sequence[str] | None = None, epoch: int | None = None) -> list[str]:
    """The profiles (of ``names``, default all) with at least one complete run of theirs in the registry
    (at ``epoch``: a run that reached it; default: each profile's epochs)."""
    out = []
    for name in names or available():
        reg = Registry(name, root, epoch=epoch)
        cells = [(v, d) for v in reg.P.variants for d in reg.P.depths]
        if any(reg.cell(c).runs for c in cells):
            out.append(name)
    return out


def verdict_list(evaluated: Sequence[Row], verdict: str) -> str:
    """The claims with ``verdict``, for the book's prose: "lvae-L1 (-98.70 ± 0.55), ..." (ids alone
    where there is no number); "none" when no claim has it."""
    items = []
    for r in evaluated:
        if r.verdict != verdict:
            continue
        part = r.deciding_part() if verdict in (REPRODUCED, NOT_REPRODUCED, UNRESOLVED) else None
        items.append(f"{r.id} ({_est_text(part)})" if part is not None and part.est is not None else r.id)
    return ", ".join(items) or "none"


BOOK_PROFILES = ("cpu", "cpu-long", "paper")  # the budgets the book shows whenever their runs exist


@dataclass
class Evaluation:
    """Every claim on one budget's runs: a profile at its epochs, or at ``budget.epoch``."""

    profile: Profile
    rows: list[Row]
    root: Path
    budget: Budget | None = None

    def budget_text(self) -> str:
        return self.budget.text(self.root) if self.budget is not None else self.profile.budget()


def book_evaluations(P: Profile, names: Sequence[str] = BOOK_PROFILES) -> dict[str, Evaluation]:
    """This build's profile ``P`` (on the registry the chapter reads), then each budget of the profiles
    ``names`` that has runs (the paper's: at 300 and at 2,000 epochs, :data:`PAPER_BUDGETS`), read from that registry or else from the repository's committed ``results/`` (a
    chapter may read a scratch copy that holds only its own profile's runs). Read-only."""
    root = results_dir()
    roots = [root]
    repo = repository()
    if repo is not None and (repo / COMMITTED).is_dir() and (repo / COMMITTED).resolve() != root.resolve():
        roots.append(repo / COMMITTED)
    out = {P.name: Evaluation(P, evaluate(P, root), root)}
    for name in names:
        if name in out:
            continue
        p = load_profile(name)
        # a profile with milestones (the paper's) is one budget per milestone its runs reached: the first
        # (every seed) and the last (the paper's epochs; one seed borrows its seed term from the first)
        budgets = [Budget(name)] if not p.milestones else \
            [Budget(name, p.milestones[0]), Budget(name, p.milestones[-1], seed_term_epoch=p.milestones[0])]
        for b in budgets:
            where = next((r for r in roots if profiles_with_runs(r, [name], b.epoch)), None)
            if where is not None:
                out[b.name] = Evaluation(p, b.evaluate(where), where, b)
    return out
