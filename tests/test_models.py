"""Architecture, shapes and the public API of the models; the committed weights' format."""
import json
import sys
from pathlib import Path

import pytest
import torch

import lvae
from lvae.config import ConfigError
from lvae.model.blocks import BottomUpLayer, LadderLayer, LayerSample, StandardNormalPrior
from lvae.model.checkpoint_format import format_1_state_dict, upgrade_state_dict
from lvae.model.gaussian import STANDARD_NORMAL, Normal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import reference  # noqa: E402  (the plain reference model keeps lvae_format 1's module layout)


def dense(d_in, d_out, bn):
    """Parameters of Linear(+BN): weights, then either a bias or BN's scale and shift."""
    return d_in * d_out + (2 * d_out if bn else d_out)


def mlp(d_in, h, bn, layers=2):
    return dense(d_in, h, bn) + (layers - 1) * dense(h, h, bn)


def head(h, d, bn):
    return 2 * dense(h, d, bn)


def expected_parameters(cfg: lvae.ModelConfig) -> int:
    lat, hid, bn, L = cfg.latent_sizes, cfg.hidden_sizes, cfg.batch_norm, cfg.n_layers
    # generative model: z_{i+1} -> z_i MLPs and heads, z_1 -> x MLP and Bernoulli logits (no BN)
    gen = sum(mlp(lat[i + 1], hid[i + 1], bn) + head(hid[i + 1], lat[i], bn) for i in range(L - 1))
    gen += mlp(lat[0], hid[0], bn) + hid[0] * cfg.x_dim + cfg.x_dim
    if cfg.inference == "bottom_up":
        d_in = [cfg.x_dim, *lat[:-1]]
        inf = sum(mlp(d_in[i], hid[i], bn) + head(hid[i], lat[i], bn) for i in range(L))
    else:
        d_in = [cfg.x_dim, *(lat[:-1] if cfg.up_input == "mu" else hid[:-1])]
        inf = sum(mlp(d_in[i], hid[i], bn) + head(hid[i], lat[i], bn) for i in range(L))
        if not cfg.share_top_down:
            inf += sum(mlp(lat[i + 1], hid[i + 1], bn) + head(hid[i + 1], lat[i], bn) for i in range(L - 1))
    return gen + inf


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
@pytest.mark.parametrize("depth", [1, 3, 5])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_parameter_counts_match_architecture(inference, depth, batch_norm):
    cfg = lvae.ModelConfig.paper(depth, inference=inference, batch_norm=batch_norm)
    assert lvae.count_parameters(lvae.build_model(cfg)) == expected_parameters(cfg)


@pytest.mark.parametrize("overrides", [{"up_input": "d"}, {"share_top_down": True}])
def test_parameter_counts_ladder_options(overrides):
    cfg = lvae.ModelConfig.paper(5, **overrides)
    assert lvae.count_parameters(lvae.build_model(cfg)) == expected_parameters(cfg)


def test_generative_model_identical_for_vae_and_lvae():
    names = {}
    for inference in ("ladder", "bottom_up"):
        m = lvae.build_model(lvae.ModelConfig.paper(5, inference=inference))
        names[inference] = {k: tuple(v.shape) for k, v in m.generative.state_dict().items()}
    assert names["ladder"] == names["bottom_up"]


def test_paper_lvae5_sizes():
    m = lvae.build_model(lvae.ModelConfig())
    assert all(isinstance(layer, LadderLayer) for layer in m.layers)
    assert [layer.up.mlp[0].linear.out_features for layer in m.layers] == [512, 256, 128, 64, 32]
    assert [layer.up.head.mu.linear.out_features for layer in m.layers] == [64, 32, 16, 8, 4]
    assert m.layers[1].up.mlp[0].linear.in_features == 64  # upward input = mu_hat (authors' code)
    assert isinstance(m.layers[-1].prior, StandardNormalPrior) and m.layers[-1].down is None  # p(z_L) = N(0, I)
    assert m.layers[-1].p(None) is STANDARD_NORMAL


