"""The numbers and table rows the book shows, read from stored runs (lvae.report.run_values, seed_means,
paper_tables, latent_units, budgets, registry_tables), and the chapter helpers of lvae.book.chapter that print them."""
import pytest

from lvae.book.chapter import glue
from lvae.book.plan import BookError
from lvae.registry.storage import short_device
from lvae.report.registry_tables import registry_rows
from lvae.report.run_values import best_lk


class FakeRun:
    def __init__(self, metrics, evals, epochs=10, ok=True):
        self._m, self._e, self.epochs, self.ok = metrics, evals, epochs, ok

    def metrics(self):
        return self._m

    def evals(self):
        return self._e


TRAINING = [{"epoch": 10, "test_LK": -90.0, "test_LK_se": 1.0, "iw_k": 5000, "n_iw": 500, "iw_seconds": 30.0}]


def _eval(value, n, seconds, device="cpu (x86_64, 2 threads)", epoch=10, k=5000):
    return {"epoch": epoch, "test_LK": value, "test_LK_se": 0.2, "iw_k": k, "n_iw": n, "iw_seconds": seconds,
            "device": device}


def test_best_lk_takes_most_images_then_newest():
    run = FakeRun(TRAINING, [_eval(-90.5, 10_000, 758.0), _eval(-90.5, 10_000, 674.0), _eval(-91.0, 1000, 60.0)])
    lk = best_lk(run)
    assert (lk["n"], lk["seconds"], lk["source"]) == (10_000, 674.0, "lvae eval on cpu, 2 threads")
    # exactly n images when asked (to compare two models on the same images); else the training-time value
    assert best_lk(run, 1000)["value"] == -91.0
    assert best_lk(run, 77)["source"] == "training-time evaluation"


def test_best_lk_ignores_other_weights_and_other_k():
    run = FakeRun(TRAINING, [_eval(-80.0, 10_000, 1.0, epoch=9), _eval(-80.0, 10_000, 1.0, k=50)])
    assert best_lk(run)["value"] == -90.0
    assert best_lk(FakeRun(TRAINING, [], ok=False)) is None
    assert best_lk(FakeRun([{"epoch": 10, "test_L1": -99.0}], [])) is None


def test_short_device():
    assert short_device("cpu (x86_64, 1 threads)") == "cpu, 1 thread"
    assert short_device("cpu (x86_64, 16 threads)") == "cpu, 16 threads"
    assert short_device("NVIDIA H100 80GB HBM3") == "NVIDIA H100 80GB HBM3"
    assert short_device(None) is None


def test_glue_refuses_text_that_would_print_as_a_tuple():
    with pytest.raises(BookError, match=r"\(10, 0\).*n_iw:,"):
        glue("n_iw", "10,000")
    glue("word", "holds")  # plain words and numbers are fine
    glue("n", 10_000)


def test_registry_rows_mark_unfinished_runs(tmp_path):
    from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
    from lvae.training.loop import get_or_train

    assert registry_rows(tmp_path) == []
    cfg = RunConfig(name="tiny", model=ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8)),
                    train=TrainConfig(dataset="synthetic", subset=64, batch_size=32))
    ev = EvalConfig(every=1, iw_k=5, iw_chunk=5, test_subset=20, train_subset=32)
    get_or_train(cfg, 2, ev, root=tmp_path, device="cpu", progress=False, stop_after=1)
    [row] = registry_rows(tmp_path)
    assert row["epochs"] == "1 (partial)" and row["device"].startswith("cpu, ") and len(row["commit"]) <= 7
    get_or_train(cfg, 2, ev, root=tmp_path, device="cpu", progress=False)
    [row] = registry_rows(tmp_path)
    assert row["epochs"] == 2 and row["test L1"] is not None
    assert row["test L_K"][1] == "L5 (20 images)"  # every L_K says how many test images it covers


# -- numbers over seeds, looked up by key ----------------------------------------------------------
import math  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lvae.book import plots  # noqa: E402
from lvae.config import EvalConfig  # noqa: E402
from lvae.report import budgets, latent_units, paper_tables, seed_means, stats  # noqa: E402


