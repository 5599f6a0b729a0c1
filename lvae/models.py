"""The VAE and the LVAE as a stack of stochastic layers: one block per latent variable z_i.

Each block (:class:`StochasticLayer`) owns what the paper attaches to its z_i:

* the prior p(z_i|z_i+1) = N(mu_p, var_p), a :class:`~lvae.layers.GaussianMLP` of z_i+1 (eq 2;
  the top block's prior is p(z_L) = N(0, I));
* VAE (:class:`BottomUpLayer`): q(z_i|z_i-1) = N(mu_q, var_q), a GaussianMLP of z_i-1, z_0 = x (eqs 7-12);
* LVAE (:class:`LadderLayer`): the deterministic upward Gaussian (mu_hat_i, var_hat_i) (eqs 13-15), the
  top-down Gaussian from z_i+1 and their precision-weighted merge q(z_i|z_i+1, x) (eqs 16-19).

The likelihood p(x|z_1) (eq 3) is :mod:`lvae.layers`' ``LIKELIHOODS``. :class:`HierarchicalVAE` runs
the blocks in plain loops: :meth:`~HierarchicalVAE.upward` (the deterministic part of inference,
once per input), :meth:`~HierarchicalVAE.posterior` (the stochastic part: top-down for the LVAE,
bottom-up for the VAE; any layer's z can be given instead of drawn) and
:meth:`~HierarchicalVAE.generate` (ancestral sampling, eqs 1-2, from any layer down).

Layers are indexed 0..L-1 in code for z_1..z_L in the paper. Tensors of samples carry a leading
sample dimension K: ``z`` is ``[K, B, d]``. Only the stochastic part of inference is expanded over
the K samples, which is what makes K = 5000 affordable.

Weights and checkpoints written before the blocks (``lvae_format`` 1) grouped the modules by role
(``generative.top_down_mlps.{i}``, ``inference.up_heads.{i}``, ...): :meth:`HierarchicalVAE.load_state_dict`
renames their keys (:func:`upgrade_state_dict`), and the parameters are listed in that role-by-role
order, which the optimizer states of checkpoints and the rounding of the gradient norm depend on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .gaussian import (
    kl_normal,
    kl_standard_normal,
    log_normal,
    log_standard_normal,
    precision_weighted,
    sample_normal,
)
from .layers import LIKELIHOODS, MLP, GaussianHead, GaussianMLP


# latents to condition on: {layer: z} or one entry (or None) per layer, 0 = z_1
Latents = Mapping[int, Tensor] | Sequence[Tensor | None] | None


@dataclass
class LayerSample:
    """One stochastic layer of one pass: the sample and both distributions it was judged by; for
    the LVAE's layers below the top also the two Gaussians the merge combined (eqs 17-18)."""

    z: torch.Tensor  # [K, B, d]
    mu_q: torch.Tensor
    var_q: torch.Tensor
    mu_p: torch.Tensor | None = None  # None for the top layer: p(z_L) = N(0, I)
    var_p: torch.Tensor | None = None
    mu_hat: torch.Tensor | None = None  # LVAE: the upward Gaussian, [B, d]
    var_hat: torch.Tensor | None = None
    mu_t: torch.Tensor | None = None  # LVAE: the top-down Gaussian from z_i+1
    var_t: torch.Tensor | None = None

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

    def log_ratio_x2(self) -> torch.Tensor:
        """2 (log p(z_i|.) - log q(z_i|.)) ``[K, B]`` without the log 2 pi terms (they cancel), as one
        fused expression: the importance-weight term of the evaluation loop (:mod:`lvae.bounds`)."""
        z = self.z
        log_q = torch.log(self.var_q) + (z - self.mu_q).square_() / self.var_q
        if self.mu_p is None:
            return (log_q - z.square()).sum(-1)
        return (log_q - torch.log(self.var_p) - (z - self.mu_p).square_() / self.var_p).sum(-1)


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


