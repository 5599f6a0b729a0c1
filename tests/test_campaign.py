"""The long runs (lvae.training.campaign): the plan, a worker's stages, milestones, resume across stages, the
paper profile finding the campaign's runs, a longer run replacing its committed prefix on import,
and the numbers of the step the runs in flight use, pinned."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import same

from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.model.network import build_model, draw_noise
from lvae.registry.archive import ArchiveError, export_runs, import_runs
from lvae.registry.profiles import experiment, load_profile
from lvae.registry.runs import CHECKPOINT, WEIGHTS_FP16, Run, load_checkpoint
from lvae.registry.storage import cpu_model, run_lock
from lvae.training import campaign
from lvae.training.loop import SingleModel, get_or_train
from lvae.training.profile_runs import find_run, get_run
from lvae.training.step import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")
PINS = Path(__file__).parent / "data" / "pinned_steps.json"
MODEL = ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8), inference="ladder", batch_norm=True)
SMALL_EVAL = EvalConfig(every=1, iw_k=8, iw_chunk=4, iw_subset=16, train_subset=64)


def small_config(variant: str, seed: int) -> RunConfig:
    """A tiny stand-in for the campaign's run of ``variant`` / ``seed`` (synthetic data, warm-up 2)."""
    model = dataclasses.replace(MODEL, inference="ladder" if variant.startswith("lvae") else "bottom_up")
    return RunConfig(f"syn-{variant}-s{seed}", model,
                     TrainConfig(dataset="synthetic", subset=96, batch_size=32, warmup_epochs=2, seed=seed))


@pytest.fixture
def small_campaign(monkeypatch, tmp_path):
    monkeypatch.setattr(campaign, "run_config", small_config)
    monkeypatch.setattr(campaign, "eval_config", lambda: SMALL_EVAL)
    monkeypatch.setattr(campaign, "FULL_TEST_IMAGES", 128)  # the synthetic test set
    monkeypatch.setenv(campaign.HOME_ENV, str(tmp_path / "long"))
    return tmp_path / "long"


def test_the_plan_is_the_paper_profiles_depth5_pair_with_the_compiled_fp32_step():
    stages = campaign.plan()
    for s in stages:
        cfg, _ = experiment("paper", s.variant, 5, s.seed, compile=True)
        assert s.config == cfg and s.config.train.precision == "fp32" and s.config.train.warmup_epochs == 200
        assert s.config.train.lr == 1e-3 and s.config.train.batch_size == 256
    # the keys of the runs in flight (and of the archives made elsewhere at this schedule)
    assert {s.config.dir_name for s in stages if s.seed == 1} == {"mnist-lvae_bn_wu-5-s1-0eab187f41",
                                                                   "mnist-vae_bn_wu-5-s1-28df46bc32"}
    first = [s for s in stages if s.epochs == 300]
    assert {(s.variant, s.seed) for s in first} == {(v, s) for v in campaign.VARIANTS for s in (0, 1, 2)}
    assert stages[:6] == first  # every seed's 300 epochs before any run goes on
    assert [(s.epochs, s.full_test) for s in stages if (s.variant, s.seed) == ("lvae_bn_wu", 0)] == \
        [(300, False), (1000, False), (2000, False), (2000, True)]
    e = campaign.eval_config()
    assert (e.every, e.iw_k, e.iw_subset, e.test_subset, e.train_subset) == (10, 5000, 2000, None, 10000)


def test_the_registry_is_outside_the_work_tree_and_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(campaign.HOME_ENV, raising=False)
    assert campaign.home() == Path.home() / ".cache" / "lvae" / "long-runs"
    assert Path(__file__).resolve().parents[1] not in campaign.home().parents
    monkeypatch.setenv(campaign.HOME_ENV, str(tmp_path))
    assert campaign.registry() == tmp_path / "runs"


