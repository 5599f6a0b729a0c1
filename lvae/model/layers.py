"""Building blocks: the two-layer MLP ``d(y)`` (eq 10) and the Gaussian head ``mu(y), sigma^2(y)``
(eqs 11-12), both optionally batch-normalised, the two joined (:class:`GaussianMLP`), and the two
observation models p(x|z_1) (eq 3) with their own MLP of z_1.

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

from lvae.config import ModelConfig
from lvae.model.gaussian import Normal, log_bernoulli_logits, log_normal

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


def workspace_buffer(workspace: dict, key, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A ``[rows, cols]`` tensor kept in ``workspace`` under ``key`` and reused by later calls (grown when
    too small). Fresh CPU tensors this large are mmap-ed and page-faulted on every call (~20% of the
    evaluation's time); on CUDA the caching allocator makes reuse merely harmless."""
    buf = workspace.get(key)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != like.dtype:
        buf = workspace[key] = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    return buf[:rows]


class MLP(nn.Sequential):
    """d(y) = MLP(y): ``n_layers`` dense layers of width ``hidden`` (eq 10)."""

    def __init__(self, d_in: int, hidden: int, cfg: ModelConfig):
        layers = [
            Dense(d_in if i == 0 else hidden, hidden, cfg.batch_norm, cfg.nonlinearity, cfg.leak, RELU_GAIN)
            for i in range(cfg.mlp_layers)
        ]
        super().__init__(*layers)
        self.d_out = hidden

    def forward_into(self, h: torch.Tensor, workspace: dict) -> torch.Tensor:
        """The MLP of 2-D ``h`` with each dense layer's output written into a buffer of ``workspace``
        (:func:`workspace_buffer`), for evaluation loops that call it many times. Under
        torch.inference_mode with batch norm in eval mode each layer is one GEMM with the folded
        batch norm; otherwise (batch norm in training mode) the ordinary layer."""
        for j, dense in enumerate(self):
            if not dense.fast_path():
                h = dense(h)
                continue
            w, b = dense.folded()
            buf = workspace_buffer(workspace, ("mlp", j), h.shape[0], w.shape[0], h)
            h = dense.activate_(torch.addmm(b, h, w.t(), out=buf) if b is not None else torch.mm(h, w.t(), out=buf))
        return h


class GaussianHead(nn.Module):
    """mu = Linear(d), var = Softplus(Linear(d)) + eps (eqs 11-12); the heads are batch-normalised
    when the MLPs are (authors' code). The variance head's bias starts at 1.0 (authors' code)."""

    def __init__(self, d_in: int, d_out: int, cfg: ModelConfig):
        super().__init__()
        self.mu = Dense(d_in, d_out, cfg.batch_norm, None, cfg.leak, 1.0)
        self.var = Dense(d_in, d_out, cfg.batch_norm, None, cfg.leak, 1.0)
        nn.init.constant_(self.var.bias, 1.0)
        self.eps = cfg.var_eps

    def forward(self, d: torch.Tensor) -> Normal:
        d = _full_precision_input(d)
        with _no_autocast(d):  # bf16 mode: the heads (small GEMMs) and the densities stay fp32
            return Normal(self.mu(d), F.softplus(self.var(d)) + self.eps)


class GaussianMLP(nn.Module):
    """y -> N(mu(d), var(d)) with d = MLP(y) (eqs 10-12): a prior p(z_i|z_i+1), a VAE q(z_i|z_i-1),
    the LVAE's upward (mu_hat_i, var_hat_i) or its top-down Gaussian. Takes its two parts built:
    the models create all MLPs before all heads, the order that fixes the random initialisation."""

    def __init__(self, mlp: MLP, head: GaussianHead):
        super().__init__()
        self.mlp = mlp
        self.head = head

    def forward(self, y: torch.Tensor) -> Normal:
        return self.head(self.mlp(y))


