"""The paper's results next to ours: the headline MNIST numbers (section 3's text, Table 1's LVAE row),
every model of the Fig 3 grid, Table 1 and Table 2, keyed by the paper's keys (:mod:`lvae.report.paper`).

Ours are means over the seeds (:class:`lvae.report.seed_means.SeedMean`) of runs read from the registry;
nothing is trained here (the Table 1 finetuning run is shown only when it is registered).
"""
from __future__ import annotations

from typing import Any, Sequence

from lvae.registry.experiments import VARIANTS, finetune_config
from lvae.registry.profiles import experiment
from lvae.registry.runs import results_dir, stored_run
from lvae.report import paper
from lvae.report.run_values import best_lk, final, first_complete_run, lk_label, model_label
from lvae.report.seed_means import best_model, iw_k, lk_images, seed_mean, seeds_cell

# -- section 3's headline numbers ----------------------------------------------------------------
HEADLINE_KEYS = ("mnist_lvae5_test_L1", "mnist_best_vae_test_L1", "mnist_lvae5_test_L5000",
                 "mnist_best_vae_test_L5000", "t1_lvae5")
FIG3_TEXT_KEYS = HEADLINE_KEYS[:4]  # the four MNIST numbers of section 3's text
HEADLINE_COLUMNS = ("quantity", "paper model", "paper", "our model", "ours", "gap", "measured as")


def headline(runs: dict, max_depth: int) -> dict[str, dict[str, Any]]:
    """Paper vs ours for every headline MNIST number, keyed by the paper's key (:mod:`lvae.report.paper`):
    section 3's text and Table 1's LVAE row. Ours: the mean over every seed in ``runs`` with its
    95 % CI (one seed: the test-image s.e.). The best VAE is the bottom-up (variant, depth) with the
    highest mean; both models' L_K are on the same test images (the most that all their seeds have)."""
    vaes = [v for v in VARIANTS if VARIANTS[v]["inference"] == "bottom_up"]
    lvae = ("lvae_bn_wu", max_depth)
    best_l1 = best_model(runs, "test_L1", vaes)
    best_lk_model = best_model(runs, "test_LK", vaes, lk_images(r for k, r in runs.items() if k[0] in vaes))
    pair = [r for k, r in runs.items() if k[:2] in (lvae, best_lk_model)]
    n = lk_images(pair)
    k = iw_k(pair)

    def row(key: str, model: tuple | None, metric: str) -> dict[str, Any]:
        ref = paper.get(key)
        sm = seed_mean(runs, *model, metric, n if metric == "test_LK" else None) if model else None
        value = None if sm is None else sm.value
        n_test = final(first_complete_run(runs, model), "n_test") or 0
        what = lk_label(k, n) if metric == "test_LK" else f"L1 ({n_test:,} images)"
        return {"key": key, "quantity": ref.what, "paper model": ref.model, "paper": ref.value, "source": ref.source,
                "our model": "—" if model is None else _fmt_model(model), "model": model, "estimate": sm,
                "value": value, "ours": None if sm is None else sm.cell(), "seeds": 0 if sm is None else sm.n_seeds,
                "measured as": what if value is not None else "—", "k": k if metric == "test_LK" else 1,
                "n": n if metric == "test_LK" else final(first_complete_run(runs, model), "n_test"),
                "gap": None if value is None else value - ref.value}

    return {
        "mnist_lvae5_test_L1": row("mnist_lvae5_test_L1", lvae, "test_L1"),
        "mnist_best_vae_test_L1": row("mnist_best_vae_test_L1", best_l1, "test_L1"),
        "mnist_lvae5_test_L5000": row("mnist_lvae5_test_L5000", lvae, "test_LK"),
        "mnist_best_vae_test_L5000": row("mnist_best_vae_test_L5000", best_lk_model, "test_LK"),
        "t1_lvae5": row("t1_lvae5", lvae, "test_LK"),
    }


def _fmt_model(key: tuple) -> str:
    return f"{VARIANTS[key[0]]['label']} {key[1]}-layer"


