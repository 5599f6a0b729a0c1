"""The numbers and table rows the book's chapters show, computed from stored runs.

Everything here reads the run registry read-only (:mod:`lvae.registry.runs`, :func:`lvae.training.profile_runs.find_run`):
metric histories, each model's numbers over its seeds (:class:`SeedMean`), differences between
models (:func:`run_contrast`), the paper-vs-ours rows keyed by the paper's key (:func:`headline`,
:func:`table1_rows`), active units and the layer-wise KL split (Figs 4-5), the longer budgets and
the registry. Passes of a trained model are in :mod:`lvae.report.probes`; the speed benchmarks' tables in
:mod:`lvae.report.benchmark_tables`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from lvae.data.datasets import load_dataset
from lvae.registry.experiments import VARIANTS, finetune_config, run_config
from lvae.registry.profiles import Profile, available, experiment, load_profile
from lvae.registry.runs import Run, RunFailedError, RunIncompleteError, list_runs, results_dir, stored_run
from lvae.report import paper
from lvae.report.stats import Estimate, contrast, contrast_of_means, contrast_partly_paired, mean_ci
from lvae.training.profile_runs import find_run
from lvae.training.step import ACTIVE_UNIT_THRESHOLD

__all__ = [
    "ACTIVE_UNIT_THRESHOLD", "history", "kl_history", "active_units", "final", "profile_runs",
    "SeedMean", "seed_mean", "iw_k", "lk_images", "lk_counts", "grid_estimates", "grid_table", "best_model",
    "run_contrast", "difference", "headline",
    "grid_rows", "active_unit_rows", "table1_rows", "budget_runs", "budget_rows", "budget_differences",
    "full_test_lk_rows",
    "learning_curves",
    "layer_kl", "test_data", "RunAtEpoch", "at_epoch", "run_kl_units", "run_active_units",
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
    cands = _lk_candidates(run)
    if not cands:
        return None
    if n is not None:
        cands = [c for c in cands if c["n"] == n] or [cands[0]]
    # the most images; among equals the newest (a re-run with faster code times the current code)
    return max(reversed(cands), key=lambda c: c["n"] or 0)


def _lk_candidates(run) -> list[dict[str, Any]]:
    """The L_K of a run's final weights: the last training-time L_K evaluation, then every ``lvae eval``
    of the final epoch with as many importance samples, in the order they were made (keys of :func:`best_lk`)."""
    row = next((r for r in reversed(run.metrics()) if "test_LK" in r), None)
    if row is None:
        return []
    cands = [{"value": row["test_LK"], "se": row.get("test_LK_se"), "k": row.get("iw_k"), "n": row.get("n_iw"),
              "seconds": row.get("iw_seconds"), "source": "training-time evaluation"}]
    for e in run.evals():
        if e.get("epoch") == run.epochs and e.get("test_LK") is not None and e.get("iw_k") == cands[0]["k"]:
            cands.append({"value": e["test_LK"], "se": e.get("test_LK_se"), "k": e["iw_k"], "n": e.get("n_iw"),
                          "seconds": e.get("iw_seconds"), "source": f"lvae eval on {short_device(e.get('device')) or '?'}"})
    return cands


def lk_counts(run, k: int | None = None) -> set[int | None]:
    """The test-image counts on which a run's final weights have an L_K (with ``k`` importance
    samples; any when None): the ``n`` that :func:`best_lk` accepts."""
    return {c["n"] for c in _lk_candidates(run) if k is None or c["k"] == k}


class RunAtEpoch(Run):
    """A run read as it stood at ``epoch`` (a budget is a profile and an epoch): its metrics up to that
    epoch, its evaluations and per-image values of that epoch, complete when the run reached that epoch
    with an evaluation there. A run that failed or is damaged stays so (a failed run is never a number,
    even from before it failed)."""

    def __init__(self, run: Run, epoch: int):
        super().__init__(run.path)
        self.base, self.at = run, int(epoch)

    def __repr__(self) -> str:
        return f"RunAtEpoch({self.name!r}, epoch={self.at}, status={self.status!r})"

    @property
    def epochs(self) -> int:
        return min(self.at, self.base.epochs)

    def metrics(self) -> list[dict]:
        return [r for r in self.base.metrics() if r.get("epoch", 0) <= self.at]

    def evals(self) -> list[dict]:
        return [r for r in self.base.evals() if r.get("epoch", 0) <= self.at]

    @property
    def status(self) -> str:
        status = self.base.status
        if status in ("failed", "damaged"):
            return status
        if self.base.epochs >= self.at and any(r.get("epoch") == self.at for r in self.metrics()):
            return "complete"
        return "partial" if status == "complete" else status

    def damage(self) -> str | None:
        return self.base.damage()


def at_epoch(run, epoch: int | None):
    """``run`` as it stood at ``epoch`` (:class:`RunAtEpoch`); the run itself when ``epoch`` is None or
    its own final epoch."""
    if run is None or epoch is None or (run.epochs == epoch and not isinstance(run, RunAtEpoch)):
        return run
    return RunAtEpoch(getattr(run, "base", run), epoch)


def model_label(run, label: str) -> str:
    """``label``, marked with the run's status unless it completed."""
    return label if run is None or run.ok else f"{label} ({run.status})"


