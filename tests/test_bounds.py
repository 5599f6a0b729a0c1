"""The bounds against closed forms: a linear-Gaussian model whose log p(x) and log p(x, z) are known
exactly; L_K against log p(x) by quadrature on 1-D latents, its growth with K, chunking and seeds,
L_1 = the sampled ELBO; and the authors' objective against L_K."""
import math

import pytest
import torch
from helpers import small_config

import lvae
from lvae.model.bounds import _log_weights, iw_bound, training_bound
from lvae.model.layers import Dense


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


def _tiny(inference, latent_sizes, batch_norm=False, x_dim=6, seed=0):
    torch.manual_seed(seed)
    cfg = lvae.ModelConfig(x_dim=x_dim, latent_sizes=latent_sizes, hidden_sizes=(8,) * len(latent_sizes),
                           inference=inference, batch_norm=batch_norm)
    model = lvae.build_model(cfg).eval()
    # An over-dispersed proposal (q's variances a constant softplus(3) ~ 3, wider than any
    # posterior here) keeps the importance weights light-tailed, so the Monte-Carlo error of L_K
    # is small and the comparisons below are sharp. The means stay input-dependent.
    for name, module in model.inference.named_modules():
        if name.endswith(".var"):
            torch.nn.init.zeros_(module.linear.weight)
            torch.nn.init.constant_(module.bias, 3.0)
    return model


def _log_px_quadrature(model, x, grid):
    """log p(x) by a Riemann sum over a grid of every (1-D) latent layer."""
    L = len(model.config.latent_sizes)
    mesh = torch.meshgrid(*([grid] * L), indexing="ij")
    pts = [m.reshape(-1, 1) for m in mesh]  # z_1 .. z_L, each [G^L, 1]
    dz = float(grid[1] - grid[0])
    out = []
    for xi in x:
        xb = xi.expand(len(pts[0]), -1)
        with torch.no_grad():
            lj = model.log_joint(xb, pts).double()
        out.append(torch.logsumexp(lj, 0) + L * math.log(dz))
    return torch.stack(out)


@pytest.mark.parametrize("inference,latent_sizes", [("ladder", (1,)), ("bottom_up", (1,)),
                                                    ("ladder", (1, 1)), ("bottom_up", (1, 1))])
@pytest.mark.slow  # log p(x) by quadrature over a grid of every latent, for 4 models
def test_iw_bound_converges_to_exact_log_likelihood(inference, latent_sizes):
    model = _tiny(inference, latent_sizes)
    x = torch.bernoulli(torch.full((3, 6), 0.5), generator=torch.Generator().manual_seed(1))
    grid = torch.linspace(-9, 9, 1801 if len(latent_sizes) == 1 else 361)
    log_px = _log_px_quadrature(model, x, grid)
    g = torch.Generator().manual_seed(2)
    l_k = lvae.iw_bound(model, x, 20_000, chunk_size=4096, generator=g).double()
    elbo = torch.stack([lvae.elbo(model, x, generator=g) for _ in range(2000)]).double().mean(0)
    assert torch.all(elbo < log_px - 0.1), (elbo, log_px)  # the ELBO is a strictly looser bound here
    assert torch.allclose(l_k, log_px, atol=0.03), (l_k, log_px)  # L_K -> log p(x); 0.03 ~ 3 Monte-Carlo SE


