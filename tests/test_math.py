"""The bounds and Gaussian algebra against closed forms and numerical quadrature."""
import math

import pytest
import torch

import lvae
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


def test_warmup_beta_schedule():
    assert [lvae.warmup_beta(e, 4) for e in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lvae.warmup_beta(0, 0) == 1.0
    with pytest.raises(ValueError):
        lvae.warmup_beta(-1, 10)


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
@pytest.mark.slow  # a real process, a book build or torch.compile
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
