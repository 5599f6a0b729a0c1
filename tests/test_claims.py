"""The verdict rule of lvae.claims, and claims evaluated on a fake registry written with the registry's own
functions: change a number in a run and the verdict changes; one seed, missing and failed runs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lvae import claims, paper
from lvae.claims import (NOT_REPRODUCED, NOT_RUN, QUALITATIVE, REPRODUCED, UNRESOLVED, VERDICTS, Claim, Registry,
                         Criterion, combine, decide, evaluate, evaluate_claim)
from lvae.experiments import FIG3_VARIANTS
from lvae.profiles import experiment, load_profile
from lvae.runs import FORMAT_VERSION, results_dir, save_per_image
from lvae.storage import append_jsonl, atomic_write_json
from lvae.stats import Estimate

N_IMAGES = 200
SIZES = (64, 32, 16, 8, 4)


def est(mean, half=0.1, seeds=3, known=True):
    return Estimate(mean, half / 2, mean - half, mean + half, seeds, 100, seed_se_known=known)


# -- the rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("e, test, verdict", [
    (est(0.5), Criterion("greater"), REPRODUCED),
    (est(-0.5), Criterion("greater"), NOT_REPRODUCED),
    (est(0.05), Criterion("greater"), UNRESOLVED),
    (est(0.0, half=0.0), Criterion("greater"), NOT_REPRODUCED),  # equal counts in every seed are not "more"
    (est(-0.5), Criterion("at_most", 0.1), REPRODUCED),
    (est(0.5), Criterion("at_most", 0.1), NOT_REPRODUCED),
    (est(0.12), Criterion("at_most", 0.1), UNRESOLVED),
    (est(-85.0), Criterion("within", -85.23, 0.5), REPRODUCED),
    (est(-84.0), Criterion("within", -85.23, 0.5), NOT_REPRODUCED),
    (est(-85.7), Criterion("within", -85.23, 0.5), UNRESOLVED),
    (est(-98.0), Criterion("within", -85.23, 0.5), NOT_REPRODUCED),
    (est(-98.0), Criterion("within", -85.23, 0.5, budget_limited=True), UNRESOLVED),  # below, at a smaller budget
    (est(-2.0), Criterion("greater", budget_limited=True), UNRESOLVED),
    (est(0.5, seeds=1, known=False), Criterion("greater"), UNRESOLVED),  # one seed: no verdict
    (None, Criterion("greater"), NOT_RUN),
])
def test_decide(e, test, verdict):
    assert decide(e, test)[0] == verdict


def test_changing_one_number_flips_the_verdict():
    assert decide(est(0.2), Criterion("greater"))[0] == REPRODUCED
    assert decide(est(-0.2), Criterion("greater"))[0] == NOT_REPRODUCED
    assert decide(est(-98.0), Criterion("within", -85.23, 0.5, budget_limited=True), at_paper_budget=True)[0] == \
        NOT_REPRODUCED  # at the paper's budget a shortfall counts


def test_min_seeds_is_the_rule(monkeypatch):
    two = est(0.5, seeds=2)
    assert decide(two, Criterion("greater"))[0] == REPRODUCED
    monkeypatch.setattr(claims, "MIN_SEEDS", 3)
    verdict, reason = decide(two, Criterion("greater"))
    assert verdict == UNRESOLVED and "fewer than 3" in reason


def test_combine():
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, NOT_RUN, NOT_REPRODUCED]) == NOT_REPRODUCED
    assert combine([REPRODUCED, UNRESOLVED, NOT_RUN]) == NOT_RUN
    assert combine([REPRODUCED, UNRESOLVED]) == UNRESOLVED
    assert combine([]) == NOT_RUN


def test_claims_are_well_formed():
    ids = [c.id for c in claims.CLAIMS]
    assert len(ids) == len(set(ids))
    for c in claims.CLAIMS:
        assert c.kind == "qualitative" or c.kind in claims.EVALUATORS, c.id
        assert c.paper_text() and "{" not in c.paper_text(), c.id
        for key in [c.args.get("key"), *c.args.get("keys", ()), *c.args.get("above", ()), *c.args.get("near", ())]:
            assert key is None or key in paper.NUMBERS, (c.id, key)
    assert {c.dataset for c in claims.CLAIMS} == {"mnist", "omniglot", "norb"}
    wheres = " ".join(c.where for c in claims.CLAIMS)
    for ref in ["§3.1", "§3.2", "§4", "Table 1", "Table 2", "Fig 2", "Fig 3b", "Fig 3c",
                *(f"Fig {i}" for i in range(4, 11))]:  # sections 3-4, Tables 1-2, Figs 2-10
        assert ref in wheres


# -- a fake registry -----------------------------------------------------------------------------
def profile(seeds=(0, 1, 2)):
    return dataclasses.replace(load_profile("smoke"), depths=(1, 2), seeds=tuple(seeds))


def write_run(root, P, variant, depth, seed, l1, lk=None, per_image=True, status="complete", active=None):
    """A run directory as training writes it (config.json, provenance.json, metrics.jsonl, per-image file)."""
    cfg, ecfg = experiment(P, variant, depth, seed)
    path = results_dir(root) / cfg.dir_name
    path.mkdir(parents=True)
    atomic_write_json(path / "config.json", {"format_version": FORMAT_VERSION, "run": cfg.to_dict(),
                                             "eval": dataclasses.asdict(ecfg)})
    prov = {"status": status, "epochs": P.epochs, "target_epochs": P.epochs, "seed": seed}
    if status == "failed":
        prov["error"] = "non-finite loss at epoch 2"
    atomic_write_json(path / "provenance.json", prov)
    lk = l1 + 8.0 if lk is None else lk
    n_iw = P.iw_subset
    active = active or SIZES
    kl = [[1.0 if i < len(active) and u < active[i] else 0.0 for u in range(SIZES[i])] for i in range(depth)]
    for epoch in range(1, P.epochs + 1):
        row = {"epoch": epoch, "test_L1": float(l1.mean()) - (P.epochs - epoch), "train_L1": float(l1.mean()),
               "n_test": l1.size, "kl_units": kl, "kl_layers": [float(sum(k)) for k in kl],
               "active_units": [int(sum(k)) for k in kl]}
        if epoch == P.epochs:
            row.update(test_L1=float(l1.mean()), test_L1_se=float(l1.std(ddof=1) / np.sqrt(l1.size)),
                       test_LK=float(lk[:n_iw].mean()), test_LK_se=float(lk[:n_iw].std(ddof=1) / np.sqrt(n_iw)),
                       iw_k=P.iw_k, n_iw=n_iw)
            if per_image:
                row["per_image"] = save_per_image(path, row, {"test_L1": l1, "test_LK": lk[:n_iw]})
        append_jsonl(path / "metrics.jsonl", row)
    return path


def images(offset, seed, rng_seed=0):
    """Per-image bounds: a common image difficulty, the model's offset and a little seed noise."""
    base = np.random.default_rng(rng_seed).normal(-100, 5, N_IMAGES)
    return base + offset + np.random.default_rng(100 + seed).normal(0, 0.3, N_IMAGES)


