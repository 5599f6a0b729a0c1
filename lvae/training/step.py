"""The training step and evaluation (paper section 3; book/protocol.md, "Optimisation" and "Evaluation");
the epoch loop is :mod:`lvae.training.loop`.

Adam (beta1 0.9, beta2 0.999, eps 1e-4), batch 256, gradients rescaled to total norm <= 4 then
clipped elementwise to +-0.9, warm-up beta linear 0 -> 1 over N_t epochs, optional finetuning
phase (lr x 0.75 every 200 epochs, 10 eq / 10 iw samples).

Reproducibility: every random draw of epoch e (data order, binarisation, the reparameterisation
noise) comes from generators seeded by (seed, e), so a run resumed at an epoch boundary from its
checkpoint replays exactly the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from lvae.config import ConfigError, EvalConfig, TrainConfig
from lvae.data import batches
from lvae.data.datasets import load_dataset
from lvae.model.bounds import elbo, iw_bound_batched, kl_per_unit, training_bound
from lvae.model.gaussian import NoiseReplay
from lvae.model.network import HierarchicalVAE, draw_noise
from lvae.registry.runs import Run, record_eval, save_per_image
from lvae.registry.storage import _finite_or_none, check_writable, device_description, git_commit
from lvae.training.optim import FlatAdam

ACTIVE_UNIT_THRESHOLD = 0.01  # nats: a unit whose average KL exceeds this is "active"


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/inf; the message names the epoch and step."""


class DivergedError(NonFiniteLossError):
    """An evaluation was not sane (:func:`evaluation_problem`): training diverged although every
    loss may have stayed finite. A :class:`NonFiniteLossError`, so whatever handles a NaN handles it."""


# -- is an evaluation sane? ------------------------------------------------------------------------
# A model that predicts 0.5 for every pixel (Bernoulli) scores -x_dim ln 2 per image: -543.4 nats on
# MNIST. For the Gaussian likelihood (NORB, pixels in [0, 1]) the counterpart is N(x | 0.5, 1), which
# scores at least -x_dim (ln(2 pi) / 2 + 1/8) per image. An evaluation whose bound lies more than
# SANITY_FACTOR times below that is not a model that learns, it is a diverged one: healthy models,
# even freshly initialised or after one epoch on 32 images, score between -0.5 and -1.7 times the
# trivial bound here (every variant, depths 1 and 5, both likelihoods); --lr 1e4 scores -1e7 times it.
SANITY_FACTOR = 10.0
# ... and one whose training L1 fell at WORSENING_EVALS evaluations in a row after warm-up (beta = 1),
# by more than WORSENING_FRACTION of the trivial bound in all, keeps getting worse: after warm-up
# the training bound (on a fixed training subset, so overfitting does not lower it) only rises.
WORSENING_EVALS = 3
WORSENING_FRACTION = 0.1
BOUND_KEYS = ("train_L1", "test_L1", "test_LK")  # the evaluated bounds the sanity floor applies to


def trivial_bound(x_dim: int, likelihood: str) -> float:
    """log-likelihood per image of the trivial model: every pixel Bernoulli(0.5) (``-x_dim ln 2``),
    or, for the Gaussian likelihood, the lowest N(x | 0.5, 1) scores on pixels in [0, 1]."""
    if likelihood == "bernoulli":
        return -x_dim * math.log(2.0)
    return -x_dim * (0.5 * math.log(2.0 * math.pi) + 0.125)


def evaluation_problem(row: dict, history: list[dict], x_dim: int, likelihood: str) -> str | None:
    """Why the evaluation ``row`` is not sane, or None. ``history``: the run's earlier rows.

    Not sane: a non-finite number (every value but the standard errors, which are undefined for
    one image); a bound (``train_L1``, ``test_L1``, ``test_LK``) more than :data:`SANITY_FACTOR`
    times below :func:`trivial_bound`; or a training L1 that fell at each of the last
    :data:`WORSENING_EVALS` evaluations after warm-up, by more than :data:`WORSENING_FRACTION` of
    the trivial bound in all. The epoch-mean training loss is not held to the floor: it averages
    the first steps of a fresh model, which can be far worse than any evaluation."""
    bad = [k for k, v in _numbers(row) if not k.endswith("_se") and not math.isfinite(v)]
    if bad:
        return f"non-finite values ({', '.join(f'{k}={_value(row, k)}' for k in dict.fromkeys(bad[:4]))})"
    trivial = trivial_bound(x_dim, likelihood)
    floor = SANITY_FACTOR * trivial
    low = [k for k in BOUND_KEYS if k in row and row[k] < floor]
    if low:
        trivial_model = "0.5" if likelihood == "bernoulli" else "N(0.5, 1)"
        return (f"{low[0]} = {row[low[0]]:.4g} nats per image, more than {SANITY_FACTOR:g} times below the "
                f"{trivial:.1f} of a model that predicts {trivial_model} for every pixel")
    rows = [r for r in history if "train_L1" in r][-WORSENING_EVALS:] + [row]
    if len(rows) == WORSENING_EVALS + 1 and all(r.get("beta", 0.0) >= 1.0 for r in rows):
        values = [r["train_L1"] for r in rows]
        fell = all(b < a for a, b in zip(values, values[1:]))
        if fell and values[0] - values[-1] > WORSENING_FRACTION * abs(trivial):
            return (f"train_L1 fell at {WORSENING_EVALS} evaluations in a row after warm-up, from {values[0]:.2f} at "
                    f"epoch {rows[0].get('epoch')} to {values[-1]:.2f}: it keeps getting worse")
    return None


