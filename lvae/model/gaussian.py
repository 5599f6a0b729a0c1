"""Diagonal-Gaussian and Bernoulli densities, the analytic KL and the precision-weighted merge.

All functions work elementwise and return per-unit values; callers sum over the last dimension.
Variances (``var``) are used throughout, as in the paper's notation (mu, sigma^2). :class:`Normal`
and :class:`StandardNormal` are the same formulas as objects, the two kinds of Gaussian a layer of the
models is judged by (a prior p(z_i|z_i+1) = N(mu_p, var_p), the top prior p(z_L) = N(0, I)).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def log_normal(z: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-unit log N(z | mu, var)."""
    return -0.5 * (LOG_2PI + torch.log(var) + (z - mu) ** 2 / var)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """Per-unit log N(z | 0, 1) (the top prior p(z_L), eq 2)."""
    return -0.5 * (LOG_2PI + z**2)


def kl_normal(mu_q: torch.Tensor, var_q: torch.Tensor, mu_p: torch.Tensor, var_p: torch.Tensor) -> torch.Tensor:
    """Per-unit KL( N(mu_q, var_q) || N(mu_p, var_p) ), in closed form."""
    return 0.5 * (torch.log(var_p) - torch.log(var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1.0)


def kl_standard_normal(mu_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """Per-unit KL( N(mu_q, var_q) || N(0, 1) )."""
    return 0.5 * (var_q + mu_q**2 - 1.0 - torch.log(var_q))


def precision_weighted(mu_hat: torch.Tensor, var_hat: torch.Tensor,
                       mu_p: torch.Tensor, var_p: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The LVAE merge (paper eqs 17-18): the normalised product of two Gaussians.

    var_q = 1 / (var_hat^-1 + var_p^-1),   mu_q = (mu_hat var_hat^-1 + mu_p var_p^-1) var_q.
    (Eq 17 prints sigma_q without the square; the algebra and the authors' code use the variance.)
    """
    prec_hat = 1.0 / var_hat
    prec_p = 1.0 / var_p
    var_q = 1.0 / (prec_hat + prec_p)
    mu_q = (mu_hat * prec_hat + mu_p * prec_p) * var_q
    return mu_q, var_q


class Normal(NamedTuple):
    """N(mu, var) with a diagonal covariance (per-unit mean and variance); a tuple ``(mu, var)``."""

    mu: torch.Tensor
    var: torch.Tensor

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Per-unit log N(z | mu, var)."""
        return log_normal(z, self.mu, self.var)

    def kl_from(self, q: Normal) -> torch.Tensor:
        """Per-unit KL(q || N(mu, var)), in closed form."""
        return kl_normal(q.mu, q.var, self.mu, self.var)

    def log_ratio_x2(self, q: Normal, z: torch.Tensor) -> torch.Tensor:
        """Per-unit 2 (log N(z | mu, var) - log q(z)) without the log 2 pi terms (they cancel), one fused
        expression (the evaluation loop's importance weights)."""
        return _minus_2_log_density(q, z) - torch.log(self.var) - (z - self.mu).square_() / self.var

    def expand(self, k: int) -> Normal:
        """The same Gaussian repeated over a leading sample dimension of size ``k`` (a view)."""
        return Normal(self.mu.expand(k, *self.mu.shape), self.var.expand(k, *self.var.shape))


class StandardNormal:
    """N(0, I) of any shape (the top prior p(z_L), eq 2): the methods of :class:`Normal` with mu = 0 and
    var = 1 written out, so no parameter tensors exist."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return log_standard_normal(z)

    def kl_from(self, q: Normal) -> torch.Tensor:
        return kl_standard_normal(q.mu, q.var)

    def log_ratio_x2(self, q: Normal, z: torch.Tensor) -> torch.Tensor:
        return _minus_2_log_density(q, z) - z.square()


STANDARD_NORMAL = StandardNormal()


def _minus_2_log_density(q: Normal, z: torch.Tensor) -> torch.Tensor:
    """Per-unit -2 log q(z) - log 2 pi = log var + (z - mu)^2 / var."""
    return torch.log(q.var) + (z - q.mu).square_() / q.var


class NoiseReplay:
    """Stands in for a ``torch.Generator`` in :func:`sample_normal`: hands out
    pre-drawn eps tensors in order (under vmap they are one model's slice of the stack)."""

    def __init__(self, eps: Sequence[torch.Tensor]):
        self._eps = list(eps)
        self._i = 0

    def draw(self, shape: torch.Size) -> torch.Tensor:
        if self._i >= len(self._eps):
            raise RuntimeError("NoiseReplay: the model drew more noise tensors than were prepared")
        e = self._eps[self._i]
        self._i += 1
        if tuple(e.shape) != tuple(shape):
            raise RuntimeError(f"NoiseReplay: draw {self._i} has shape {tuple(e.shape)}, the model asked {tuple(shape)}")
        return e


def sample_normal(mu: torch.Tensor, var: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reparameterised sample mu + sqrt(var) * eps (eps from ``generator`` when given)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        # a noise source that replays pre-drawn eps (lvae.training.grid: many models under vmap)
        eps = generator.draw(mu.shape)
    else:
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
    return mu + var.sqrt() * eps


def log_bernoulli_logits(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel log B(x | sigmoid(logits)), computed stably from logits."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
