"""The VAE and the LVAE as a stack of stochastic layers: one block per latent variable z_i.

Each block (:class:`StochasticLayer`) owns what the paper attaches to its z_i:

* the prior p(z_i|z_i+1) = N(mu_p, var_p), a :class:`~lvae.model.layers.GaussianMLP` of z_i+1 (eq 2); the
  top block's is :class:`StandardNormalPrior`, p(z_L) = N(0, I);
* VAE (:class:`BottomUpLayer`): q(z_i|z_i-1) = N(mu_q, var_q), a GaussianMLP of z_i-1, z_0 = x (eqs 7-12);
* LVAE (:class:`LadderLayer`): the deterministic upward Gaussian (mu_hat_i, var_hat_i) (eqs 13-15), the
  top-down Gaussian from z_i+1 and their precision-weighted merge q(z_i|z_i+1, x) (eqs 16-19);

and both kinds of block draw their z_i the same way: ``q(...) -> LayerSample``, the sample with the
Gaussians it was drawn from and is judged by; :meth:`LayerSample.kl_units` is the one place that takes
the KL(q || p) and decides whether its closed form applies.

The likelihood p(x|z_1) (eq 3) is :mod:`lvae.model.layers`' ``LIKELIHOODS``. :class:`HierarchicalVAE` runs
the blocks in plain loops: :meth:`~HierarchicalVAE.upward` (the deterministic part of inference,
once per input), :meth:`~HierarchicalVAE.posterior` (the stochastic part: each block draws its z_i,
top-down for the LVAE, bottom-up for the VAE; any layer's z can be given instead of drawn) and
:meth:`~HierarchicalVAE.generate` (ancestral sampling, eqs 1-2, from any layer down).

Layers are indexed 0..L-1 in code for z_1..z_L in the paper. Tensors of samples carry a leading
sample dimension K: ``z`` is ``[K, B, d]``. Only the stochastic part of inference is expanded over
the K samples, which is what makes K = 5000 affordable.

Weights and checkpoints written before the blocks (``lvae_format`` 1) grouped the modules by role:
:meth:`HierarchicalVAE.load_state_dict` renames their keys and the parameters are listed in that
format's order (:mod:`lvae.model.checkpoint_format`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from lvae.config import ModelConfig
from lvae.model.blocks import BottomUpLayer, LadderLayer, LayerSample, StandardNormalPrior, gaussian_mlps
from lvae.model.checkpoint_format import format_1_rank, key_pairs, upgrade_state_dict
from lvae.model.layers import LIKELIHOODS

# latents to condition on: {layer: z} or one entry (or None) per layer, 0 = z_1
Latents = Mapping[int, Tensor] | Sequence[Tensor | None] | None


@dataclass
class Pass:
    """Result of inference + generative scoring of a batch with K samples per example."""

    layers: list[LayerSample]  # bottom (z_1) to top (z_L)
    log_px: Tensor  # [K, B] log p(x | z_1)
    px: dict[str, Tensor] = field(default_factory=dict)  # parameters of p(x|z_1)

    @property
    def zs(self) -> list[Tensor]:
        return [layer.z for layer in self.layers]

    @property
    def log_q(self) -> Tensor:
        return sum(layer.log_q for layer in self.layers)

    @property
    def log_pz(self) -> Tensor:
        return sum(layer.log_p for layer in self.layers)

    def kl_units(self, analytic: bool = True) -> list[Tensor]:
        """Per-layer, per-unit KL ``[K, B, d_i]`` (:meth:`LayerSample.kl_units`)."""
        return [layer.kl_units(analytic) for layer in self.layers]


# -- the model ----------------------------------------------------------------------------------------
class HierarchicalVAE(nn.Module):
    """A VAE or an LVAE: ``layers`` (one :class:`StochasticLayer` per z_i, bottom to top) and the
    ``likelihood`` p(x|z_1). p(x, z) = p(x|z_1) prod_i p(z_i|z_i+1) p(z_L) (eqs 1-3) is the same
    for both; the inference differs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        L, lat, hid = cfg.n_layers, list(cfg.latent_sizes), list(cfg.hidden_sizes)
        ladder = cfg.inference == "ladder"
        # created in lvae_format 1's order (priors, likelihood, upward, top-down): a seed gives the
        # same initial weights as before the blocks
        priors = gaussian_mlps(lat[1:], hid[1:], lat[:-1], cfg)
        likelihood = LIKELIHOODS[cfg.likelihood](lat[0], hid[0], cfg.x_dim, cfg)
        if ladder:
            d_in = [cfg.x_dim] + [lat[i - 1] if cfg.up_input == "mu" else hid[i - 1] for i in range(1, L)]
        else:
            d_in = [cfg.x_dim, *lat[:-1]]
        ups = gaussian_mlps(d_in, hid, lat, cfg)
        downs = gaussian_mlps(lat[1:], hid[1:], lat[:-1], cfg) if ladder and not cfg.share_top_down else []
        priors, downs = priors + [StandardNormalPrior()], downs + [None] * (L - len(downs))
        if ladder:
            layers = [LadderLayer(priors[i], ups[i], downs[i], cfg.up_input) for i in range(L)]
        else:
            layers = [BottomUpLayer(priors[i], ups[i]) for i in range(L)]
        self.layers = nn.ModuleList(layers)
        self.likelihood = likelihood
        self._format_1 = key_pairs(ladder, to_format_1=True)

    @property
    def ladder(self) -> bool:
        return self.config.inference == "ladder"

    @property
    def generative(self) -> nn.ModuleList:
        """The generative model's modules (the priors and the likelihood), for inspection."""
        return nn.ModuleList([*(layer.prior for layer in self.layers), self.likelihood])

    @property
    def inference(self) -> nn.ModuleList:
        """The inference model's modules (upward, and the LVAE's own top-down ones), for inspection."""
        return nn.ModuleList(m for layer in self.layers for m in (layer.up, getattr(layer, "down", None))
                             if m is not None)

    # -- state: lvae_format 1 keys and parameter order ------------------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, nn.Parameter]]:
        """As ``nn.Module``'s, in lvae_format 1's order: role by role (priors' MLPs, priors' heads,
        likelihood, upward MLPs, upward heads, top-down MLPs, top-down heads), then layer by layer.
        ``parameters()`` follows it: checkpoints' optimizer states are by position, and the gradient
        norm of the clipping sums the per-tensor norms in this order."""
        named = list(super().named_parameters(prefix, recurse, remove_duplicate))
        if not recurse:
            return iter(named)

        def rank(item):
            return format_1_rank(item[0][len(prefix) + 1 if prefix else 0:], self._format_1)
        return iter(sorted(named, key=rank))  # stable: within a module, its own order

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; also reads lvae_format 1's keys (:func:`upgrade_state_dict`)."""
        return super().load_state_dict(upgrade_state_dict(state_dict, self.ladder), strict=strict, assign=assign)

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
        takes any finite value). One host sync: the public entry points (:mod:`lvae.model.bounds`,
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
    def upward(self, x: Tensor):
        """The deterministic part of inference, computed once per input (reuse it over K chunks):
        LVAE, [N(mu_hat_i, var_hat_i)] for i = 1..L (eqs 13-15); VAE, N(mu, var) = q(z_1|x)."""
        self._check_x(x)
        if not self.ladder:
            return self.layers[0].up(x)
        h, up = x, []
        for layer in self.layers:
            h, gaussian = layer.upward(h)
            up.append(gaussian)
        return up

    def posterior(self, up, k: int = 1,
                  generator: torch.Generator | None = None,
                  z: Latents = None,
                  mean: bool = False) -> list[LayerSample]:
        """The stochastic part of inference from :meth:`upward`'s ``up``: ``k`` samples of every z_i
        (``[k, B, d_i]``) with q and p of each, bottom to top. Each block draws its z_i from q given
        the z drawn just before: the LVAE top-down, z_i ~ q(z_i|z_i+1, x) (eqs 16-19), the VAE
        bottom-up, z_i ~ q(z_i|z_i-1) (eqs 7-12).

        ``z``: latents to condition on instead of drawing them, ``{layer: z}`` or a list with one
        entry (or None) per layer, 0 = z_1; each ``[B, d_i]`` or ``[k, B, d_i]``. The layers they
        condition are computed from them; no noise is drawn for them. ``mean``: every other z_i is
        the mean of its q instead of a sample (no noise drawn at all).
        """
        given, L = self._given(z), len(self.layers)
        order = reversed(range(L)) if self.ladder else range(L)
        # the VAE's only deterministic part is that of q(z_1|x)
        ups = up if self.ladder else [up] + [None] * (L - 1)
        samples: list[LayerSample | None] = [None] * L
        # the z drawn just before: z_i+1 (LVAE), z_i-1 (VAE); none at first
        z_before = None
        for i in order:
            layer = self.layers[i]
            samples[i] = layer.q(ups[i], z_before, k, generator, given[i], mean)
            z_before = samples[i].z
        # The VAE's p(z_i|z_i+1) conditions on a z_i+1 drawn after z_i: it is
        # evaluated once every z is drawn, bottom to top (the order the
        # training steps' rounding depends on). The LVAE's blocks evaluated
        # theirs before drawing, for the merge.
        for i, sample in enumerate(samples):
            if sample.p is None:
                z_above = samples[i + 1].z if i + 1 < L else None
                sample.p = self.layers[i].p(z_above)
        return samples

    def forward_from(self, x: Tensor, up, k: int = 1, generator: torch.Generator | None = None,
                     z: Latents = None, mean: bool = False) -> Pass:
        """:meth:`posterior` from ``up`` = ``upward(x)``, scored under p(x|z_1)."""
        samples = self.posterior(up, k, generator, z, mean)
        px = self.likelihood.params(samples[0].z)
        return Pass(samples, self.likelihood.log_prob(x, px), px)

    def forward(self, x: Tensor, k: int = 1, generator: torch.Generator | None = None,
                z: Latents = None, mean: bool = False) -> Pass:
        """Infer K posterior samples per example and score them under the generative model
        (``z``, ``mean``: see :meth:`posterior`)."""
        return self.forward_from(x, self.upward(x), k, generator, z, mean)

    def generate(self, z: Tensor, layer: int | None = None, generator: torch.Generator | None = None,
                 mean: bool = False) -> list[Tensor]:
        """Ancestral sampling (eqs 1-2) down from ``z`` at ``layer`` (default the top, 0 = z_1):
        [z_1, ..., z_layer], each z_i ~ p(z_i|z_i+1), or its mean with ``mean``."""
        layer = len(self.layers) - 1 if layer is None else layer
        zs = [z]
        for block in reversed(self.layers[:layer]):
            zs.insert(0, block.draw(block.p(zs[0]), generator, mean=mean))
        return zs

    def decode(self, z1: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z_1) (pixel probabilities for the Bernoulli likelihood)."""
        return self.likelihood.mean(self.likelihood.params(z1))

    def _given(self, z) -> list[torch.Tensor | None]:
        """:meth:`posterior`'s ``z`` as one entry (or None) per layer, checked."""
        sizes = self.config.latent_sizes
        if z is None:
            return [None] * len(sizes)
        if isinstance(z, Mapping):
            bad = [i for i in z if not isinstance(i, int) or not 0 <= i < len(sizes)]
            if bad:
                raise ValueError(f"z has layers {bad}; the layers are 0..{len(sizes) - 1} (0 = z_1)")
            z = [z.get(i) for i in range(len(sizes))]
        z = list(z)
        if len(z) != len(sizes):
            raise ValueError(f"z must have one entry (a tensor or None) per layer, {len(sizes)}, got {len(z)}; "
                             f"or pass a dict {{layer: z}}")
        for i, (t, d) in enumerate(zip(z, sizes)):
            if t is not None and (t.dim() not in (2, 3) or t.shape[-1] != d):
                raise ValueError(f"z for layer {i} must be [B, {d}] or [k, B, {d}], got {tuple(t.shape)}")
        return z

    # -- public API ---------------------------------------------------------------------------------
    def log_joint(self, x: Tensor, zs: list[Tensor]) -> Tensor:
        """log p(x, z_1..z_L) per example, ``zs`` bottom (z_1) to top (z_L), each ``[B, d_i]``
        (any leading dimensions, the same for x and every z_i)."""
        self.check_input(x)
        self._check_zs(x, zs)
        log_p = self.layers[-1].p(None).log_prob(zs[-1]).sum(-1)  # p(z_L) = N(0, I)
        for layer, z_i, z_above in zip(self.layers, zs, zs[1:]):
            log_p = log_p + layer.p(z_above).log_prob(z_i).sum(-1)
        return log_p + self.likelihood.log_prob(x, self.likelihood.params(zs[0]))

    def sample_posterior(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None):
        """(zs, log_q): ``zs`` a list of ``[k, B, d_i]`` bottom to top, ``log_q`` ``[k, B]``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be a positive integer (the number of posterior samples per image, e.g. 10)")
        self.check_input(x)
        p = self.forward(x, k, generator)
        return p.zs, p.log_q

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None):
        """Ancestral samples: (zs bottom to top, each ``[n, d_i]``; the mean of p(x|z_1)) (paper Figs 9-10)."""
        dev = next(self.parameters()).device
        zs = self.generate(torch.randn(n, self.config.latent_sizes[-1], device=dev, generator=generator),
                           generator=generator)
        return zs, self.decode(zs[0])


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