FIG2 = next(c for c in claims.CLAIMS if c.id == "fig2-lvae-vs-vae")  # LVAE+BN+WU vs VAE+BN+WU, deepest, L1


@pytest.mark.parametrize("margin, verdict", [(0.5, REPRODUCED), (-0.5, NOT_REPRODUCED), (0.0, UNRESOLVED)])
def test_a_number_in_the_registry_decides_the_verdict(tmp_path, margin, verdict):
    P = profile()
    for s in P.seeds:
        write_run(tmp_path, P, "lvae_bn_wu", 2, s, images(margin, s))
        write_run(tmp_path, P, "vae_bn_wu", 2, s, images(0.0, s + 10))
    row = evaluate_claim(FIG2, Registry(P, tmp_path))
    assert row.verdict == verdict
    assert row.estimate.n_seeds == 3 and row.estimate.n_images == N_IMAGES and row.estimate.seed_se_known
    assert "paired per test image" in row.reason
    assert row.estimate.mean == pytest.approx(margin, abs=0.2)


def test_one_seed_is_unresolved_and_its_interval_covers_test_images_only(tmp_path):
    P = profile(seeds=(0,))
    write_run(tmp_path, P, "lvae_bn_wu", 2, 0, images(2.0, 0))
    write_run(tmp_path, P, "vae_bn_wu", 2, 0, images(0.0, 1))
    row = evaluate_claim(FIG2, Registry(P, tmp_path))
    assert row.verdict == UNRESOLVED and "1 seed" in row.reason
    assert row.estimate.lo > 0  # the test-image CI alone would have decided
    assert "test images only" in row.as_dict()["ours (95 % CI)"][0]


