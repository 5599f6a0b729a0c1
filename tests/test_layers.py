"""lvae.model.layers: the MLP d(y) (eq 10), the Gaussian heads (eqs 11-12; var = softplus + eps), the
likelihoods p(x|z_1) (eq 3) against torch.distributions, and the inference-mode fast paths."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import small_config
from torch.distributions import Bernoulli
from torch.distributions import Normal as TorchNormal

import lvae
from lvae.config import ModelConfig
from lvae.model.gaussian import Normal
from lvae.model.layers import (MLP, BernoulliLikelihood, Dense, GaussianHead, GaussianLikelihood, GaussianMLP,
                               glorot_normal_)


def _cfg(**kw):
    return ModelConfig(x_dim=30, latent_sizes=(8, 4), hidden_sizes=(20, 12), **kw)


def test_inference_mode_dense_matches_forward():
    torch.manual_seed(0)
    model = lvae.build_model(small_config())
    x = (torch.rand(40, 30) < 0.4).float()
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        a = model.upward(x)
    with torch.inference_mode():
        b = model.upward(x)
    for (ma, va), (mb, vb) in zip(a, b):
        torch.testing.assert_close(mb, ma, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nonlinearity", ["leaky_relu", "tanh"])
def test_mlp_is_the_composition_of_its_dense_layers(nonlinearity):
    """d(y) = f(W_2 f(W_1 y + b_1) + b_2) without batch norm (eq 10), leaky ReLU max(a, leak a) or tanh,
    for any leading dimensions."""
    cfg = _cfg(batch_norm=False, nonlinearity=nonlinearity, leak=0.1)
    torch.manual_seed(0)
    mlp = MLP(7, 20, cfg)
    y = torch.randn(3, 5, 7)
    f = (lambda a: torch.maximum(a, 0.1 * a)) if nonlinearity == "leaky_relu" else torch.tanh
    h = y
    for dense in mlp:
        h = f(h @ dense.linear.weight.T + dense.linear.bias)
    d = mlp(y)
    assert d.shape == (3, 5, 20) and len(mlp) == cfg.mlp_layers and mlp.d_out == 20
    torch.testing.assert_close(d, h)


def test_batch_normalised_dense_is_linear_bn_nonlinearity():
    """Linear (no bias) -> BN over every leading dimension flattened -> leaky ReLU (authors' order);
    in eval mode with population statistics the folded affine map gives the same."""
    torch.manual_seed(0)
    dense = Dense(6, 4, batch_norm=True, activation="leaky_relu", leak=0.1, gain=1.0)
    assert dense.linear.bias is None and dense.bias is dense.bn.bias
    y = torch.randn(2, 50, 6)
    a = (y @ dense.linear.weight.T).reshape(-1, 4)
    normed = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + dense.bn.eps)
    torch.testing.assert_close(dense(y), F.leaky_relu(normed, 0.1).reshape(2, 50, 4), rtol=1e-5, atol=1e-5)
    dense.eval()
    with torch.no_grad():
        slow = dense(y)
    with torch.inference_mode():
        fast = dense(y)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_gaussian_head_mean_is_linear_and_variance_softplus_plus_eps(batch_norm):
    """mu = Linear(d), var = Softplus(Linear(d)) + eps (eqs 11-12): shapes, var >= eps > 0 even where the
    linear part is very negative, and the variance bias starts at 1."""
    cfg = _cfg(batch_norm=batch_norm, var_eps=1e-3)
    torch.manual_seed(0)
    head = GaussianHead(20, 8, cfg).eval()
    assert torch.all(head.var.bias == 1.0)
    d = torch.randn(3, 5, 20) * 30  # large activations: the variance's linear part reaches far below 0
    out = head(d)
    assert isinstance(out, Normal) and out.mu.shape == out.var.shape == (3, 5, 8)
    torch.testing.assert_close(out.mu, head.mu(d))
    torch.testing.assert_close(out.var, F.softplus(head.var(d)) + 1e-3)
    assert torch.all(out.var >= 1e-3) and torch.all(torch.isfinite(out.var))
    # softplus(a) = log(1 + e^a): at a bias of 1 and no input the variance is log(1 + e) + eps
    if not batch_norm:
        zero = head(torch.zeros(1, 20))
        torch.testing.assert_close(zero.var, torch.full((1, 8), math.log1p(math.e) + 1e-3))
        torch.testing.assert_close(zero.mu, torch.zeros(1, 8))


def test_gaussian_mlp_is_head_of_mlp():
    cfg = _cfg(batch_norm=False)
    torch.manual_seed(0)
    gm = GaussianMLP(MLP(4, 12, cfg), GaussianHead(12, 8, cfg))
    y = torch.randn(6, 4)
    mu, var = gm(y)
    want = gm.head(gm.mlp(y))
    assert torch.equal(mu, want.mu) and torch.equal(var, want.var) and mu.shape == (6, 8)


def test_glorot_normal_has_the_glorot_standard_deviation_and_zero_bias():
    torch.manual_seed(0)
    lin = torch.nn.Linear(400, 300)
    glorot_normal_(lin, math.sqrt(2.0))
    std = math.sqrt(2.0) * math.sqrt(2.0 / 700)
    assert abs(float(lin.weight.detach().std()) / std - 1) < 0.02 and torch.all(lin.bias == 0)


def test_bernoulli_likelihood_is_torch_distributions():
    cfg = _cfg(batch_norm=False)
    torch.manual_seed(0)
    lik = BernoulliLikelihood(8, 20, 30, cfg).double()
    z1 = torch.randn(3, 5, 8, dtype=torch.float64)
    x = (torch.rand(5, 30, dtype=torch.float64) < 0.4).double()
    params = lik.params(z1)
    want = Bernoulli(logits=params["logits"]).log_prob(x.expand(3, 5, 30)).sum(-1)
    torch.testing.assert_close(lik.log_prob(x, params), want, rtol=0, atol=1e-10)
    torch.testing.assert_close(lik.mean(params), torch.sigmoid(params["logits"]))
    with torch.inference_mode():  # the evaluation loop's form, x never expanded
        fast = lik.add_log_prob(torch.zeros(3, 5, dtype=torch.float64), x, z1, {})
    torch.testing.assert_close(fast, want, rtol=1e-10, atol=1e-9)


def test_gaussian_likelihood_is_torch_distributions():
    cfg = _cfg(batch_norm=False, var_eps=1e-4)
    torch.manual_seed(0)
    lik = GaussianLikelihood(8, 20, 30, cfg).double()
    z1 = torch.randn(3, 5, 8, dtype=torch.float64)
    x = torch.randn(5, 30, dtype=torch.float64)
    params = lik.params(z1)
    assert torch.all(params["var"] >= 1e-4)
    torch.testing.assert_close(params["var"], F.softplus(lik.var(lik.mlp(z1))) + 1e-4)
    want = TorchNormal(params["mu"], params["var"].sqrt()).log_prob(x).sum(-1)
    torch.testing.assert_close(lik.log_prob(x, params), want, rtol=0, atol=1e-10)
    assert torch.equal(lik.mean(params), params["mu"])
    with torch.inference_mode():
        fast = lik.add_log_prob(torch.zeros(3, 5, dtype=torch.float64), x, z1, {})
    torch.testing.assert_close(fast, want, rtol=1e-10, atol=1e-9)