def test_a_worker_does_every_stage_keeps_the_milestones_and_resumes_bitwise(small_campaign, tmp_path):
    stages = [campaign.Stage("lvae_bn_wu", 0, 2), campaign.Stage("lvae_bn_wu", 0, 3),
              campaign.Stage("lvae_bn_wu", 0, 3, full_test=True)]
    log = []
    assert not campaign._ready(stages[1], stages, small_campaign)
    campaign.work(stages=stages, progress=False, log=log.append)
    assert all(campaign.stage_done(s, stages=stages) for s in stages)
    assert log[-1] == "nothing left for this worker"
    run = Run(campaign.registry() / small_config("lvae_bn_wu", 0).dir_name)
    assert (run.epochs, run.status) == (3, "complete")
    # the fp16 weights of each milestone, which record their epoch: a copy where the run went on, its own at the end
    assert load_checkpoint(run.path / "model-fp16-e2.pt")["epoch"] == 2
    assert load_checkpoint(run.path / WEIGHTS_FP16)["epoch"] == 3 and not (run.path / "model-fp16-e3.pt").exists()
    assert [r["epoch"] for r in run.metrics() if r.get("test_LK") is not None] == [2, 3]  # L_K at each milestone
    (full,) = run.evals()
    assert (full["epoch"], full["n_iw"], full["n_test"]) == (3, 128, 128) and (run.path / full["per_image"]).exists()
    # the run, stopped at its first milestone and resumed, ends where a run trained straight through ends
    straight = get_or_train(small_config("lvae_bn_wu", 0), 3, SMALL_EVAL, root=tmp_path / "straight", progress=False)
    a, b = (load_checkpoint(r.path / CHECKPOINT) for r in (run, straight))
    assert same(a["model"], b["model"]) and same(a["optimizer"], b["optimizer"])
    assert [r["test_L1"] for r in run.metrics()] == [r["test_L1"] for r in straight.metrics()]
    # a worker started again finds nothing to do
    campaign.work(stages=stages, progress=False, log=log.append)
    assert log[-1] == "nothing left for this worker"


def test_a_stage_another_worker_holds_is_skipped(small_campaign):
    stages = [campaign.Stage("vae_bn_wu", 1, 1)]
    path = campaign.registry() / small_config("vae_bn_wu", 1).dir_name
    log = []
    with run_lock(path):
        campaign.work(stages=stages, progress=False, log=log.append)
    assert any("trained by another worker, skipped" in line for line in log)
    assert log[-1] == "every remaining stage is held by another worker"
    assert not campaign.stage_done(stages[0])


def test_a_full_test_evaluation_another_worker_holds_is_skipped_not_done_twice(small_campaign):
    stages = [campaign.Stage("vae_bn_wu", 1, 1), campaign.Stage("vae_bn_wu", 1, 1, full_test=True)]
    campaign.work(stages=stages[:1], progress=False, log=lambda line: None)
    run = Run(campaign.registry() / small_config("vae_bn_wu", 1).dir_name)
    log = []
    with run_lock(run.path):  # the other worker evaluating it
        campaign.work(stages=stages, progress=False, log=log.append)
    assert any("L5000 on all 10,000 test images: evaluated by another worker, skipped" in line for line in log)
    assert log[-1] == "every remaining stage is held by another worker"
    assert run.evals() == [] and run.status == "complete"
    campaign.work(stages=stages, progress=False, log=log.append)  # released: done once
    campaign.run_stage(stages[1], small_campaign, None, progress=False)  # a worker that took it before: no-op
    assert [(r["epoch"], r["n_iw"]) for r in run.evals()] == [(1, 128)]


def test_status_names_every_run_of_the_plan(small_campaign):
    campaign.work(stages=[campaign.Stage("lvae_bn_wu", 0, 1)], progress=False, log=lambda s: None)
    rows = {r["run"]: r for r in campaign.status()}
    assert set(rows) == {small_config(v, s).dir_name for v in campaign.VARIANTS for s in campaign.SEEDS}
    row = rows[small_config("lvae_bn_wu", 0).dir_name]
    assert (row["epochs"], row["target"], row["status"], row["milestones"]) == (1, 2000, "complete", [])
    assert rows[small_config("vae_bn_wu", 2).dir_name]["status"] == "not started"


def test_a_milestone_of_another_epoch_is_refused(small_campaign):
    run = get_or_train(small_config("vae_bn_wu", 0), 1, SMALL_EVAL, root=campaign.registry(), progress=False)
    with pytest.raises(RuntimeError, match="holds epoch 1, not 2; resume the run to 2 epochs first"):
        campaign.keep_milestone(run, 2)