# -- runs of a profile, and numbers over its seeds -------------------------------------------------
Key = tuple  # (variant, depth, seed): how every run of a profile is looked up


def profile_runs(profile, root=None, variants: Sequence[str] | None = None,
                 depths: Sequence[int] | None = None) -> dict[Key, Any]:
    """Every (variant, depth, seed) of ``profile`` (all its seeds) -> its run or None, read-only
    (:func:`lvae.training.profile_runs.find_run`; :func:`lvae.training.profile_runs.grid_runs` trains what is missing instead)."""
    p = load_profile(profile) if isinstance(profile, str) else profile
    return {(v, d, s): find_run(p, v, d, s, root) for s in p.seeds for v in (variants or p.variants)
            for d in (depths or p.depths)}


def iw_k(runs: Iterable, default: int | None = None) -> int | None:
    """The importance samples K of the L_K the runs measured: the first run's that has one, else ``default``."""
    return next((r.last("iw_k") for r in runs if r is not None and r.last("iw_k")), default)


def run_state(run) -> str:
    """Why a run has no number: "not run", or its status with its epochs ("partial, 6 of 30 epochs")."""
    if run is None:
        return "not run"
    target = run.provenance.get("target_epochs")
    return f"{run.status}, {run.epochs} of {target} epochs" if target else run.status


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


def run_value(run, metric: str, n: int | None = None) -> tuple[float, float | None, int | None] | None:
    """(value, test-image s.e., images) of one complete run's final ``metric``; None when the run has
    no such number. ``test_LK`` is the L_K on exactly ``n`` test images (the most when None, see
    :func:`best_lk`); ``active_units`` the total over layers (no s.e.)."""
    if run is None or not run.ok:
        return None
    if metric == "test_LK":
        lk = best_lk(run, n)
        if lk is None or (n is not None and lk["n"] != n):
            return None
        return lk["value"], lk["se"], lk["n"]
    value = final(run, metric)
    if value is None:
        return None
    if metric == "active_units":
        return float(sum(value)), None, None
    n_images = final(run, "n_test") if metric.startswith("test_") else run.eval_config.train_subset
    return float(value), final(run, metric + "_se"), n_images


@dataclass(frozen=True)
class SeedMean:
    """One number of one model over the seeds a profile lists: the mean over the seeds that have it,
    with a 95 % CI from their spread (:func:`lvae.report.stats.mean_ci`), and the test-image s.e."""

    metric: str
    values: dict[int, float]  # seed -> value, for the seeds with a number
    missing: dict[int, str]  # seed -> why it has none (:func:`run_state`)
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
    """{variant: {depth: mean over the seeds of the final ``metric``}} from :func:`lvae.training.profile_runs.grid_runs`."""
    return {v: {d: e.value for d, e in by.items()} for v, by in grid_estimates(runs, metric).items()}


def best_model(runs: dict, metric: str, variants: Sequence[str], n: int | None = None) -> tuple[str, int] | None:
    """The (variant, depth) among ``variants`` with the highest mean over the seeds of ``metric``."""
    models = sorted({k[:2] for k in runs if k[0] in variants})
    scored = [(m, seed_mean(runs, *m, metric, n).value) for m in models]
    scored = [(m, v) for m, v in scored if v is not None]
    return max(scored, key=lambda mv: mv[1])[0] if scored else None


