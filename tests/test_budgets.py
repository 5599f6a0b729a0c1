"""Budgets on the way (a profile's milestones): every run read as it stood at each milestone, the
paper's numbers next to ours at every budget, and the claims' columns for the paper's schedule."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from lvae.book import plots
from lvae.registry.profiles import experiment, load_profile
from lvae.report import budgets, claims, paper, seed_means
from lvae.training.loop import get_or_train
from lvae.training.profile_runs import get_run

PROFILES = """\
tiny: {dataset: synthetic, subset: 64, epochs: 3, warmup_epochs: 1, depths: [1], variants: [lvae_bn_wu, vae_bn_wu],
       seeds: [0, 1], eval_every: 1, eval_train_subset: 32, test_subset: 20, iw_k: 5, milestones: [2, 3]}
paper: {epochs: 2000, warmup_epochs: 200, depths: [5], variants: [lvae_bn_wu]}   # what the claims call the paper's budget
"""


@pytest.fixture
def milestone_registry(tmp_path, monkeypatch, one_thread):
    """Profile ``tiny`` (milestones 2 and 3): seed 0 of both models trained to 3 epochs in two calls (as
    lvae.training.campaign does), seed 1 of the LVAE to 2 epochs only, seed 1 of the VAE never."""
    (tmp_path / "profiles.yml").write_text(PROFILES)
    monkeypatch.setenv("LVAE_PROFILES", str(tmp_path / "profiles.yml"))
    root = tmp_path / "results"
    p = load_profile("tiny")
    for v, seeds in (("lvae_bn_wu", (0, 1)), ("vae_bn_wu", (0,))):
        for s in seeds:
            cfg, ecfg = experiment(p, v, 1, s)
            get_or_train(cfg, 2, ecfg, root=root, device="cpu", progress=False)
            if s == 0:
                get_or_train(cfg, 3, ecfg, root=root, device="cpu", progress=False)
    return root


def test_a_profile_with_milestones_is_one_budget_per_milestone(milestone_registry):
    root = milestone_registry
    before = sorted(q.name for q in root.iterdir())
    by_budget = budgets.budget_runs(1, dataset="synthetic", root=root)
    assert list(by_budget) == ["tiny, 2 epochs", "tiny, 3 epochs"]
    at2, at3 = by_budget.values()
    assert (at2.epoch, at3.epoch, at2.profile.name) == (2, 3, "tiny")
    run = at2[("lvae_bn_wu", 1, 0)]  # the 3-epoch run as it stood at epoch 2
    assert run.epochs == 2 and run.ok and [r["epoch"] for r in run.metrics()] == [1, 2]
    assert at3[("lvae_bn_wu", 1, 0)].epochs == 3
    # a run that ended before a milestone is not a run of that budget; one never trained is None
    assert at2[("lvae_bn_wu", 1, 1)].ok and at3[("lvae_bn_wu", 1, 1)] is None
    assert at2[("vae_bn_wu", 1, 1)] is None
    rows = {r["key"]: r for r in budgets.budget_rows(by_budget)}
    assert rows[("lvae_bn_wu", 1, "tiny, 2 epochs")]["seeds"] == "2 of 2"
    assert rows[("lvae_bn_wu", 1, "tiny, 3 epochs")]["seeds"] == ("1 of 2", "seed 1: not run")
    assert rows[("lvae_bn_wu", 1, "tiny, 2 epochs")]["epochs"] == "2 (warm-up 1)"
    # the value at a milestone is the run's own row of that epoch
    row2 = next(r for r in get_run("tiny", "lvae_bn_wu", 1, 0, root=root, progress=False).metrics() if r["epoch"] == 2)
    assert seed_means.seed_mean(at2, "lvae_bn_wu", 1, "test_L1", seeds=[0]).value == row2["test_L1"]
    diffs = {r["profile"]: r for r in budgets.budget_differences(by_budget)}
    assert diffs["tiny, 3 epochs"]["epochs"] == 3
    assert sorted(q.name for q in root.iterdir()) == before  # read-only


def test_the_claims_read_the_paper_schedule_at_its_first_and_last_milestone(milestone_registry, monkeypatch):
    by_budget = budgets.budget_runs(1, dataset="synthetic", root=milestone_registry)
    b2, b3 = (claims.budget_of_runs(n, r) for n, r in by_budget.items())
    assert (b2.epoch, b2.seed_term_epoch) == (2, None) and (b3.epoch, b3.seed_term_epoch) == (3, 2)
    assert claims.profiles_with_runs(milestone_registry, ["tiny"], epoch=3) == ["tiny"]
    assert claims.profiles_with_runs(milestone_registry, ["tiny"], epoch=4) == []
    assert "3 epochs" in b3.text(milestone_registry) and "seed term from the same comparison at 2 epochs" in \
        b3.text(milestone_registry)


def test_the_paper_schedule_on_the_committed_runs_shows_its_gap_to_the_paper(monkeypatch):
    """The committed runs of the paper's schedule (seeds 1 and 2 of the pair at 300 epochs)."""
    monkeypatch.setenv("LVAE_RESULTS", str(Path(__file__).resolve().parents[1] / "results"))
    by_budget = budgets.budget_runs(5)
    assert "paper, 300 epochs" in by_budget
    names = list(by_budget)
    assert names.index("cpu") < names.index("cpu-long") < names.index("paper, 300 epochs")  # by epochs
    verdicts = claims.budget_verdicts(by_budget)
    rows = {r["budget"]: r for r in budgets.paper_gap_rows(by_budget, verdicts)}
    row = rows["paper, 300 epochs"]
    assert row["step"] == "fp32, compiled" and row["epochs"] == "300 (warm-up 200)"
    l1, said = row["estimates"]["test_L1"].value, verdicts["paper, 300 epochs"]
    assert row["test L1"][0] == "L1 (10,000 images)" and row["test L_K"][0] == "L5000 (2,000 images)"
    assert row["test L1"][-2:] == (f"gap {l1 - paper.get('mnist_lvae5_test_L1').value:+.2f}", said["lvae-L1"])
    assert row["test L_K"][-1] == said["lvae-L5000"] and set(said) == {"lvae-L1", "lvae-L5000"}
    assert rows["cpu-long"]["step"] == "bf16, compiled" and rows["cpu"]["step"] == "fp32"
    evaluated = claims.book_evaluations(load_profile("cpu"))
    assert "paper, 300 epochs" in evaluated
    assert "L_5000 on 2,000 test images" in evaluated["paper, 300 epochs"].budget_text()


