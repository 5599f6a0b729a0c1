"""The grid trainer (lvae.training.grid) reproduces the single-model trainer: same seeds, same numbers."""
import json

import pytest
import torch

from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.data import datasets
from lvae.model.network import noise_shapes
from lvae.training.grid import group_configs, train_grid
from lvae.training.loop import get_or_train

EVAL = EvalConfig(every=1, iw_k=20, iw_chunk=7, test_subset=60, train_subset=80)


def _cfg(name, inference="ladder", bn=True, seed=0, warmup=0):
    m = ModelConfig(x_dim=64, latent_sizes=(6, 4, 2), hidden_sizes=(24, 16, 8), inference=inference, batch_norm=bn)
    t = TrainConfig(dataset="synthetic", subset=200, seed=seed, batch_size=64, warmup_epochs=warmup)
    return RunConfig(name=name, model=m, train=t)


GRID = [
    _cfg("lvae-s0", seed=0, warmup=2), _cfg("lvae-s1", seed=1, warmup=2),  # seeds of one config
    _cfg("vaebn", "bottom_up", True, 0, 0), _cfg("vaebn-wu", "bottom_up", True, 0, 2),  # differ in beta only
    _cfg("vae", "bottom_up", False, 3, 0),  # a group of one
]


@pytest.fixture(scope="module")
def data():
    return datasets.load_dataset("synthetic", subset=200, test_subset=60)


def test_grouping():
    groups = group_configs(GRID)
    assert sorted(len(g) for g in groups) == [1, 2, 2]


def test_noise_shapes_follow_drawing_order():
    assert noise_shapes(_cfg("a").model, 1, 5) == [(1, 5, 2), (1, 5, 4), (1, 5, 6)]
    assert noise_shapes(_cfg("b", "bottom_up").model, 3, 5) == [(3, 5, 6), (3, 5, 4), (3, 5, 2)]


def _weights(run):
    return torch.load(run.path / "checkpoint.pt", weights_only=True)


def test_grid_matches_one_by_one(tmp_path, data):
    torch.set_num_threads(1)
    epochs = 3
    single = [get_or_train(c, epochs, EVAL, root=tmp_path / "single", device="cpu", progress=False, data=data)
              for c in GRID]
    grid = train_grid(GRID, epochs, EVAL, root=tmp_path / "grid", device="cpu", progress=False, data=data)
    for a, b in zip(single, grid):
        assert a.name == b.name and b.status == "complete" and b.epochs == epochs
        ma, mb = a.metrics(), b.metrics()
        assert [r["epoch"] for r in ma] == [r["epoch"] for r in mb] == [1, 2, 3]
        for ra, rb in zip(ma, mb):
            assert ("test_LK" in ra) == ("test_LK" in rb) == (ra["epoch"] == epochs)
            for key in ("beta", "lr", "train_loss", "train_L1", "test_L1", "test_LK"):
                if key not in ra:
                    continue
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-4), (a.name, ra["epoch"], key)
            assert rb["active_units"] == ra["active_units"]
        wa, wb = _weights(a), _weights(b)
        assert wa["epoch"] == wb["epoch"] == epochs
        for k, v in wa["model"].items():
            torch.testing.assert_close(wb["model"][k], v, rtol=1e-3, atol=1e-4, msg=f"{a.name} {k}")
        sa, sb = wa["optimizer"]["state"], wb["optimizer"]["state"]
        assert set(sa) == set(sb)
        for j in sa:
            assert float(sa[j]["step"]) == float(sb[j]["step"])
            torch.testing.assert_close(sb[j]["exp_avg"], sa[j]["exp_avg"], rtol=1e-3, atol=1e-5)


