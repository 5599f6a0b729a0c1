"""The blocks of the VAE and the LVAE: one per stochastic layer z_i, each owning its prior, its
posterior, how it draws z_i and its KL (paper eqs 2, 7-19).

* :class:`StandardNormalPrior` -- p(z_L) = N(0, I), the top block's prior, an explicit block;
* :class:`BottomUpLayer` -- the VAE's q(z_i|z_i-1) = N(mu_q, var_q), a GaussianMLP of z_i-1 (eqs 7-12);
* :class:`LadderLayer` -- the LVAE's upward Gaussian (mu_hat_i, var_hat_i) (eqs 13-15), the top-down
  Gaussian from z_i+1 and their precision-weighted merge q(z_i|z_i+1, x) (eqs 16-19).

Both kinds of block draw the same way: ``q(...) -> LayerSample``, the sample with the Gaussians it was
drawn from and is judged by; :meth:`LayerSample.kl_units` is the one place that takes KL(q || p) and
decides whether its closed form applies. :mod:`lvae.model.network` runs the blocks in plain loops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor, nn

from lvae.config import ModelConfig
from lvae.model.gaussian import STANDARD_NORMAL, Normal, StandardNormal, precision_weighted, sample_normal
from lvae.model.layers import MLP, GaussianHead, GaussianMLP


@dataclass
class LayerSample:
    """One stochastic layer of one pass: the sample ``z`` ``[K, B, d]``, the posterior ``q`` it was
    drawn from and the prior ``p`` it is judged by (:class:`~lvae.model.gaussian.StandardNormal` for the
    top layer); for the LVAE's layers below the top also the two Gaussians the merge combined
    (eqs 17-18): ``up`` = (mu_hat, var_hat) ``[B, d]`` and ``down`` = (mu_t, var_t), the top-down
    Gaussian from z_i+1. ``p`` is None only inside :meth:`HierarchicalVAE.posterior` (see there)."""

    z: Tensor
    q: Normal
    p: Normal | StandardNormal | None
    up: Normal | None = None
    down: Normal | None = None

    @property
    def log_q(self) -> Tensor:  # [K, B]
        return self.q.log_prob(self.z).sum(-1)

    @property
    def log_p(self) -> Tensor:  # [K, B]
        return self.p.log_prob(self.z).sum(-1)

    def kl_units(self, analytic: bool = True) -> Tensor:
        """Per-unit KL(q || p) ``[K, B, d]``. With ``analytic``, in closed form where q and p are both
        Gaussians given the samples drawn before z_i: p = N(0, I) (the top layer), or q conditioned
        on the z_i+1 that p is conditioned on (the LVAE: its top-down Gaussian ``down``). Elsewhere
        (the VAE below the top, whose z_i+1 was drawn from q(z_i+1|z_i)), and without ``analytic``,
        the one-sample estimate log q(z_i) - log p(z_i)."""
        if analytic and (isinstance(self.p, StandardNormal) or self.down is not None):
            return self.p.kl_from(self.q)
        log_p = self.p.log_prob(self.z)
        return self.q.log_prob(self.z) - log_p

    def log_ratio_x2(self) -> Tensor:
        """2 (log p(z_i|.) - log q(z_i|.)) ``[K, B]`` without the log 2 pi terms (they cancel), as one
        fused expression: the importance-weight term of the evaluation loop (:mod:`lvae.model.bounds`)."""
        return self.p.log_ratio_x2(self.q, self.z).sum(-1)



# -- the blocks ---------------------------------------------------------------------------------------
class StandardNormalPrior(nn.Module):
    """p(z_L) = N(0, I) (eq 2): the top block's prior. No parameters; called like the priors below
    it, with the z above it (there is none)."""

    def forward(self, z_above: Tensor | None = None) -> StandardNormal:
        return STANDARD_NORMAL


class StochasticLayer(nn.Module):
    """z_i with its prior p(z_i|z_i+1) (eq 2): a :class:`~lvae.model.layers.GaussianMLP` of z_i+1 (its MLP
    has width ``hidden_sizes[i+1]``, mirroring the encoder, as in the authors' code), or
    :class:`StandardNormalPrior` for the top layer."""

    def __init__(self, prior: GaussianMLP | StandardNormalPrior):
        super().__init__()
        self.prior = prior

    def p(self, z_above: Tensor | None) -> Normal | StandardNormal:
        """p(z_i|z_i+1) (eq 2); N(0, I) for the top layer (``z_above`` None)."""
        return self.prior(z_above)

    @staticmethod
    def draw(q: Normal, generator=None, z: Tensor | None = None, mean: bool = False) -> Tensor:
        """z_i from ``q``: ``z`` when given (broadcast to q's shape), else q's mean with ``mean``, else
        the reparameterised sample mu + sqrt(var) eps (only this draws noise from ``generator``)."""
        if z is not None:
            return z.expand_as(q.mu)
        return q.mu if mean else sample_normal(q.mu, q.var, generator)


class BottomUpLayer(StochasticLayer):
    """A VAE layer: q(z_i|z_i-1) = N(mu_q, var_q) from an MLP of z_i-1, z_0 = x (eqs 7-12)."""

    def __init__(self, prior: GaussianMLP | StandardNormalPrior, up: GaussianMLP):
        super().__init__(prior)
        self.up = up

    def q(self, up: Normal | None, z_below: Tensor | None, k: int,
          generator=None, z: Tensor | None = None, mean: bool = False) -> LayerSample:
        """q(z_i|z_i-1) from the sample ``z_below`` of z_i-1 (for the bottom layer, None: q(z_1|x) is
        ``up``, from :meth:`HierarchicalVAE.upward`, expanded over the ``k`` samples), and z_i drawn
        from it (:meth:`StochasticLayer.draw`). Its prior conditions on z_i+1, not drawn yet: ``p`` is
        left None (see :meth:`HierarchicalVAE.posterior`)."""
        q = up.expand(k) if z_below is None else self.up(z_below)
        return LayerSample(self.draw(q, generator, z, mean), q, None)


class LadderLayer(StochasticLayer):
    """An LVAE layer (eqs 13-19).

    Upward: d_i = MLP(input_i), mu_hat_i = Linear(d_i), var_hat_i = Softplus(Linear(d_i)), with
    input_1 = x and input_i = mu_hat_i-1 (``up_input="mu"``, authors' code) or d_i-1 (paper).
    Downward: q(z_L|x) = N(mu_hat_L, var_hat_L); below the top, the top-down Gaussian from z_i+1 is
    merged with (mu_hat_i, var_hat_i) by precision weighting. The top-down Gaussian is the generative
    p(z_i|z_i+1) (``down`` None: ``share_top_down=True``, paper text) or its own MLP of the same shape
    (authors' code, default); the KL is always against the generative prior.
    """

    def __init__(self, prior: GaussianMLP | StandardNormalPrior, up: GaussianMLP, down: GaussianMLP | None,
                 up_input: str):
        super().__init__(prior)
        self.up = up
        self.down = down
        self.up_input = up_input

    def upward(self, h: Tensor) -> tuple[Tensor, Normal]:
        """(input of the layer above, N(mu_hat_i, var_hat_i)) from this layer's input (eqs 13-15)."""
        d = self.up.mlp(h)
        up = self.up.head(d)
        return (up.mu if self.up_input == "mu" else d), up

    def q(self, up: Normal, z_above: Tensor | None, k: int, generator=None,
          z: Tensor | None = None, mean: bool = False) -> LayerSample:
        """q(z_i|z_i+1, x) from the upward Gaussian ``up`` and the sample ``z_above`` of z_i+1 (None for
        the top layer: q(z_L|x) = N(mu_hat_L, var_hat_L), expanded over the ``k`` samples), and z_i
        drawn from it (:meth:`StochasticLayer.draw`)."""
        p = self.p(z_above)
        if z_above is None:
            q = up.expand(k)
            return LayerSample(self.draw(q, generator, z, mean), q, p)
        down = p if self.down is None else self.down(z_above)
        # eqs 17-18: the precision-weighted merge of the two Gaussians
        q = Normal(*precision_weighted(up.mu, up.var, down.mu, down.var))
        return LayerSample(self.draw(q, generator, z, mean), q, p, up, down)


def gaussian_mlps(d_in: Sequence[int], hidden: Sequence[int], d_out: Sequence[int], cfg: ModelConfig
                   ) -> list[GaussianMLP]:
    """One GaussianMLP per layer; all MLPs are created before all heads (lvae_format 1's order, in
    which a seed draws the initial weights)."""
    mlps = [MLP(a, h, cfg) for a, h in zip(d_in, hidden)]
    heads = [GaussianHead(h, d, cfg) for h, d in zip(hidden, d_out)]
    return [GaussianMLP(mlp, head) for mlp, head in zip(mlps, heads)]
