"""lvae.model.gaussian against closed forms, torch.distributions and Monte Carlo: the log-densities, the
analytic KL, the precision-weighted merge (eqs 17-18), the reparameterised sample and the Normal /
StandardNormal objects the models' layers are judged by."""
import math

import pytest
import torch
from torch.distributions import Bernoulli
from torch.distributions import Normal as TorchNormal
from torch.distributions import kl_divergence

from lvae.model.gaussian import (LOG_2PI, STANDARD_NORMAL, NoiseReplay, Normal, kl_normal, kl_standard_normal,
                                 log_bernoulli_logits, log_normal, log_standard_normal, precision_weighted,
                                 sample_normal)


def _gaussians(n=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, generator=g, dtype=dtype) * 2
    var = torch.rand(n, generator=g, dtype=dtype) * 3 + 0.05
    return mu, var


def test_log_normal_is_torch_distributions_and_the_formula():
    mu, var = _gaussians()
    z = torch.linspace(-5, 5, 11, dtype=torch.float64)[:, None]
    got = log_normal(z, mu, var)
    torch.testing.assert_close(got, TorchNormal(mu, var.sqrt()).log_prob(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, -0.5 * math.log(2 * math.pi) - 0.5 * torch.log(var) - (z - mu) ** 2 / (2 * var),
                               rtol=0, atol=1e-12)
    assert LOG_2PI == math.log(2 * math.pi)


def test_log_standard_normal_is_log_normal_at_zero_mean_unit_variance():
    z = torch.linspace(-6, 6, 25, dtype=torch.float64)
    torch.testing.assert_close(log_standard_normal(z), TorchNormal(0.0, 1.0).log_prob(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_standard_normal(z), log_normal(z, torch.zeros_like(z), torch.ones_like(z)))
    at_zero = float(log_standard_normal(torch.tensor(0.0, dtype=torch.float64)))
    assert at_zero == pytest.approx(-0.5 * math.log(2 * math.pi))


def test_analytic_kl_is_the_scalar_formula_and_torch_distributions():
    # KL(N(m1, v1) || N(m2, v2)) = 1/2 [log(v2/v1) + (v1 + (m1 - m2)^2) / v2 - 1]
    mu_q, var_q = _gaussians(seed=1)
    mu_p, var_p = _gaussians(seed=2)
    got = kl_normal(mu_q, var_q, mu_p, var_p)
    for i in range(len(got)):
        m1, v1, m2, v2 = (float(t[i]) for t in (mu_q, var_q, mu_p, var_p))
        assert float(got[i]) == pytest.approx(0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1), rel=1e-12)
    want = kl_divergence(TorchNormal(mu_q, var_q.sqrt()), TorchNormal(mu_p, var_p.sqrt()))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # KL(N(m, v) || N(0, 1)) = 1/2 (v + m^2 - 1 - log v)
    torch.testing.assert_close(kl_standard_normal(mu_q, var_q), 0.5 * (var_q + mu_q**2 - 1 - torch.log(var_q)))
    torch.testing.assert_close(kl_standard_normal(mu_q, var_q),
                               kl_normal(mu_q, var_q, torch.zeros_like(mu_q), torch.ones_like(var_q)))


def test_kl_of_a_gaussian_with_itself_is_zero_and_otherwise_positive():
    mu, var = _gaussians(seed=3)
    assert torch.equal(kl_normal(mu, var, mu, var), torch.zeros_like(mu))
    assert torch.equal(kl_standard_normal(torch.zeros(4), torch.ones(4)), torch.zeros(4))
    mu_p, var_p = _gaussians(seed=4)
    assert torch.all(kl_normal(mu, var, mu_p, var_p) > 0)
    # only the mean differs: (m1 - m2)^2 / (2 v); only the variance: 1/2 (r - 1 - log r), r = v1 / v2
    torch.testing.assert_close(kl_normal(mu + 1.5, var, mu, var), 1.5**2 / (2 * var))
    r = var / var_p
    torch.testing.assert_close(kl_normal(mu, var, mu, var_p), 0.5 * (r - 1 - torch.log(r)))


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_q, var_q = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.5, 2.0, 0.1])
    mu_p, var_p = torch.tensor([0.0, 0.5, 1.5]), torch.tensor([1.0, 0.7, 0.3])
    n = 400_000
    z = mu_q + var_q.sqrt() * torch.randn(n, 3, generator=g)
    terms = (log_normal(z, mu_q, var_q) - log_normal(z, mu_p, var_p)).double()
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(n)
    analytic = kl_normal(mu_q, var_q, mu_p, var_p).double()
    assert torch.all((mc - analytic).abs() < 4 * se + 1e-6), (mc, analytic, se)
    assert torch.allclose(kl_standard_normal(mu_q, var_q), kl_normal(mu_q, var_q, torch.zeros(3), torch.ones(3)))