class SeedRun(FakeRun):
    """A complete run with final test/train L1, L5000 (training-time on ``n_iw`` images, and
    ``lvae eval`` rows) and, optionally, stored per-image values."""

    def __init__(self, l1, lk=None, n_iw=500, evals=(), per_image=None, active=(3, 1), status="complete", epochs=10,
                 n_test=10_000):
        row = {"epoch": epochs, "train_L1": l1 + 0.5, "test_L1": l1, "test_L1_se": 0.25, "n_test": n_test,
               "active_units": list(active), "kl_units": [[0.5] * active[0] + [0.0], [0.5] * active[1] + [0.0]]}
        if lk is not None:
            row.update(test_LK=lk, test_LK_se=1.0, iw_k=5000, n_iw=n_iw, iw_seconds=3.0)
        super().__init__([row], list(evals), epochs=epochs, ok=status == "complete")
        self.status, self.eval_config, self._per_image = status, EvalConfig(train_subset=10_000), per_image
        self.name = f"run-{id(self)}"
        self.provenance = {"status": status, "epochs": epochs, "target_epochs": 10}

    def result(self, key):
        return self.last(key)

    def last(self, key):
        return next((r[key] for r in reversed(self._m) if key in r), None)

    def per_image(self, k=None, n=None):
        p = self._per_image
        return None if p is None or (n is not None and p["n"] != n) else p


def test_seed_mean_three_seeds_one_seed_and_missing():
    runs = {("vae", 2, s): SeedRun(v) for s, v in enumerate([-99.0, -98.0, -97.5])}
    sm = seed_means.seed_mean(runs, "vae", 2, "test_L1")
    ref = stats.mean_ci([-99.0, -98.0, -97.5])
    assert (sm.value, sm.estimate.half_width, sm.n_seeds, sm.n_images) == (ref.mean, ref.half_width, 3, 10_000)
    assert sm.text() == ref.text() and sm.cell() == (ref.text(), "s.e. 0.25 (images)", "3 seeds")
    assert sm.spread_text() == ref.text()[len(f"{ref.mean:.2f}"):].strip()
    # one seed: the test-image s.e. and "1 seed"; the seeds listed without a run say why
    one = seed_means.seed_mean({("vae", 2, 0): runs[("vae", 2, 0)], ("vae", 2, 1): None,
                              ("vae", 2, 2): SeedRun(-90.0, status="partial", epochs=4)}, "vae", 2, "test_L1")
    assert one.cell() == ("-99.00 ± 0.25 s.e.", "1 seed")
    assert one.spread_text() == "± 0.25 s.e."
    assert one.missing == {1: "not run", 2: "partial, 4 of 10 epochs"}
    assert seed_means.seeds_cell([one], 3) == ("1 of 3", "seed 1: not run", "seed 2: partial, 4 of 10 epochs")


def _grid(order_seed: int) -> dict:
    """Two VAE variants and the LVAE at depths 1-2, seeds 0-2, inserted in a shuffled order. vae_bn
    has the best seed 0 but vae_bn_wu the best mean; the LVAE's seed 0 has L5000 on 10,000 images too."""
    l1 = {("vae_bn", 2): [-97.0, -100.0, -100.0], ("vae_bn_wu", 2): [-98.0, -98.5, -98.0],
          ("lvae_bn_wu", 2): [-98.2, -98.4, -98.6]}
    runs = {}
    for (v, d), vals in l1.items():
        for s, x in enumerate(vals):
            evals = [_eval(x + 8.5, 10_000, 600.0)] if (v == "lvae_bn_wu" and s == 0) else []
            runs[(v, d, s)] = SeedRun(x, lk=x + 9.0, evals=evals)
            runs[(v, 1, s)] = SeedRun(x - 10.0, lk=x - 1.0)
    items = list(runs.items())
    random.Random(order_seed).shuffle(items)
    return dict(items)