def run_contrast(terms: Sequence[tuple[float, Sequence[Run]]], metric: str, k: int | None = None,
                 n: int | None = None) -> tuple[Estimate | None, str]:
    """sum_j w_j * model j's final ``metric``, each model the mean over its runs (one per seed).

    ``terms``: ``(w_j, the complete runs of model j, at least one)``; ``metric``: ``test_L1``, or
    ``test_LK`` with ``k`` importance samples (any when None) on ``n`` test images (None: the most
    on which every run has per-image values, else an L_K, see :func:`lk_counts`). Image by image
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


def _fmt_model(key: tuple) -> str:
    return f"{VARIANTS[key[0]]['label']} {key[1]}-layer"


def _lk_label(k: int | None, n: int | None) -> str:
    """``L5000 (500 images)``: every L_K says how many test images it covers."""
    return f"L{k or 'K'} ({n:,} images)" if n else f"L{k or 'K'}"


HEADLINE_KEYS = ("mnist_lvae5_test_L1", "mnist_best_vae_test_L1", "mnist_lvae5_test_L5000",
                 "mnist_best_vae_test_L5000", "t1_lvae5")
FIG3_TEXT_KEYS = HEADLINE_KEYS[:4]  # the four MNIST numbers of section 3's text


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
        n_test = final(_any_run(runs, model), "n_test") or 0
        what = _lk_label(k, n) if metric == "test_LK" else f"L1 ({n_test:,} images)"
        return {"key": key, "quantity": ref.what, "paper model": ref.model, "paper": ref.value, "source": ref.source,
                "our model": "—" if model is None else _fmt_model(model), "model": model, "estimate": sm,
                "value": value, "ours": None if sm is None else sm.cell(), "seeds": 0 if sm is None else sm.n_seeds,
                "measured as": what if value is not None else "—", "k": k if metric == "test_LK" else 1,
                "n": n if metric == "test_LK" else final(_any_run(runs, model), "n_test"),
                "gap": None if value is None else value - ref.value}

    return {
        "mnist_lvae5_test_L1": row("mnist_lvae5_test_L1", lvae, "test_L1"),
        "mnist_best_vae_test_L1": row("mnist_best_vae_test_L1", best_l1, "test_L1"),
        "mnist_lvae5_test_L5000": row("mnist_lvae5_test_L5000", lvae, "test_LK"),
        "mnist_best_vae_test_L5000": row("mnist_best_vae_test_L5000", best_lk_model, "test_LK"),
        "t1_lvae5": row("t1_lvae5", lvae, "test_LK"),
    }


def _any_run(runs: dict, model: tuple | None):
    return next((r for k, r in sorted(runs.items(), key=lambda kv: kv[0][2]) if model and k[:2] == model
                 and r is not None and r.ok), None)


# -- data and model passes -----------------------------------------------------------------------
def test_data(profile, n: int | None = None):
    """The profile's dataset with the first ``n`` test images (labels included)."""
    return load_dataset(profile.dataset, subset=1, test_subset=n)


@dataclass
class LayerSplit:
    """The layer-wise split of the test bound (paper Fig 5): KL per layer, in nats."""

    epochs: np.ndarray
    kl_layers: np.ndarray  # [n_evals, n_layers]


def layer_split(run) -> LayerSplit:
    rows = [r for r in run.metrics() if "kl_layers" in r]
    return LayerSplit(np.array([r["epoch"] for r in rows]), np.array([r["kl_layers"] for r in rows], dtype=float))


# -- table rows for the chapters -----------------------------------------------------------------
HEADLINE_COLUMNS = ("quantity", "paper model", "paper", "our model", "ours", "gap", "measured as")
CI_NOTE = ("Ours: mean over the seeds ± half-width of its 95 % CI over the seeds (Student t); 's.e. (images)': "
           "the standard error over the test images; with 1 seed only the latter is known.")