def test_precision_weighted_merge_is_normalised_product():
    # N(z|a,A) N(z|b,B) = N(a|b, A+B) N(z|mu_q, var_q) for every z: the merge is the product's Gaussian.
    mu_hat, var_hat = torch.tensor([0.5, -2.0]), torch.tensor([0.2, 3.0])
    mu_p, var_p = torch.tensor([1.5, 1.0]), torch.tensor([1.0, 0.5])
    mu_q, var_q = precision_weighted(mu_hat, var_hat, mu_p, var_p)
    z = torch.linspace(-4, 4, 101).unsqueeze(1).double()
    lhs = log_normal(z, mu_hat.double(), var_hat.double()) + log_normal(z, mu_p.double(), var_p.double())
    rhs = log_normal(mu_hat.double(), mu_p.double(), (var_hat + var_p).double()) + log_normal(z, mu_q.double(), var_q.double())
    assert torch.allclose(lhs, rhs, atol=1e-9)
    assert torch.all(var_q < torch.minimum(var_hat, var_p))  # merging always sharpens


def test_precision_weighted_merge_is_the_product_computed_independently():
    """Eqs 17-18 against the product of the two densities normalised numerically on a grid: its mean
    and variance by quadrature, per unit; and the symmetric, equal-variance and flat-limit cases."""
    f64 = dict(dtype=torch.float64)
    mu_hat, var_hat = torch.tensor([0.5, -2.0, 3.0], **f64), torch.tensor([0.2, 3.0, 1.0], **f64)
    mu_t, var_t = torch.tensor([1.5, 1.0, -1.0], **f64), torch.tensor([1.0, 0.5, 4.0], **f64)
    mu_q, var_q = precision_weighted(mu_hat, var_hat, mu_t, var_t)
    z = torch.linspace(-15, 15, 60_001, dtype=torch.float64)[:, None]
    w = torch.exp(TorchNormal(mu_hat, var_hat.sqrt()).log_prob(z) + TorchNormal(mu_t, var_t.sqrt()).log_prob(z))
    w = w / w.sum(0)
    mean = (w * z).sum(0)
    torch.testing.assert_close(mu_q, mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(var_q, (w * (z - mean) ** 2).sum(0), rtol=0, atol=1e-8)
    # symmetric in its two Gaussians; equal variances: the mean is the midpoint, the variance halves
    for a, b in zip((mu_q, var_q), precision_weighted(mu_t, var_t, mu_hat, var_hat)):
        torch.testing.assert_close(a, b)
    m, v = precision_weighted(mu_hat, var_hat, mu_t, var_hat)
    torch.testing.assert_close(m, (mu_hat + mu_t) / 2)
    torch.testing.assert_close(v, var_hat / 2)
    # a (nearly) flat top-down Gaussian leaves the upward one
    m, v = precision_weighted(mu_hat, var_hat, mu_t, torch.full_like(var_t, 1e12))
    torch.testing.assert_close(m, mu_hat)
    torch.testing.assert_close(v, var_hat)


def test_sample_normal_is_mu_plus_sqrt_var_eps_and_replays_noise():
    mu, var = _gaussians(5, seed=5, dtype=torch.float32)
    mu, var = mu.expand(3, 5), var.expand(3, 5)
    z = sample_normal(mu, var, torch.Generator().manual_seed(9))
    eps = torch.randn(3, 5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(z, mu + var.sqrt() * eps)
    assert torch.equal(sample_normal(mu, var, NoiseReplay([eps])), z)
    with pytest.raises(RuntimeError, match="shape"):
        sample_normal(mu, var, NoiseReplay([eps[:1]]))
    # moments over many draws
    big = sample_normal(torch.full((200_000,), 1.5), torch.full((200_000,), 4.0), torch.Generator().manual_seed(1))
    assert abs(float(big.mean()) - 1.5) < 4 * 2 / math.sqrt(200_000)
    assert abs(float(big.var()) - 4.0) < 0.05


def test_log_bernoulli_logits_is_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=g, dtype=torch.float64) * 5
    x = (torch.rand(30, generator=g, dtype=torch.float64) < 0.5).to(torch.float64)
    got = log_bernoulli_logits(x, logits)  # x broadcast to the logits' shape
    torch.testing.assert_close(got, Bernoulli(logits=logits).log_prob(x.expand_as(logits)), rtol=0, atol=1e-12)
    p = torch.sigmoid(logits)
    torch.testing.assert_close(got, x * torch.log(p) + (1 - x) * torch.log1p(-p), rtol=1e-9, atol=1e-9)
    assert torch.all(got <= 0)


def test_normal_and_standard_normal_objects_are_the_formulas():
    mu_q, var_q = _gaussians(seed=6)
    mu_p, var_p = _gaussians(seed=7)
    q, p = Normal(mu_q, var_q), Normal(mu_p, var_p)
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)
    assert tuple(q) == (mu_q, var_q)  # a tuple (mu, var)
    assert torch.equal(p.log_prob(z), log_normal(z, mu_p, var_p))
    assert torch.equal(p.kl_from(q), kl_normal(mu_q, var_q, mu_p, var_p))
    assert torch.equal(STANDARD_NORMAL.log_prob(z), log_standard_normal(z))
    assert torch.equal(STANDARD_NORMAL.kl_from(q), kl_standard_normal(mu_q, var_q))
    # the fused evaluation term: 2 (log p(z) - log q(z)), the log 2 pi terms cancelled
    for prior in (p, STANDARD_NORMAL):
        torch.testing.assert_close(prior.log_ratio_x2(q, z), 2 * (prior.log_prob(z) - q.log_prob(z)))
    k = q.expand(4)
    assert k.mu.shape == (4, 7) and torch.equal(k.var[3], var_q)