def test_headline_is_keyed_averages_seeds_and_says_its_images():
    h = paper_tables.headline(_grid(0), 2)
    assert tuple(h) == paper_tables.HEADLINE_KEYS
    assert h["mnist_best_vae_test_L1"]["model"] == ("vae_bn_wu", 2)  # best mean, not the best seed 0
    assert h["mnist_lvae5_test_L1"]["value"] == pytest.approx(-98.4)
    assert h["mnist_lvae5_test_L1"]["seeds"] == 3
    # L5000 on the images every seed of both models has: 500 (only one seed was evaluated on 10,000)
    lk = h["mnist_lvae5_test_L5000"]
    assert (lk["n"], lk["measured as"], lk["value"]) == (500, "L5000 (500 images)", pytest.approx(-89.4))
    assert h["t1_lvae5"]["value"] == lk["value"]
    for order in (1, 2):  # the same rows whatever the order of the runs
        again = paper_tables.headline(_grid(order), 2)
        assert [r["value"] for r in again.values()] == [r["value"] for r in h.values()]


def test_lk_images_takes_the_most_images_all_runs_share():
    a = SeedRun(-98.0, lk=-90.0, evals=[_eval(-90.5, 10_000, 600.0)])
    b = SeedRun(-98.0, lk=-90.0, evals=[_eval(-90.4, 10_000, 600.0)])
    assert seed_means.lk_images([a, b]) == 10_000
    assert seed_means.lk_images([a, b, SeedRun(-98.0, lk=-91.0)]) == 500
    assert seed_means.lk_images([None, SeedRun(-98.0)]) is None
    runs = {("lvae_bn_wu", 2, 0): a, ("lvae_bn_wu", 2, 1): b}
    rows = paper_tables.table1_rows(runs, 2)
    assert tuple(rows) == paper_tables.TABLE1_KEYS  # keyed by the paper's key, in the table's order
    row = rows["t1_lvae5"]
    assert row["estimate"].n_images == 10_000 and row["ours: run"] == ("LVAE+BN+WU 2-layer: L5000 (10,000 images)",)
    assert row["estimate"].value == pytest.approx(-90.45)


def test_grid_rows_columns_say_images_and_seeds():
    rows = paper_tables.grid_rows(_grid(0), ["vae_bn", "vae_bn_wu", "lvae_bn_wu"])
    assert [(r["model"], r["layers"]) for r in rows][:2] == [("VAE+BN", 1), ("VAE+BN", 2)]
    assert "test L5000 (500 images)" in rows[0] and rows[0]["seeds"] == "3 of 3"
    assert rows[1]["test L1"][0] == stats.mean_ci([-97.0, -100.0, -100.0]).text()


def test_difference_is_paired_when_per_image_values_exist():
    rng = np.random.default_rng(0)
    base = rng.normal(-90.0, 10.0, size=200)
    per = {s: {"test_L1": base + rng.normal(0, 0.5, 200) + (0.3 if s < 2 else 0.0), "n": 200} for s in range(4)}
    runs = {("lvae_bn_wu", 2, s): SeedRun(float(per[s]["test_L1"].mean()), per_image=per[s]) for s in (0, 1)}
    runs.update({("vae_bn_wu", 2, s - 2): SeedRun(float(per[s]["test_L1"].mean()), per_image=per[s]) for s in (2, 3)})
    d = seed_means.difference(runs, ("lvae_bn_wu", 2), ("vae_bn_wu", 2), "test_L1")
    ref = stats.contrast([(1.0, [per[0]["test_L1"], per[1]["test_L1"]]),
                          (-1.0, [per[2]["test_L1"], per[3]["test_L1"]])])
    assert d == ref and d.df == 1  # two seeds a side: the smallest seed df (issue 18, finding 6)
    runs[("vae_bn_wu", 2, 0)]._per_image = None  # a run without per-image values: from the means
    d2 = seed_means.difference(runs, ("lvae_bn_wu", 2), ("vae_bn_wu", 2), "test_L1")
    assert d2.mean == pytest.approx(d.mean) and d2.half_width > d.half_width