def grid_rows(runs: dict, variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row per model (variant order as given, then depth) of the grid: the Fig 3 numbers, each the
    mean over every seed in ``runs`` (:class:`SeedMean` cells); L_K on the test images all runs have."""
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
                         f"test {_lk_label(k, n)}": cells["test_LK"].cell(seeds=False),
                         "active units": cells["active_units"].cell("{:.1f}", seeds=False),
                         "epochs": ", ".join(map(str, epochs)) or "—"})
    return rows


def active_unit_counts(runs: dict, variants: Sequence[str], depth: int) -> dict[str, dict[str, SeedMean]]:
    """{variant: {"z1": active units of z1, ..., "z<depth>": ..., "total": over the layers}} as
    :class:`SeedMean` over every seed in ``runs``, from the per-unit KL stored by training
    (:func:`run_active_units`): the one source of active units for every chapter and for
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


def run_kl_units(run) -> list[list[float]] | None:
    """A complete run's final per-unit test KL as training stored it (None otherwise): the one source of
    active units and of the layer-wise KL for the chapters and the claims."""
    return final(run, "kl_units")


def run_active_units(run) -> list[int] | None:
    """Active units per layer of a complete run (:func:`run_kl_units`, :func:`active_units`)."""
    kl = run_kl_units(run)
    return None if kl is None else active_units(kl)


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


TABLE1_KEYS = ("t1_vae1_nf", "t1_iwae2_iw1", "t1_iwae2_iw50", "t1_vae2_vgp", "t1_lvae5", "t1_lvae5_ft",
               "t1_lvae5_ft_iw10")


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
            status = (f"LVAE+BN+WU {depth}-layer: {_lk_label(k, n)}",
                      *(f"seed {s}: {w}" for s, w in lvae.missing.items()))
            est = lvae
        elif key in ("t1_lvae5_ft", "t1_lvae5_ft_iw10"):
            est = ft
            status = "not run (needs the finetuning run)" if ft is None else \
                (f"{finetune_run.name}: {_lk_label(ft_lk.get('k'), ft_lk.get('n'))}" if ft.value is not None
                 else model_label(finetune_run, finetune_run.name))
        else:
            est, status = None, "other paper's model"
        value = None if est is None else est.value
        rows[key] = {"key": key, "model": ref.model, "paper": ref.value,
                     "ours": None if est is None or value is None else est.cell(),
                     "seeds": None if est is None else est.n_seeds, "estimate": est,
                     "gap": None if value is None else value - ref.value, "ours: run": status}
    return rows


TABLE1_COLUMNS = ("model", "paper", "ours", "gap", "ours: run")


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
    """Every profile of lvae/registry/profiles.yml, one row each."""
    rows = []
    for name in available():
        p = load_profile(name)
        n_iw = "all" if p.iw_subset is None and p.test_subset is None else f"{p.iw_subset or p.test_subset:,}"
        rows.append({"profile": name, "epochs": p.epochs, "warm-up": p.warmup_epochs,
                     "train images": "60,000" if p.subset is None else f"{p.subset:,}",
                     "depths": ", ".join(map(str, p.depths)), "seeds": len(p.seeds), "K": p.iw_k,
                     "test images for L_K": n_iw})
    return rows


def registry_rows(root=None, runs=None) -> list[dict[str, Any]]:
    """The run registry (``lvae runs``) with provenance, or only ``runs`` (e.g. the values of
    ``grid_runs(P)``: the runs the book read); a run's status is shown when it is not complete."""
    rows = []
    for r in (list_runs(root) if runs is None else sorted(runs, key=lambda r: r.name)):
        if r.status == "damaged":  # its provenance cannot be read: the row says so instead of a number
            rows.append({"run": r.name, "epochs": "damaged (lvae runs --json gives the fix)"})
            continue
        prov = r.provenance
        epochs = r.epochs if r.status == "complete" else f"{r.epochs} ({r.status})"
        lk = final(r, "test_LK")
        rows.append({"run": r.name, "epochs": epochs, "test L1": final(r, "test_L1"),
                     "test L_K": None if lk is None else (lk, _lk_label(final(r, "iw_k"), final(r, "n_iw"))),
                     "wall [min]": (prov.get("wall_seconds") or 0) / 60, "device": short_device(prov.get("device")),
                     "commit": (prov.get("git_commit") or "—")[:7]})
    return rows


def short_device(device: str | None) -> str | None:
    """``lvae.registry.runs.device_description`` in a table cell: "cpu (x86_64, 2 threads)" -> "cpu, 2 threads"."""
    m = re.fullmatch(r"cpu \((.*), (\d+) threads\)", device or "")
    if m:
        return f"cpu, {m.group(2)} thread{'' if m.group(2) == '1' else 's'}"
    return device


def best_depths(runs: dict, metric: str = "test_L1") -> dict[str, int]:
    """The depth with the best mean over the seeds of the final ``metric`` for each variant."""
    table = grid_table(runs, metric)
    return {v: max(ds, key=lambda d: t[d]) for v, t in table.items() if (ds := [d for d in t if t[d] is not None])}


def upper_layer_share(kl_layers: Sequence[float]) -> float:
    """Percentage of the KL carried by the layers above z1 (Fig 5)."""
    total = float(sum(kl_layers))
    return 100.0 * float(sum(kl_layers[1:])) / total if total > 0 else 0.0


def layer_kl(runs: dict, variants: Sequence[str], depth: int) -> dict[str, dict[str, Any]]:
    """{variant: {"layers": KL per layer (mean over the seeds), "upper": :class:`SeedMean` of the
    percentage above z1 (Fig 5)}}, from the per-unit KL stored by training (:func:`run_kl_units`)."""
    out = {}
    for v in variants:
        kl_by_seed, missing = _kl_units_by_seed(runs, v, depth)
        per = {s: [float(np.sum(layer)) for layer in kl] for s, kl in kl_by_seed.items()}
        shares = {s: upper_layer_share(lay) for s, lay in per.items()}
        out[v] = {"layers": np.mean(list(per.values()), axis=0).tolist() if per else None,
                  "upper": SeedMean("upper_share", shares, missing,
                                    mean_ci(list(shares.values())) if shares else None, None, None)}
    return out


# -- the longer budgets ----------------------------------------------------------------------------
BUDGET_VARIANTS = ("lvae_bn_wu", "vae_bn_wu", "lvae_bn", "lvae_wu")  # the depth-5 pair and the Fig 7 ablations


class BudgetRuns(dict):
    """{(variant, depth, seed): run or None} of one budget: ``profile``'s runs read at ``epoch``
    (:class:`RunAtEpoch` where a run went on past it)."""

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
                         "test L_K": (_lk_label(k, n), *_tuple(lk.cell(seeds=False))) if lk.value is not None else None,
                         "key": (v, depth, name)})
    return rows