def _numbers(obj, key: str = "") -> list[tuple[str, float]]:
    """(key, value) of every float in a metrics row, lists included (``kl_units``)."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _numbers(v, k)]
    if isinstance(obj, (list, tuple)):
        return [kv for v in obj for kv in _numbers(v, key)]
    return [(key, obj)] if isinstance(obj, float) else []


def _value(row: dict, key: str):
    v = row.get(key)
    return v if isinstance(v, float) else "non-finite entries"


def generator(device: torch.device | str, *parts: object) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(batches.derive_seed(*parts))
    return g


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Objective(nn.Module):
    """-(training bound).mean() of one model with pre-drawn noise ``eps`` (:func:`lvae.model.network.draw_noise`):
    the loss of :func:`train_step` as a module, so that ``torch.compile`` sees no random-number
    generator and ``functional_call`` (lvae.training.grid) can swap in one model's slice of stacked weights."""

    def __init__(self, model: HierarchicalVAE, tcfg: TrainConfig):
        super().__init__()
        self.model = model
        self.eq, self.iw, self.analytic = tcfg.eq_samples, tcfg.iw_samples, tcfg.analytic_kl

    def forward(self, x: torch.Tensor, beta: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        return -training_bound(self.model, x, beta, self.eq, self.iw, self.analytic, NoiseReplay(eps),
                               check=False).mean()


def make_optimizer(model: nn.Module, cfg: TrainConfig, capturable: bool = False) -> FlatAdam:
    """Adam (book/protocol.md, "Optimisation") over one flat buffer (:mod:`lvae.training.optim`): by default bitwise the
    numbers of ``torch.optim.Adam``; the opt-in bf16 and compile modes, whose rounding differs
    anyway, use the fused kernel and a one-reduction gradient norm. ``capturable``: step counter and
    learning rate on the device, for a step captured as a CUDA graph (:mod:`lvae.training.loop`)."""
    return FlatAdam(model.parameters(), cfg.lr, cfg.adam_betas, cfg.adam_eps, fused=fused_adam(cfg),
                    capturable=capturable)


def fused_adam(cfg: TrainConfig) -> bool:
    """The opt-in modes whose rounding differs anyway take the fused Adam kernel."""
    return cfg.precision == "bf16" or cfg.compile


def learning_rate(epoch: int, cfg: TrainConfig) -> float:
    """lr of 0-based ``epoch``: constant, or decayed by ``lr_decay`` every ``lr_decay_every`` epochs."""
    if cfg.lr_decay_every <= 0:
        return cfg.lr
    return cfg.lr * cfg.lr_decay ** (epoch // cfg.lr_decay_every)


def clip_gradients(params: list[torch.Tensor] | torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Rescale to total norm <= clip_norm, then clip elementwise to +-clip_value (no host sync).
    ``params``: a list of parameters, or an optimizer (a :class:`FlatAdam` clips its flat gradient)."""
    if isinstance(params, FlatAdam):
        params.clip_(cfg.clip_norm, cfg.clip_value)
        return
    if isinstance(params, torch.optim.Optimizer):
        params = [p for group in params.param_groups for p in group["params"]]
    if cfg.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm, foreach=True)
    if cfg.clip_value > 0:
        torch.nn.utils.clip_grad_value_(params, cfg.clip_value, foreach=True)


def autocast(cfg: TrainConfig, device: torch.device | str):
    """The training step's precision context: bf16 autocast (``cfg.precision == "bf16"``) or none.
    On CUDA the cast cache is off, as a step captured in a CUDA graph needs."""
    if cfg.precision == "bf16":
        kind = torch.device(device).type
        return torch.autocast(kind, dtype=torch.bfloat16, cache_enabled=kind != "cuda")
    return contextlib.nullcontext()


class PrecisionError(ConfigError):
    """The requested precision has no fast hardware path here; the message names the fp32 option."""


_BF16_FAST: dict[str, tuple[bool, str]] = {}  # device type -> (fast, reason), probed once per process


def bf16_matmul(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 matrices faster than fp32, and the evidence in words.

    CUDA: bf16 tensor cores (compute capability >= 8.0). CPU: a probe, once per process, that times
    a 512 x 512 matmul in bf16 and in fp32 (best of 5); without AVX512-BF16 or AMX the bf16 one is
    emulated and slower."""
    dev = torch.device(device)
    if dev.type in _BF16_FAST:
        return _BF16_FAST[dev.type]
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        fast = major >= 8
        out = (fast, f"{torch.cuda.get_device_name(dev)} has compute capability {major}.{minor}"
                     f"{'' if fast else ' (bf16 tensor cores need 8.0 or newer)'}")
    elif dev.type == "cpu":
        a = torch.rand(512, 512)
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            x = a.to(dtype)
            x @ x
            best = math.inf
            for _ in range(5):
                t0 = time.perf_counter()
                x @ x
                best = min(best, time.perf_counter() - t0)
            times[dtype] = best
        fast = times[torch.bfloat16] < times[torch.float32]
        out = (fast, f"a 512 x 512 matmul took {1e3 * times[torch.bfloat16]:.2f} ms in bf16 and "
                     f"{1e3 * times[torch.float32]:.2f} ms in fp32 on this CPU "
                     f"({torch.backends.cpu.get_cpu_capability()})")
    else:
        out = (False, f"no bf16 probe for device type {dev.type!r}")
    _BF16_FAST[dev.type] = out
    return out


def check_precision(cfg: TrainConfig, device: torch.device | str) -> None:
    """Refuse ``precision="bf16"`` where bf16 matmuls are not faster than fp32 (:func:`bf16_matmul`):
    there it is only slower and less exact. Raises :class:`PrecisionError` naming the fp32 option."""
    if cfg.precision != "bf16":
        return
    fast, why = bf16_matmul(device)
    if not fast:
        raise PrecisionError(f"precision='bf16' needs fast bf16 matrix multiplication, which this hardware lacks: "
                             f"{why}. Train in fp32 instead (--precision fp32; TrainConfig(precision='fp32')).")


_COMPILED: OrderedDict[tuple, tuple[weakref.ref, Callable]] = OrderedDict()  # -> compiled Objective


def compiled_objective(model: HierarchicalVAE, cfg: TrainConfig) -> Callable:
    """``torch.compile(Objective(model, cfg))``, cached per model and objective (the last two)."""
    key = (id(model), cfg.eq_samples, cfg.iw_samples, cfg.analytic_kl)
    hit = _COMPILED.get(key)
    if hit is not None and hit[0]() is model:
        _COMPILED.move_to_end(key)
        return hit[1]
    fn = torch.compile(Objective(model, cfg))
    _COMPILED[key] = (weakref.ref(model), fn)
    while len(_COMPILED) > 2:
        _COMPILED.popitem(last=False)
    return fn


def objective_step(loss: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, beta: torch.Tensor,
                   eps: list[torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """One minibatch step of one model with pre-drawn noise: ``loss(x, beta, eps)`` (an
    :class:`Objective`, or its compiled form), backward, clipping, Adam. Returns the loss (no host
    sync). Static shapes and no random-number generator: the step a CUDA graph captures."""
    with autocast(cfg, x.device):
        value = loss(x, beta, eps)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    clip_gradients(optimizer, cfg)
    optimizer.step()
    return value.detach()


def train_step(model: HierarchicalVAE, optimizer: torch.optim.Optimizer, x: torch.Tensor, beta: float,
               cfg: TrainConfig, noise: torch.Generator | None) -> torch.Tensor:
    """One minibatch step with the noise drawn from ``noise`` (:func:`lvae.model.network.draw_noise`, the
    draws a pass would make, in its order): :func:`objective_step`. Returns the loss (no host sync).

    ``cfg.compile``: full-size batches run through :func:`compiled_objective`; a smaller last batch
    runs eagerly rather than compiling a second graph.
    """
    eps = draw_noise(model.config, cfg.eq_samples * cfg.iw_samples, len(x), noise, x.device, x.dtype)
    loss = compiled_objective(model, cfg) if cfg.compile and len(x) == cfg.batch_size else Objective(model, cfg)
    return objective_step(loss, optimizer, x, torch.tensor(float(beta), device=x.device), eps, cfg)


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
def evaluate(model: HierarchicalVAE, data: batches.ImageData, cfg: TrainConfig, ecfg: EvalConfig,
             epoch: int, with_iw: bool, device: torch.device, batch_size: int = 1000, progress: bool = False,
             per_image: dict | None = None) -> dict:
    """Train L1, test L1, per-unit KL on the test set, and (``with_iw``) test L_K with its SE
    (``progress``: a progress bar over the L_K batches, for long stand-alone evaluations).

    ``per_image``: a dict that receives the per-test-image values (float32 numpy arrays ``test_L1``
    and, with ``with_iw``, ``test_LK``), for paired comparisons between models on the same images.
    Asking for them changes no number: the random draws are the same."""
    x_test = data.x_test[: ecfg.test_subset].to(device) if ecfg.test_subset else data.x_test.to(device)
    x_train = batches.fixed_binarized_train(data, ecfg.train_subset, cfg.seed).to(device)
    g = generator(device, "eval", cfg.seed, epoch)
    if ecfg.bn_stats == "recompute":
        recompute_bn_stats(model, x_train, g, batch_size)
    model.eval()

    def l1(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([elbo(model, x[s:s + batch_size], 1.0, True, g) for s in range(0, len(x), batch_size)])

    out: dict = {}
    out["train_L1"], _ = _batched_mean_se(l1(x_train))
    test_l1 = l1(x_test)
    out["test_L1"], out["test_L1_se"] = _batched_mean_se(test_l1)
    if per_image is not None:
        per_image["test_L1"] = test_l1.float().cpu().numpy()
    kls = [kl_per_unit(model, x_test[s:s + batch_size], True, g) for s in range(0, len(x_test), batch_size)]
    sizes = [min(batch_size, len(x_test) - s) for s in range(0, len(x_test), batch_size)]
    kl_units = [sum(k[i] * n for k, n in zip(kls, sizes)) / len(x_test) for i in range(len(kls[0]))]
    out["kl_units"] = [[round(float(v), 6) for v in layer] for layer in kl_units]
    out["kl_layers"] = [float(layer.sum()) for layer in kl_units]
    out["active_units"] = [int((layer > ACTIVE_UNIT_THRESHOLD).sum()) for layer in kl_units]
    out["n_test"] = len(x_test)
    if with_iw:
        t0 = time.perf_counter()
        iw_batch = max(1, min(100, 25_000 // max(1, min(ecfg.iw_chunk, ecfg.iw_k))))
        x_iw = x_test[: ecfg.iw_subset] if ecfg.iw_subset else x_test
        vals = iw_bound_batched(model, x_iw, ecfg.iw_k, ecfg.iw_chunk, iw_batch, g,
                                workers=torch.get_num_threads(), progress=progress)
        out["test_LK"], out["test_LK_se"] = _batched_mean_se(vals)
        if per_image is not None:
            per_image["test_LK"] = vals.float().cpu().numpy()
        out["iw_k"] = ecfg.iw_k
        out["n_iw"] = len(x_iw)
        out["iw_seconds"] = time.perf_counter() - t0
    return out


# -- a stored run's final weights, evaluated again (lvae eval) --------------------------------------
def evaluate_run(run: Run, iw_k: int = EvalConfig().iw_k, test_subset: int | None = None,
                 iw_chunk: int = EvalConfig().iw_chunk, device: str | torch.device | None = None, save: bool = True,
                 progress: bool = False, iw_subset: int | None = None) -> dict:
    """Evaluate a stored run's final weights (L1s, per-unit KL, L_K) and record it in evals.jsonl,
    with the per-test-image values (:func:`lvae.registry.runs.save_per_image`). ``lvae eval`` calls it.

    L1 covers the first ``test_subset`` test images (all 10,000 when None); L_K the first
    ``iw_subset`` of those (all of them when None), whatever the run's own training-time
    evaluations used.
    """
    if save:  # the evaluation is recorded in the run's folder: refuse a read-only one before the work
        check_writable(run.path, f"evaluate a copy of the run in a writable registry (cp -r {run.path} DIR/, then "
                                 f"`lvae eval {run.name} --out DIR`), or pass save=False in Python")
    dev = torch.device(device) if device is not None else default_device()
    tcfg = run.config.train
    ecfg = dataclasses.replace(run.eval_config, iw_k=iw_k, test_subset=test_subset, iw_subset=iw_subset,
                               iw_chunk=iw_chunk)
    data = load_dataset(tcfg.dataset, subset=tcfg.subset, test_subset=test_subset, test_seed=tcfg.test_seed)
    model = run.load_model(dev)
    code = git_commit()  # the code loaded now, before the (long) evaluation
    t0 = time.perf_counter()
    per_image: dict = {}
    row = {"epoch": run.epochs,
           **evaluate(model, data, tcfg, ecfg, run.epochs - 1, True, dev, progress=progress, per_image=per_image),
           "device": device_description(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
           **code, "seconds": time.perf_counter() - t0}
    if save:
        row["per_image"] = save_per_image(run.path, row, per_image)
        record_eval(run, row)
    return _finite_or_none(row)  # as stored: an undefined number (one image's standard error) is None