def test_difference_pairs_the_runs_with_per_image_values_when_only_some_have_them():
    rng = np.random.default_rng(1)
    base = rng.normal(-90.0, 10.0, size=200)
    per = [base + rng.normal(0, 0.5, 200) + (0.3 if s < 2 else 0.0) for s in range(4)]
    l1 = [float(x.mean()) for x in per]
    runs = {("lvae_bn_wu", 2, s): SeedRun(l1[s], per_image={"test_L1": per[s], "n": 200}, n_test=200) for s in (0, 1)}
    runs.update({("vae_bn_wu", 2, s): SeedRun(l1[s + 2], per_image={"test_L1": per[s + 2], "n": 200}, n_test=200)
                 for s in (0, 1)})
    runs[("vae_bn_wu", 2, 0)]._per_image = None
    d = seed_means.difference(runs, ("lvae_bn_wu", 2), ("vae_bn_wu", 2), "test_L1")
    assert d == stats.contrast_partly_paired([(1.0, l1[:2], per[:2]), (-1.0, l1[2:], per[3:])], 200)
    runs[("vae_bn_wu", 2, 1)]._per_image = None  # a side without any: unpaired, from the seed means and their s.e.
    d2 = seed_means.difference(runs, ("lvae_bn_wu", 2), ("vae_bn_wu", 2), "test_L1")
    assert d2 == stats.contrast_of_means([(1.0, l1[:2], [0.25, 0.25]), (-1.0, l1[2:], [0.25, 0.25])], n_images=200)
    assert d2.half_width > d.half_width


def test_active_units_have_one_source_for_the_chapters_and_the_claims():
    """Issue 18, finding 10: the chapters' active units are the claims' (the KL stored by training); no
    chapter passes a recomputed KL in their place."""
    import inspect
    from pathlib import Path

    from lvae.report import claims

    runs = {("vae", 2, s): SeedRun(-99.0, active=(3, 1)) for s in range(3)}
    counts = latent_units.active_unit_counts(runs, ["vae"], 2)
    assert {layer: c.value for layer, c in counts["vae"].items()} == {"z1": 3, "z2": 1, "total": 4}
    for fn in (latent_units.active_unit_counts, latent_units.active_unit_rows, latent_units.layer_kl):
        assert "kl_units" not in inspect.signature(fn).parameters
    assert all(claims._active_total(r) == counts["vae"]["total"].values[k[2]] for k, r in runs.items())
    assert latent_units.layer_kl(runs, ["vae"], 2)["vae"]["upper"].n_seeds == 3
    book = Path(__file__).resolve().parents[1] / "book"
    for chapter in book.glob("*.md"):
        assert "kl_units_from_weights" not in chapter.read_text(), chapter.name


def test_layer_kl_bars_take_variants_and_show_their_labels():
    import matplotlib.pyplot as plt

    fig = plots.layer_kl_bars({"vae": [1.0, 0.5], "lvae_bn_wu": [1.0, 0.2, 0.1]})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["VAE", "LVAE+BN+WU"]
    assert len(ax.patches) == 3 * 2  # one bar segment per layer and model (a missing layer is 0)
    plt.close(fig)


def test_curves_vs_depth_draws_the_ci_over_seeds():
    import matplotlib.pyplot as plt

    est = seed_means.grid_estimates(_grid(0), "test_L1")
    fig = plots.curves_vs_depth({"test L1": est})
    bars = [c for c in fig.axes[0].containers if c.has_yerr]
    assert len(bars) == 3
    plt.close(fig)


# -- reading the longer budgets from the registry, never training ----------------------------------
PROFILES = """
short: {dataset: synthetic, subset: 64, epochs: 2, warmup_epochs: 1, depths: [1], variants: [lvae_bn_wu, vae_bn_wu],
        seeds: [0, 1], eval_every: 1, eval_train_subset: 32, test_subset: 20, iw_k: 5}
long: {dataset: synthetic, subset: 64, epochs: 3, warmup_epochs: 2, depths: [1], variants: [lvae_bn_wu, vae_bn_wu],
       seeds: [0, 1], eval_every: 1, eval_train_subset: 32, test_subset: 20, iw_k: 5}
never: {dataset: synthetic, subset: 64, epochs: 9, depths: [1], variants: [lvae_bn_wu], seeds: [0]}
"""


