"""Latent units: the per-unit KL that training stores, active units and the layer-wise KL split (Figs 4-5).

A unit is active when its average KL(q||p) exceeds :data:`lvae.training.step.ACTIVE_UNIT_THRESHOLD` nats.
Every count here comes from the per-unit test KL stored by training (:func:`run_kl_units`): the one
source of active units for the chapters and for :mod:`lvae.report.claims`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lvae.registry.experiments import VARIANTS, run_config
from lvae.report.run_values import final, run_state
from lvae.report.seed_means import SeedMean, seeds_cell
from lvae.report.stats import mean_ci
from lvae.training.step import ACTIVE_UNIT_THRESHOLD


# -- one run -------------------------------------------------------------------------------------
def kl_history(run) -> tuple[np.ndarray, list[np.ndarray]]:
    """(epochs, per layer an array [n_evals, units]) of the per-unit test KL (paper Fig 4)."""
    rows = [r for r in run.metrics() if "kl_units" in r]
    epochs = np.array([r["epoch"] for r in rows])
    n_layers = len(rows[0]["kl_units"]) if rows else 0
    return epochs, [np.array([r["kl_units"][i] for r in rows], dtype=float) for i in range(n_layers)]


def active_units(kl_units: Sequence[Sequence[float]], threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[int]:
    """Units per layer whose average KL(q||p) exceeds ``threshold`` nats."""
    return [int((np.asarray(layer) > threshold).sum()) for layer in kl_units]


def run_kl_units(run) -> list[list[float]] | None:
    """A complete run's final per-unit test KL as training stored it (None otherwise): the one source of
    active units and of the layer-wise KL for the chapters and the claims."""
    return final(run, "kl_units")


def run_active_units(run) -> list[int] | None:
    """Active units per layer of a complete run (:func:`run_kl_units`, :func:`active_units`)."""
    kl = run_kl_units(run)
    return None if kl is None else active_units(kl)


# -- over the seeds ------------------------------------------------------------------------------
def _kl_units_by_seed(runs: dict, variant: str, depth: int
                      ) -> tuple[dict[int, Sequence[Sequence[float]]], dict[int, str]]:
    """({seed: per-unit KL stored by training}, {seed: why it has none}) of model (variant, depth) over
    every seed in ``runs``."""
    per, missing = {}, {}
    for s in sorted({k[2] for k in runs}):
        key = (variant, depth, s)
        kl = run_kl_units(runs.get(key))
        if kl is None:
            missing[s] = run_state(runs.get(key))
            continue
        per[s] = kl
    return per, missing


def active_unit_counts(runs: dict, variants: Sequence[str], depth: int) -> dict[str, dict[str, SeedMean]]:
    """{variant: {"z1": active units of z1, ..., "z<depth>": ..., "total": over the layers}} as
    :class:`lvae.report.seed_means.SeedMean` over every seed in ``runs``, from the per-unit KL stored by
    training (:func:`run_active_units`): the one source of active units for every chapter and for
    :mod:`lvae.report.claims`."""
    out = {}
    for v in variants:
        per, missing = _kl_units_by_seed(runs, v, depth)
        per_seed = {s: active_units(kl) for s, kl in per.items()}
        per_seed = {s: act + [sum(act)] for s, act in per_seed.items()}
        names = [f"z{i + 1}" for i in range(depth)] + ["total"]
        out[v] = {name: SeedMean("active_units", {s: float(a[i]) for s, a in per_seed.items()}, missing,
                                 mean_ci([a[i] for a in per_seed.values()]) if per_seed else None, None, None)
                  for i, name in enumerate(names)}
    return out


def active_unit_rows(runs: dict, variants: Sequence[str], depth: int) -> list[dict[str, Any]]:
    """Active units per layer (and in total) of each variant at ``depth``, mean over the seeds
    (see :func:`active_unit_counts`); layer sizes in the column names."""
    counts = active_unit_counts(runs, variants, depth)
    sizes = run_config(variants[0], depth).model.latent_sizes if variants else ()
    rows = []
    for v in variants:
        cols = counts[v]
        rows.append({"model": f"{VARIANTS[v]['label']} {depth}-layer",
                     "seeds": seeds_cell([cols["total"]], len({k[2] for k in runs})),
                     **{f"z{i + 1} ({d})": _count_cell(cols[f"z{i + 1}"]) for i, d in enumerate(sizes)},
                     "total": _count_cell(cols["total"]), "of": sum(sizes)})
    return rows


def _count_cell(sm: SeedMean) -> tuple[str, ...] | str:
    """A count over seeds in a narrow column: the mean, and its ± on a second line."""
    if sm.value is None:
        return "—"
    spread = sm.spread_text("{:.1f}")
    return (f"{sm.value:.1f}", spread) if spread else f"{sm.value:.1f}"


def upper_layer_share(kl_layers: Sequence[float]) -> float:
    """Percentage of the KL carried by the layers above z1 (Fig 5)."""
    total = float(sum(kl_layers))
    return 100.0 * float(sum(kl_layers[1:])) / total if total > 0 else 0.0


def layer_kl(runs: dict, variants: Sequence[str], depth: int) -> dict[str, dict[str, Any]]:
    """{variant: {"layers": KL per layer (mean over the seeds), "upper":
    :class:`lvae.report.seed_means.SeedMean` of the percentage above z1 (Fig 5)}}, from the per-unit KL
    stored by training (:func:`run_kl_units`)."""
    out = {}
    for v in variants:
        kl_by_seed, missing = _kl_units_by_seed(runs, v, depth)
        per = {s: [float(np.sum(layer)) for layer in kl] for s, kl in kl_by_seed.items()}
        shares = {s: upper_layer_share(lay) for s, lay in per.items()}
        out[v] = {"layers": np.mean(list(per.values()), axis=0).tolist() if per else None,
                  "upper": SeedMean("upper_share", shares, missing,
                                    mean_ci(list(shares.values())) if shares else None, None, None)}
    return out


# -- at every budget -----------------------------------------------------------------------------
def _mean_text(sm: SeedMean) -> str:
    """A count over seeds in one short cell: the mean (one decimal where the seeds differ)."""
    return "—" if sm.value is None else (f"{sm.value:.0f}" if float(sm.value).is_integer() else f"{sm.value:.1f}")


def budget_layer_rows(by_budget: dict[str, dict], variants: Sequence[str], depth: int) -> list[dict[str, Any]]:
    """One row per budget (:func:`lvae.report.budgets.budget_runs`, every run read at the budget's epoch)
    and model: the seeds with a number, the active units per layer (mean over the seeds) and the
    share of the test KL above z1 (Fig 5; mean ± 95 % CI over the seeds, a bare value with one seed),
    from the per-unit KL that training stored at that epoch."""
    rows = []
    for name, runs in by_budget.items():
        counts = active_unit_counts(runs, variants, depth)
        split = layer_kl(runs, variants, depth)
        listed = len({k[2] for k in runs})
        for v in variants:
            upper = split[v]["upper"]
            rows.append({"budget": name, "model": f"{VARIANTS[v]['label']} {depth}-layer",
                         "seeds": seeds_cell([upper], listed),
                         f"active units z1…z{depth}": " / ".join(_mean_text(counts[v][f"z{i + 1}"])
                                                               for i in range(depth)),
                         "KL above z1 [%]": upper.text("{:.1f}") or "—"})
    return rows
