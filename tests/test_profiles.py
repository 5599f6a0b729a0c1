"""Profiles (lvae/registry/profiles.yml): every committed profile keeps its runs' keys, and a key a profile omits
takes the config's own default (lvae.config is the one source of every default)."""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from lvae.config import EvalConfig, TrainConfig
from lvae.registry.experiments import DEPTHS, FIG3_VARIANTS, run_config
from lvae.registry.profiles import PROFILE_FILE_ENV, available, experiment, load_profile
from lvae.report import protocol
from lvae.training.step import evaluate_run

# every committed profile's run keys and evaluation, as computed before the profile defaults were read
# from lvae.config: {profile: {"eval": EvalConfig fields, "runs": {"<variant>-<depth>-s<seed>": dir_name}}}
KEYS = json.loads((Path(__file__).parent / "data" / "profile_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(KEYS))
def test_every_profiles_runs_keep_their_keys(name):
    assert name in available()
    p = load_profile(name)
    runs, evals = {}, set()
    for s in p.seeds:
        for v in p.variants:
            for d in p.depths:
                cfg, ecfg = experiment(p, v, d, s)
                runs[f"{v}-{d}-s{s}"] = cfg.dir_name
                evals.add(json.dumps(dataclasses.asdict(ecfg), sort_keys=True))
    assert runs == KEYS[name]["runs"]
    assert evals == {json.dumps(KEYS[name]["eval"], sort_keys=True)}


def test_a_key_a_profile_omits_is_the_configs_default(tmp_path, monkeypatch):
    (tmp_path / "profiles.yml").write_text("bare:\n  epochs: 3\n")
    monkeypatch.setenv(PROFILE_FILE_ENV, str(tmp_path / "profiles.yml"))
    p = load_profile("bare")
    t, e = TrainConfig(), EvalConfig()
    assert (p.dataset, p.subset, p.warmup_epochs, p.seeds) == (t.dataset, t.subset, t.warmup_epochs, (t.seed,))
    assert (p.eval_every, p.eval_train_subset, p.test_subset, p.iw_k, p.iw_every, p.iw_subset) == \
        (e.every, e.train_subset, e.test_subset, e.iw_k, e.iw_every, e.iw_subset)
    assert (p.depths, p.variants, p.trainer) == (DEPTHS, FIG3_VARIANTS, "single")
    cfg, ecfg = experiment(p, "lvae_bn_wu", 2)
    assert cfg == run_config("lvae_bn_wu", 2) and cfg.train.warmup_epochs == t.warmup_epochs
    assert dataclasses.replace(ecfg, iw_chunk=e.iw_chunk, bn_stats=e.bn_stats) == e


def test_the_paper_k_and_warmup_are_read_from_the_config():
    """The defaults written once, in lvae.config: the run configurations, `lvae eval`'s evaluation and the
    paper's budget read them."""
    t, e = TrainConfig(), EvalConfig()
    assert inspect.signature(run_config).parameters["warmup_epochs"].default == t.warmup_epochs
    params = inspect.signature(evaluate_run).parameters
    assert (params["iw_k"].default, params["iw_chunk"].default) == (e.iw_k, e.iw_chunk)
    b = protocol.PAPER_BUDGET
    assert (b["warmup_epochs"], b["iw_k"], b["subset"], b["test_subset"], b["iw_subset"]) == \
        (t.warmup_epochs, e.iw_k, t.subset, e.test_subset, e.iw_subset)