def test_budget_runs_read_finished_and_partial_runs_and_train_nothing(tmp_path, monkeypatch, one_thread):
    import matplotlib.pyplot as plt

    from lvae.registry.profiles import experiment, load_profile
    from lvae.training.loop import get_or_train
    from lvae.training.profile_runs import get_run

    (tmp_path / "profiles.yml").write_text(PROFILES)
    monkeypatch.setenv("LVAE_PROFILES", str(tmp_path / "profiles.yml"))
    root = tmp_path / "results"
    for v in ("lvae_bn_wu", "vae_bn_wu"):
        for s in (0, 1):
            get_run("short", v, 1, s, progress=False, root=root)
    cfg, ecfg = experiment(load_profile("long"), "lvae_bn_wu", 1, 0)
    get_or_train(cfg, 3, ecfg, root=root, device="cpu", progress=False, stop_after=1)  # partial: 1 of 3
    before = sorted(p.name for p in root.iterdir())

    by_budget = budgets.budget_runs(1, dataset="synthetic", root=root)
    assert list(by_budget) == ["short", "long"]  # "never" has no run and no row
    assert by_budget["long"][("vae_bn_wu", 1, 0)] is None
    # the same configuration trained for other epochs belongs to another budget
    monkeypatch.setenv("LVAE_PROFILES", str(tmp_path / "other.yml"))
    (tmp_path / "other.yml").write_text(PROFILES.replace("epochs: 2, warmup_epochs: 1", "epochs: 5, warmup_epochs: 1"))
    assert list(budgets.budget_runs(1, dataset="synthetic", root=root)) == ["long"]
    monkeypatch.setenv("LVAE_PROFILES", str(tmp_path / "profiles.yml"))
    assert sorted(p.name for p in root.iterdir()) == before  # nothing trained
    rows = {r["key"]: r for r in budgets.budget_rows(by_budget)}
    assert rows[("lvae_bn_wu", 1, "short")]["seeds"] == "2 of 2"
    assert rows[("lvae_bn_wu", 1, "long")]["seeds"] == ("0 of 2", "seed 0: partial, 1 of 3 epochs", "seed 1: not run")
    assert rows[("lvae_bn_wu", 1, "long")]["test L1"] == "—"
    diffs = {r["profile"]: r for r in budgets.budget_differences(by_budget)}
    assert diffs["short"]["estimates"]["test_L1"] is not None and diffs["long"]["test L1"] is None
    curves = budgets.learning_curves(by_budget)
    [partial] = curves["long"]["lvae_bn_wu"]
    assert partial["state"] == "partial, 1 of 3 epochs" and list(partial["epochs"]) == [1]
    assert len(curves["short"]["vae_bn_wu"]) == 2
    fig = plots.learning_curves(curves)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2 * (2 * 2 + 2)  # 2 variants x (2 seeds x 2 + 2 means)
    plt.close(fig)


# -- per-unit KL, checked against closed forms and Monte Carlo on tiny models -----------------------
def _tiny(inference: str, latent=(3, 2)):
    """A small double-precision model; variances of at least 0.3 keep log-densities (and the Monte
    Carlo spread) moderate."""
    from lvae.config import ModelConfig
    from lvae.model.network import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(x_dim=6, latent_sizes=latent, hidden_sizes=(8, 6)[:len(latent)], inference=inference,
                      batch_norm=False, var_eps=0.3)
    return build_model(cfg).double().eval(), torch.rand(5, 6, generator=torch.Generator().manual_seed(1)).double()