def test_the_paper_profile_finds_a_cells_run_trained_with_the_compiled_step(tmp_path, monkeypatch):
    profiles = tmp_path / "profiles.yml"
    profiles.write_text(
        "tiny:\n  dataset: synthetic\n  subset: 96\n  epochs: 1\n  warmup_epochs: 0\n  depths: [1]\n"
        "  variants: [vae_bn_wu]\n  seeds: [0, 1]\n  iw_k: 4\n  eval_train_subset: 32\n"
        "  also_found: [{adam_eps: 0.001}]\n")
    monkeypatch.setenv("LVAE_PROFILES", str(profiles))
    p = load_profile("tiny")
    assert p.also_found == ((("adam_eps", 0.001),),)
    root = tmp_path / "reg"
    assert find_run(p, "vae_bn_wu", 1, 1, root) is None
    other = get_run(p, "vae_bn_wu", 1, 1, root=root, progress=False, adam_eps=0.001)  # the other step's run
    assert find_run(p, "vae_bn_wu", 1, 1, root).path == other.path
    assert get_run(p, "vae_bn_wu", 1, 1, root=root, progress=False).path == other.path  # found, nothing trained
    assert sorted(q.name for q in root.iterdir()) == [other.path.name]
    own = get_run(p, "vae_bn_wu", 1, 0, root=root, progress=False)  # no other run: the profile's own is trained
    assert own.config.train.adam_eps == TrainConfig().adam_eps


def move(run_path: Path, archive: Path, dest: Path):
    """``lvae runs export`` of one run, then ``lvae runs import`` into registry ``dest``."""
    export_runs([run_path], archive)
    return import_runs(archive, root=dest)


def test_a_run_trained_further_replaces_its_imported_prefix_and_nothing_else_does(tmp_path):
    cfg = small_config("lvae_bn_wu", 0)
    src, dest = tmp_path / "long", tmp_path / "results"
    get_or_train(cfg, 2, SMALL_EVAL, root=src, progress=False)
    move(src / cfg.dir_name, tmp_path / "e2.tar", dest)
    committed = Run(dest / cfg.dir_name).metrics()
    # trained straight to 3 elsewhere: its epoch-2 row has no L_K, so the committed run is no prefix of it
    get_or_train(cfg, 3, SMALL_EVAL, root=tmp_path / "other", progress=False)
    with pytest.raises(ArchiveError, match="already exists in .* with other contents"):
        move(tmp_path / "other" / cfg.dir_name, tmp_path / "other.tar", dest)
    assert Run(dest / cfg.dir_name).metrics() == committed
    # the same run resumed to 3: it replaces the committed one
    get_or_train(cfg, 3, SMALL_EVAL, root=src, progress=False)
    (imported,) = move(src / cfg.dir_name, tmp_path / "e3.tar", dest)
    run = Run(dest / cfg.dir_name)
    assert (imported.epochs, imported.identical, run.epochs) == (3, False, 3)
    assert run.metrics()[:len(committed)] == committed and len(run.metrics()) == 3
    assert sorted(q.name for q in dest.iterdir()) == [cfg.dir_name]  # nothing left of the old one
    # a shorter run never replaces a longer one
    shutil.rmtree(src)
    get_or_train(cfg, 2, SMALL_EVAL, root=src, progress=False)
    with pytest.raises(ArchiveError, match="other contents"):
        move(src / cfg.dir_name, tmp_path / "short.tar", dest)
    assert Run(dest / cfg.dir_name).epochs == 3


def test_a_milestone_of_a_run_in_training_is_exported_and_later_replaced_by_the_run(small_campaign, tmp_path):
    stages = [campaign.Stage("lvae_bn_wu", 0, 2), campaign.Stage("lvae_bn_wu", 0, 4)]
    campaign.work(stages=stages[:1] + [campaign.Stage("lvae_bn_wu", 0, 3)], progress=False, log=lambda s: None)
    run = Run(campaign.registry() / small_config("lvae_bn_wu", 0).dir_name)
    dest = tmp_path / "results"
    with run_lock(run.path):  # it is being trained: a milestone it went past can still be exported
        with pytest.raises(ArchiveError, match="no model-fp16-e3.pt"):
            export_runs([run.path], tmp_path / "m3.tar", at_epoch=3)
        export_runs([run.path], tmp_path / "m2.tar", at_epoch=2)
    (imported,) = import_runs(tmp_path / "m2.tar", root=dest)
    snap = Run(dest / run.name)
    assert (imported.epochs, snap.epochs, snap.status, snap.damage()) == (2, 2, "complete", None)
    assert snap.metrics() == [r for r in run.metrics() if r["epoch"] <= 2]
    assert load_checkpoint(snap.path / WEIGHTS_FP16)["epoch"] == 2 and snap.provenance["milestone_of"]["epochs"] == 3
    assert (snap.path / snap.metrics()[-1]["per_image"]).exists()
    assert snap.load_model() is not None
    # the run trained on replaces its milestone
    campaign.work(stages=stages, progress=False, log=lambda s: None)
    export_runs([run.path], tmp_path / "e4.tar")
    (imported,) = import_runs(tmp_path / "e4.tar", root=dest)
    assert (imported.epochs, Run(dest / run.name).epochs, imported.identical) == (4, 4, False)


