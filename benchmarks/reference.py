"""A plain eager reference LVAE / VAE, written the obvious way, for side-by-side benchmarks.

Same architecture, the library's parameter names of ``lvae_format`` 1 (a library model's
``state_dict`` loads into it: :meth:`RefModel.load_state_dict` renames today's keys), same
objective (single-sample ELBO with analytic KL where valid, warm-up beta), same optimiser protocol
(Adam with PyTorch's default per-parameter loop, clip_grad_norm_ 4, clip_grad_value_ 0.9). The
importance-weighted bound is computed the naive way: the input is repeated K times and the whole
model (upward pass included) runs on the K*B rows. Nothing here is tuned; it is the yardstick.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lvae.model.checkpoint_format import format_1_state_dict

LOG_2PI = math.log(2 * math.pi)


class Dense(nn.Module):
    def __init__(self, d_in, d_out, bn, act):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=not bn)
        self.bn = nn.BatchNorm1d(d_out) if bn else None
        self.act = act

    def forward(self, h):
        a = self.linear(h)
        if self.bn is not None:
            a = self.bn(a)
        return F.leaky_relu(a, 0.1) if self.act else a


def mlp(d_in, h, bn):
    return nn.Sequential(Dense(d_in, h, bn, True), Dense(h, h, bn, True))


class Head(nn.Module):
    def __init__(self, d_in, d_out, bn):
        super().__init__()
        self.mu = Dense(d_in, d_out, bn, False)
        self.var = Dense(d_in, d_out, bn, False)

    def forward(self, d):
        return self.mu(d), F.softplus(self.var(d)) + 1e-5


class Output(nn.Module):
    def __init__(self, d_in, x_dim):
        super().__init__()
        self.logits = nn.Linear(d_in, x_dim)


class Generative(nn.Module):
    def __init__(self, lat, hid, bn, x_dim):
        super().__init__()
        L = len(lat)
        self.top_down_mlps = nn.ModuleList(mlp(lat[i + 1], hid[i + 1], bn) for i in range(L - 1))
        self.top_down_heads = nn.ModuleList(Head(hid[i + 1], lat[i], bn) for i in range(L - 1))
        self.output_mlp = mlp(lat[0], hid[0], bn)
        self.output = Output(hid[0], x_dim)


class Ladder(nn.Module):
    def __init__(self, lat, hid, bn, x_dim):
        super().__init__()
        L = len(lat)
        d_in = [x_dim, *lat[:-1]]
        self.up_mlps = nn.ModuleList(mlp(d_in[i], hid[i], bn) for i in range(L))
        self.up_heads = nn.ModuleList(Head(hid[i], lat[i], bn) for i in range(L))
        self.down_mlps = nn.ModuleList(mlp(lat[i + 1], hid[i + 1], bn) for i in range(L - 1))
        self.down_heads = nn.ModuleList(Head(hid[i + 1], lat[i], bn) for i in range(L - 1))


class BottomUp(nn.Module):
    def __init__(self, lat, hid, bn, x_dim):
        super().__init__()
        L = len(lat)
        d_in = [x_dim, *lat[:-1]]
        self.mlps = nn.ModuleList(mlp(d_in[i], hid[i], bn) for i in range(L))
        self.heads = nn.ModuleList(Head(hid[i], lat[i], bn) for i in range(L))


def log_normal(z, mu, var):
    return -0.5 * (LOG_2PI + torch.log(var) + (z - mu) ** 2 / var)


def kl_normal(mu_q, var_q, mu_p, var_p):
    return 0.5 * (torch.log(var_p) - torch.log(var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1.0)


class RefModel(nn.Module):
    """LVAE (``ladder=True``) or VAE with the paper's MNIST architecture."""

    def __init__(self, ladder=True, depth=5, bn=True, x_dim=784,
                 lat=(64, 32, 16, 8, 4), hid=(512, 256, 128, 64, 32)):
        super().__init__()
        lat, hid = lat[:depth], hid[:depth]
        self.ladder = ladder
        self.generative = Generative(lat, hid, bn, x_dim)
        self.inference = (Ladder if ladder else BottomUp)(lat, hid, bn, x_dim)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Also takes a library model's state dict (its block keys renamed to the role-grouped ones here)."""
        return super().load_state_dict(format_1_state_dict(state_dict, self.ladder), strict=strict, assign=assign)

    def prior(self, i, z):
        g = self.generative
        return g.top_down_heads[i](g.top_down_mlps[i](z))

    def log_px(self, x, z1):
        logits = self.generative.output.logits(self.generative.output_mlp(z1))
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)

    def sample(self, mu, var, g):
        return mu + var.sqrt() * torch.randn(mu.shape, generator=g)

    def terms(self, x, g):
        """(log p(x|z_1), per-layer KL or log q - log p), one sample per row of ``x``."""
        inf = self.inference
        if self.ladder:
            h, ups = x, []
            for m, head in zip(inf.up_mlps, inf.up_heads):
                mu, var = head(m(h))
                ups.append((mu, var))
                h = mu
            mu_q, var_q = ups[-1]
            z = self.sample(mu_q, var_q, g)
            kls = [0.5 * (var_q + mu_q ** 2 - 1.0 - torch.log(var_q))]
            lq = [log_normal(z, mu_q, var_q)]
            lp = [-0.5 * (LOG_2PI + z ** 2)]
            for i in reversed(range(len(ups) - 1)):
                mu_p, var_p = self.prior(i, z)
                mu_t, var_t = inf.down_heads[i](inf.down_mlps[i](z))
                mu_hat, var_hat = ups[i]
                prec_hat, prec_t = 1.0 / var_hat, 1.0 / var_t
                var_q = 1.0 / (prec_hat + prec_t)
                mu_q = (mu_hat * prec_hat + mu_t * prec_t) * var_q
                z = self.sample(mu_q, var_q, g)
                kls.append(kl_normal(mu_q, var_q, mu_p, var_p))
                lq.append(log_normal(z, mu_q, var_q))
                lp.append(log_normal(z, mu_p, var_p))
            return self.log_px(x, z), kls, lq, lp
        zs, qs, h = [], [], x
        for m, head in zip(inf.mlps, inf.heads):
            mu_q, var_q = head(m(h))
            z = self.sample(mu_q, var_q, g)
            zs.append(z)
            qs.append((mu_q, var_q))
            h = z
        kls, lq, lp = [], [], []
        for i in range(len(zs)):
            mu_q, var_q = qs[i]
            lq.append(log_normal(zs[i], mu_q, var_q))
            if i == len(zs) - 1:
                lp.append(-0.5 * (LOG_2PI + zs[i] ** 2))
                kls.append(0.5 * (var_q + mu_q ** 2 - 1.0 - torch.log(var_q)))
            else:
                mu_p, var_p = self.prior(i, zs[i + 1])
                lp.append(log_normal(zs[i], mu_p, var_p))
                kls.append(lq[-1] - lp[-1])
        return self.log_px(x, zs[0]), kls, lq, lp

    def elbo(self, x, beta, g):
        log_px, kls, _, _ = self.terms(x, g)
        return log_px - beta * sum(k.sum(-1) for k in kls)

    @torch.no_grad()
    def iw_bound(self, x, k, chunk, g):
        """Naive L_K: repeat x over the samples and run the whole model on every chunk."""
        parts = []
        for s in range(0, k, chunk):
            n = min(chunk, k - s)
            xr = x.repeat(n, 1)
            log_px, _, lq, lp = self.terms(xr, g)
            lw = log_px + sum(a.sum(-1) for a in lp) - sum(a.sum(-1) for a in lq)
            parts.append(torch.logsumexp(lw.view(n, -1), 0))
        return torch.logsumexp(torch.stack(parts), 0) - math.log(k)


def make_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-4)


def train_step(model, opt, x, beta, g):
    loss = -model.elbo(x, beta, g).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.9)
    opt.step()
    return loss.item()