# -- the Fig 3 grid ------------------------------------------------------------------------------
def grid_rows(runs: dict, variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row per model (variant order as given, then depth) of the grid: the Fig 3 numbers, each the
    mean over every seed in ``runs`` (:class:`lvae.report.seed_means.SeedMean` cells); L_K on the test
    images all runs have."""
    n = lk_images(runs.values())
    k = iw_k(runs.values())
    seeds = sorted({key[2] for key in runs})
    rows = []
    for v in variants:
        for d in sorted({key[1] for key in runs if key[0] == v}):
            cells = {m: seed_mean(runs, v, d, m, n if m == "test_LK" else None)
                     for m in ("train_L1", "test_L1", "test_LK", "active_units")}
            epochs = sorted({r.epochs for key, r in runs.items() if key[:2] == (v, d) and r is not None and r.ok})
            rows.append({"model": VARIANTS[v]["label"], "layers": d,
                         "seeds": seeds_cell(list(cells.values()), len(seeds)),
                         "train L1": cells["train_L1"].cell(seeds=False), "test L1": cells["test_L1"].cell(seeds=False),
                         f"test {lk_label(k, n)}": cells["test_LK"].cell(seeds=False),
                         "active units": cells["active_units"].cell("{:.1f}", seeds=False),
                         "epochs": ", ".join(map(str, epochs)) or "—"})
    return rows


# -- Tables 1 and 2 ------------------------------------------------------------------------------
TABLE1_KEYS = ("t1_vae1_nf", "t1_iwae2_iw1", "t1_iwae2_iw50", "t1_vae2_vgp", "t1_lvae5", "t1_lvae5_ft",
               "t1_lvae5_ft_iw10")
TABLE1_COLUMNS = ("model", "paper", "ours", "gap", "ours: run")


def table1_rows(runs: dict, depth: int, finetune_run=None) -> dict[str, dict[str, Any]]:
    """Table 1 of the paper with ours where we have runs, keyed by the paper's key (:data:`TABLE1_KEYS`,
    in the table's order): the LVAE row (mean over every seed of ``lvae_bn_wu`` at ``depth`` in
    ``runs``, L_K on the test images all of them have) and the finetuning rows if a finetuning run
    exists; other papers' models are the paper's numbers only."""
    lvae_runs = {k: r for k, r in runs.items() if k[:2] == ("lvae_bn_wu", depth)}
    n = lk_images(lvae_runs.values())
    lvae = seed_mean(runs, "lvae_bn_wu", depth, "test_LK", n)
    k = iw_k(lvae_runs.values())
    ft = seed_mean({("ft", depth, 0): finetune_run}, "ft", depth, "test_LK") if finetune_run is not None else None
    ft_lk = best_lk(finetune_run) or {}
    rows = {}
    for key in TABLE1_KEYS:
        ref = paper.get(key)
        if key == "t1_lvae5":
            status = (f"LVAE+BN+WU {depth}-layer: {lk_label(k, n)}",
                      *(f"seed {s}: {w}" for s, w in lvae.missing.items()))
            est = lvae
        elif key in ("t1_lvae5_ft", "t1_lvae5_ft_iw10"):
            est = ft
            status = "not run (needs the finetuning run)" if ft is None else \
                (f"{finetune_run.name}: {lk_label(ft_lk.get('k'), ft_lk.get('n'))}" if ft.value is not None
                 else model_label(finetune_run, finetune_run.name))
        else:
            est, status = None, "other paper's model"
        value = None if est is None else est.value
        rows[key] = {"key": key, "model": ref.model, "paper": ref.value,
                     "ours": None if est is None or value is None else est.cell(),
                     "seeds": None if est is None else est.n_seeds, "estimate": est,
                     "gap": None if value is None else value - ref.value, "ours: run": status}
    return rows


def finetune_run(profile, variant: str = "lvae_bn_wu", depth: int | None = None):
    """The Table 1 finetuning run continuing the profile's ``variant`` model, if it is in the
    registry (None otherwise; it is never trained here)."""
    parent, _ = experiment(profile, variant, depth or profile.max_depth)
    return stored_run(results_dir() / finetune_config(parent, profile.epochs).dir_name)


def table2_rows() -> list[dict[str, Any]]:
    """Table 2 of the paper (OMNIGLOT, NORB); ours: not run (datasets unavailable offline)."""
    rows = []
    for ds in ("omniglot", "norb"):
        for depth in range(1, 6):
            row: dict[str, Any] = {"dataset": {"omniglot": "OMNIGLOT", "norb": "NORB"}[ds],
                                   "latent": paper.LATENT_LABELS[depth]}
            for col in paper.TABLE2_COLUMNS:
                row[f"{col} (paper)"] = paper.table2(ds, col, depth)
            row["ours"] = "not run"
            rows.append(row)
    return rows