class BernoulliLikelihood(nn.Module):
    """p(x|z_1) = B(x | sigmoid(Linear(d(z_1)))) (eq 3); no batch norm on the output layer (authors' code)."""

    def __init__(self, z_dim: int, hidden: int, x_dim: int, cfg: ModelConfig):
        super().__init__()
        self.mlp = MLP(z_dim, hidden, cfg)
        self.logits = nn.Linear(hidden, x_dim)
        glorot_normal_(self.logits, 1.0)

    def params(self, z1: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters of p(x|z_1): ``{"logits": ...}``."""
        return self.head(self.mlp(z1))

    def head(self, d: torch.Tensor) -> dict[str, torch.Tensor]:
        d = _full_precision_input(d)
        with _no_autocast(d):  # bf16 mode: the output layer stays fp32 (bf16 logits cost ~1 nat)
            return {"logits": self.logits(d)}

    @staticmethod
    def log_prob(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return log_bernoulli_logits(x, params["logits"]).sum(-1)

    @staticmethod
    def mean(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(params["logits"])

    def add_log_prob(self, lw: torch.Tensor, x: torch.Tensor, z1: torch.Tensor, workspace: dict) -> torch.Tensor:
        """``lw`` + log p(x|z_1) ``[n, B]`` for ``z1`` ``[n, B, d]`` and ``x`` ``[B, x_dim]``: the
        evaluation loop's form (torch.inference_mode), same math as ``lw + log_prob(x, params(z1))``.
        log p(x|z_1) = x.l - sum softplus(l) with x.l = h.(W^T x) + b.x, so the ``[n, B, x_dim]``
        logits are read once and x is never expanded; the activations and logits go into buffers of
        ``workspace`` reused over the calls (:func:`workspace_buffer`)."""
        n = z1.shape[0]
        h = self.mlp.forward_into(z1.reshape(-1, z1.shape[-1]), workspace)
        w, b = self.logits.weight, self.logits.bias
        logits = torch.addmm(b, h, w.t(), out=workspace_buffer(workspace, "logits", h.shape[0], w.shape[0], h))
        sp = torch.ops.aten.softplus.out(logits, 1, 20, out=logits).sum(-1).view(n, -1)  # in place
        h = h.view(n, -1, h.shape[-1])
        prod = workspace_buffer(workspace, "prod", h.shape[0] * h.shape[1], h.shape[2], h).view(h.shape)
        xl = torch.mul(h, x @ w, out=prod).sum(-1) + x @ b  # sum_j x_j l_j without touching the logits
        return lw + xl - sp


class GaussianLikelihood(nn.Module):
    """p(x|z_1) = N(x | Linear(d(z_1)), Softplus(Linear(d(z_1))) + eps) (eq 3, NORB); no batch norm
    on the output layer."""

    def __init__(self, z_dim: int, hidden: int, x_dim: int, cfg: ModelConfig):
        super().__init__()
        self.mlp = MLP(z_dim, hidden, cfg)
        self.mu = nn.Linear(hidden, x_dim)
        self.var = nn.Linear(hidden, x_dim)
        glorot_normal_(self.mu, 1.0)
        glorot_normal_(self.var, 1.0)
        nn.init.constant_(self.var.bias, 1.0)
        self.eps = cfg.var_eps

    def params(self, z1: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters of p(x|z_1): ``{"mu": ..., "var": ...}``."""
        return self.head(self.mlp(z1))

    def head(self, d: torch.Tensor) -> dict[str, torch.Tensor]:
        d = _full_precision_input(d)
        with _no_autocast(d):
            return {"mu": self.mu(d), "var": F.softplus(self.var(d)) + self.eps}

    @staticmethod
    def log_prob(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return log_normal(x, params["mu"], params["var"]).sum(-1)

    @staticmethod
    def mean(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["mu"]

    def add_log_prob(self, lw: torch.Tensor, x: torch.Tensor, z1: torch.Tensor, workspace: dict) -> torch.Tensor:
        """``lw`` + log p(x|z_1) ``[n, B]`` for ``z1`` ``[n, B, d]``, the MLP's activations in buffers
        of ``workspace`` (see :meth:`BernoulliLikelihood.add_log_prob`)."""
        h = self.mlp.forward_into(z1.reshape(-1, z1.shape[-1]), workspace)
        return lw + self.log_prob(x, self.head(h.view(*z1.shape[:-1], h.shape[-1])))


LIKELIHOODS = {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood}