# -- the blocks ---------------------------------------------------------------------------------------
class StochasticLayer(nn.Module):
    """z_i with its prior p(z_i|z_i+1) = N(mu_p, var_p) (eq 2); ``prior`` is None for the top layer,
    whose prior is N(0, I). The MLP out of z_i+1 has width ``hidden_sizes[i+1]``, mirroring the
    encoder, as in the authors' code."""

    def __init__(self, prior: GaussianMLP | None):
        super().__init__()
        self.prior = prior

    def p(self, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu_p, var_p of p(z_i|z_i+1) (eq 2); not for the top layer."""
        return self.prior(z_above)

    @staticmethod
    def draw(mu: torch.Tensor, var: torch.Tensor, generator=None, z: torch.Tensor | None = None,
             mean: bool = False) -> torch.Tensor:
        """z_i from N(mu, var): ``z`` when given (broadcast to mu's shape), else mu with ``mean``, else
        the reparameterised sample mu + sqrt(var) eps (only this draws noise from ``generator``)."""
        if z is not None:
            return z.expand_as(mu)
        return mu if mean else sample_normal(mu, var, generator)


class BottomUpLayer(StochasticLayer):
    """A VAE layer: q(z_i|z_i-1) = N(mu_q, var_q) from an MLP of z_i-1, z_0 = x (eqs 7-12)."""

    def __init__(self, prior: GaussianMLP | None, up: GaussianMLP):
        super().__init__(prior)
        self.up = up

    def q(self, z_below: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu_q, var_q of q(z_i|z_i-1) (of q(z_1|x) for the bottom layer)."""
        return self.up(z_below)


class LadderLayer(StochasticLayer):
    """An LVAE layer (eqs 13-19).

    Upward: d_i = MLP(input_i), mu_hat_i = Linear(d_i), var_hat_i = Softplus(Linear(d_i)), with
    input_1 = x and input_i = mu_hat_i-1 (``up_input="mu"``, authors' code) or d_i-1 (paper).
    Downward: q(z_L|x) = N(mu_hat_L, var_hat_L); below the top, the top-down Gaussian from z_i+1 is
    merged with (mu_hat_i, var_hat_i) by precision weighting. The top-down Gaussian is the generative
    p(z_i|z_i+1) (``down`` None: ``share_top_down=True``, paper text) or its own MLP of the same shape
    (authors' code, default); the KL is always against the generative prior.
    """

    def __init__(self, prior: GaussianMLP | None, up: GaussianMLP, down: GaussianMLP | None, up_input: str):
        super().__init__(prior)
        self.up = up
        self.down = down
        self.up_input = up_input

    def upward(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(input of the layer above, (mu_hat_i, var_hat_i)) from this layer's input (eqs 13-15)."""
        d = self.up.mlp(h)
        mu_hat, var_hat = self.up.head(d)
        return (mu_hat if self.up_input == "mu" else d), (mu_hat, var_hat)

    def q(self, up: tuple[Tensor, Tensor], z_above: Tensor | None, k: int,
          generator=None, z: Tensor | None = None, mean: bool = False
          ) -> LayerSample:
        """q(z_i|z_i+1, x) from the upward Gaussian ``up`` and the sample ``z_above`` of z_i+1 (None for
        the top layer: q(z_L|x) = N(mu_hat_L, var_hat_L), expanded over the ``k`` samples), and z_i
        drawn from it (:meth:`StochasticLayer.draw`)."""
        if z_above is None:
            mu_q, var_q = (t.expand(k, *t.shape) for t in up)
            z = self.draw(mu_q, var_q, generator, z, mean)
            return LayerSample(z, mu_q, var_q)
        mu_p, var_p = self.p(z_above)
        down = self.down
        mu_t, var_t = (mu_p, var_p) if down is None else down(z_above)
        mu_hat, var_hat = up
        # eqs 17-18
        mu_q, var_q = precision_weighted(mu_hat, var_hat, mu_t, var_t)
        z = self.draw(mu_q, var_q, generator, z, mean)
        return LayerSample(z, mu_q, var_q, mu_p, var_p,
                           mu_hat, var_hat, mu_t, var_t)


# -- lvae_format 1: the modules grouped by role ------------------------------------------------------
# (key prefix in lvae_format 1, key prefix now), in that format's parameter order; "{i}" is the
# layer, "{up}" is "up_" for the LVAE and "" for the VAE.
FORMAT_1_KEYS = (
    ("generative.top_down_mlps.{i}.", "layers.{i}.prior.mlp."),
    ("generative.top_down_heads.{i}.", "layers.{i}.prior.head."),
    ("generative.output_mlp.", "likelihood.mlp."),
    ("generative.output.", "likelihood."),
    ("inference.{up}mlps.{i}.", "layers.{i}.up.mlp."),
    ("inference.{up}heads.{i}.", "layers.{i}.up.head."),
    ("inference.down_mlps.{i}.", "layers.{i}.down.mlp."),
    ("inference.down_heads.{i}.", "layers.{i}.down.head."),
)


def _prefix_regex(prefix: str, up: str) -> re.Pattern:
    return re.compile(re.escape(prefix.replace("{up}", up)).replace(re.escape("{i}"), r"(\d+)"))


def _rename(key: str, pairs: Sequence[tuple[re.Pattern, str]]) -> tuple[str, int, int]:
    """(renamed key, rank of its role, layer) by the first matching prefix; the key unchanged if none."""
    for rank, (pattern, target) in enumerate(pairs):
        m = pattern.match(key)
        if m:
            layer = m.group(1) if pattern.groups else "0"
            return target.replace("{i}", layer) + key[m.end():], rank, int(layer)
    return key, len(pairs), 0


def _pairs(ladder: bool, to_format_1: bool) -> list[tuple[re.Pattern, str]]:
    up = "up_" if ladder else ""
    if to_format_1:
        return [(_prefix_regex(new, up), old.replace("{up}", up)) for old, new in FORMAT_1_KEYS]
    return [(_prefix_regex(old, up), new) for old, new in FORMAT_1_KEYS]


def upgrade_state_dict(state: Mapping[str, torch.Tensor], ladder: bool) -> dict[str, torch.Tensor]:
    """A state dict with ``lvae_format`` 1 keys (``generative.*``, ``inference.*``) renamed to today's
    block keys (``layers.{i}.*``, ``likelihood.*``); today's keys pass unchanged. ``ladder``: the
    model's inference is ``"ladder"`` (the VAE's were ``inference.mlps``/``inference.heads``)."""
    pairs = _pairs(ladder, to_format_1=False)
    return {_rename(k, pairs)[0]: v for k, v in state.items()}


def format_1_state_dict(state: Mapping[str, torch.Tensor], ladder: bool) -> dict[str, torch.Tensor]:
    """The inverse of :func:`upgrade_state_dict`: today's keys renamed to ``lvae_format`` 1's."""
    pairs = _pairs(ladder, to_format_1=True)
    return {_rename(k, pairs)[0]: v for k, v in state.items()}


def _gaussian_mlps(d_in: Sequence[int], hidden: Sequence[int], d_out: Sequence[int], cfg: ModelConfig
                   ) -> list[GaussianMLP]:
    """One GaussianMLP per layer; all MLPs are created before all heads (lvae_format 1's order, in
    which a seed draws the initial weights)."""
    mlps = [MLP(a, h, cfg) for a, h in zip(d_in, hidden)]
    heads = [GaussianHead(h, d, cfg) for h, d in zip(hidden, d_out)]
    return [GaussianMLP(mlp, head) for mlp, head in zip(mlps, heads)]


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
        priors = _gaussian_mlps(lat[1:], hid[1:], lat[:-1], cfg)
        likelihood = LIKELIHOODS[cfg.likelihood](lat[0], hid[0], cfg.x_dim, cfg)
        if ladder:
            d_in = [cfg.x_dim] + [lat[i - 1] if cfg.up_input == "mu" else hid[i - 1] for i in range(1, L)]
        else:
            d_in = [cfg.x_dim, *lat[:-1]]
        ups = _gaussian_mlps(d_in, hid, lat, cfg)
        downs = _gaussian_mlps(lat[1:], hid[1:], lat[:-1], cfg) if ladder and not cfg.share_top_down else []
        priors, downs = priors + [None], downs + [None] * (L - len(downs))
        if ladder:
            layers = [LadderLayer(priors[i], ups[i], downs[i], cfg.up_input) for i in range(L)]
        else:
            layers = [BottomUpLayer(priors[i], ups[i]) for i in range(L)]
        self.layers = nn.ModuleList(layers)
        self.likelihood = likelihood
        self._format_1 = _pairs(ladder, to_format_1=True)

    @property
    def ladder(self) -> bool:
        return self.config.inference == "ladder"

    @property
    def generative(self) -> nn.ModuleList:
        """The generative model's modules (the priors and the likelihood), for inspection."""
        return nn.ModuleList([*(layer.prior for layer in self.layers if layer.prior is not None), self.likelihood])

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
            _, role, layer = _rename(item[0][len(prefix) + 1 if prefix else 0:], self._format_1)
            return role, layer
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
        """The deterministic part of inference, computed once per input (reuse it over K chunks):
        LVAE, [(mu_hat_i, var_hat_i)] for i = 1..L (eqs 13-15); VAE, (mu, var) of q(z_1|x)."""
        self._check_x(x)
        if not self.ladder:
            return self.layers[0].q(x)
        h, up = x, []
        for layer in self.layers:
            h, gaussian = layer.upward(h)
            up.append(gaussian)
        return up

    def posterior(self, up, k: int = 1, generator: torch.Generator | None = None,
                  z: Latents = None, mean: bool = False
                  ) -> tuple[list[LayerSample], tuple[bool, ...]]:
        """The stochastic part of inference from :meth:`upward`'s ``up``: ``k`` samples of every z_i
        (``[k, B, d_i]``) with q and p of each, bottom to top, and per layer whether the closed-form
        KL is valid. The LVAE draws top-down (eqs 16-19), the VAE bottom-up, then scores each z_i
        under p(z_i|z_i+1) given the sample above.

        ``z``: latents to condition on instead of drawing them, ``{layer: z}`` or a list with one
        entry (or None) per layer, 0 = z_1; each ``[B, d_i]`` or ``[k, B, d_i]``. The layers they
        condition are computed from them; no noise is drawn for them. ``mean``: every other z_i is
        the mean of its q instead of a sample (no noise drawn at all).
        """
        given = self._given(z)
        L = len(self.layers)
        if self.ladder:  # top-down: z_L, then z_i from q(z_i | z_i+1, x)
            records, z_above = [], None
            for i in reversed(range(L)):
                layer = self.layers[i]
                record = layer.q(up[i], z_above, k, generator, given[i], mean)
                records.insert(0, record)
                z_above = record.z
            # q and p of z_i share their conditioning sample z_i+1:
            # every KL is analytic.
            return records, (True,) * L
        records = []
        for i, layer in enumerate(self.layers):  # bottom-up: z_i ~ q(z_i | z_i-1)
            if records:
                mu_q, var_q = layer.q(records[-1].z)
            else:  # q(z_1|x), from upward(x)
                mu_q, var_q = (t.expand(k, *t.shape) for t in up)
            z_i = layer.draw(mu_q, var_q, generator, given[i], mean)
            records.append(LayerSample(z_i, mu_q, var_q))
        # p(z_i|z_i+1), given the samples above
        for layer, record, above in zip(self.layers, records, records[1:]):
            record.mu_p, record.var_p = layer.p(above.z)
        # Only the top layer's KL is analytic: below, z_i+1 depends on z_i.
        return records, tuple(i == L - 1 for i in range(L))

    def forward_from(self, x: torch.Tensor, up, k: int = 1, generator: torch.Generator | None = None,
                     z: Latents = None,
                     mean: bool = False) -> Pass:
        """:meth:`posterior` from ``up`` = ``upward(x)``, scored under p(x|z_1)."""
        records, ok = self.posterior(up, k, generator, z, mean)
        px = self.likelihood.params(records[0].z)
        return Pass(records, self.likelihood.log_prob(x, px), px, ok)

    def forward(self, x: torch.Tensor, k: int = 1, generator: torch.Generator | None = None,
                z: Latents = None,
                mean: bool = False) -> Pass:
        """Infer K posterior samples per example and score them under the generative model
        (``z``, ``mean``: see :meth:`posterior`)."""
        return self.forward_from(x, self.upward(x), k, generator, z, mean)

    def generate(self, z: torch.Tensor, layer: int | None = None, generator: torch.Generator | None = None,
                 mean: bool = False) -> list[torch.Tensor]:
        """Ancestral sampling (eqs 1-2) down from ``z`` at ``layer`` (default the top, 0 = z_1):
        [z_1, ..., z_layer], each z_i ~ p(z_i|z_i+1), or its mean with ``mean``."""
        layer = len(self.layers) - 1 if layer is None else layer
        zs = [z]
        for block in reversed(self.layers[:layer]):
            mu_p, var_p = block.p(zs[0])
            zs.insert(0, block.draw(mu_p, var_p, generator, mean=mean))
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
    def log_joint(self, x: torch.Tensor, zs: list[torch.Tensor]) -> torch.Tensor:
        """log p(x, z_1..z_L) per example, ``zs`` bottom (z_1) to top (z_L), each ``[B, d_i]``
        (any leading dimensions, the same for x and every z_i)."""
        self.check_input(x)
        self._check_zs(x, zs)
        log_p = log_standard_normal(zs[-1]).sum(-1)
        for layer, z_i, z_above in zip(self.layers, zs, zs[1:]):
            mu_p, var_p = layer.p(z_above)
            log_p = log_p + log_normal(z_i, mu_p, var_p).sum(-1)
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
