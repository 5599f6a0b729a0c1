"""Training and evaluation (PROTOCOL.md sections 3 and 5).

Adam (beta1 0.9, beta2 0.999, eps 1e-4), batch 256, gradients rescaled to total norm <= 4 then
clipped elementwise to +-0.9, warm-up beta linear 0 -> 1 over N_t epochs, optional finetuning
phase (lr x 0.75 every 200 epochs, 10 eq / 10 iw samples).

Reproducibility: every random draw of epoch e (data order, binarisation, the reparameterisation
noise) comes from generators seeded by (seed, e), so a run resumed at an epoch boundary from its
checkpoint replays exactly the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import data as datasets
from .bounds import elbo, iw_bound, kl_per_unit, training_bound
from .config import EvalConfig, TrainConfig
from .models import HierarchicalVAE
from .warmup import warmup_beta

ACTIVE_UNIT_THRESHOLD = 0.01  # nats: a unit whose average KL exceeds this is "active"


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/inf; the message names the epoch and step."""


def generator(device: torch.device | str, *parts: object) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(datasets.derive_seed(*parts))
    return g


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    # fp32: foreach -- a few multi-tensor kernels instead of ~10 per parameter, bitwise identical to
    # the per-parameter loop. The fused kernel (one pass, ~3x faster on CPU) rounds differently, so
    # it is used only by the opt-in bf16 mode, whose numbers differ from fp32 anyway.
    kind = {"fused": True} if cfg.precision == "bf16" else {"foreach": True}
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, **kind)


def learning_rate(epoch: int, cfg: TrainConfig) -> float:
    """lr of 0-based ``epoch``: constant, or decayed by ``lr_decay`` every ``lr_decay_every`` epochs."""
    if cfg.lr_decay_every <= 0:
        return cfg.lr
    return cfg.lr * cfg.lr_decay ** (epoch // cfg.lr_decay_every)


def clip_gradients(params: list[torch.Tensor], cfg: TrainConfig) -> None:
    """Rescale to total norm <= clip_norm, then clip elementwise to +-clip_value (no host sync)."""
    if cfg.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm, foreach=True)
    if cfg.clip_value > 0:
        torch.nn.utils.clip_grad_value_(params, cfg.clip_value, foreach=True)


def autocast(cfg: TrainConfig, device: torch.device | str):
    """The training step's precision context: bf16 autocast (``cfg.precision == "bf16"``) or none."""
    if cfg.precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class EpochResult:
    epoch: int  # 0-based index of the epoch just trained
    beta: float
    lr: float
    train_loss: float  # mean of -bound over the epoch's minibatches (nats)
    seconds: float


def train_epoch(model: HierarchicalVAE, optimizer: torch.optim.Optimizer, data: datasets.ImageData,
                epoch: int, cfg: TrainConfig, device: torch.device, progress=None) -> EpochResult:
    """One pass over the (re-binarised, shuffled) training set. Raises NonFiniteLossError."""
    t0 = time.perf_counter()
    model.train()
    beta = warmup_beta(epoch, cfg.warmup_epochs)
    lr = learning_rate(epoch, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    noise = generator(device, "noise", cfg.seed, epoch)
    params = [p for p in model.parameters()]
    losses = []
    for x in datasets.train_batches(data, epoch, cfg.seed, cfg.batch_size):
        x = x.to(device, non_blocking=True)
        with autocast(cfg, device):
            loss = -training_bound(model, x, beta, cfg.eq_samples, cfg.iw_samples, cfg.analytic_kl, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(params, cfg)
        optimizer.step()
        losses.append(loss.detach())
        if progress is not None:
            progress.update(1)
    losses = torch.stack(losses)  # one host sync per epoch, not per step
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        step = int((~finite).nonzero()[0])
        raise NonFiniteLossError(
            f"non-finite loss ({losses[step].item()}) at epoch {epoch + 1}, step {step + 1}; "
            f"lower the learning rate (lr={lr}) or check the data. The last good checkpoint is kept."
        )
    return EpochResult(epoch, beta, lr, float(losses.mean()), time.perf_counter() - t0)


@torch.no_grad()
def recompute_bn_stats(model: HierarchicalVAE, x: torch.Tensor, g: torch.Generator, batch_size: int = 1000) -> None:
    """Set every batch-norm layer's population statistics to the exact average over ``x``
    (training-mode passes with sampled z), as the authors' code did before evaluating."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    if not bns:
        return
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = exact mean over the batches
    model.train()
    for start in range(0, len(x), batch_size):
        model(x[start:start + batch_size], 1, g)
    for bn, m in zip(bns, saved):
        bn.momentum = m


def _batched_mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


@torch.no_grad()
def evaluate(model: HierarchicalVAE, data: datasets.ImageData, cfg: TrainConfig, ecfg: EvalConfig,
             epoch: int, with_iw: bool, device: torch.device, batch_size: int = 1000) -> dict:
    """Train L1, test L1, per-unit KL on the test set, and (``with_iw``) test L_K with its SE."""
    x_test = data.x_test[: ecfg.test_subset].to(device) if ecfg.test_subset else data.x_test.to(device)
    x_train = datasets.fixed_binarized_train(data, ecfg.train_subset, cfg.seed).to(device)
    g = generator(device, "eval", cfg.seed, epoch)
    if ecfg.bn_stats == "recompute":
        recompute_bn_stats(model, x_train, g, batch_size)
    model.eval()

    def l1(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([elbo(model, x[s:s + batch_size], 1.0, True, g) for s in range(0, len(x), batch_size)])

    out: dict = {}
    out["train_L1"], _ = _batched_mean_se(l1(x_train))
    out["test_L1"], out["test_L1_se"] = _batched_mean_se(l1(x_test))
    kls = [kl_per_unit(model, x_test[s:s + batch_size], True, g) for s in range(0, len(x_test), batch_size)]
    sizes = [min(batch_size, len(x_test) - s) for s in range(0, len(x_test), batch_size)]
    kl_units = [sum(k[i] * n for k, n in zip(kls, sizes)) / len(x_test) for i in range(len(kls[0]))]
    out["kl_units"] = [[round(float(v), 6) for v in layer] for layer in kl_units]
    out["kl_layers"] = [float(layer.sum()) for layer in kl_units]
    out["active_units"] = [int((layer > ACTIVE_UNIT_THRESHOLD).sum()) for layer in kl_units]
    out["n_test"] = len(x_test)
    if with_iw:
        t0 = time.perf_counter()
        iw_batch = max(1, min(100, 25_000 // max(1, min(ecfg.iw_chunk, ecfg.iw_samples))))
        x_iw = x_test[: ecfg.iw_subset] if ecfg.iw_subset else x_test
        vals = torch.cat([iw_bound(model, x_iw[s:s + iw_batch], ecfg.iw_samples, ecfg.iw_chunk, g)
                          for s in range(0, len(x_iw), iw_batch)])
        out["test_LK"], out["test_LK_se"] = _batched_mean_se(vals)
        out["iw_k"] = ecfg.iw_samples
        out["n_iw"] = len(x_iw)
        out["iw_seconds"] = time.perf_counter() - t0
    return out