def test_a_later_milestone_keeps_the_per_image_values_of_the_earlier_one(small_campaign, tmp_path):
    """The milestone at 1,000 epochs replaces the committed one at 300 in results/: the per-image values
    of epoch 300 (the paired comparisons at that budget) come with it."""
    stages = [campaign.Stage("lvae_bn_wu", 0, e) for e in (2, 3, 4)]
    campaign.work(stages=stages, progress=False, log=lambda s: None)
    run = Run(campaign.registry() / small_config("lvae_bn_wu", 0).dir_name)
    per_image = {r["epoch"]: r["per_image"] for r in run.metrics() if r.get("per_image")}
    assert {2, 3} <= set(per_image)
    dest = tmp_path / "results"
    export_runs([run.path], tmp_path / "m2.tar", at_epoch=2)
    import_runs(tmp_path / "m2.tar", root=dest)
    export_runs([run.path], tmp_path / "m3.tar", at_epoch=3)
    (imported,) = import_runs(tmp_path / "m3.tar", root=dest)
    snap = Run(dest / run.name)
    assert (imported.epochs, imported.identical, snap.epochs) == (3, False, 3)
    assert (snap.path / per_image[2]).read_bytes() == (run.path / per_image[2]).read_bytes()
    assert (snap.path / per_image[3]).exists() and not (snap.path / per_image.get(4, "none")).exists()


# -- the numbers of the step the runs in flight use ----------------------------------------------------
def fingerprint() -> str:
    """What decides a float32 step's rounding besides the code: torch and the CPU's vector extensions."""
    return f"torch {torch.__version__}; {cpu_model()}"


def step_numbers(variant: str, compile: bool, steps: int = 3) -> dict:
    """``steps`` steps of the campaign's LVAE-5 / VAE-5 (paper sizes, batch 256, seed 0, beta 0.25,
    one thread) on fixed binary data and noise: each loss (hex) and a SHA-256 of every parameter
    and Adam state after them."""
    cfg = campaign.run_config(variant, 0)
    tcfg = dataclasses.replace(cfg.train, compile=compile)
    cfg = dataclasses.replace(cfg, train=tcfg)
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg.model)
    stepper = SingleModel(model, make_optimizer(model, tcfg), cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(steps):
        x = (torch.rand(1, 256, 784, generator=g) < 0.3).float()
        eps = [e.unsqueeze(0) for e in draw_noise(cfg.model, 1, 256, g, torch.device("cpu"))]
        stepper.set_epoch([0.25], tcfg.lr)
        losses.append(float(stepper.step(x, eps)[0]).hex())
    h = hashlib.sha256()
    for t in list(model.state_dict().values()) + stepper.optimizer.state_tensors():
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"losses": losses, "state_sha256": h.hexdigest()}


def _pinned(name: str) -> dict:
    pins = json.loads(PINS.read_text()) if PINS.exists() else {}
    if fingerprint() not in pins or name not in pins[fingerprint()]:
        pytest.skip(f"no pinned numbers for {fingerprint()!r}: record them on this machine with "
                    f"`python tests/test_campaign.py --record` (before any change to the step)")
    return pins[fingerprint()][name]


@pytest.mark.parametrize("variant", campaign.VARIANTS)
def test_the_eager_step_keeps_its_numbers(variant):
    assert step_numbers(variant, compile=False) == _pinned(f"{variant} eager")


@pytest.mark.slow
@pytest.mark.parametrize("variant", campaign.VARIANTS)
def test_the_compiled_step_of_the_runs_in_flight_keeps_its_numbers(variant):
    assert step_numbers(variant, compile=True, steps=2) == _pinned(f"{variant} compiled")


def test_the_pins_were_recorded_on_the_machines_that_train():
    """The file is read by the tests above; a fingerprint without all four entries pins nothing."""
    pins = json.loads(PINS.read_text())
    assert pins and all(set(v) == {f"{var} {kind}" for var in campaign.VARIANTS for kind in ("eager", "compiled")}
                        for v in pins.values())


if __name__ == "__main__":  # python tests/test_campaign.py --record
    import sys

    if "--record" not in sys.argv:
        raise SystemExit("usage: python tests/test_campaign.py --record")
    torch.set_num_threads(1)
    pins = json.loads(PINS.read_text()) if PINS.exists() else {}
    pins[fingerprint()] = {f"{v} {kind}": step_numbers(v, compile=kind == "compiled", steps=3 if kind == "eager" else 2)
                           for v in campaign.VARIANTS for kind in ("eager", "compiled")}
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    print(f"pinned {fingerprint()!r} in {PINS}")