def test_iw_bound_is_non_decreasing_in_k_on_average():
    model = _tiny("bottom_up", (2, 2), batch_norm=True, x_dim=10)
    x = torch.bernoulli(torch.full((20, 10), 0.3), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    means = []
    for k in (1, 4, 16, 64, 256):
        means.append(torch.stack([lvae.iw_bound(model, x, k, generator=g) for _ in range(20)]).mean().item())
    assert all(b >= a - 0.02 for a, b in zip(means, means[1:])), means
    assert means[-1] > means[0] + 0.1, means  # and it really gets tighter


def test_iw_bound_chunking_and_seed():
    model = _tiny("ladder", (2,), batch_norm=True)
    x = torch.bernoulli(torch.full((5, 6), 0.5), generator=torch.Generator().manual_seed(0))
    a = lvae.iw_bound(model, x, 5000, chunk_size=300, generator=torch.Generator().manual_seed(7))
    b = lvae.iw_bound(model, x, 5000, chunk_size=300, generator=torch.Generator().manual_seed(7))
    c = lvae.iw_bound(model, x, 5000, chunk_size=None, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)  # deterministic given the seed
    assert torch.allclose(a, c, atol=0.05)  # chunk size only changes Monte-Carlo noise
    assert lvae.iw_bound(model, x, 1).shape == (5,)


def test_iw_bound_with_k1_is_the_sampled_elbo():
    model = _tiny("ladder", (3, 2))
    x = torch.bernoulli(torch.full((4, 6), 0.5), generator=torch.Generator().manual_seed(0))
    a = lvae.iw_bound(model, x, 1, generator=torch.Generator().manual_seed(3))
    b = lvae.elbo(model, x, analytic_kl=False, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-5)


def _generic_iw(model, x, k, chunk, g):
    with torch.no_grad():
        up = model.upward(x)
        parts = [torch.logsumexp(_log_weights(model.forward_from(x, up, min(chunk, k - s), g)), 0)
                 for s in range(0, k, chunk)]
        return torch.logsumexp(torch.stack(parts), 0) - math.log(k)


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_iw_fast_path_matches_generic_path(inference, bn, likelihood):
    torch.manual_seed(0)
    model = lvae.build_model(small_config(inference, bn, likelihood=likelihood))
    x = torch.rand(64, 30)
    if likelihood == "bernoulli":
        x = (x < 0.4).float()
    model.train()
    with torch.no_grad():  # non-trivial batch-norm population statistics
        for _ in range(3):
            model(x, 1, torch.Generator().manual_seed(5))
    model.eval()
    a = _generic_iw(model, x[:10], 37, 8, torch.Generator().manual_seed(1))
    b = iw_bound(model, x[:10], 37, 8, torch.Generator().manual_seed(1))
    torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-4)
    if bn:  # batch norm left in training mode (batch statistics of each chunk): the ordinary layers
        model.train()
        a = _generic_iw(model, x[:10], 37, 8, torch.Generator().manual_seed(1))
        b = iw_bound(model, x[:10], 37, 8, torch.Generator().manual_seed(1))
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-4)
    assert not b.is_inference()
    c = iw_bound(model, x[:10], 37, 37, torch.Generator().manual_seed(1))  # chunking changes only rounding
    assert torch.isfinite(c).all()


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_threaded_iw_equals_sequential(inference):
    """iw_bound_batched with worker threads draws the same noise in the same order and computes each
    batch with the same code: the numbers of one batch after another on one generator, to rounding."""
    from lvae.model.bounds import iw_bound_batched

    torch.manual_seed(0)
    model = lvae.build_model(small_config(inference)).eval()
    x = (torch.rand(23, 30, generator=torch.Generator().manual_seed(2)) < 0.4).float()
    g = torch.Generator().manual_seed(1)
    seq = torch.cat([iw_bound(model, x[s:s + 5], 37, 8, g) for s in range(0, 23, 5)])
    threads = torch.get_num_threads()
    par = iw_bound_batched(model, x, 37, 8, 5, torch.Generator().manual_seed(1), workers=3, rows=16)
    assert torch.get_num_threads() == threads  # restored
    torch.testing.assert_close(par, seq, rtol=1e-5, atol=1e-5)
    one = iw_bound_batched(model, x, 37, 8, 5, torch.Generator().manual_seed(1), workers=1, rows=16)
    torch.testing.assert_close(one, seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, par, rtol=1e-5, atol=1e-5)  # intra-op threads may round differently
