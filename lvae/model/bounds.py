"""Variational bounds on log p(x), in nats per example (paper eqs 4-6 and 20).

* :func:`elbo` -- L(x) = E_q[log p(x|z)] - beta * sum_i KL_i            (eq 5 with warm-up, eq 20)
* :func:`iw_bound` -- L_K(x) = E[log 1/K sum_k p(x, z_k) / q(z_k|x)]     (eq 6, IWAE)
* :func:`training_bound` -- the authors' objective: eq-sample mean of iw-sample log-mean-exp of
  log p(x|z_1) + beta * (log p(z) - log q(z|x)); equal to :func:`elbo` when eq = iw = 1.
* :func:`kl_per_unit` -- per-layer, per-unit KL(q||p), the diagnostic of paper Figs 4-5.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Iterator

import torch

from lvae.model.gaussian import NoiseReplay
from lvae.model.network import HierarchicalVAE, Pass, draw_noise


def _log_mean_exp(a: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(a, dim=dim) - math.log(a.shape[dim])


def _check_beta(beta) -> None:
    """beta weighs the KL terms (warm-up): a finite number >= 0 (one host sync for a tensor)."""
    value = float(beta) if isinstance(beta, (int, float)) or (isinstance(beta, torch.Tensor) and beta.numel() == 1) \
        else None
    if value is None or isinstance(beta, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"beta={beta!r} must be a finite number >= 0 (the weight of the KL terms: 1 for the "
                         f"plain bound, 0 to 1 during warm-up)")


def _check_count(name: str, value, none_means: str | None = None) -> None:
    """A sample count or chunk size: a positive integer (or None where ``none_means`` says what None does)."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        alt = f" or None ({none_means})" if none_means else ""
        raise ValueError(f"{name}={value!r} must be a positive integer{alt}")


def _log_weights(p: Pass, beta: float = 1.0) -> torch.Tensor:
    """log p(x|z_1) + beta (log p(z) - log q(z|x)), ``[K, B]``: the sampled form of the bound."""
    return p.log_px + beta * (p.log_pz - p.log_q)


def elbo(model: HierarchicalVAE, x: torch.Tensor, beta: float = 1.0, analytic_kl: bool = True,
         generator: torch.Generator | None = None, *, check: bool = True) -> torch.Tensor:
    """The single-sample evidence lower bound with warm-up weight ``beta`` on the KL terms, ``[B]``.

    With ``analytic_kl`` the KL of each layer is taken in closed form where q and p are both
    Gaussians given the sample above (every LVAE layer, the VAE's top layer) and estimated by
    log q - log p elsewhere; without it every term is the one-sample estimate.

    ``check``: refuse x with NaN/inf or (Bernoulli) outside [0, 1], and a negative or NaN beta
    (:meth:`~lvae.model.network.HierarchicalVAE.check_input`; one host sync). The training loop, whose
    data were checked when loaded, turns it off.
    """
    if check:
        model.check_input(x)
        _check_beta(beta)
    p = model(x, 1, generator)
    kl = sum(k.sum(-1) for k in p.kl_units(analytic_kl))
    return (p.log_px - beta * kl)[0]


def training_bound(model: HierarchicalVAE, x: torch.Tensor, beta: float = 1.0, eq_samples: int = 1,
                   iw_samples: int = 1, analytic_kl: bool = True,
                   generator: torch.Generator | None = None, *, check: bool = True) -> torch.Tensor:
    """The authors' training objective per example ``[B]`` (book/protocol.md, "Objective and warm-up")."""
    if check:  # as in elbo; the training loop turns it off
        model.check_input(x)
        _check_beta(beta)
        _check_count("eq_samples", eq_samples)
        _check_count("iw_samples", iw_samples)
    if eq_samples == 1 and iw_samples == 1:
        return elbo(model, x, beta, analytic_kl, generator, check=False)
    p = model(x, eq_samples * iw_samples, generator)
    a = _log_weights(p, beta).reshape(eq_samples, iw_samples, -1)
    return _log_mean_exp(a, dim=1).mean(0)


