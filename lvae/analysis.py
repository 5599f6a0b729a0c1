"""What the book's analysis chapters compute from stored runs.

Everything here reads the run registry (:mod:`lvae.runs`, :func:`lvae.profiles.get_run`) or a
trained model: metric histories, the paper-vs-ours comparison rows, active units, the layer-wise
KL split (Fig 5), PCA of posterior means (Fig 6), reconstructions and samples (Figs 9-10) and
latent traversals (the explorer widget).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import paper
from .experiments import VARIANTS
from .gaussian import precision_weighted
from .models import HierarchicalVAE
from .runs import RunFailedError, RunIncompleteError
from .train import ACTIVE_UNIT_THRESHOLD

__all__ = [
    "ACTIVE_UNIT_THRESHOLD", "history", "kl_history", "active_units", "final", "grid_table", "best_run",
    "headline_rows", "posterior_means", "pca", "reconstruct", "traversal", "traversal_values",
    "merge_sharpening", "iw_curve", "test_data",
]


# -- metric histories ----------------------------------------------------------------------------
def history(run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of metric ``key`` over a run's evaluations (rows without it skipped)."""
    rows = [r for r in run.metrics() if r.get(key) is not None]
    return np.array([r["epoch"] for r in rows]), np.array([r[key] for r in rows], dtype=float)


def kl_history(run) -> tuple[np.ndarray, list[np.ndarray]]:
    """(epochs, per layer an array [n_evals, units]) of the per-unit test KL (paper Fig 4)."""
    rows = [r for r in run.metrics() if "kl_units" in r]
    epochs = np.array([r["epoch"] for r in rows])
    n_layers = len(rows[0]["kl_units"]) if rows else 0
    return epochs, [np.array([r["kl_units"][i] for r in rows], dtype=float) for i in range(n_layers)]


