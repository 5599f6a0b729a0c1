"""Building blocks: the two-layer MLP ``d(y)`` (eq 10) and the Gaussian head ``mu(y), sigma^2(y)``
(eqs 11-12), both optionally batch-normalised, plus the two observation models p(x|z_1) (eq 3).

Block order with batch norm follows the authors' code: Linear -> BN (normalise, learned scale and
shift) -> nonlinearity. Every module accepts any number of leading dimensions (e.g. ``[K, B, d]``
for K importance samples); batch norm sees them flattened into one batch.
"""
from __future__ import annotations

import contextlib
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


def _no_autocast(t: torch.Tensor):
    """Leave an enclosing bf16 autocast region (the opt-in bf16 training mode); a no-op otherwise."""
    try:
        on = torch.is_autocast_enabled(t.device.type)
    except TypeError:  # torch < 2.4
        on = torch.is_autocast_cpu_enabled() if t.device.type == "cpu" else torch.is_autocast_enabled()
    return torch.autocast(t.device.type, enabled=False) if on else contextlib.nullcontext()


def _full_precision_input(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64) else t


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

    def fast_path(self) -> bool:
        """Under torch.inference_mode with batch norm (if any) in eval mode, outside torch.compile."""
        return (not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
                and (self.bn is None or not self.bn.training))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.fast_path():
            return self._forward_inference(h)
        a = self.linear(h)
        if self.bn is not None:
            lead = a.shape[:-1]
            a = self.bn(a.reshape(-1, a.shape[-1])).reshape(*lead, a.shape[-1])
        return self._activate(a)

    def _forward_inference(self, h: torch.Tensor) -> torch.Tensor:
        """Evaluation fast path (under torch.inference_mode, BN in eval mode): batch norm with
        population statistics is an affine map, folded into the linear layer (one GEMM with its
        bias, no extra pass over the activations); the nonlinearity is applied in place. Same
        math as :meth:`forward` up to floating-point rounding."""
        w, b = self.folded()
        return self.activate_(F.linear(h, w, b))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the affine map Linear -> BN(eval) (population statistics)."""
        w, b = self.linear.weight, self.linear.bias
        if self.bn is not None:
            bn = self.bn
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            w = w * scale[:, None]
            b = bn.bias - bn.running_mean * scale
        return w, b

    def _activate(self, a: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(a, self.leak, inplace=inplace)
        if self.activation == "tanh":
            return a.tanh_() if inplace else torch.tanh(a)
        return a

    def activate_(self, a: torch.Tensor) -> torch.Tensor:
        """The nonlinearity, in place (inference only)."""
        return self._activate(a, inplace=True)


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
        d = _full_precision_input(d)
        with _no_autocast(d):  # bf16 mode: the heads (small GEMMs) and the densities stay fp32
            return self.mu(d), F.softplus(self.var(d)) + self.eps


class BernoulliOutput(nn.Module):
    """P(x|z_1) = B(x | sigmoid(Linear(d))) (eq 3); no batch norm on the output (authors' code)."""

    def __init__(self, d_in: int, x_dim: int, cfg: ModelConfig):
        super().__init__()
        self.logits = nn.Linear(d_in, x_dim)
        glorot_normal_(self.logits, 1.0)

    def params(self, d: torch.Tensor) -> dict[str, torch.Tensor]:
        d = _full_precision_input(d)
        with _no_autocast(d):  # bf16 mode: the output layer stays fp32 (bf16 logits cost ~1 nat)
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
        d = _full_precision_input(d)
        with _no_autocast(d):
            return {"mu": self.mu(d), "var": F.softplus(self.var(d)) + self.eps}

    @staticmethod
    def log_prob(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return log_normal(x, params["mu"], params["var"]).sum(-1)

    @staticmethod
    def mean(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["mu"]


OUTPUTS = {"bernoulli": BernoulliOutput, "gaussian": GaussianOutput}
