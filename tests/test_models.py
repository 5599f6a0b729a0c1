"""Architecture, shapes and the public API of the models."""
import pytest
import torch

import lvae
from lvae.config import ConfigError


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
    assert [mlp[0].linear.out_features for mlp in m.inference.up_mlps] == [512, 256, 128, 64, 32]
    assert [h.mu.linear.out_features for h in m.inference.up_heads] == [64, 32, 16, 8, 4]
    assert m.inference.up_mlps[1][0].linear.in_features == 64  # upward input = mu_hat (authors' code)


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
