"""Building blocks: the two-layer MLP ``d(y)`` (eq 10) and the Gaussian head ``mu(y), sigma^2(y)``
(eqs 11-12), both optionally batch-normalised, plus the two observation models p(x|z_1) (eq 3).

Block order with batch norm follows the authors' code: Linear -> BN (normalise, learned scale and
shift) -> nonlinearity. Every module accepts any number of leading dimensions (e.g. ``[K, B, d]``
for K importance samples); batch norm sees them flattened into one batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .gaussian import log_bernoulli_logits, log_normal

RELU_GAIN = math.sqrt(2.0)


def glorot_normal_(linear: nn.Linear, gain: float) -> None:
    """Glorot-normal initialisation (the authors' code), zero bias."""
    std = gain * math.sqrt(2.0 / (linear.in_features + linear.out_features))
    nn.init.normal_(linear.weight, 0.0, std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class Dense(nn.Module):
    """Linear (+ BatchNorm) (+ nonlinearity) on inputs with arbitrary leading dimensions.

    With batch norm, the linear layer has no bias: the BN shift plays that role.
    """

    def __init__(self, d_in: int, d_out: int, batch_norm: bool, activation: str | None, leak: float, gain: float):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=not batch_norm)
        glorot_normal_(self.linear, gain)
        self.bn = nn.BatchNorm1d(d_out) if batch_norm else None
        self.activation = activation
        self.leak = leak

    @property
    def bias(self) -> torch.Tensor:
        """The additive shift of this layer (BN's beta when batch-normalised)."""
        return self.bn.bias if self.bn is not None else self.linear.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.linear(h)
        if self.bn is not None:
            lead = a.shape[:-1]
            a = self.bn(a.reshape(-1, a.shape[-1])).reshape(*lead, a.shape[-1])
        if self.activation == "leaky_relu":
            return F.leaky_relu(a, self.leak)
        if self.activation == "tanh":
            return torch.tanh(a)
        return a


class MLP(nn.Sequential):
    """d(y) = MLP(y): ``n_layers`` dense layers of width ``hidden`` (eq 10)."""

    def __init__(self, d_in: int, hidden: int, cfg: ModelConfig):
        layers = [
            Dense(d_in if i == 0 else hidden, hidden, cfg.batch_norm, cfg.nonlinearity, cfg.leak, RELU_GAIN)
            for i in range(cfg.mlp_layers)
        ]
        super().__init__(*layers)
        self.d_out = hidden


class GaussianHead(nn.Module):
    """mu = Linear(d), var = Softplus(Linear(d)) + eps (eqs 11-12); the heads are batch-normalised
    when the MLPs are (authors' code). The variance head's bias starts at 1.0 (authors' code)."""

    def __init__(self, d_in: int, d_out: int, cfg: ModelConfig):
        super().__init__()
        self.mu = Dense(d_in, d_out, cfg.batch_norm, None, cfg.leak, 1.0)
        self.var = Dense(d_in, d_out, cfg.batch_norm, None, cfg.leak, 1.0)
        nn.init.constant_(self.var.bias, 1.0)
        self.eps = cfg.var_eps

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(d), F.softplus(self.var(d)) + self.eps


class BernoulliOutput(nn.Module):
    """P(x|z_1) = B(x | sigmoid(Linear(d))) (eq 3); no batch norm on the output (authors' code)."""

    def __init__(self, d_in: int, x_dim: int, cfg: ModelConfig):
        super().__init__()
        self.logits = nn.Linear(d_in, x_dim)
        glorot_normal_(self.logits, 1.0)

    def params(self, d: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.logits(d)}

    @staticmethod
    def log_prob(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return log_bernoulli_logits(x, params["logits"]).sum(-1)

    @staticmethod
    def mean(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(params["logits"])


class GaussianOutput(nn.Module):
    """p(x|z_1) = N(x | Linear(d), Softplus(Linear(d)) + eps) (eq 3, NORB); no batch norm."""

    def __init__(self, d_in: int, x_dim: int, cfg: ModelConfig):
        super().__init__()
        self.mu = nn.Linear(d_in, x_dim)
        self.var = nn.Linear(d_in, x_dim)
        glorot_normal_(self.mu, 1.0)
        glorot_normal_(self.var, 1.0)
        nn.init.constant_(self.var.bias, 1.0)
        self.eps = cfg.var_eps

    def params(self, d: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mu": self.mu(d), "var": F.softplus(self.var(d)) + self.eps}

    @staticmethod
    def log_prob(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return log_normal(x, params["mu"], params["var"]).sum(-1)

    @staticmethod
    def mean(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["mu"]


OUTPUTS = {"bernoulli": BernoulliOutput, "gaussian": GaussianOutput}
