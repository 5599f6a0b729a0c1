"""lvae.gaussian against closed forms and Monte Carlo: the analytic KL and the precision-weighted
merge (eqs 17-18)."""
import math

import torch

from lvae.gaussian import kl_normal, kl_standard_normal, log_normal, precision_weighted


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
