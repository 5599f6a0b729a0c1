"""Variational bounds on log p(x), in nats per example (paper eqs 4-6 and 20).

* :func:`elbo` -- L(x) = E_q[log p(x|z)] - beta * sum_i KL_i            (eq 5 with warm-up, eq 20)
* :func:`iw_bound` -- L_K(x) = E[log 1/K sum_k p(x, z_k) / q(z_k|x)]     (eq 6, IWAE)
* :func:`training_bound` -- the authors' objective: eq-sample mean of iw-sample log-mean-exp of
  log p(x|z_1) + beta * (log p(z) - log q(z|x)); equal to :func:`elbo` when eq = iw = 1.
* :func:`kl_per_unit` -- per-layer, per-unit KL(q||p), the diagnostic of paper Figs 4-5.
"""
from __future__ import annotations

import math

import torch

from .models import HierarchicalVAE, Pass


def _log_mean_exp(a: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(a, dim=dim) - math.log(a.shape[dim])


def _log_weights(p: Pass, beta: float = 1.0) -> torch.Tensor:
    """log p(x|z_1) + beta (log p(z) - log q(z|x)), ``[K, B]``: the sampled form of the bound."""
    return p.log_px + beta * (p.log_pz - p.log_q)


def elbo(model: HierarchicalVAE, x: torch.Tensor, beta: float = 1.0, analytic_kl: bool = True,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """The single-sample evidence lower bound with warm-up weight ``beta`` on the KL terms, ``[B]``.

    With ``analytic_kl`` the KL of each layer is taken in closed form where q and p are both
    Gaussians given the sample above (every LVAE layer, the VAE's top layer) and estimated by
    log q - log p elsewhere; without it every term is the one-sample estimate.
    """
    p = model(x, 1, generator)
    kl = sum(k.sum(-1) for k in p.kl_units(analytic_kl))
    return (p.log_px - beta * kl)[0]


def training_bound(model: HierarchicalVAE, x: torch.Tensor, beta: float = 1.0, eq_samples: int = 1,
                   iw_samples: int = 1, analytic_kl: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The authors' training objective per example ``[B]`` (PROTOCOL.md section 2)."""
    if eq_samples == 1 and iw_samples == 1:
        return elbo(model, x, beta, analytic_kl, generator)
    p = model(x, eq_samples * iw_samples, generator)
    a = _log_weights(p, beta).reshape(eq_samples, iw_samples, -1)
    return _log_mean_exp(a, dim=1).mean(0)


def iw_bound(model: HierarchicalVAE, x: torch.Tensor, k: int, chunk_size: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The importance-weighted bound L_K per example ``[B]`` (eq 6), K = ``k``.

    The deterministic part of inference is computed once; the K samples are drawn in chunks of
    ``chunk_size`` (memory stays bounded) and combined with a running log-sum-exp, so the result
    does not depend on the chunk size beyond floating-point rounding. Deterministic given
    ``generator``. Put the model in ``eval()`` mode first so batch norm uses population statistics.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    chunk = k if chunk_size is None else max(1, min(chunk_size, k))
    with torch.no_grad():
        up = model.upward(x)
        parts = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            parts.append(torch.logsumexp(_log_weights(model.forward_from(x, up, n, generator)), dim=0))
        return torch.logsumexp(torch.stack(parts), dim=0) - math.log(k)


def kl_per_unit(model: HierarchicalVAE, x: torch.Tensor, analytic: bool = True,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per-layer, per-unit KL(q||p) averaged over the batch: a list of ``[d_i]`` (Figs 4-5)."""
    with torch.no_grad():
        return [k.mean(dim=(0, 1)) for k in model(x, 1, generator).kl_units(analytic)]