# -- lvae_format 1: committed weights and checkpoints --------------------------------------------------
@pytest.mark.parametrize("ladder", [True, False])
@pytest.mark.parametrize("depth", [1, 5])
def test_parameter_order_and_keys_are_lvae_format_1(ladder, depth):
    """named_parameters() lists lvae_format 1's keys in its order (checkpoints' optimizer states are
    by position), here the plain reference model's, which keeps that module layout."""
    cfg = lvae.ModelConfig.paper(depth, inference="ladder" if ladder else "bottom_up")
    model = lvae.build_model(cfg)
    ref = reference.RefModel(ladder=ladder, depth=depth)
    names = [n for n, _ in model.named_parameters()]
    assert list(format_1_state_dict(dict.fromkeys(names), ladder)) == [n for n, _ in ref.named_parameters()]
    assert [p for _, p in model.named_parameters()] == list(model.parameters())
    state = model.state_dict()
    old = format_1_state_dict(state, ladder)
    assert set(old) == set(ref.state_dict())
    new = upgrade_state_dict(old, ladder)
    assert list(new) == list(state) and all(new[k] is v for k, v in state.items())


def test_same_seed_same_initial_weights_as_lvae_format_1():
    """A seed gives the same initial weights (the modules are created in lvae_format 1's order: the
    bitwise check against the code before the blocks was made once, outside the tests), and a state
    dict with the old keys loads into the same tensors; unknown keys are still refused."""
    torch.manual_seed(0)
    model = lvae.build_model(lvae.ModelConfig.paper(3))
    torch.manual_seed(0)
    other = lvae.build_model(lvae.ModelConfig.paper(3))
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n
    loaded = lvae.build_model(lvae.ModelConfig.paper(3))
    loaded.load_state_dict(format_1_state_dict(model.state_dict(), True))  # old keys in, same tensors
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(RuntimeError, match="Unexpected key"):
        loaded.load_state_dict({**model.state_dict(), "generative.nothing.weight": torch.zeros(1)})


# ELBO (generator seed 3) and L_50 (chunks of 20, seed 4) of 4 fixed random binary images under the
# committed fp16 weights, computed by the code that trained them (before the blocks)
COMMITTED = {
    "mnist-lvae_bn_wu-5-f75a10fd09": ([-803.855, -736.753, -715.991, -701.649], [-740.191, -698.801, -676.172, -634.035]),
    "mnist-vae_bn_wu-5-c9cd6df346": ([-838.514, -767.052, -764.276, -726.613], [-785.571, -705.148, -691.21, -668.951]),
}


