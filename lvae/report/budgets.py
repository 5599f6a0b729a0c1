"""Training budgets: every budget in the registry with its runs, and the rows the chapters show (Fig 2).

A budget is a profile and an epoch: a profile at its epochs, or, for a profile with ``milestones``
(the paper's schedule: 300, 1,000, 2,000 epochs), one budget per milestone, every run read as it
stood then (:class:`lvae.report.run_values.RunAtEpoch`). :func:`budget_runs` finds them read-only;
the rows put one model per budget (:func:`budget_rows`), the 5-layer LVAE against the paper
(:func:`paper_gap_rows`), the LVAE minus the VAE (:func:`budget_differences`), the L_K on every test
image (:func:`full_test_lk_rows`) and the training curves (:func:`learning_curves`).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from lvae.registry.experiments import VARIANTS
from lvae.registry.profiles import Profile, available, load_profile
from lvae.report import paper
from lvae.report.run_values import (Key, at_epoch, best_lk, final, first_complete_run, history, lk_counts, lk_label,
                                    model_label, profile_runs, run_state)
from lvae.report.seed_means import SeedMean, difference, iw_k, lk_images, run_contrast, seed_mean, seeds_cell

# -- the budgets in the registry -----------------------------------------------------------------
BUDGET_VARIANTS = ("lvae_bn_wu", "vae_bn_wu", "lvae_bn", "lvae_wu")  # the depth-5 pair and the Fig 7 ablations


class BudgetRuns(dict):
    """{(variant, depth, seed): run or None} of one budget: ``profile``'s runs read at ``epoch``
    (:class:`lvae.report.run_values.RunAtEpoch` where a run went on past it)."""

    def __init__(self, profile: Profile, epoch: int, runs: dict[Key, Any]):
        super().__init__(runs)
        self.profile, self.epoch = profile, epoch

    def epochs_text(self) -> str:
        return f"{self.epoch} (warm-up {self.profile.warmup_epochs})"


def budget_of(name: str, runs: dict) -> tuple[Profile, int]:
    """The profile and epoch of budget ``name`` (a :class:`BudgetRuns`, or a profile's name and its runs)."""
    if isinstance(runs, BudgetRuns):
        return runs.profile, runs.epoch
    p = load_profile(name)
    return p, p.epochs


def budget_runs(depth: int, variants: Sequence[str] = BUDGET_VARIANTS, dataset: str = "mnist",
                root=None) -> dict[str, BudgetRuns]:
    """Every budget with at least one finished run in the registry of a model (variant, ``depth``) of
    ``variants``: {budget name: :class:`BudgetRuns` {(variant, depth, seed): run or None, for the
    profile's seeds}}, in profiles.yml's order. A budget is a profile at its epochs, or, for a profile
    with ``milestones`` (the paper's: 300, 1,000, 2,000), one budget per milestone ("paper, 300 epochs"),
    every run read as it stood then. Read-only: a missing run is None (so is a complete run of the same
    configuration that stopped short of the budget's epochs, or, without milestones, was trained for
    other epochs); a partial run is returned as it is. Runs of profiles added later (e.g. imported)
    appear here without any change to the caller."""
    out = {}
    for name in available():
        p = load_profile(name)
        if p.dataset != dataset or depth not in p.depths:
            continue
        vs = [v for v in variants if v in p.variants]
        runs = profile_runs(p, root, vs, (depth,)) if vs else {}
        if not p.milestones:
            # a complete run of the same configuration trained for another number of epochs belongs to
            # another budget (the registry keys runs by configuration, not by epochs)
            runs = {k: None if r is not None and r.ok and r.epochs != p.epochs else r for k, r in runs.items()}
            if any(r is not None for r in runs.values()):
                out[name] = BudgetRuns(p, p.epochs, runs)
            continue
        for e in p.milestones:
            at = {k: None if r is None or (r.ok and r.epochs < e) else at_epoch(r, e) for k, r in runs.items()}
            if any(r is not None and r.ok for r in at.values()):
                out[f"{name}, {e} epochs"] = BudgetRuns(p, e, at)
    return dict(sorted(out.items(), key=lambda kv: kv[1].epoch))  # shortest budget first


def step_text(runs: Iterable) -> str:
    """The training step the runs' configs record: "fp32", "bf16, compiled" (several: joined by " / ")."""
    steps = {f"{r.config.train.precision}{', compiled' if r.config.train.compile else ''}" for r in runs
             if r is not None}
    return " / ".join(sorted(steps)) or "—"


# -- rows ----------------------------------------------------------------------------------------
BUDGET_COLUMNS = ("model", "profile", "epochs", "seeds", "train L1", "test L1", "test L_K")


def budget_rows(budgets: dict[str, dict[Key, Any]], variants: Sequence[str] = BUDGET_VARIANTS) -> list[dict[str, Any]]:
    """One row per model and budget (:func:`budget_runs`): means over the seeds with their 95 % CI,
    the seeds with a number of the seeds the profile lists, and why the others have none."""
    rows = []
    for v in variants:
        for name, runs in budgets.items():
            keys = [k for k in runs if k[0] == v]
            if not keys:
                continue
            p, epoch = budget_of(name, runs)
            depth = keys[0][1]
            mine = {k: runs[k] for k in keys}
            n = lk_images(mine.values())
            k = iw_k(mine.values(), p.iw_k)
            cells = {m: seed_mean(mine, v, depth, m, n if m == "test_LK" else None, p.seeds)
                     for m in ("train_L1", "test_L1", "test_LK")}
            lk = cells["test_LK"]
            rows.append({"model": f"{VARIANTS[v]['label']} {depth}-layer", "profile": name,
                         "epochs": f"{epoch} (warm-up {p.warmup_epochs})",
                         "seeds": seeds_cell(list(cells.values()), len(p.seeds)),
                         "train L1": cells["train_L1"].cell(seeds=False), "test L1": cells["test_L1"].cell(seeds=False),
                         "test L_K": (lk_label(k, n), *_tuple(lk.cell(seeds=False))) if lk.value is not None else None,
                         "key": (v, depth, name)})
    return rows


PAPER_GAP_COLUMNS = ("budget", "epochs", "seeds", "step", "test L1", "test L_K")


def paper_gap_rows(budgets: dict[str, dict[Key, Any]], verdicts: dict[str, dict[str, str]] | None = None,
                   variant: str = "lvae_bn_wu") -> list[dict[str, Any]]:
    """The 5-layer LVAE+BN+WU at every budget (:func:`budget_runs`) next to the paper's numbers for it
    (section 3: test L1 −85.23, L5000 −82.12): per bound, the test images, our mean over the seeds with
    its 95 % CI (one seed: the test-image s.e.), the gap (ours − paper; negative: ours is lower) and the
    verdict of ``verdicts``: {budget: {claim id: verdict}} (:func:`lvae.report.claims.budget_verdicts`, claims
    ``lvae-L1`` and ``lvae-L5000``). The gap on L_K is shown only where ours is L5000, the paper's bound."""
    ref_l1, ref_lk = paper.get("mnist_lvae5_test_L1"), paper.get("mnist_lvae5_test_L5000")
    rows = []
    for name, runs in budgets.items():
        p, epoch = budget_of(name, runs)
        mine = {k: r for k, r in runs.items() if k[0] == variant and k[1] == 5}
        if p.dataset != "mnist" or not mine:
            continue
        n = lk_images(mine.values())
        k = iw_k(mine.values(), p.iw_k)
        l1 = seed_mean(mine, variant, 5, "test_L1", seeds=p.seeds)
        lk = seed_mean(mine, variant, 5, "test_LK", n, p.seeds)
        said = (verdicts or {}).get(name, {})
        n_test = final(first_complete_run(mine, (variant, 5)), "n_test") or 0

        def cell(what: str, est: SeedMean, ref, claim: str, comparable: bool = True):
            if est.value is None:
                return None
            gap = f"gap {est.value - ref.value:+.2f}" if comparable else "no gap (not L5000)"
            return (what, *_tuple(est.cell(seeds=False)), gap, *((said[claim],) if claim in said else ()))

        rows.append({
            "budget": name, "epochs": f"{epoch} (warm-up {p.warmup_epochs})",
            "seeds": seeds_cell([l1, lk], len(p.seeds)),
            "step": step_text(mine.values()),
            "test L1": cell(f"L1 ({n_test:,} images)", l1, ref_l1, "lvae-L1"),
            "test L_K": cell(lk_label(k, n), lk, ref_lk, "lvae-L5000", k == 5000),
            "estimates": {"test_L1": l1, "test_LK": lk}})
    return rows


def full_test_lk_rows(budgets: dict[str, dict[Key, Any]], ref: str = "lvae_bn_wu") -> list[dict[str, Any]]:
    """One row per run (of every profile in ``budgets``, as :func:`budget_runs` gives) whose final
    weights have an L_K on all the test images its L1 covers (10,000 on MNIST): that L_K with its
    test-image s.e., and ``ref`` of the same profile and seed minus it, paired image by image when
    both stored per-image values on those images (a 95 % CI over the test images: one seed)."""
    rows = []
    for name, runs in budgets.items():
        for (variant, depth, seed), run in runs.items():
            n = final(run, "n_test")
            lk = best_lk(run, n) if n else None
            if lk is None or lk["n"] != n:
                continue
            other = runs.get((ref, depth, seed))
            diff, how = None, ""
            if variant != ref and other is not None and n in lk_counts(other, lk["k"]):
                diff, how = run_contrast([(1.0, [other]), (-1.0, [run])], "test_LK", lk["k"], n)
            rows.append({"profile": name, "model": model_label(run, f"{VARIANTS[variant]['label']}-{depth}"),
                         "seed": seed, "epochs": run.epochs, f"L{lk['k']}": lk["value"], "s.e. (images)": lk["se"],
                         "test images": n, f"{VARIANTS[ref]['label']} − this": None if diff is None else
                         f"{diff.text()} ({'paired' if how.startswith('paired') else 'unpaired'})"})
    return rows


def budget_differences(budgets: dict[str, dict[Key, Any]], a: str = "lvae_bn_wu", b: str = "vae_bn_wu"
                       ) -> list[dict[str, Any]]:
    """Model ``a`` minus model ``b`` (variants at the budgets' depth) per budget (:func:`budget_runs`),
    on test L1 and on L_K over the test images all their seeds have (:func:`lvae.report.seed_means.difference`): paired
    image by image where the runs stored per-image values. A budget where a side has no finished
    run says so."""
    rows = []
    for name, runs in budgets.items():
        depth = next(iter(runs))[1]
        p, epoch = budget_of(name, runs)
        mine = {k: r for k, r in runs.items() if k[0] in (a, b)}
        n = lk_images(mine.values())
        k = iw_k(mine.values(), p.iw_k)
        d1 = difference(mine, (a, depth), (b, depth), "test_L1")
        dk = difference(mine, (a, depth), (b, depth), "test_LK", n) if n else None
        seeds = [seed_mean(mine, v, depth, "test_L1", seeds=p.seeds) for v in (a, b)]
        rows.append({"profile": name, "epochs": epoch, "seeds": seeds_cell(seeds, len(p.seeds), min),
                     "test L1": None if d1 is None else d1.text(),
                     "test L_K": None if dk is None else (lk_label(k, n), dk.text()),
                     "estimates": {"test_L1": d1, "test_LK": dk}})
    return rows


def _tuple(cell) -> tuple:
    return cell if isinstance(cell, tuple) else (cell,)


def learning_curves(budgets: dict[str, dict[Key, Any]], variants: Sequence[str] = ("lvae_bn_wu", "vae_bn_wu")
                    ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Train and test L1 over epochs (paper Fig 2) of every run of ``variants`` in ``budgets``:
    {profile: {variant: [{"seed", "epochs", "train", "test", "state"}]}}; a partial run's curve
    ends at its last evaluation and its state says so ("partial, 16 of 30 epochs")."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, runs in budgets.items():
        for (v, _d, s), run in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][2])):
            if v not in variants or run is None:
                continue
            e_train, train = history(run, "train_L1")
            e_test, test = history(run, "test_L1")
            out.setdefault(name, {}).setdefault(v, []).append(
                {"seed": s, "epochs": e_train, "train": train, "test_epochs": e_test, "test": test,
                 "state": "complete" if run.ok else run_state(run)})
    return out