def iw_bound(model: HierarchicalVAE, x: torch.Tensor, k: int,
             chunk_size: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The importance-weighted bound L_K per example ``[B]`` (eq 6), K = ``k``.

    The deterministic part of inference is computed once; the K samples are drawn in chunks of
    ``chunk_size`` (memory stays bounded; None: all K at once) and combined with a running
    log-sum-exp. What the chunk size changes: the noise is drawn chunk by chunk (within a chunk
    layer by layer), so with the same ``generator`` two chunk sizes draw *different* samples and
    the values differ by Monte Carlo error (a few nats per image at K = 100), while their
    distribution is the same. Given the same samples (a ``NoiseReplay`` of them in drawing order),
    the result does not depend on the chunk size beyond floating-point rounding. Deterministic
    given ``generator`` and ``chunk_size``. Put the model in ``eval()`` mode first so batch norm
    uses population statistics. Bad x is refused as by :func:`elbo`.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k={k!r} must be >= 1 "
                         "(an integer: the number of importance samples)")
    _check_count("chunk_size", chunk_size, "all k samples at once")
    model.check_input(x)
    return iw_bound_chunks(model, x, k, min(chunk_size or k, k), generator)


def iw_bound_chunks(model: HierarchicalVAE, x: torch.Tensor, k: int,
                    chunk: int, generator) -> torch.Tensor:
    """:func:`iw_bound` without its argument checks (``chunk`` in [1, k]): the upward pass once, then the K
    samples chunk by chunk, combined by a running log-sum-exp."""
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


IW_ROWS = 2_500  # CPU: samples x images per chunk of work, so the [rows, 784] logits stay in the cache


def iw_bound_batched(model: HierarchicalVAE, x: torch.Tensor, k: int, chunk_size: int | None, batch_size: int,
                     generator: torch.Generator | None = None, workers: int = 1, progress: bool = False,
                     rows: int | None = None) -> torch.Tensor:
    """:func:`iw_bound` of every row of ``x``, ``[N]``, with the noise of ``batch_size`` rows at a time.

    The noise is drawn exactly as ``torch.cat([iw_bound(model, x[s:s + batch_size], k, chunk_size,
    generator) for s in ...])`` draws it (batch by batch, chunk by chunk, one generator), so each
    image gets the same samples. On the CPU the work is then done in sub-batches of
    ``rows // chunk_size`` images (``rows`` default :data:`IW_ROWS`: a working set that stays in the
    cache, ~10% faster than 25,000-row chunks here) and, with ``workers > 1``, by that many threads
    running their kernels on one core each (~8% faster on this 2-core CPU than two intra-op threads:
    the samples' small elementwise kernels scale poorly). On other devices a batch is one piece of
    work (``rows`` None) on one thread, whatever ``workers`` says. Results agree with the plain
    loop, for any ``workers`` and ``rows``, up to floating-point rounding (``tests/test_bounds.py``).
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k={k!r} must be >= 1 "
                         "(an integer: the number of importance samples)")
    _check_count("chunk_size", chunk_size, "all k samples at once")
    _check_count("batch_size", batch_size)
    model.check_input(x)
    chunk = min(chunk_size or k, k)
    cpu = x.device.type == "cpu"
    rows = rows if rows is not None else (IW_ROWS if cpu else None)
    sub = max(1, min(batch_size, rows // chunk)) if rows is not None else batch_size
    workers = max(1, workers) if cpu else 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(x), desc=f"L_{k}", unit="image", leave=False)

    def one(xs: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        res = iw_bound_chunks(model, xs, k, chunk, NoiseReplay(eps))  # x was checked above, once
        if bar is not None:
            bar.update(len(xs))
        return res

    tasks = _iw_tasks(model, x, k, chunk, batch_size, sub, generator)
    out = [one(xs, eps) for xs, eps in tasks] if workers == 1 else _in_threads(one, tasks, workers)
    if bar is not None:
        bar.close()
    return torch.cat(out)


def _iw_tasks(model: HierarchicalVAE, x: torch.Tensor, k: int, chunk: int, batch_size: int, sub: int,
              generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(images, their noise) of every sub-batch of ``sub`` images, batch after batch of ``batch_size``. The noise
    of a batch is drawn when the batch is reached, as :func:`iw_bound` draws it: chunk after chunk of ``chunk``
    samples, eps ``[n, images, d]`` in drawing order."""
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        noise = [draw_noise(model.config, min(chunk, k - start), len(xb), generator, x.device, x.dtype)
                 for start in range(0, k, chunk)]
        for j in range(0, len(xb), sub):
            yield xb[j:j + sub], [e[:, j:j + sub] for per_chunk in noise for e in per_chunk]