@pytest.mark.parametrize("run", sorted(COMMITTED))
def test_committed_fp16_weights_load_and_give_their_numbers(run):
    path = ROOT / "results" / run
    model_cfg = json.loads((path / "config.json").read_text())["run"]["model"]
    cfg = lvae.ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_cfg.items()})
    state = torch.load(path / "model-fp16.pt", map_location="cpu", weights_only=True)["model"]
    assert any(k.startswith("generative.top_down_mlps.") for k in state)  # lvae_format 1 keys
    model = lvae.build_model(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.eval()
    x = (torch.rand(4, 784, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    elbo = lvae.elbo(model, x, 1.0, True, torch.Generator().manual_seed(3))
    l_k = lvae.iw_bound(model, x, 50, 20, torch.Generator().manual_seed(4))
    want_elbo, want_lk = COMMITTED[run]
    torch.testing.assert_close(elbo, torch.tensor(want_elbo), rtol=0, atol=2e-3)
    torch.testing.assert_close(l_k, torch.tensor(want_lk), rtol=0, atol=2e-3)


# -- latents given instead of drawn -------------------------------------------------------------------
def _tiny(inference):
    torch.manual_seed(0)
    model = lvae.build_model(lvae.ModelConfig(x_dim=12, latent_sizes=(4, 3, 2), hidden_sizes=(8, 8, 8),
                                              inference=inference)).eval()
    return model, (torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) < 0.4).float()


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_given_latents_replay_a_pass_without_drawing(inference):
    model, x = _tiny(inference)
    with torch.no_grad():
        p = model(x, 3, torch.Generator().manual_seed(2))
        g = torch.Generator().manual_seed(7)
        state = g.get_state()
        q = model(x, 3, g, z=p.zs)
    assert torch.equal(g.get_state(), state)  # nothing drawn
    for a, b in zip(p.layers, q.layers):
        assert torch.equal(a.z, b.z) and all(torch.equal(u, v) for u, v in zip(a.q, b.q))
        assert (a.p is b.p is STANDARD_NORMAL) or all(torch.equal(u, v) for u, v in zip(a.p, b.p))
    assert torch.equal(p.log_px, q.log_px)


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_a_given_latent_conditions_the_others(inference):
    model, x = _tiny(inference)
    z2 = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        p = model(x, 4, torch.Generator().manual_seed(2), z={1: z2})
        means = model(x, 1, z={1: z2}, mean=True)
    assert torch.equal(p.layers[1].z, z2.expand(4, 5, 3))
    if inference == "ladder":  # below: q(z_1|z_2, x) given z_2, the same in every sample
        assert torch.allclose(p.layers[0].q.mu, p.layers[0].q.mu[:1].expand_as(p.layers[0].q.mu))
        mu_p, _ = model.layers[1].p(p.layers[2].z)  # above: z_3 drawn first, z_2's prior from it
        assert torch.allclose(p.layers[1].p.mu, mu_p)
    else:  # above: q(z_3|z_2) given z_2
        mu_q, _ = model.layers[2].up(z2)
        assert torch.allclose(p.layers[2].q.mu, mu_q.expand_as(p.layers[2].q.mu))
    for layer in (0, 2):  # mean=True: every other z is the mean of its q
        assert torch.equal(means.layers[layer].z, means.layers[layer].q.mu)
    # ancestral means down from z_2: z_1 = mean of p(z_1|z_2)
    z1 = model.generate(z2, 1, mean=True)[0]
    assert torch.allclose(z1, model.layers[0].p(z2)[0])


def test_given_latents_are_checked():
    model, x = _tiny("ladder")
    with pytest.raises(ValueError, match="layers are 0..2"):
        model(x, 1, z={3: torch.zeros(5, 2)})
    with pytest.raises(ValueError, match=r"layer 1 must be \[B, 3\]"):
        model(x, 1, z={1: torch.zeros(5, 4)})
    with pytest.raises(ValueError, match="one entry"):
        model(x, 1, z=[None, None])


def test_merge_records_and_fused_log_ratio():
    """LVAE records keep the two Gaussians of the merge (eqs 17-18); the evaluation loop's fused
    per-layer term is 2 (log p - log q)."""
    model, x = _tiny("ladder")
    with torch.no_grad():
        p = model(x, 3, torch.Generator().manual_seed(2))
    for layer in p.layers[:-1]:
        assert torch.all(layer.q.var <= torch.minimum(layer.up.var, layer.down.var) + 1e-7)
        assert torch.allclose(1 / layer.q.var, 1 / layer.up.var + 1 / layer.down.var)
    for layer in p.layers:
        torch.testing.assert_close(layer.log_ratio_x2(), 2 * (layer.log_p - layer.log_q))


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_both_blocks_draw_a_layer_sample(inference):
    """Both kinds of block: q(...) -> LayerSample, drawing z_i in the block; a VAE block's q is its
    upward GaussianMLP of z_i-1, an LVAE block's the merge of its upward and top-down Gaussians."""
    model, x = _tiny(inference)
    block = model.layers[1]
    z_before = torch.randn(2, 5, 4 if inference == "bottom_up" else 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        up = model.upward(x)[1] if inference == "ladder" else None
        g = torch.Generator().manual_seed(1)
        sample = block.q(up, z_before, 2, g)
        eps = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
        if inference == "ladder":
            down = block.down(z_before)
            var_q = 1 / (1 / up.var + 1 / down.var)
            torch.testing.assert_close(sample.q.var, var_q)
            torch.testing.assert_close(sample.q.mu, (up.mu / up.var + down.mu / down.var) * var_q)
            assert sample.p is not None and sample.up is up
        else:
            torch.testing.assert_close(sample.q.mu, block.up(z_before).mu)
            assert sample.p is None  # p(z_2|z_3): z_3 is drawn after z_2 (filled in by posterior)
    assert isinstance(block, LadderLayer if inference == "ladder" else BottomUpLayer)
    assert isinstance(sample, LayerSample) and isinstance(sample.q, Normal)
    torch.testing.assert_close(sample.z, sample.q.mu + sample.q.var.sqrt() * eps)  # the block drew it
    p = model(x, 2, torch.Generator().manual_seed(1))
    assert all(s.p is not None for s in p.layers) and p.layers[-1].p is STANDARD_NORMAL


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_kl_units_closed_form_where_q_and_p_share_the_sample_above(inference):
    """The one place that decides the KL's form: closed form for every LVAE layer and the top layer,
    the one-sample estimate log q - log p for the VAE below the top (and without ``analytic``)."""
    from lvae.model.gaussian import kl_normal, kl_standard_normal

    model, x = _tiny(inference)
    with torch.no_grad():
        p = model(x, 2, torch.Generator().manual_seed(1))
    for i, s in enumerate(p.layers):
        sampled = s.q.log_prob(s.z) - s.p.log_prob(s.z)
        assert torch.equal(s.kl_units(False), sampled)
        if i == len(p.layers) - 1:
            want = kl_standard_normal(*s.q)
        elif inference == "ladder":
            want = kl_normal(*s.q, *s.p)
        else:
            want = sampled
        assert torch.equal(s.kl_units(True), want), i


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_public_api_shapes(inference, likelihood):
    cfg = lvae.ModelConfig(x_dim=20, latent_sizes=(6, 4, 2), hidden_sizes=(16, 8, 8), inference=inference,
                           likelihood=likelihood, nonlinearity="tanh" if likelihood == "gaussian" else "leaky_relu")
    model = lvae.build_model(cfg)
    x = torch.rand(5, 20).round() if likelihood == "bernoulli" else torch.rand(5, 20)
    zs, log_q = model.sample_posterior(x, 7)
    assert [tuple(z.shape) for z in zs] == [(7, 5, 6), (7, 5, 4), (7, 5, 2)]
    assert log_q.shape == (7, 5)
    assert model.log_joint(x, [z[0] for z in zs]).shape == (5,)
    assert lvae.elbo(model, x, beta=0.3).shape == (5,)
    model.eval()
    assert lvae.iw_bound(model, x, 10, chunk_size=3).shape == (5,)
    zs_prior, x_mean = model.sample_prior(4)
    assert x_mean.shape == (4, 20) and [z.shape[-1] for z in zs_prior] == [6, 4, 2]


def test_log_joint_agrees_with_the_inference_pass():
    model = lvae.build_model(lvae.ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 8))).eval()
    x = torch.rand(6, 12).round()
    p = model(x, 3)
    assert torch.allclose(model.log_joint(x.expand(3, -1, -1).reshape(18, 12), [z.reshape(18, -1) for z in p.zs]),
                          (p.log_px + p.log_pz).reshape(18), atol=1e-4)


def test_beta_weights_only_the_kl():
    torch.manual_seed(0)
    model = lvae.build_model(lvae.ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 8))).eval()
    x = torch.rand(6, 12).round()
    e0, e1 = (lvae.elbo(model, x, beta=b, generator=torch.Generator().manual_seed(1)) for b in (0.0, 1.0))
    p = model(x, 1, torch.Generator().manual_seed(1))
    assert torch.allclose(e0, p.log_px[0], atol=1e-5)
    kl = sum(k.sum(-1) for k in p.kl_units())[0]
    assert torch.allclose(e1, p.log_px[0] - kl, atol=1e-5) and torch.all(kl >= 0)