def active_units(kl_units: Sequence[Sequence[float]], threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[int]:
    """Units per layer whose average KL(q||p) exceeds ``threshold`` nats."""
    return [int((np.asarray(layer) > threshold).sum()) for layer in kl_units]


def final(run, key: str) -> Any:
    """The final value of ``key`` of a complete run; None when never measured or when the run
    failed or is unfinished (a failed run is shown as failed, never as a number)."""
    if run is None:
        return None
    try:
        return run.result(key)
    except (RunFailedError, RunIncompleteError):
        return None


def best_lk(run, n: int | None = None) -> dict[str, Any] | None:
    """The final importance-weighted bound of a complete run on the most test images available:
    the training-time evaluation (often on a test subset) or a later ``lvae eval`` of the same
    weights (evals.jsonl), whichever used more images -- or exactly ``n`` images when given, so
    that two models are compared on the same images; among evaluations on as many images, the
    newest. Keys: value, se, k, n, seconds, source."""
    if run is None or not run.ok:
        return None
    row = next((r for r in reversed(run.metrics()) if "test_LK" in r), None)  # the final L_K evaluation
    if row is None:
        return None
    cands = [{"value": row["test_LK"], "se": row.get("test_LK_se"), "k": row.get("iw_k"), "n": row.get("n_iw"),
              "seconds": row.get("iw_seconds"), "source": "training-time evaluation"}]
    for e in run.evals():  # in the order they were made
        if e.get("epoch") == run.epochs and e.get("test_LK") is not None and e.get("iw_k") == cands[0]["k"]:
            cands.append({"value": e["test_LK"], "se": e.get("test_LK_se"), "k": e["iw_k"], "n": e.get("n_iw"),
                          "seconds": e.get("iw_seconds"), "source": f"lvae eval on {short_device(e.get('device')) or '?'}"})
    if n is not None:
        cands = [c for c in cands if c["n"] == n] or [cands[0]]
    # the most images; among equals the newest (a re-run with faster code times the current code)
    return max(reversed(cands), key=lambda c: c["n"] or 0)


def model_label(run, label: str) -> str:
    """``label``, marked with the run's status unless it completed."""
    return label if run is None or run.ok else f"{label} ({run.status})"


def grid_table(runs: dict, metric: str) -> dict[str, dict[int, float | None]]:
    """{variant: {depth: final value of ``metric``}} from :func:`lvae.profiles.grid_runs`."""
    out: dict[str, dict[int, float | None]] = {}
    for (variant, depth, _seed), run in sorted(runs.items()):
        out.setdefault(variant, {})[depth] = final(run, metric)
    return out


def best_run(runs: dict, metric: str, variants: Sequence[str]) -> tuple[tuple[str, int, int], Any]:
    """The (key, run) with the highest final ``metric`` among ``variants``."""
    cands = [(k, r) for k, r in runs.items() if k[0] in variants and final(r, metric) is not None]
    if not cands:
        return None, None
    return max(cands, key=lambda kr: final(kr[1], metric))


def _fmt_model(key: tuple[str, int, int]) -> str:
    return f"{VARIANTS[key[0]]['label']} {key[1]}-layer"


def headline_rows(runs: dict, max_depth: int) -> list[dict[str, Any]]:
    """Paper vs ours vs gap for every headline MNIST number (section 3 text and Table 1's LVAE row)."""
    lvae = runs.get(("lvae_bn_wu", max_depth, min(k[2] for k in runs)))
    vaes = [v for v in VARIANTS if v != "lvae_bn_wu"]
    best_l1 = best_run(runs, "test_L1", vaes)
    best_lk_run = best_run(runs, "test_LK", vaes)

    # L_K of the LVAE and of the best VAE on the same test images: the most both have
    n_common = min((best_lk(r) or {}).get("n") or 0 for r in (lvae, best_lk_run[1])) or None

    def row(key: str, ours_key: tuple | None, run, metric: str) -> dict[str, Any]:
        ref = paper.get(key)
        if metric == "test_LK":
            lk = best_lk(run, n_common) or {}
            value, se = lk.get("value"), lk.get("se")
            what = f"L{lk['k']} on {lk['n']:,}" if lk else "—"
        else:
            value, se = final(run, metric), final(run, metric + "_se")
            what = f"L1 on {final(run, 'n_test'):,}" if value is not None else "—"
        return {"quantity": ref.what, "paper model": ref.model, "paper": ref.value, "source": ref.source,
                "our model": "—" if ours_key is None else model_label(run, _fmt_model(ours_key)), "ours": value,
                "± s.e.": se, "ours ± s.e.": value if se is None else (value, f"± {se:.2f}"),
                "measured as": what, "gap": None if value is None else value - ref.value}

    lkey = ("lvae_bn_wu", max_depth, 0)
    return [
        row("mnist_lvae5_test_L1", lkey, lvae, "test_L1"),
        row("mnist_best_vae_test_L1", best_l1[0], best_l1[1], "test_L1"),
        row("mnist_lvae5_test_L5000", lkey, lvae, "test_LK"),
        row("mnist_best_vae_test_L5000", best_lk_run[0], best_lk_run[1], "test_LK"),
        row("t1_lvae5", lkey, lvae, "test_LK"),
    ]


# -- data and model passes -----------------------------------------------------------------------
def test_data(profile, n: int | None = None):
    """The profile's dataset with the first ``n`` test images (labels included)."""
    from .data import load_dataset

    return load_dataset(profile.dataset, subset=1, test_subset=n)


@torch.no_grad()
def posterior_means(model: HierarchicalVAE, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(means, variances) of q(z_i|.) per layer, bottom to top, ``[B, d_i]`` each (one pass, eval mode)."""
    model.eval()
    p = model(x, 1, torch.Generator().manual_seed(0))
    return [layer.mu_q[0] for layer in p.layers], [layer.var_q[0] for layer in p.layers]


def pca(z: torch.Tensor | np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(projections [B, k], explained-variance ratios [k]) of the rows of ``z``."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    var = s**2 / max(1, len(z) - 1)
    k = min(k, vt.shape[0])
    return z @ vt[:k].T, var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)


@torch.no_grad()
def reconstruct(model: HierarchicalVAE, x: torch.Tensor) -> torch.Tensor:
    """Mean of p(x|z_1) with every z at its posterior mean (conditional reconstructions, Fig 9b)."""
    means, _ = posterior_means(model, x)
    return model.generative.output.mean(model.generative.px_params(means[0]))


@torch.no_grad()
def _down_means(model: HierarchicalVAE, x: torch.Tensor, layer: int, z_layer: torch.Tensor) -> torch.Tensor:
    """z_1 (mean) below a fixed z_``layer``: for the LVAE the precision-weighted merge of the image's
    upward pass with the top-down Gaussian; for the VAE (no top-down inference) the prior mean."""
    z = z_layer
    inf = model.inference
    up = inf.upward(x) if model.config.inference == "ladder" else None
    for i in reversed(range(layer)):
        mu_p, var_p = model.generative.prior(i, z)
        if up is not None:
            mu_t, var_t = inf.top_down(i, z, model.generative)
            mu_hat, var_hat = up[i]
            mu_p, _ = precision_weighted(mu_hat.expand_as(mu_t), var_hat.expand_as(var_t), mu_t, var_t)
        z = mu_p
    return z


def traversal_values(means: torch.Tensor, unit: int, steps: int = 9) -> np.ndarray:
    """Values for a unit's traversal: from its 2nd to 98th percentile over the test images'
    posterior means, widened to at least +-2 around their median."""
    v = means[:, unit].double().numpy()
    lo, mid, hi = np.percentile(v, [2, 50, 98])
    lo, hi = min(lo, mid - 2.0), max(hi, mid + 2.0)
    return np.linspace(lo, hi, steps)


@torch.no_grad()
def traversal(model: HierarchicalVAE, x: torch.Tensor, layer: int, unit: int, values: Sequence[float]) -> torch.Tensor:
    """Decoded images ``[len(values), x_dim]`` as unit ``unit`` of layer ``layer`` (0 = z_1) moves
    through ``values`` while the other units of that layer stay at the posterior mean of the single
    image ``x`` ([1, x_dim]); the layers below follow (see :func:`_down_means`)."""
    model.eval()
    means, _ = posterior_means(model, x)
    z = means[layer].repeat(len(values), 1)
    z[:, unit] = torch.as_tensor(np.asarray(values), dtype=z.dtype)
    xs = x.expand(len(values), -1)
    z1 = _down_means(model, xs, layer, z)
    return model.generative.output.mean(model.generative.px_params(z1))


# -- live demos for the methods chapter ----------------------------------------------------------
@torch.no_grad()
def merge_sharpening(model: HierarchicalVAE, x: torch.Tensor) -> list[dict[str, float]]:
    """Per LVAE layer below the top: mean variance of the upward Gaussian, of the top-down one and of
    their precision-weighted merge q (eqs 17-18). The merge is never wider than either input."""
    model.eval()
    inf = model.inference
    up = inf.upward(x)
    p = model(x, 1, torch.Generator().manual_seed(0))
    rows = []
    for i in range(len(up) - 1):
        z_above = p.layers[i + 1].z[0]
        mu_t, var_t = inf.top_down(i, z_above, model.generative)
        mu_q, var_q = precision_weighted(up[i][0], up[i][1], mu_t, var_t)
        rows.append({"layer": f"z{i + 1}", "bottom-up var": float(up[i][1].mean()),
                     "top-down var": float(var_t.mean()), "merged var": float(var_q.mean()),
                     "merged ≤ both (all units)": bool((var_q <= torch.minimum(up[i][1], var_t) + 1e-7).all())})
    return rows


@torch.no_grad()
def iw_curve(model: HierarchicalVAE, x: torch.Tensor, ks: Sequence[int] = (1, 5, 50, 500),
             seed: int = 0) -> list[dict[str, float]]:
    """Test L_K (mean and s.e. over ``x``) for each K: the IW bound tightens as K grows (eq 6)."""
    from .bounds import iw_bound

    model.eval()
    rows = []
    for k in ks:
        v = iw_bound(model, x, k, chunk_size=500, generator=torch.Generator().manual_seed(seed)).double()
        rows.append({"K": k, "L_K": float(v.mean()), "s.e.": float(v.std() / np.sqrt(len(v)))})
    return rows


@dataclass
class LayerSplit:
    """The layer-wise split of the test bound (paper Fig 5): KL per layer, in nats."""

    epochs: np.ndarray
    kl_layers: np.ndarray  # [n_evals, n_layers]


def layer_split(run) -> LayerSplit:
    rows = [r for r in run.metrics() if "kl_layers" in r]
    return LayerSplit(np.array([r["epoch"] for r in rows]), np.array([r["kl_layers"] for r in rows], dtype=float))


# -- table rows for the chapters -----------------------------------------------------------------
HEADLINE_COLUMNS = ("quantity", "paper model", "paper", "our model", "ours ± s.e.", "gap", "measured as")


def grid_rows(runs: dict, variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run of the grid (variant order as given, then depth): the Fig 3 numbers."""
    k = next((r.last("iw_k") for r in runs.values() if r.last("iw_k")), None)
    rows = []
    for (v, d, _s), run in sorted(runs.items(), key=lambda kv: (list(variants).index(kv[0][0]), kv[0][1])):
        rows.append({"model": model_label(run, VARIANTS[v]["label"]), "layers": d, "train L1": final(run, "train_L1"),
                     "test L1": final(run, "test_L1"), f"test L{k}": final(run, "test_LK"),
                     "± s.e.": final(run, "test_LK_se"), "active units": sum(final(run, "active_units") or []),
                     "epochs": run.epochs})
    return rows


def active_unit_rows(runs: dict, variants: Sequence[str], depth: int, seed: int = 0) -> list[dict[str, Any]]:
    """Active units per layer (and in total) of each variant at ``depth``."""
    rows = []
    for v in variants:
        kl = final(runs[(v, depth, seed)], "kl_units")
        if kl is None:
            rows.append({"model": model_label(runs[(v, depth, seed)], f"{VARIANTS[v]['label']} {depth}-layer")})
            continue
        act = active_units(kl)
        rows.append({"model": f"{VARIANTS[v]['label']} {depth}-layer",
                     **{f"z{i + 1} ({len(k)})": a for i, (k, a) in enumerate(zip(kl, act))},
                     "total": sum(act), "of": sum(len(k) for k in kl)})
    return rows


TABLE1_KEYS = ("t1_vae1_nf", "t1_iwae2_iw1", "t1_iwae2_iw50", "t1_vae2_vgp", "t1_lvae5", "t1_lvae5_ft",
               "t1_lvae5_ft_iw10")


def table1_rows(lvae_run, finetune_run=None) -> list[dict[str, Any]]:
    """Table 1 of the paper with ours where we have a run: the LVAE row (and finetuning rows if
    a finetuning run exists); other papers' models are shown as the paper's numbers only."""
    ours = {"t1_lvae5": lvae_run, "t1_lvae5_ft": finetune_run, "t1_lvae5_ft_iw10": finetune_run}
    rows = []
    for key in TABLE1_KEYS:
        ref = paper.get(key)
        r = ours.get(key)
        lk = best_lk(r) or {}
        value = lk.get("value")
        if key not in ours:
            status = "other paper's model"
        elif r is None:
            status = "not run (needs the finetuning run)"
        else:
            status = f"{r.name}: L{lk['k']} on {lk['n']:,} test images" if lk else model_label(r, r.name)
        rows.append({"model": ref.model, "paper": ref.value, "ours": value,
                     "± s.e.": lk.get("se"),
                     "gap": None if value is None else value - ref.value, "ours: run": status})
    return rows


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


def profile_rows() -> list[dict[str, Any]]:
    """Every profile of lvae/profiles.yml, one row each."""
    from .profiles import available, load_profile

    rows = []
    for name in available():
        p = load_profile(name)
        n_iw = "all" if p.iw_subset is None and p.test_subset is None else f"{p.iw_subset or p.test_subset:,}"
        rows.append({"profile": name, "epochs": p.epochs, "warm-up": p.warmup_epochs,
                     "train images": "60,000" if p.subset is None else f"{p.subset:,}",
                     "depths": ", ".join(map(str, p.depths)), "seeds": len(p.seeds), "K": p.iw_samples,
                     "test images for L_K": n_iw})
    return rows


def registry_rows(root=None) -> list[dict[str, Any]]:
    """The run registry (``lvae runs``) with provenance; a run's status is shown when it is not complete."""
    from .runs import list_runs

    rows = []
    for r in list_runs(root):
        prov = r.provenance
        epochs = r.epochs if r.status == "complete" else f"{r.epochs} ({r.status})"
        rows.append({"run": r.name, "epochs": epochs, "test L1": final(r, "test_L1"),
                     "test LK": final(r, "test_LK"), "K": final(r, "iw_k"),
                     "wall [min]": (prov.get("wall_seconds") or 0) / 60, "device": short_device(prov.get("device")),
                     "commit": (prov.get("git_commit") or "—")[:7]})
    return rows


def short_device(device: str | None) -> str | None:
    """``lvae.runs.device_description`` in a table cell: "cpu (x86_64, 2 threads)" -> "cpu, 2 threads"."""
    m = re.fullmatch(r"cpu \((.*), (\d+) threads\)", device or "")
    if m:
        return f"cpu, {m.group(2)} thread{'' if m.group(2) == '1' else 's'}"
    return device


def benchmark_results_path() -> Path | None:
    """``benchmarks/results.json`` of the repository (a source checkout, or the clone whose
    ``results/`` the registry reads, as in Colab); None when there is none."""
    from .runs import results_dir

    for root in (Path(__file__).resolve().parent.parent, results_dir().resolve().parent):
        if (root / "benchmarks" / "results.json").exists():
            return root / "benchmarks" / "results.json"
    return None


def benchmark_table(path=None) -> tuple[str, list[dict[str, Any]]]:
    """(machine description, rows) of the speed benchmark results written by ``benchmarks/bench.py``."""
    path = path or benchmark_results_path()
    if path is None:
        raise FileNotFoundError("no benchmarks/results.json: run `python benchmarks/bench.py` in the repository")
    res = json.loads(Path(path).read_text())
    m = res["machine"]
    timing = "CPU time of one thread" if m["threads"] == 1 else f"wall time, {m['threads']} threads"
    commit = f", commit {m['git_commit'][:7]}{' (modified)' if m.get('git_dirty') else ''}" \
        if m.get("git_commit") else ""
    machine = (f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s) ({timing}), torch {m['torch']}, "
               f"{m['date']}{commit}; load average {m['load_start'][0]:.1f} at the start, "
               f"{m.get('load_end', [float('nan')])[0]:.1f} at the end. Matmul peak measured in the same run: "
               f"fp32 {res['peak']['float32']:.0f} GFLOP/s, bf16 {res['peak']['bfloat16']:.0f} GFLOP/s.")
    rows = []
    for r in res["rows"]:
        ms = r["ms"]
        notes = []
        if "wall_ms" in r and m["threads"] == 1:
            notes.append(f"wall {r['wall_ms'] / 1000:.1f} s" if r["wall_ms"] >= 1_000 else f"wall {r['wall_ms']:.1f} ms")
        if "compile_s" in r:
            notes.append(f"first steps incl. compilation {r['compile_s']:.0f} s")
        if "extrapolated_full_test_min" in r:
            notes.append(f"full 10k test set: {r['extrapolated_full_test_min']:.1f} min (extrapolated)")
        if "test_L1" in r:
            notes.append(f"test L1 {r['test_L1']:.3f}")
        if "diff_vs_fp32" in r:
            notes.append(f"bf16 - fp32 = {r['diff_vs_fp32']:+.3f} nats (per seed: "
                         f"{', '.join(f'{d:+.2f}' for d in r['per_seed_diff'])})")
        if "ok" in r and not r["ok"]:
            notes.append("FAILED")
        rows.append({"benchmark": r["what"], "implementation": r["impl"],
                     "time": f"{ms:.1f} ms" if ms < 1_000 else f"{ms / 1000:.1f} s",
                     "x reference": f"{r['ratio']:.2f}" if "ratio" in r else "",
                     "GFLOP/s": f"{r['gflops']:.1f}" if "gflops" in r else "",
                     "% of fp32 peak": f"{100 * r['peak_frac']:.0f}%" if "peak_frac" in r else "",
                     "notes": "; ".join(notes)})
    return machine, rows


BENCHMARK_IMPLS = ("reference", "library fp32", "library fp32 compiled", "library bf16", "library bf16 compiled")


def benchmark_summary(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`benchmark_table` rows in a narrow form for the book: one row per benchmark measured against
    the reference, one column per implementation (cells: time, x reference, % of fp32 peak); and every
    other result (grid, bf16 quality, book rebuild) and every note as a sentence."""
    by_what: dict[str, dict[str, Any]] = {}
    sentences = []
    for r in rows:
        if r["implementation"] in BENCHMARK_IMPLS and r["x reference"]:
            cell = tuple(c for c in (r["time"], r["x reference"] and f"{r['x reference']}x",
                                     r["% of fp32 peak"]) if c)
            by_what.setdefault(r["benchmark"], {"benchmark": r["benchmark"]})[r["implementation"]] = cell
            if r["notes"]:
                sentences.append(f"{r['benchmark']}, {r['implementation']}: {r['notes']}")
        else:
            sentences.append(f"{r['benchmark']}, {r['implementation']}: {r['time']}"
                             + (f", {r['x reference']}x" if r["x reference"] else "")
                             + (f"; {r['notes']}" if r["notes"] else ""))
    return list(by_what.values()), sentences


def best_depths(runs: dict, metric: str = "test_L1") -> dict[str, int]:
    """The depth with the best final ``metric`` for each variant."""
    table = grid_table(runs, metric)
    return {v: max((d for d in t if t[d] is not None), key=lambda d: t[d]) for v, t in table.items()}


def upper_layer_share(kl_layers: Sequence[float]) -> float:
    """Percentage of the KL carried by the layers above z1 (Fig 5)."""
    total = float(sum(kl_layers))
    return 100.0 * float(sum(kl_layers[1:])) / total if total > 0 else 0.0


def finetune_run(profile, variant: str = "lvae_bn_wu", depth: int | None = None):
    """The Table 1 finetuning run continuing the profile's ``variant`` model, if it is in the
    registry (None otherwise; it is never trained here)."""
    from .experiments import finetune_config
    from .profiles import experiment
    from .runs import Run, results_dir

    parent, _ = experiment(profile, variant, depth or profile.max_depth)
    path = results_dir() / finetune_config(parent, profile.epochs).dir_name
    return Run(path) if (path / "config.json").exists() else None