BUDGET_COLUMNS = ("model", "profile", "epochs", "seeds", "train L1", "test L1", "test L_K")


def step_text(runs: Iterable) -> str:
    """The training step the runs' configs record: "fp32", "bf16, compiled" (several: joined by " / ")."""
    steps = {f"{r.config.train.precision}{', compiled' if r.config.train.compile else ''}" for r in runs
             if r is not None}
    return " / ".join(sorted(steps)) or "—"


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
        n_test = final(_any_run(mine, (variant, 5)), "n_test") or 0

        def cell(what: str, est: SeedMean, ref, claim: str, comparable: bool = True):
            if est.value is None:
                return None
            gap = f"gap {est.value - ref.value:+.2f}" if comparable else "no gap (not L5000)"
            return (what, *_tuple(est.cell(seeds=False)), gap, *((said[claim],) if claim in said else ()))

        rows.append({
            "budget": name, "epochs": f"{epoch} (warm-up {p.warmup_epochs})", "seeds": seeds_cell([l1, lk], len(p.seeds)),
            "step": step_text(mine.values()),
            "test L1": cell(f"L1 ({n_test:,} images)", l1, ref_l1, "lvae-L1"),
            "test L_K": cell(_lk_label(k, n), lk, ref_lk, "lvae-L5000", k == 5000),
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
    on test L1 and on L_K over the test images all their seeds have (:func:`difference`): paired
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
                     "test L_K": None if dk is None else (_lk_label(k, n), dk.text()),
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


def finetune_run(profile, variant: str = "lvae_bn_wu", depth: int | None = None):
    """The Table 1 finetuning run continuing the profile's ``variant`` model, if it is in the
    registry (None otherwise; it is never trained here)."""
    parent, _ = experiment(profile, variant, depth or profile.max_depth)
    return stored_run(results_dir() / finetune_config(parent, profile.epochs).dir_name)
