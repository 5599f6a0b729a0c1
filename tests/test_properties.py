"""Property-based tests (hypothesis) over configs, the CLI's value parsing, the data loaders and the
registry's file formats."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lvae
from lvae import cli
from lvae.config import LIKELIHOODS, ConfigError, ModelConfig, RunConfig, TrainConfig
from lvae.data import batches, datasets
from lvae.registry import runs, storage

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.lists(st.integers(1, 6), min_size=1, max_size=3)


@st.composite
def model_configs(draw) -> ModelConfig:
    latent = draw(sizes)
    hidden = draw(st.lists(st.integers(1, 8), min_size=len(latent), max_size=len(latent)))
    return ModelConfig(x_dim=draw(st.integers(1, 10)), latent_sizes=tuple(latent), hidden_sizes=tuple(hidden),
                       inference=draw(st.sampled_from(["ladder", "bottom_up"])), batch_norm=draw(st.booleans()),
                       likelihood=draw(st.sampled_from(LIKELIHOODS)),
                       nonlinearity=draw(st.sampled_from(["leaky_relu", "tanh"])))


@FAST
@given(model_configs(), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_any_valid_config_builds_a_model_with_finite_bounds(cfg, batch, seed):
    model = lvae.build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cfg.x_dim, generator=g)
    if cfg.likelihood == "bernoulli":
        x = x.round()
    e = lvae.elbo(model, x, generator=g)
    lk = lvae.iw_bound(model, x, 3, 2, g)
    assert e.shape == lk.shape == (batch,) and torch.isfinite(e).all() and torch.isfinite(lk).all()


@FAST
@given(model_configs(), st.integers(0, 10**6), st.text(min_size=1, max_size=12))
def test_run_key_is_stable_and_round_trips(cfg, seed, name):
    run = RunConfig(name, cfg, TrainConfig(dataset="synthetic", seed=seed))
    back = RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))
    assert back == run and back.key == run.key and len(run.key) == 10
    other = dataclasses.replace(run, train=dataclasses.replace(run.train, seed=seed + 1))
    assert other.key != run.key


@FAST
@given(sizes, st.data())
def test_non_positive_or_mismatched_sizes_are_refused(latent, data):
    bad = list(latent)
    i = data.draw(st.integers(0, len(bad) - 1))
    bad[i] = data.draw(st.integers(-10**6, 0))
    with pytest.raises(ConfigError, match="positive integer"):
        ModelConfig(latent_sizes=tuple(bad), hidden_sizes=tuple([8] * len(bad)))
    n = data.draw(st.integers(1, 4).filter(lambda k: k != len(latent)))
    with pytest.raises(ConfigError, match="one hidden size per stochastic layer"):
        ModelConfig(latent_sizes=tuple(latent), hidden_sizes=tuple([8] * n))


@FAST
@given(st.text(max_size=10))
def test_unknown_likelihoods_are_refused(name):
    assume(name not in LIKELIHOODS)
    with pytest.raises(ConfigError, match="choose one of 'bernoulli', 'gaussian'"):
        ModelConfig(likelihood=name)


@FAST
@given(st.integers(-100, 0), st.floats(max_value=0.0, allow_nan=False))
def test_invalid_train_values_are_refused(n, lr):
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=n)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=lr)


@FAST
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_fields_are_refused(field):
    d = RunConfig("x", ModelConfig(), TrainConfig()).to_dict()
    assume(field not in d["train"])
    d["train"][field] = 1
    with pytest.raises(ConfigError, match="unknown TrainConfig field"):
        RunConfig.from_dict(d)


@FAST
@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=6))
def test_cli_int_lists_parse_exactly_signs_included(values):
    for sep in (",", ", "):
        assert cli._parse_tuple(sep.join(map(str, values)), int) == tuple(values)
    positive = [abs(v) + 1 for v in values]
    for sep in ("x", "-"):
        assert cli._parse_tuple(sep.join(map(str, positive)), int) == tuple(positive)


# -- data loaders ----------------------------------------------------------------------------------
def bits(n: int) -> batches.ImageData:
    """Distinct 0/1 rows: binarizing is the identity and a row identifies its example."""
    x = ((torch.arange(n)[:, None] >> torch.arange(8)[None, :]) & 1).float()
    return batches.ImageData("bits", x, None, x.clone(), None, (2, 4), "bernoulli")


def ids(batch: torch.Tensor) -> list[int]:
    return (batch.long() * (2 ** torch.arange(8))).sum(1).tolist()


@FAST
@given(st.integers(1, 200), st.integers(1, 64), st.integers(0, 2**32), st.integers(0, 10**4))
def test_train_batches_cover_every_example_once_and_replay(n, batch_size, seed, epoch):
    d = bits(n)
    epoch_batches = list(batches.train_batches(d, epoch, seed, batch_size))
    assert len(epoch_batches) == batches.num_batches(n, batch_size)
    assert all(len(b) == batch_size for b in epoch_batches[:-1]) and 1 <= len(epoch_batches[-1]) <= batch_size
    seen = [i for b in epoch_batches for i in ids(b)]
    assert sorted(seen) == list(range(n))
    again = list(batches.train_batches(d, epoch, seed, batch_size))
    assert all(torch.equal(a, b) for a, b in zip(epoch_batches, again))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 300), st.integers(1, 100), st.integers(0, 5), st.integers(0, 3))
def test_synthetic_loader_prefixes_and_fixed_test_binarization(subset, test_subset, test_seed, epoch):
    d = datasets.load_dataset("synthetic", subset=subset, test_subset=test_subset, test_seed=test_seed)
    assert d.x_train.shape == (subset, 64) and d.x_test.shape == (test_subset, 64) and d.x_dim == 64
    assert d.x_train.dtype == torch.float32 and 0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1
    assert set(d.x_test.unique().tolist()) <= {0.0, 1.0}
    full = datasets.load_dataset("synthetic", subset=300, test_subset=100, test_seed=test_seed)
    assert torch.equal(full.x_train[:subset], d.x_train)  # a subset is a prefix
    assert torch.equal(full.x_test[:test_subset], d.x_test)  # of the same fixed binarization
    x = batches.epoch_train_data(d, epoch, 0)
    assert set(x.unique().tolist()) <= {0.0, 1.0} and torch.equal(x, batches.epoch_train_data(d, epoch, 0))


@FAST
@given(st.integers(-10**6, 0))
def test_bad_subset_sizes_are_refused(n):
    with pytest.raises(ValueError):
        datasets.load_dataset("synthetic", subset=n) if n < 0 else batches.num_batches(10, n)


# -- registry file formats -------------------------------------------------------------------------
jsonable = st.dictionaries(st.sampled_from(["epoch", "a", "b"]),
                           st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5)), min_size=1)


@FAST
@given(st.lists(jsonable, max_size=5), st.data())
def test_any_torn_metrics_file_reads_as_a_prefix(tmp_path_factory, rows, data):
    p = tmp_path_factory.mktemp("jsonl") / "metrics.jsonl"
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    cut = data.draw(st.integers(0, len(text)))
    p.write_text(text[:cut])
    got = storage.read_jsonl(p)
    assert got == rows[:len(got)] and len(got) >= text[:cut].count("\n") - 1


@FAST
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=20), st.data())
def test_digest_changes_with_any_element(values, data):
    t = torch.tensor(values, dtype=torch.float32)
    payload = {"model": {"w": t}, "epoch": 3}
    i = data.draw(st.integers(0, len(values) - 1))
    changed = t.clone()
    changed.view(torch.int32)[i] ^= 1  # one bit of one element
    assert runs._digest(payload) == runs._digest({"model": {"w": t.clone()}, "epoch": 3})
    assert runs._digest(payload) != runs._digest({"model": {"w": changed}, "epoch": 3})
    assert runs._digest(payload) != runs._digest({"model": {"w": t}, "epoch": 4})