def test_grid_resume_and_reuse(tmp_path, data):
    """A grid stopped early resumes from its checkpoints; the single trainer can extend a grid run."""
    torch.set_num_threads(1)
    cfgs = GRID[:2]
    full = train_grid(cfgs, 2, EVAL, root=tmp_path / "a", device="cpu", progress=False, data=data)
    part = train_grid(cfgs, 2, EVAL, root=tmp_path / "b", device="cpu", progress=False, data=data, stop_after=1)
    assert all(r.status == "partial" and r.epochs == 1 for r in part)
    resumed = train_grid(cfgs, 2, EVAL, root=tmp_path / "b", device="cpu", progress=False, data=data)
    for a, b in zip(full, resumed):
        assert b.status == "complete"
        assert b.last("test_L1") == pytest.approx(a.last("test_L1"), rel=1e-5)
    ext = get_or_train(cfgs[0], 3, EVAL, root=tmp_path / "b", device="cpu", progress=False, data=data)
    assert ext.epochs == 3 and json.loads((ext.path / "provenance.json").read_text())["status"] == "complete"


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_compiled_grid_matches_eager_grid(tmp_path, data):
    """compile=True (torch.compile of the vmapped objective, meant for the GPU) runs on the CPU and
    gives the eager grid's numbers up to rounding."""
    torch.set_num_threads(1)
    cfgs = GRID[:2]
    eager = train_grid(cfgs, 2, EVAL, root=tmp_path / "eager", device="cpu", progress=False, data=data)
    comp = train_grid(cfgs, 2, EVAL, root=tmp_path / "comp", device="cpu", progress=False, data=data, compile=True)
    for a, b in zip(eager, comp):
        assert b.status == "complete" and b.epochs == 2
        for ra, rb in zip(a.metrics(), b.metrics()):
            for key in ("train_loss", "test_L1", "test_LK"):
                if key in ra:
                    assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-3), (a.name, ra["epoch"], key)


def test_cli_train_grid(tmp_path, capsys):
    from lvae.cli import main

    rc = main(["train", "--grid", "fig3", "--depths", "1,2", "--epochs", "1", "--dataset", "synthetic",
               "--subset", "128", "--out", str(tmp_path), "--quiet", "--eval-iw-k", "5",
               "--eval-test-subset", "50", "--eval-train-subset", "50"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and all(r["status"] == "complete" and "test_LK" in r for r in rows)
    assert {r["run"].rsplit("/", 1)[-1].rsplit("-", 1)[0] for r in rows} == {
        f"synthetic-{v}-{d}" for v in ("vae", "vae_bn", "vae_bn_wu", "lvae_bn_wu") for d in (1, 2)}


def test_a_group_of_one_is_bitwise_the_single_run(tmp_path, data):
    """A group of one model is trained by the single-model step: the very numbers of get_or_train."""
    torch.set_num_threads(1)
    cfg = GRID[-1]
    single = get_or_train(cfg, 2, EVAL, root=tmp_path / "single", device="cpu", progress=False, data=data)
    grid = train_grid([cfg], 2, EVAL, root=tmp_path / "grid", device="cpu", progress=False, data=data)[0]
    wa, wb = _weights(single), _weights(grid)
    for k, v in wa["model"].items():
        assert torch.equal(wb["model"][k], v), k
    drop = {"epoch_seconds", "iw_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in single.metrics()] == \
        [{k: v for k, v in r.items() if k not in drop} for r in grid.metrics()]


def test_a_profile_names_its_trainer(tmp_path, monkeypatch):
    from lvae.config import ConfigError
    from lvae.registry.profiles import PROFILE_FILE_ENV, load_profile

    assert load_profile("paper").trainer == "grid" and load_profile("cpu").trainer == "single"
    bad = tmp_path / "profiles.yml"
    bad.write_text("p:\n  epochs: 1\n  trainer: stacked\n")
    monkeypatch.setenv(PROFILE_FILE_ENV, str(bad))
    with pytest.raises(ConfigError, match=r"trainer 'stacked' is not one of \['single', 'grid'\]"):
        load_profile("p")