def _in_threads(fn: Callable[..., torch.Tensor], tasks: Iterable[tuple], workers: int) -> list[torch.Tensor]:
    """``fn(*task)`` of every task, in order, run by ``workers`` threads of one intra-op thread each; at most
    4 x workers tasks (and their noise) in flight."""
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = []
            for task in tasks:
                if len(futures) >= 4 * workers:
                    futures[len(futures) - 4 * workers].result()
                futures.append(pool.submit(fn, *task))
            return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


def _iw_log_weights(model: HierarchicalVAE, x: torch.Tensor, up, n: int,
                    generator: torch.Generator | None, workspace: dict) -> torch.Tensor:
    """log p(x, z) - log q(z|x) ``[n, B]`` for n samples per input, without building a Pass.

    Same math as ``_log_weights(model.forward_from(x, up, n))``: each layer's log p - log q is one
    fused expression without the 0.5 log 2 pi terms, which cancel
    (:meth:`~lvae.model.blocks.LayerSample.log_ratio_x2`), and log p(x|z_1) is the likelihood's
    evaluation form with buffers reused over the chunks (``add_log_prob`` of :mod:`lvae.model.layers`).
    """
    layers = model.posterior(up, n, generator)
    lw = None
    for layer in layers:
        term = layer.log_ratio_x2()
        lw = term if lw is None else lw + term
    return model.likelihood.add_log_prob(0.5 * lw, x, layers[0].z, workspace)


KL_SAMPLES = 32  # posterior samples per image for the per-unit KL of analyses (see kl_per_unit)


def kl_per_unit(model: HierarchicalVAE, x: torch.Tensor, analytic: bool = True,
                generator: torch.Generator | None = None, samples: int = 1) -> list[torch.Tensor]:
    """Per-layer, per-unit KL(q||p), averaged over the batch and over ``samples`` posterior samples per
    image: a list of ``[d_i]`` (Figs 4-5).

    Layer i's term is E_q[log q(z_i|.) - log p(z_i|z_i+1)], split unit by unit. With ``analytic`` it
    is taken in closed form wherever q and p are both Gaussians given the samples already drawn:

    - LVAE, every layer: q(z_i|z_i+1, x) and p(z_i|z_i+1) are conditioned on the same z_i+1, so the
      KL is closed form given that sample and averaged over the samples of z_i+1;
    - VAE, top layer: q(z_L|z_L-1) against N(0, I), closed form given the sample of z_L-1;
    - VAE, layers below the top: p(z_i|z_i+1) is conditioned on z_i+1 ~ q(z_i+1|z_i), which
      depends on z_i itself, so no closed form exists; the estimate log q(z_i) - log p(z_i) is
      averaged over the samples. Its entropy part E log q(z_i|z_i-1) is closed form given z_i-1,
      but taking it so raises the per-image variance (median 0.49 vs 0.46 nats^2 on the model
      below: log q and log p of one sample are correlated), so it is not used. This term is not a
      KL and can be negative in expectation: z_i+1 is drawn knowing z_i, so p(z_i|z_i+1) can fit
      z_i better than q does.

    Measured on the committed 5-layer VAE+BN+WU (profile ``cpu``, fp16 weights, all 10,000 test
    images), with S samples per image against S = 64: units on the other side of the 0.01-nat
    active threshold (of 124; 106 active at S = 64): S = 1: 5, S = 2: 2, S = 4: 1, S = 8, 16, 32:
    0. Its lowest unit: -0.023 nats at S = 1, -0.015 at S = 64 with a standard error of 0.001,
    i.e. truly negative. The 5-layer LVAE+BN+WU (closed form in every layer; per-image variance
    median 0.043 nats^2 vs 0.24 for log q - log p) has no unit change side at any S >= 1.
    :data:`KL_SAMPLES` = 32 keeps the largest standard error over 10,000 images (per-image
    variance up to 0.92 nats^2) near 0.002, a fifth of the threshold. ``samples`` = 1 (the
    default) is the training-time diagnostic, which draws one sample from ``generator``.
    """
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1 (posterior samples per image)")
    with torch.no_grad():
        return [k.mean(dim=(0, 1)) for k in model(x, samples, generator).kl_units(analytic)]