def test_missing_and_failed_runs_are_not_run_and_never_a_number(tmp_path):
    P = profile()
    for s in P.seeds:
        write_run(tmp_path, P, "vae_bn_wu", 2, s, images(0.0, s))
    row = evaluate_claim(FIG2, Registry(P, tmp_path))
    assert row.verdict == NOT_RUN and row.estimate is None and "3 runs missing" in row.reason
    for s in P.seeds:
        write_run(tmp_path, P, "lvae_bn_wu", 2, s, images(3.0, s), status="failed")
    row = evaluate_claim(FIG2, Registry(P, tmp_path))
    assert row.verdict == NOT_RUN and row.estimate is None and "failed" in row.reason
    assert row.as_dict()["ours (95 % CI)"] == "—"


def test_a_failed_seed_is_left_out_and_named(tmp_path):
    P = profile()
    for s in P.seeds:
        write_run(tmp_path, P, "lvae_bn_wu", 2, s, images(0.5, s), status="failed" if s == 2 else "complete")
        write_run(tmp_path, P, "vae_bn_wu", 2, s, images(0.0, s + 10))
    row = evaluate_claim(FIG2, Registry(P, tmp_path))
    assert row.estimate.n_seeds == 2 and "seed 2: failed" in row.reason


def test_without_per_image_values_on_one_side_the_difference_is_unpaired(tmp_path):
    P = profile()
    for s in P.seeds:
        write_run(tmp_path, P, "lvae_bn_wu", 2, s, images(0.5, s), per_image=False)
        write_run(tmp_path, P, "vae_bn_wu", 2, s, images(0.0, s + 10))
    row = evaluate_claim(FIG2, Registry(P, tmp_path))
    assert "unpaired" in row.reason and "3 of 6 runs have no per-image values" in row.reason
    assert row.estimate.half_width > 0.3  # the image-to-image spread (sd 5) is no longer cancelled by pairing


def test_when_some_seeds_lack_per_image_values_the_image_part_is_paired_on_the_others(tmp_path):
    P = profile()
    for s in P.seeds:
        write_run(tmp_path, P, "lvae_bn_wu", 2, s, images(0.5, s), per_image=s != 0)
        write_run(tmp_path, P, "vae_bn_wu", 2, s, images(0.0, s + 10))
    row = evaluate_claim(FIG2, Registry(P, tmp_path))
    assert "paired per image on the 5 of 6 runs" in row.reason
    unpaired = tmp_path / "unpaired"
    for s in P.seeds:
        write_run(unpaired, P, "lvae_bn_wu", 2, s, images(0.5, s), per_image=False)
        write_run(unpaired, P, "vae_bn_wu", 2, s, images(0.0, s + 10))
    far = evaluate_claim(FIG2, Registry(P, unpaired))
    assert row.estimate.mean == pytest.approx(far.estimate.mean)  # the same seed means
    assert row.estimate.half_width < far.estimate.half_width / 2  # the image-to-image spread cancels again


def test_value_claims_against_the_paper_and_the_budget(tmp_path):
    P = profile()
    claim = Claim("v", "test", "x", "{mnist_lvae5_test_L1:.2f}", "value",
                  {"cell": ("lvae_bn_wu", 2), "metric": "test_L1", "key": "mnist_lvae5_test_L1"})
    target = paper.get("mnist_lvae5_test_L1").value
    def near(shift, s):  # per-image bounds with a small spread around the paper's number, so the CI is narrow
        return target + shift + 0.01 * s + np.random.default_rng(s).normal(0, 0.5, N_IMAGES)

    for s in P.seeds:
        write_run(tmp_path, P, "lvae_bn_wu", 2, s, near(0.0, s))
    assert evaluate_claim(claim, Registry(P, tmp_path)).verdict == REPRODUCED
    low = tmp_path / "low"
    for s in P.seeds:
        write_run(low, P, "lvae_bn_wu", 2, s, near(-10.0, s))
    reg = Registry(P, low)
    assert evaluate_claim(claim, reg).verdict == UNRESOLVED  # below the paper after 2 epochs, not 2,000
    reg.paper_epochs = P.epochs  # as if this were the paper's budget
    assert evaluate_claim(claim, reg).verdict == NOT_REPRODUCED


