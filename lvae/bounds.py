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

from .layers import BernoulliOutput
from .gaussian import NoiseReplay
from .models import HierarchicalVAE, Pass, draw_noise


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


def iw_bound(model: HierarchicalVAE, x: torch.Tensor, k: int,
             chunk_size: int | None = None,
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
    with torch.inference_mode():
        up = model.upward(x)  # the deterministic part, once per input
        total, workspace = None, {}
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            log_w = _iw_log_weights(model, x, up, n, generator, workspace)
            part = torch.logsumexp(log_w, dim=0)
            # running log-sum-exp over the chunks
            total = part if total is None else torch.logaddexp(total, part)
        total = total - math.log(k)
    return total.clone()  # a normal tensor (usable outside inference mode)


IW_ROWS = 2_500  # samples x images per chunk of work: the [rows, 784] logits stay in the cache


def iw_bound_batched(model: HierarchicalVAE, x: torch.Tensor, k: int, chunk_size: int | None, batch_size: int,
                     generator: torch.Generator | None = None, workers: int = 1, progress: bool = False,
                     rows: int = IW_ROWS) -> torch.Tensor:
    """:func:`iw_bound` of every row of ``x``, ``[N]``, with the noise of ``batch_size`` rows at a time.

    The noise is drawn exactly as ``torch.cat([iw_bound(model, x[s:s + batch_size], k, chunk_size,
    generator) for s in ...])`` draws it (batch by batch, chunk by chunk, one generator), so each
    image gets the same samples; the work is then done in sub-batches of ``rows // chunk_size``
    images (a working set that stays in the cache: ~10% faster than 25,000-row chunks here) and,
    with ``workers > 1`` on the CPU, by that many threads running their kernels on one core each
    (~8% faster on this 2-core CPU than two intra-op threads: the samples' small elementwise
    kernels scale poorly). Results agree with the plain loop, for any ``workers``, up to
    floating-point rounding (``tests/test_speed.py``).
    """
    chunk = k if chunk_size is None else max(1, min(chunk_size, k))
    sub = max(1, min(batch_size, rows // chunk))
    workers = max(1, workers) if x.device.type == "cpu" else 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(x), desc=f"L_{k}", unit="image", leave=False)

    def batch_noise(n_rows: int) -> list[list[torch.Tensor]]:  # per chunk: eps [n, n_rows, d] in drawing order
        return [draw_noise(model.config, min(chunk, k - start), n_rows, generator, x.device, x.dtype)
                for start in range(0, k, chunk)]

    def one(xs: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        res = iw_bound(model, xs, k, chunk, NoiseReplay(eps))
        if bar is not None:
            bar.update(len(xs))
        return res

    def tasks():  # (images, their noise), batch after batch; the noise of a batch is drawn when reached
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            noise = batch_noise(len(xb))
            for j in range(0, len(xb), sub):
                yield xb[j:j + sub], [e[:, j:j + sub] for per_chunk in noise for e in per_chunk]

    if workers == 1:
        out = [one(xs, eps) for xs, eps in tasks()]
    else:
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                futures = []
                for xs, eps in tasks():  # at most 4 x workers sub-batches (and their noise) in flight
                    if len(futures) >= 4 * workers:
                        futures[len(futures) - 4 * workers].result()
                    futures.append(pool.submit(one, xs, eps))
                out = [f.result() for f in futures]
        finally:
            torch.set_num_threads(threads)
    if bar is not None:
        bar.close()
    return torch.cat(out)


def _iw_log_weights(model: HierarchicalVAE, x: torch.Tensor, up, n: int,
                    generator: torch.Generator | None, workspace: dict) -> torch.Tensor:
    """log p(x, z) - log q(z|x) ``[n, B]`` for n samples per input, without building a Pass.

    Same math as ``_log_weights(model.forward_from(x, up, n))``: the 0.5 log 2 pi terms of
    log p(z) and log q(z) cancel and are dropped, each layer's log p - log q is one fused
    expression, and for Bernoulli outputs log p(x|z_1) = x.l - sum softplus(l) with
    x.l = h.(W^T x) + b.x, so the [n, B, 784] logits are read once and x is never expanded.
    """
    layers, _ = model.inference.downward(up, n, model.generative, generator)
    lw = None
    for layer in layers:
        z, mu_q, var_q = layer.z, layer.mu_q, layer.var_q
        log_q = torch.log(var_q) + (z - mu_q).square_() / var_q
        if layer.mu_p is None:
            diff = log_q - z.square()
        else:
            diff = log_q - torch.log(layer.var_p) - (z - layer.mu_p).square_() / layer.var_p
        term = diff.sum(-1)
        lw = term if lw is None else lw + term
    lw = 0.5 * lw  # = sum_i log p(z_i|.) - log q(z_i|.)
    # The [n*B, 512] activations and [n*B, 784] logits go into buffers reused over the chunks:
    # fresh tensors this large are mmap-ed and page-faulted on every chunk (~20% of the time).
    gen, out = model.generative, model.generative.output
    z1 = layers[0].z
    h = z1.reshape(-1, z1.shape[-1])
    for j, dense in enumerate(gen.output_mlp):
        if not dense.fast_path():  # batch norm in training mode: the ordinary layer
            h = dense(h)
            continue
        w, b = dense.folded()
        buf = _buffer(workspace, ("mlp", j), h.shape[0], w.shape[0], h)
        h = dense.activate_(torch.addmm(b, h, w.t(), out=buf) if b is not None else torch.mm(h, w.t(), out=buf))
    if not isinstance(out, BernoulliOutput):
        return lw + out.log_prob(x, out.params(h.view(n, -1, h.shape[-1])))
    w, b = out.logits.weight, out.logits.bias
    logits = torch.addmm(b, h, w.t(), out=_buffer(workspace, "logits", h.shape[0], w.shape[0], h))
    sp = torch._C._nn.softplus(logits, 1, 20, out=logits).sum(-1).view(n, -1)  # in place
    h = h.view(n, -1, h.shape[-1])
    prod = _buffer(workspace, "prod", h.shape[0] * h.shape[1], h.shape[2], h).view(h.shape)
    xl = torch.mul(h, x @ w, out=prod).sum(-1) + x @ b  # sum_j x_j l_j without touching the logits
    return lw + xl - sp


def _buffer(workspace: dict, key, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    buf = workspace.get(key)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != like.dtype:
        buf = workspace[key] = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    return buf[:rows]


def kl_per_unit(model: HierarchicalVAE, x: torch.Tensor, analytic: bool = True,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per-layer, per-unit KL(q||p) averaged over the batch: a list of ``[d_i]`` (Figs 4-5)."""
    with torch.no_grad():
        return [k.mean(dim=(0, 1)) for k in model(x, 1, generator).kl_units(analytic)]
