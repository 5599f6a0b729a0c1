"""The bounds against closed forms: a linear-Gaussian model whose log p(x) and log p(x, z) are known
exactly, and the authors' objective against L_K. (Convergence of L_K on 1-D latents by quadrature,
its growth with K and L_1 = the sampled ELBO are in tests/test_math.py.)"""
import math

import pytest
import torch

import lvae
from lvae.bounds import _log_weights, iw_bound, training_bound
from lvae.layers import Dense


def _linear_gaussian(inference: str, seed: int = 2):
    """A 2-layer model (z_2: 1 unit, z_1: 2 units, x: 3 values) whose generative model is linear-Gaussian:
    every MLP made linear (leak 1) and every generative variance constant (variance weights zero)."""
    torch.manual_seed(seed)
    cfg = lvae.ModelConfig(x_dim=3, latent_sizes=(2, 1), hidden_sizes=(4, 4), inference=inference,
                           likelihood="gaussian", batch_norm=False)
    model = lvae.build_model(cfg).double().eval()
    for module in model.generative.modules():
        if isinstance(module, Dense):
            module.leak = 1.0
    with torch.no_grad():
        for name, module in model.generative.named_modules():
            if name.endswith(".var"):
                weight = module.linear.weight if isinstance(module, Dense) else module.weight
                weight.zero_()
                module.bias.uniform_(-1.0, 0.5)  # variances softplus(bias) + eps, away from 1
            if name.endswith("head.mu"):  # p(z_1|z_2)'s mean: a small slope, so that z_1's prior
                module.linear.weight.mul_(0.2)  # variance stays near 1 (below q's)
        # q = N(0, ~1.3-2.6) whatever x: an over-dispersed proposal around the posterior (the generative
        # biases are 0) keeps the importance weights light-tailed, so L_K's Monte-Carlo error is small
        for name, module in model.inference.named_modules():
            if name.endswith(".var") or name.endswith(".mu"):
                module.linear.weight.zero_()
                module.bias.fill_(2.5 if name.endswith(".var") else 0.0)
    return model


def _affine(f, d_in: int):
    """(A, c) of an affine map f: R^d_in -> R^d_out, from its values at 0 and the unit vectors."""
    c = f(torch.zeros(1, d_in, dtype=torch.float64))[0]
    cols = [f(torch.eye(d_in, dtype=torch.float64)[j:j + 1])[0] - c for j in range(d_in)]
    return torch.stack(cols, 1), c


def _joint_gaussian(model):
    """Mean and covariance of (z_2, z_1, x) under the model, and the x block's slice."""
    prior = model.layers[0].p  # p(z_1|z_2)
    a1, c1 = _affine(lambda z: prior(z)[0], 1)
    d1 = prior(torch.zeros(1, 1, dtype=torch.float64))[1][0]
    lik = model.likelihood
    a0, c0 = _affine(lambda z: lik.params(z)["mu"], 2)
    d0 = lik.params(torch.zeros(1, 2, dtype=torch.float64))["var"][0]
    # (z_2, z_1, x) = M eps + m with eps = (z_2, e_1, e_0) ~ N(0, diag(1, d1, d0))
    m = torch.cat([torch.zeros(1, dtype=torch.float64), c1, a0 @ c1 + c0])
    M = torch.zeros(6, 6, dtype=torch.float64)
    M[0, 0] = 1.0
    M[1:3, 0:1] = a1
    M[1:3, 1:3] = torch.eye(2, dtype=torch.float64)
    M[3:6, 0:1] = a0 @ a1
    M[3:6, 1:3] = a0
    M[3:6, 3:6] = torch.eye(3, dtype=torch.float64)
    cov = M @ torch.diag(torch.cat([torch.ones(1, dtype=torch.float64), d1, d0])) @ M.T
    return m, cov


def _check_linear(model):
    """The test's premise: the generative maps are affine with constant variances."""
    z = torch.randn(5, 1, dtype=torch.float64)
    mu, var = model.layers[0].p(z)
    a1, c1 = _affine(lambda t: model.layers[0].p(t)[0], 1)
    assert torch.allclose(mu, z @ a1.T + c1) and torch.allclose(var, var[:1].expand_as(var))


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_log_joint_is_the_joint_gaussian_density(inference):
    model = _linear_gaussian(inference)
    _check_linear(model)
    m, cov = _joint_gaussian(model)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(7, 6, dtype=torch.float64, generator=g)
    z2, z1, x = v[:, :1], v[:, 1:3], v[:, 3:]
    exact = torch.distributions.MultivariateNormal(m, cov).log_prob(v)
    assert torch.allclose(model.log_joint(x, [z1, z2]), exact, atol=1e-9)


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_iw_bound_reaches_the_exact_log_likelihood(inference):
    """L_1 < L_K <= log p(x) (in expectation) and L_K -> log p(x) for the exact Gaussian marginal."""
    model = _linear_gaussian(inference)
    m, cov = _joint_gaussian(model)
    x = torch.distributions.MultivariateNormal(m[3:], cov[3:, 3:]).sample((6,))
    log_px = torch.distributions.MultivariateNormal(m[3:], cov[3:, 3:]).log_prob(x)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # L_1 = E_q[log w], averaged over 2000 samples
        l1 = _log_weights(model(x, 2000, g)).mean(0)
    l_k = iw_bound(model, x, 20_000, chunk_size=5_000, generator=g)
    assert torch.all(l1 < log_px - 0.05), (l1, log_px)  # q is far from the posterior
    assert torch.allclose(l_k, log_px, atol=0.05), (l_k, log_px)
    assert torch.all(l_k > l1)


def test_authors_objective_with_iw_samples_is_l_k():
    """training_bound(eq_samples=1, iw_samples=K, beta=1) is L_K on the same K samples; with
    eq_samples=K, iw_samples=1 and the sampled KL it is the mean of K single-sample ELBOs."""
    torch.manual_seed(0)
    model = lvae.build_model(lvae.ModelConfig(x_dim=12, latent_sizes=(4, 3), hidden_sizes=(8, 8))).eval()
    x = (torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    k = 16
    with torch.no_grad():
        tb = training_bound(model, x, 1.0, 1, k, generator=torch.Generator().manual_seed(3))
        p = model(x, k, torch.Generator().manual_seed(3))
        eq = training_bound(model, x, 1.0, k, 1, analytic_kl=False, generator=torch.Generator().manual_seed(3))
    lk = iw_bound(model, x, k, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(tb, lk, rtol=1e-5, atol=1e-4)
    log_w = p.log_px + p.log_pz - p.log_q
    torch.testing.assert_close(tb, torch.logsumexp(log_w, 0) - math.log(k))
    torch.testing.assert_close(eq, log_w.mean(0))