def test_every_claim_on_a_fake_grid_reads_only(tmp_path):
    P = dataclasses.replace(profile(), depths=(1, 2, 3, 4, 5))
    offsets = {"vae": 0.0, "vae_bn": 1.0, "vae_bn_wu": 2.0, "lvae_bn_wu": 3.0}
    for v in FIG3_VARIANTS:
        for d in P.depths:
            for s in P.seeds:
                write_run(tmp_path, P, v, d, s, images(offsets[v] + d, s), active=SIZES if v == "lvae_bn_wu"
                          else (60,))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rows = evaluate(P, tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing trained, nothing written
    assert len(rows) == len(claims.CLAIMS)
    by_id = {r.id: r for r in rows}
    assert all(r.verdict in VERDICTS for r in rows)
    assert by_id["t2-omniglot-vae"].verdict == NOT_RUN and "OMNIGLOT" in by_id["t2-omniglot-vae"].reason
    assert by_id["fig9-mnist-samples"].verdict == QUALITATIVE
    assert by_id["lvae-each-layer"].verdict == REPRODUCED  # 2 layers beat 1 by a nat on every image
    assert by_id["vae-no-gain-beyond-1"].verdict == NOT_REPRODUCED
    assert by_id["fig2-lvae-vs-vae"].verdict == REPRODUCED
    assert by_id["fig4-lvae-most-distributed"].verdict == REPRODUCED  # 124 vs 60 units in every seed
    assert by_id["fig6-lvae-all-layers"].verdict == REPRODUCED
    assert by_id["fig6-vae-collapsed"].verdict == NOT_REPRODUCED  # 1 active layer, not 2
    assert by_id["fig7-lvae-without-bn"].verdict == NOT_RUN and "no LVAE+WU" in by_id["fig7-lvae-without-bn"].reason
    assert by_id["t1-finetune"].verdict == NOT_RUN
    assert by_id["lvae-vs-vae-L5000"].verdict == REPRODUCED  # our best VAE is VAE+BN+WU 5-layer
    assert "our best VAE: VAE+BN+WU 5-layer" in by_id["lvae-vs-vae-L5000"].reason
    for r in rows:
        d = r.as_dict()
        assert set(d) == set(claims.COLUMNS)
        if r.verdict in (REPRODUCED, NOT_REPRODUCED, UNRESOLVED):
            assert d["ours (95 % CI)"] != "—" and d["budget"].startswith(f"{P.epochs} epochs"), r.id
    assert claims.profiles_with_runs(tmp_path, ["smoke", "cpu"]) == ["smoke"]
    summary = claims.summary_rows({"smoke": rows})
    assert [s["smoke"] for s in summary] == [r.verdict for r in rows]


def test_best_vae_compares_every_model_on_the_same_test_images(tmp_path):
    """A later evaluation of one seed on more (harder) images must not make its model look worse:
    the best VAE on L_K is chosen with every run on the test images they all have."""
    P = profile()
    for s in P.seeds:
        write_run(tmp_path, P, "vae_bn_wu", 1, s, images(0.0, s))
        write_run(tmp_path, P, "vae_bn_wu", 2, s, images(1.0, s))
    path = results_dir(tmp_path) / experiment(P, "vae_bn_wu", 2, 0)[0].dir_name
    append_jsonl(path / "evals.jsonl", {"epoch": P.epochs, "iw_k": P.iw_k, "n_iw": N_IMAGES,
                                        "test_LK": -500.0, "test_LK_se": 1.0})
    best, note = claims._best_vae(Registry(P, tmp_path), "test_LK")
    assert best == ("vae_bn_wu", 2) and "VAE+BN+WU 2-layer" in note