def test_same_seed_same_numbers():
    def run():
        torch.manual_seed(3)
        model = lvae.build_model(lvae.ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 8)))
        x = torch.rand(6, 12, generator=torch.Generator().manual_seed(0)).round()
        return lvae.elbo(model, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(run(), run())


@pytest.mark.parametrize("bad,match", [
    ({"latent_sizes": (64, -2)}, "positive"),
    ({"latent_sizes": (64, 32), "hidden_sizes": (512,)}, "one hidden size per"),
    ({"likelihood": "poisson"}, "bernoulli"),
    ({"inference": "top_down"}, "ladder"),
    ({"nonlinearity": "relu6"}, "leaky_relu"),
    ({"x_dim": 0}, "x_dim"),
    ({"latent_sizes": ()}, "empty"),
])
def test_invalid_model_config_is_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        lvae.ModelConfig(**bad)


def test_wrong_shapes_are_refused_with_the_fix():
    model = lvae.build_model(lvae.ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 8)))
    with pytest.raises(ValueError, match=r"\[batch, 12\].*reshape"):
        lvae.elbo(model, torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="bottom to top"):
        model.log_joint(torch.rand(2, 12), [torch.rand(2, 3), torch.rand(2, 4)])
    with pytest.raises(TypeError):
        lvae.build_model({"x_dim": 12})