def test_the_papers_number_is_marked_on_its_panels(milestone_registry):
    by_budget = budgets.budget_runs(1, dataset="synthetic", root=milestone_registry)
    curves = budgets.learning_curves(by_budget)
    fig = plots.learning_curves(curves, marks={"tiny, 3 epochs": [(-40.0, "paper", "lvae_bn_wu")]})
    ax2, ax3 = fig.axes
    assert [tuple(line.get_ydata()) for line in ax3.lines if line.get_label() == "paper"] == [(-40.0, -40.0)]
    assert not any(line.get_label() == "paper" for line in ax2.lines)
    assert ax3.get_ylim()[0] < -40.0 < ax3.get_ylim()[1]
    plt.close(fig)


def test_a_run_at_a_milestone_loads_its_weights_of_that_epoch(milestone_registry, tmp_path):
    """Figs 5-6 at a milestone: the per-unit KL of that epoch, and the weights of that epoch (the kept
    milestone weights), never the weights the run went on to; without them, an error that says so."""
    import torch

    from lvae.registry.runs import MILESTONE_WEIGHTS, WEIGHTS_FP16, RunError, load_checkpoint
    from lvae.report import latent_units

    by_budget = budgets.budget_runs(1, dataset="synthetic", root=milestone_registry)
    at2 = by_budget["tiny, 2 epochs"][("lvae_bn_wu", 1, 0)]  # the run went on to 3 epochs
    assert load_checkpoint(at2.path / WEIGHTS_FP16)["epoch"] == 3
    with pytest.raises(RunError, match=r"no weights of epoch 2 \(checkpoint.pt: epoch 3, model-fp16.pt: epoch 3\)"):
        at2.load_model()
    kept = load_checkpoint(at2.path / WEIGHTS_FP16)
    fake = {k: (v * 0 if v.is_floating_point() else v) for k, v in kept["model"].items()}  # marks the file read
    torch.save({"model": fake, "epoch": 2}, at2.path / MILESTONE_WEIGHTS.format(epoch=2))
    assert at2.weights()[0].name == "model-fp16-e2.pt"
    assert all(float(p.detach().abs().sum()) == 0 for p in at2.load_model().parameters())
    at3 = by_budget["tiny, 3 epochs"][("lvae_bn_wu", 1, 0)]
    assert at3.load_model() is not None  # the run's own weights, of epoch 3
    rows = latent_units.budget_layer_rows(by_budget, ("lvae_bn_wu", "vae_bn_wu"), 1)
    assert [(r["budget"], r["model"], r["seeds"]) for r in rows] == [
        ("tiny, 2 epochs", "LVAE+BN+WU 1-layer", "2 of 2"),
        ("tiny, 2 epochs", "VAE+BN+WU 1-layer", ("1 of 2", "seed 1: not run")),
        ("tiny, 3 epochs", "LVAE+BN+WU 1-layer", ("1 of 2", "seed 1: not run")),
        ("tiny, 3 epochs", "VAE+BN+WU 1-layer", ("1 of 2", "seed 1: not run"))]
    kl2 = next(r["kl_units"] for r in at2.base.metrics() if r["epoch"] == 2)
    assert rows[0]["active units z1…z1"] != "—" and latent_units.run_kl_units(at2) == kl2
    assert rows[0]["KL above z1 [%]"] == "0.0 ± 0.0"  # one layer: nothing above z1
