"""The generative model shared by the VAE and the LVAE, and their two inference models.

* :class:`GenerativeModel` -- p(z_L) p(z_L-1|z_L) ... p(z_1|z_2) p(x|z_1)        (paper eqs 1-3)
* :class:`BottomUpInference` -- q(z_1|x) q(z_2|z_1) ... q(z_L|z_L-1)           (VAE, eqs 7-12)
* :class:`LadderInference` -- a deterministic upward pass, then a stochastic downward pass that
  merges the upward Gaussian with a top-down one by precision weighting          (LVAE, eqs 13-19)

Layers are indexed 0..L-1 in code for z_1..z_L in the paper. Tensors of samples carry a leading
sample dimension K: ``z`` is ``[K, B, d]``. The deterministic part of inference (the LVAE's whole
upward pass, the VAE's first MLP) is computed once per input and only the stochastic part is
expanded over the K samples, which is what makes K = 5000 affordable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ModelConfig
from .gaussian import (
    kl_normal,
    kl_standard_normal,
    log_normal,
    log_standard_normal,
    precision_weighted,
    sample_normal,
)
from .layers import MLP, OUTPUTS, GaussianHead


@dataclass
class LayerSample:
    """One stochastic layer of one pass: the sample and both distributions it was judged by."""

    z: torch.Tensor  # [K, B, d]
    mu_q: torch.Tensor
    var_q: torch.Tensor
    mu_p: torch.Tensor | None = None  # None for the top layer: p(z_L) = N(0, I)
    var_p: torch.Tensor | None = None

    @property
    def log_q(self) -> torch.Tensor:  # [K, B]
        return log_normal(self.z, self.mu_q, self.var_q).sum(-1)

    @property
    def log_p(self) -> torch.Tensor:  # [K, B]
        if self.mu_p is None:
            return log_standard_normal(self.z).sum(-1)
        return log_normal(self.z, self.mu_p, self.var_p).sum(-1)

    def kl_units(self, analytic: bool) -> torch.Tensor:
        """Per-unit KL(q || p) ``[K, B, d]``: closed form, or the one-sample estimate log q - log p."""
        if analytic:
            if self.mu_p is None:
                return kl_standard_normal(self.mu_q, self.var_q)
            return kl_normal(self.mu_q, self.var_q, self.mu_p, self.var_p)
        log_p = log_standard_normal(self.z) if self.mu_p is None else log_normal(self.z, self.mu_p, self.var_p)
        return log_normal(self.z, self.mu_q, self.var_q) - log_p


@dataclass
class Pass:
    """Result of inference + generative scoring of a batch with K samples per example."""

    layers: list[LayerSample]  # bottom (z_1) to top (z_L)
    log_px: torch.Tensor  # [K, B] log p(x | z_1)
    px: dict[str, torch.Tensor] = field(default_factory=dict)  # parameters of p(x|z_1)
    analytic_kl_ok: tuple[bool, ...] = ()  # per layer: is the closed-form KL a valid estimator here?

    @property
    def zs(self) -> list[torch.Tensor]:
        return [layer.z for layer in self.layers]

    @property
    def log_q(self) -> torch.Tensor:
        return sum(layer.log_q for layer in self.layers)

    @property
    def log_pz(self) -> torch.Tensor:
        return sum(layer.log_p for layer in self.layers)

    def kl_units(self, analytic: bool = True) -> list[torch.Tensor]:
        """Per-layer, per-unit KL ``[K, B, d_i]``; closed form only where it is valid."""
        return [layer.kl_units(analytic and ok) for layer, ok in zip(self.layers, self.analytic_kl_ok)]


class GenerativeModel(nn.Module):
    """p(x, z) = p(x|z_1) prod_i p(z_i|z_i+1) p(z_L) (eqs 1-3). The MLP out of z_i has width
    ``hidden_sizes[i-1]`` (mirroring the encoder), as in the authors' VAE code."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L, lat, hid = cfg.n_layers, cfg.latent_sizes, cfg.hidden_sizes
        self.latent_sizes = tuple(lat)
        # top_down[i]: z_{i+2} -> p(z_{i+1}) in paper indexing, i = 0..L-2
        self.top_down_mlps = nn.ModuleList(MLP(lat[i + 1], hid[i + 1], cfg) for i in range(L - 1))
        self.top_down_heads = nn.ModuleList(GaussianHead(hid[i + 1], lat[i], cfg) for i in range(L - 1))
        self.output_mlp = MLP(lat[0], hid[0], cfg)
        self.output = OUTPUTS[cfg.likelihood](hid[0], cfg.x_dim, cfg)

    def prior(self, i: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu_p, var_p of p(z_i | z_i+1) for code layer ``i`` < L-1 (eq 2)."""
        return self.top_down_heads[i](self.top_down_mlps[i](z_above))

    def px_params(self, z1: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.output.params(self.output_mlp(z1))

    def log_px(self, x: torch.Tensor, z1: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        params = self.px_params(z1)
        return self.output.log_prob(x, params), params

    def log_joint(self, x: torch.Tensor, zs: list[torch.Tensor]) -> torch.Tensor:
        """log p(x, z_1..z_L), summed over units; ``zs`` bottom to top, any leading dims."""
        log_p = log_standard_normal(zs[-1]).sum(-1)
        for i in range(len(zs) - 1):
            mu_p, var_p = self.prior(i, zs[i + 1])
            log_p = log_p + log_normal(zs[i], mu_p, var_p).sum(-1)
        return log_p + self.log_px(x, zs[0])[0]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, top: torch.Tensor | None = None):
        """Ancestral samples: returns (zs bottom-to-top, mean of p(x|z_1)) (paper Figs 9-10)."""
        dev = next(self.parameters()).device
        z = torch.randn(n, self.latent_sizes[-1], device=dev, generator=generator) if top is None else top
        zs = [z]
        for i in reversed(range(len(self.latent_sizes) - 1)):
            mu_p, var_p = self.prior(i, zs[0])
            zs.insert(0, sample_normal(mu_p, var_p, generator))
        return zs, self.output.mean(self.px_params(zs[0]))


class BottomUpInference(nn.Module):
    """VAE inference (eqs 7-12): q(z_1|x) = N(mu(x), var(x)), q(z_i|z_i-1) = N(mu(z_i-1), var(z_i-1))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        lat, hid = cfg.latent_sizes, cfg.hidden_sizes
        d_in = [cfg.x_dim, *lat[:-1]]
        self.mlps = nn.ModuleList(MLP(d_in[i], hid[i], cfg) for i in range(cfg.n_layers))
        self.heads = nn.ModuleList(GaussianHead(hid[i], lat[i], cfg) for i in range(cfg.n_layers))

    def upward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic part: q(z_1|x) depends on x alone."""
        return self.heads[0](self.mlps[0](x))

    def downward(self, up, k: int, gen: GenerativeModel, generator=None) -> tuple[list[LayerSample], tuple[bool, ...]]:
        mu_q, var_q = (t.expand(k, *t.shape) for t in up)
        layers = [LayerSample(sample_normal(mu_q, var_q, generator), mu_q, var_q)]
        for i in range(1, len(self.mlps)):  # bottom-up sampling: z_i ~ q(z_i | z_i-1)
            mu_q, var_q = self.heads[i](self.mlps[i](layers[-1].z))
            layers.append(LayerSample(sample_normal(mu_q, var_q, generator), mu_q, var_q))
        for i in range(len(layers) - 1):  # generative priors p(z_i | z_i+1), given the samples above
            layers[i].mu_p, layers[i].var_p = gen.prior(i, layers[i + 1].z)
        # Only the top layer's KL is analytic: below, z_i+1 itself depends on z_i.
        return layers, tuple(i == len(layers) - 1 for i in range(len(layers)))


class LadderInference(nn.Module):
    """LVAE inference (eqs 13-19).

    Upward: d_i = MLP(input_i), mu_hat_i = Linear(d_i), var_hat_i = Softplus(Linear(d_i)), with
    input_1 = x and input_i = mu_hat_i-1 (``up_input="mu"``, authors' code) or d_i-1 (paper).
    Downward: q(z_L|x) = N(mu_hat_L, var_hat_L); for i = L-1..1 a top-down Gaussian from z_i+1 is
    merged with (mu_hat_i, var_hat_i) by precision weighting. The top-down Gaussian is the
    generative p(z_i|z_i+1) (``share_top_down=True``, paper text) or a separate inference MLP of
    the same shape (authors' code, default); the KL is always against the generative prior.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L, lat, hid = cfg.n_layers, cfg.latent_sizes, cfg.hidden_sizes
        d_in = [cfg.x_dim] + [lat[i - 1] if cfg.up_input == "mu" else hid[i - 1] for i in range(1, L)]
        self.up_input = cfg.up_input
        self.up_mlps = nn.ModuleList(MLP(d_in[i], hid[i], cfg) for i in range(L))
        self.up_heads = nn.ModuleList(GaussianHead(hid[i], lat[i], cfg) for i in range(L))
        self.share_top_down = cfg.share_top_down
        if not cfg.share_top_down:
            self.down_mlps = nn.ModuleList(MLP(lat[i + 1], hid[i + 1], cfg) for i in range(L - 1))
            self.down_heads = nn.ModuleList(GaussianHead(hid[i + 1], lat[i], cfg) for i in range(L - 1))

    def upward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The deterministic bottom-up pass: [(mu_hat_i, var_hat_i)] for i = 1..L (eqs 13-15)."""
        h, out = x, []
        for mlp, head in zip(self.up_mlps, self.up_heads):
            d = mlp(h)
            mu_hat, var_hat = head(d)
            out.append((mu_hat, var_hat))
            h = mu_hat if self.up_input == "mu" else d
        return out

    def top_down(self, i: int, z_above: torch.Tensor, gen: GenerativeModel):
        if self.share_top_down:
            return gen.prior(i, z_above)
        return self.down_heads[i](self.down_mlps[i](z_above))

    def downward(self, up, k: int, gen: GenerativeModel, generator=None) -> tuple[list[LayerSample], tuple[bool, ...]]:
        L = len(up)
        mu_q, var_q = (t.expand(k, *t.shape) for t in up[-1])
        layers = [LayerSample(sample_normal(mu_q, var_q, generator), mu_q, var_q)]
        for i in reversed(range(L - 1)):  # stochastic downward pass, eqs 16-19
            z_above = layers[0].z
            mu_p, var_p = gen.prior(i, z_above)
            mu_t, var_t = (mu_p, var_p) if self.share_top_down else self.top_down(i, z_above, gen)
            mu_hat, var_hat = up[i]
            mu_q, var_q = precision_weighted(mu_hat, var_hat, mu_t, var_t)
            layers.insert(0, LayerSample(sample_normal(mu_q, var_q, generator), mu_q, var_q, mu_p, var_p))
        # q(z_i|z_i+1, x) and p(z_i|z_i+1) share their conditioning sample: every KL is analytic.
        return layers, (True,) * L


class HierarchicalVAE(nn.Module):
    """A VAE or an LVAE: one :class:`GenerativeModel` and one inference model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.generative = GenerativeModel(cfg)
        self.inference = LadderInference(cfg) if cfg.inference == "ladder" else BottomUpInference(cfg)

    # -- input checks -------------------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != self.config.x_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"x must be a float tensor of shape [batch, {self.config.x_dim}], got {shape}; "
                f"flatten images with x.reshape(len(x), -1)"
            )
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model computes in {dtype}; "
                            f"convert it with x.to({dtype}) (pixel values in [0, 1])")

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse what no bound is defined for: a wrong shape or dtype, NaN/inf, and for the
        Bernoulli likelihood values outside [0, 1] (pixel intensities; the Gaussian likelihood
        takes any finite value). One host sync: the public entry points (:mod:`lvae.bounds`,
        :meth:`log_joint`, :meth:`sample_posterior`) call it, the training loop does not."""
        self._check_x(x)
        if not x.numel():
            return
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            raise ValueError(f"x contains {int((~finite).sum())} NaN or infinite value(s); clean the data first, "
                             f"e.g. drop those images or x.nan_to_num()")
        if self.config.likelihood == "bernoulli":
            lo, hi = (float(v) for v in torch.aminmax(x))
            if lo < 0 or hi > 1:
                raise ValueError(f"x must hold pixel values in [0, 1] for the Bernoulli likelihood, got values in "
                                 f"[{lo:g}, {hi:g}]; scale the images to [0, 1], e.g. x / 255")

    def _check_zs(self, x: torch.Tensor, zs: list[torch.Tensor]) -> None:
        sizes = self.config.latent_sizes
        got = [tuple(z.shape) for z in zs]
        if len(zs) != len(sizes) or any(z.shape[-1] != d for z, d in zip(zs, sizes)):
            raise ValueError(f"zs must be {len(sizes)} tensors [.., d_i] with d_i = {list(sizes)} (bottom to top), got {got}")
        if any(z.shape[:-1] != x.shape[:-1] for z in zs):
            raise ValueError(f"zs must have x's batch shape {tuple(x.shape[:-1])} before the last dimension, got {got}; "
                             f"for K samples per example flatten [K, B, d] to [K*B, d] and repeat x K times")

    # -- passes -------------------------------------------------------------------------------------
    def upward(self, x: torch.Tensor):
        """The deterministic part of inference, computed once per input (reuse it over K chunks)."""
        self._check_x(x)
        return self.inference.upward(x)

    def forward_from(self, x: torch.Tensor, up, k: int = 1, generator: torch.Generator | None = None) -> Pass:
        layers, ok = self.inference.downward(up, k, self.generative, generator)
        log_px, px = self.generative.log_px(x, layers[0].z)
        return Pass(layers, log_px, px, ok)

    def forward(self, x: torch.Tensor, k: int = 1, generator: torch.Generator | None = None) -> Pass:
        """Infer K posterior samples per example and score them under the generative model."""
        return self.forward_from(x, self.upward(x), k, generator)

    # -- public API ---------------------------------------------------------------------------------
    def log_joint(self, x: torch.Tensor, zs: list[torch.Tensor]) -> torch.Tensor:
        """log p(x, z_1..z_L) per example, ``zs`` bottom (z_1) to top (z_L), each ``[B, d_i]``."""
        self.check_input(x)
        self._check_zs(x, zs)
        return self.generative.log_joint(x, zs)

    def sample_posterior(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None):
        """(zs, log_q): ``zs`` a list of ``[k, B, d_i]`` bottom to top, ``log_q`` ``[k, B]``."""
        self.check_input(x)
        p = self.forward(x, k, generator)
        return p.zs, p.log_q

    def sample_prior(self, n: int, generator: torch.Generator | None = None):
        return self.generative.sample(n, generator)


def noise_shapes(model_cfg: ModelConfig, k: int, batch: int) -> list[tuple[int, int, int]]:
    """Shapes of the eps tensors one pass with ``k`` samples per example draws, in drawing order
    (the LVAE samples top-down, the VAE bottom-up); for replaying them with ``NoiseReplay``."""
    lat = list(model_cfg.latent_sizes)
    order = list(reversed(lat)) if model_cfg.inference == "ladder" else lat
    return [(k, batch, d) for d in order]


def draw_noise(model_cfg: ModelConfig, k: int, batch: int, generator: torch.Generator | None,
               device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The eps tensors a pass with ``k`` samples per example would draw from ``generator``, drawn
    now, in the same order and shapes (:func:`noise_shapes`)."""
    return [torch.randn(shape, dtype=dtype, device=device, generator=generator)
            for shape in noise_shapes(model_cfg, k, batch)]


def build_model(config: ModelConfig) -> HierarchicalVAE:
    """The VAE (``inference="bottom_up"``) or LVAE (``"ladder"``) described by ``config``."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model takes an lvae.ModelConfig, got {type(config).__name__}")
    return HierarchicalVAE(config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