def _mc_kl(model, x, n: int = 200_000) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Reference: log q(z_i|.) - log p(z_i|z_i+1) per unit, averaged over n joint posterior samples
    per image; and its standard error."""
    with torch.no_grad():
        p = model(x, n, torch.Generator().manual_seed(123))
        mean, se = [], []
        for lay in p.layers:
            d = (lay.q.log_prob(lay.z) - lay.p.log_prob(lay.z)).reshape(-1, lay.z.shape[-1])
            mean.append(d.mean(0))
            se.append(d.std(0) / math.sqrt(len(d)))
    return mean, se


def test_kl_per_unit_one_layer_is_the_closed_form():
    from lvae.model.bounds import kl_per_unit
    from lvae.model.gaussian import kl_standard_normal

    model, x = _tiny("bottom_up", latent=(3,))
    mu, var = model.upward(x)
    [kl] = kl_per_unit(model, x, samples=7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(kl, kl_standard_normal(mu, var).mean(0))
    with pytest.raises(ValueError, match="samples=0"):
        kl_per_unit(model, x, samples=0)


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_kl_per_unit_averages_samples_towards_the_monte_carlo_value(inference):
    from lvae.model.bounds import kl_per_unit
    from lvae.model.gaussian import kl_standard_normal

    model, x = _tiny(inference)
    ref, se = _mc_kl(model, x)
    samples = 20_000
    many = kl_per_unit(model, x, samples=samples, generator=torch.Generator().manual_seed(0))
    one = kl_per_unit(model, x, samples=1, generator=torch.Generator().manual_seed(0))
    for layer, (m, r, e) in enumerate(zip(many, ref, se)):
        # the estimate's own s.e. is at most sqrt(200,000 / 20,000) times the reference's
        tol = 5 * e * math.sqrt(1 + 200_000 / samples) + 1e-9
        assert ((m - r).abs() <= tol).all(), (layer, m, r, tol)
    # the estimate with one sample is further from the reference than with many
    err = lambda est: max(float((a - r).abs().max()) for a, r in zip(est, ref))  # noqa: E731
    assert err(many) < err(one)
    if inference == "ladder":  # the LVAE's top layer: q(z_L|x) against N(0, I), no sampling at all
        mu, var = model.upward(x)[-1]
        assert torch.allclose(many[-1], kl_standard_normal(mu, var).mean(0))


def test_full_test_lk_rows_list_models_with_lk_on_every_test_image():
    """Only runs with an L_K on all the test images their L1 covers get a row; the difference to the
    reference LVAE of the same budget and seed is paired per image when both have per-image values."""
    g = np.random.default_rng(0)
    a = g.normal(-90.5, 5.0, 10_000)
    b = a - 0.4 + g.normal(0.0, 1.0, 10_000)
    runs = {("lvae_bn_wu", 5, 0): SeedRun(-98.0, lk=-89.0, evals=[_eval(float(a.mean()), 10_000, 600.0)],
                                          per_image={"test_LK": a, "n": 10_000}),
            ("vae_bn_wu", 5, 0): SeedRun(-98.5, lk=-89.5, evals=[_eval(float(b.mean()), 10_000, 600.0)],
                                         per_image={"test_LK": b, "n": 10_000}),
            ("vae", 5, 0): SeedRun(-99.0, lk=-90.0),  # L_K on 500 test images only
            ("vae_bn", 5, 0): None}
    rows = budgets.full_test_lk_rows({"cpu": runs})
    assert [(r["model"], r["test images"]) for r in rows] == [("LVAE+BN+WU-5", 10_000), ("VAE+BN+WU-5", 10_000)]
    assert rows[0]["LVAE+BN+WU − this"] is None and rows[0]["L5000"] == float(a.mean())
    want = stats.contrast([(1.0, [a]), (-1.0, [b])])
    assert rows[1]["LVAE+BN+WU − this"] == f"{want.text()} (paired)"
    # without per-image values the difference is the unpaired one, and says so
    runs[("vae_bn_wu", 5, 0)]._per_image = None
    assert budgets.full_test_lk_rows({"cpu": runs})[1]["LVAE+BN+WU − this"].endswith("(unpaired)")
