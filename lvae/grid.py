"""Many models at once: train a grid of run configurations in one process.

Models whose architecture and optimisation protocol agree (seeds of one configuration, or variants
that differ only in warm-up, e.g. VAE+BN vs VAE+BN+WU) form a *group*: their weights are stacked
(``torch.func.stack_module_state``) and one step trains all of them with ``torch.func.vmap`` over
:func:`lvae.bounds.training_bound` -- the same objective code as the single-model trainer. Groups
run one after the other. Each model keeps exactly the random streams of the single-model trainer
(:mod:`lvae.train`): its parameters are initialised after ``torch.manual_seed(seed)``, its batches
come from ``data.train_batches(data, epoch, seed, batch_size)`` and its reparameterisation noise
is drawn, in the same order and shapes, from its own ``generator(device, "noise", seed, epoch)``
and replayed inside vmap. So a grid-trained model equals the one-by-one model up to
floating-point rounding (batched vs single matmuls); ``tests/test_grid.py`` checks this on CPU.

Adam is elementwise, so one Adam over the stacked parameters is every model's own Adam; the
gradient-norm clipping is computed per model. Every epoch's data is built once per seed and moved
to the device in one transfer (prepared for the next epoch in a background thread).

Results go into the ordinary run registry (:mod:`lvae.runs`): the same ``config.json``,
``metrics.jsonl``, ``provenance.json``, ``checkpoint.pt`` (a per-model Adam state, so a grid run
can be resumed or extended by :func:`lvae.runs.get_or_train` and vice versa) and fp16 weights.
Evaluation (:func:`lvae.train.evaluate`) runs per model on its unstacked copy.

Device-agnostic (CPU or CUDA). Only CPU was available when this was written; on a GPU,
``compile=True`` (or ``TrainConfig(compile=True)``) wraps the vmapped objective in ``torch.compile``
for full batches (a last partial batch runs eager: no recompilation); tests/test_grid.py checks it
against the eager grid on the CPU; it has not run on a GPU.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.func import functional_call, stack_module_state, vmap

from . import data as datasets
from . import runs as registry
from .config import EvalConfig, RunConfig
from .models import HierarchicalVAE, draw_noise
from .optim import FlatAdam
from .train import (DivergedError, NonFiniteLossError, Objective, autocast, default_device, evaluate,
                    evaluation_problem, fused_adam, generator, learning_rate, make_optimizer)
from .warmup import warmup_beta

# TrainConfig fields that may differ inside one stacked group (everything else must agree)
_PER_MODEL_FIELDS = ("seed", "warmup_epochs")


def group_key(cfg: RunConfig) -> str:
    """Configurations with equal keys can be stacked into one vmapped group."""
    train = {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(cfg.train) if f.name not in _PER_MODEL_FIELDS}
    return json.dumps({"model": dataclasses.asdict(cfg.model), "train": train}, sort_keys=True, default=str)


def group_configs(configs: Sequence[RunConfig]) -> list[list[RunConfig]]:
    groups: dict[str, list[RunConfig]] = {}
    for c in configs:
        groups.setdefault(group_key(c), []).append(c)
    return list(groups.values())


@dataclass
class _Member:
    config: RunConfig
    path: Any
    model: HierarchicalVAE
    optimizer: torch.optim.Optimizer
    start: int
    prov: dict
    save_fp16: bool
    train_losses: list = dataclasses.field(default_factory=list)


class GridTrainer:
    """One stacked group of models (same architecture and protocol), trained in lockstep."""

    def __init__(self, models: Sequence[HierarchicalVAE], configs: Sequence[RunConfig], device: torch.device,
                 optimizers: Sequence[torch.optim.Optimizer] | None = None, compile: bool = False):
        if len({group_key(c) for c in configs}) != 1:
            raise ValueError("GridTrainer: the configurations differ in more than seed / warm-up; use group_configs")
        self.device = torch.device(device)
        self.configs = list(configs)
        self.tcfg = configs[0].train
        self.mcfg = configs[0].model
        self.models = list(models)
        params, buffers = stack_module_state(self.models)
        self.names = list(params)
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        base = copy.deepcopy(self.models[0]).to("meta")
        self.objective = Objective(base, self.tcfg)
        self.optimizer = FlatAdam(list(self.params.values()), self.tcfg.lr, self.tcfg.adam_betas, self.tcfg.adam_eps,
                                  fused=fused_adam(self.tcfg))
        if optimizers is not None:
            self._load_optimizer_states(optimizers)

        def one(params, buffers, x, beta, eps):
            p = {"model." + k: v for k, v in params.items()}
            b = {"model." + k: v for k, v in buffers.items()}
            return functional_call(self.objective, (p, b), (x, beta, eps))

        self._loss = vmap(one, in_dims=(0, 0, 0, 0, 0), randomness="error")
        # as lvae.train.train_step: full batches through the compiled graph, a last partial batch eager
        # (no recompilation, no dynamic-shape graph)
        self._loss_full = torch.compile(self._loss) if compile or self.tcfg.compile else self._loss

    # -- per-model state <-> stacked state ---------------------------------------------------------
    def _load_optimizer_states(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        states = [opt.state_dict()["state"] for opt in optimizers]
        if not states[0]:
            return
        steps = {float(s[0]["step"]) for s in states}
        if len(steps) != 1:
            raise ValueError(f"GridTrainer: the models' optimizers are at different steps {sorted(steps)}")
        for j, name in enumerate(self.names):
            p = self.params[name]
            self.optimizer.state[p] = {
                "step": states[0][j]["step"].clone(),
                "exp_avg": torch.stack([s[j]["exp_avg"] for s in states]).to(self.device),
                "exp_avg_sq": torch.stack([s[j]["exp_avg_sq"] for s in states]).to(self.device),
            }
        self.optimizer.adopt_state()

    @torch.no_grad()
    def sync_to_models(self) -> None:
        """Copy each model's slice of the stack into its nn.Module (for evaluation and saving)."""
        for i, m in enumerate(self.models):
            state = {k: v[i] for k, v in self.params.items()}
            state.update({k: v[i] for k, v in self.buffers.items()})
            m.load_state_dict(state)

    @torch.no_grad()
    def sync_buffers_from_models(self) -> None:
        """Evaluation recomputes batch-norm statistics in place (as in the single trainer): carry them on."""
        for i, m in enumerate(self.models):
            for k, v in m.named_buffers():
                self.buffers[k][i].copy_(v)

    def model_optimizer(self, i: int, lr: float) -> torch.optim.Optimizer:
        """A per-model Adam holding model i's slice of the stacked Adam state (for checkpoints)."""
        m = self.models[i]
        opt = make_optimizer(m, self.tcfg)
        for group in opt.param_groups:
            group["lr"] = lr
        for name, p in m.named_parameters():
            st = self.optimizer.state.get(self.params[name])
            if st:
                opt.state[p] = {"step": st["step"].clone(), "exp_avg": st["exp_avg"][i].clone(),
                                "exp_avg_sq": st["exp_avg_sq"][i].clone()}
        return opt

    # -- training -----------------------------------------------------------------------------------
    def _clip(self) -> None:
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        cfg = self.tcfg
        if cfg.clip_norm > 0:  # per model: clip_grad_norm_ over that model's tensors
            norms = torch.stack([torch.linalg.vector_norm(g.reshape(len(g), -1), 2, dim=1) for g in grads], dim=1)
            total = torch.linalg.vector_norm(norms, 2, dim=1)
            coef = torch.clamp(cfg.clip_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
        self.optimizer.clip_(0.0, cfg.clip_value)  # elementwise: on the flat gradient

    def step(self, x: torch.Tensor, beta: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        """One Adam step of every model; ``x`` [M, B, D], ``beta`` [M], ``eps`` list of [M, k, B, d]."""
        with autocast(self.tcfg, self.device):
            loss = self._loss_full if x.shape[1] == self.tcfg.batch_size else self._loss
            losses = loss(self.params, self.buffers, x, beta, eps)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self._clip()
        self.optimizer.step()
        return losses.detach()

    def train_epoch(self, epoch: int, epoch_data: dict[int, torch.Tensor], progress=None) -> list[tuple]:
        """One epoch of every model; ``epoch_data[seed]`` = that seed's whole epoch, batch order."""
        t0 = time.perf_counter()
        cfg, dev, M = self.tcfg, self.device, len(self.models)
        seeds = [c.train.seed for c in self.configs]
        betas = torch.tensor([warmup_beta(epoch, c.train.warmup_epochs) for c in self.configs], device=dev)
        lr = learning_rate(epoch, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        noise = [generator(dev, "noise", s, epoch) for s in seeds]
        k = cfg.eq_samples * cfg.iw_samples
        n = len(next(iter(epoch_data.values())))
        same = len(set(seeds)) == 1
        losses = []
        for start in range(0, n, cfg.batch_size):
            if same:
                xb = epoch_data[seeds[0]][start:start + cfg.batch_size]
                x = xb.unsqueeze(0).expand(M, *xb.shape)
            else:
                x = torch.stack([epoch_data[s][start:start + cfg.batch_size] for s in seeds])
            per_model = [draw_noise(self.mcfg, k, x.shape[1], g, dev) for g in noise]
            eps = [torch.stack(draws) for draws in zip(*per_model)]
            losses.append(self.step(x, betas, eps))
            if progress is not None:
                progress.update(1)
        losses = torch.stack(losses)  # [steps, M]; one host sync per epoch
        return [(epoch, float(betas[i]), lr, losses[:, i], time.perf_counter() - t0) for i in range(M)]


def _epoch_data(data: datasets.ImageData, epoch: int, seeds: Sequence[int], batch_size: int,
                device: torch.device) -> dict[int, torch.Tensor]:
    """Each seed's whole epoch, in batch order, on the device (one transfer per seed)."""
    out = {}
    for s in sorted(set(seeds)):
        x = torch.cat(list(datasets.train_batches(data, epoch, s, batch_size)))
        out[s] = x.to(device, non_blocking=True) if device.type == "cuda" else x
    return out


def train_grid(configs: Sequence[RunConfig], epochs: int, eval_config: EvalConfig | Sequence[EvalConfig] | None = None,
               *, root: str | os.PathLike | None = None, device: str | torch.device | None = None,
               progress: bool = True, save_fp16: bool | Sequence[bool] = True,
               data: datasets.ImageData | None = None, stop_after: int | None = None, compile: bool = False,
               checkpoint_every: int | None = None, log: Callable[[str], None] | None = None) -> list[registry.Run]:
    """Train every run of ``configs`` to ``epochs`` epochs, stacked by group; returns the Runs in order.

    Runs already complete with >= ``epochs`` are reused; runs with a checkpoint are resumed
    (models of one group that stand at different epochs are trained in separate groups). Runs
    with ``init_from`` (finetuning) are trained one by one with :func:`lvae.runs.get_or_train`.
    Checkpoints are written at every evaluation, every ``checkpoint_every`` epochs and at the end.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    configs = list(configs)
    ecfgs = list(eval_config) if isinstance(eval_config, (list, tuple)) else [eval_config or EvalConfig()] * len(configs)
    fp16 = list(save_fp16) if isinstance(save_fp16, (list, tuple)) else [save_fp16] * len(configs)
    base = registry.results_dir(root)
    dev = torch.device(device) if device is not None else default_device()
    log = log or (lambda s: print(s, file=sys.stderr) if progress else None)

    todo, done = [], {}
    for cfg in configs:  # before any run directory is created
        registry.check_run_name(cfg.name)
    for i, cfg in enumerate(configs):
        path = base / cfg.dir_name
        if (path / "config.json").exists():
            run = registry.Run(path)
            if run.epochs >= epochs and run.status == "complete":
                done[i] = run
                continue
        if cfg.train.init_from:
            done[i] = registry.get_or_train(cfg, epochs, ecfgs[i], root=base, device=dev, progress=progress,
                                            save_fp16=fp16[i], data=data, stop_after=stop_after)
            continue
        todo.append(i)

    by_data: dict[tuple, list[int]] = {}
    for i in todo:
        t = configs[i].train
        by_data.setdefault((t.dataset, t.subset, t.test_seed, ecfgs[i].test_subset), []).append(i)
    for (dataset, subset, test_seed, test_subset), idx in by_data.items():
        d = data if data is not None else datasets.load_dataset(dataset, subset=subset, test_subset=test_subset,
                                                                  test_seed=test_seed)
        groups: dict[str, list[int]] = {}
        for i in idx:
            groups.setdefault(group_key(configs[i]) + f"|{ecfgs[i]}", []).append(i)
        for members in groups.values():
            with contextlib.ExitStack() as stack:
                for i in members:
                    stack.enter_context(registry.run_lock(base / configs[i].dir_name))
                runs = _train_group([configs[i] for i in members], epochs, ecfgs[members[0]],
                                    [fp16[i] for i in members], base, dev, d, progress, stop_after, compile,
                                    checkpoint_every, log)
            done.update(zip(members, runs))
    return [done[i] for i in range(len(configs))]


def _prepare_member(cfg: RunConfig, ecfg: EvalConfig, path, base, dev, save_fp16: bool, data) -> _Member:
    tcfg, mcfg = cfg.train, cfg.model
    if data.x_dim != mcfg.x_dim or data.likelihood != mcfg.likelihood:
        raise registry.RunError(f"dataset {tcfg.dataset!r} has x_dim={data.x_dim}, likelihood={data.likelihood!r} "
                                f"but {cfg.name} expects x_dim={mcfg.x_dim}, likelihood={mcfg.likelihood!r}")
    st = registry.open_for_training(cfg, ecfg, path, base, dev)
    return _Member(cfg, path, st.model, st.optimizer, st.start, st.prov, save_fp16, st.pending)


def _train_group(configs, epochs, ecfg, fp16, base, dev, data, progress, stop_after, compile, checkpoint_every,
                 log) -> list[registry.Run]:
    members = [_prepare_member(c, ecfg, base / c.dir_name, base, dev, f, data) for c, f in zip(configs, fp16)]
    by_start: dict[int, list[_Member]] = {}
    for m in members:
        by_start.setdefault(m.start, []).append(m)
    for start, ms in sorted(by_start.items()):
        _train_members(ms, start, epochs, ecfg, dev, data, progress, stop_after, compile, checkpoint_every, log)
    return [registry.Run(m.path) for m in members]


def _train_members(ms: list[_Member], start: int, epochs: int, ecfg: EvalConfig, dev, data, progress, stop_after,
                   compile, checkpoint_every, log) -> None:
    tcfg = ms[0].config.train
    for m in ms:
        registry.mark_running(m.path, m.prov, m.config.train.seed, dev, start, epochs,
                              trainer=f"lvae.grid ({len(ms)} stacked)")
    trainer = GridTrainer([m.model for m in ms], [m.config for m in ms], dev, [m.optimizer for m in ms], compile)
    end = epochs if stop_after is None else min(epochs, start + stop_after)
    seeds = [m.config.train.seed for m in ms]
    log(f"lvae.grid: {len(ms)} model(s) {[m.config.name for m in ms]} epochs {start}->{end} on {dev}")
    from tqdm.auto import tqdm

    n_batches = datasets.num_batches(len(data.x_train), tcfg.batch_size)
    bar = tqdm(total=(end - start) * n_batches, desc=f"grid[{len(ms)}] {ms[0].config.name}", unit="step",
               disable=not progress, leave=False)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        nxt = pool.submit(_epoch_data, data, start, seeds, tcfg.batch_size, dev) if start < end else None
        for epoch in range(start, end):
            t0 = time.perf_counter()
            epoch_data = nxt.result()
            nxt = pool.submit(_epoch_data, data, epoch + 1, seeds, tcfg.batch_size, dev) if epoch + 1 < end else None
            results = trainer.train_epoch(epoch, epoch_data, bar)
            done = epoch + 1
            finite = torch.stack([torch.isfinite(p.detach()).flatten(1).all(1) for p in trainer.params.values()]).all(0)
            bad = [(m, r) for j, (m, r) in enumerate(zip(ms, results))
                   if not bool(torch.isfinite(r[3]).all()) or not bool(finite[j])]
            if bad:
                trainer.sync_to_models()
                for m, r in bad:
                    where = (~torch.isfinite(r[3])).nonzero()
                    step = int(where[0]) if len(where) else len(r[3]) - 1
                    err = (f"non-finite loss or parameters at epoch {done}, step {step + 1}; lower the learning "
                           f"rate (lr={r[2]}) or check the data. The last good checkpoint is kept.")
                    m.prov.update({"status": "failed", "error": err, "finished": registry._now()})
                    registry.atomic_write_json(m.path / "provenance.json", m.prov)
                raise NonFiniteLossError(f"{bad[0][0].config.name}: {bad[0][0].prov['error']}")
            is_eval = done % ecfg.every == 0 or done == epochs
            is_ckpt = is_eval or done == end or (checkpoint_every and done % checkpoint_every == 0)
            if is_ckpt:
                trainer.sync_to_models()
            per_model_seconds = (time.perf_counter() - t0) / len(ms)
            for i, (m, (ep, beta, lr, losses, secs)) in enumerate(zip(ms, results)):
                m.train_losses.append(float(losses.mean()))
                row = None
                if is_eval:
                    with_iw = done == epochs or (ecfg.iw_every > 0 and done % ecfg.iw_every == 0)
                    row = {"epoch": done, "beta": beta, "lr": lr,
                           "train_loss": sum(m.train_losses) / len(m.train_losses),
                           **evaluate(m.model, data, m.config.train, ecfg, epoch, with_iw, dev)}
                    m.train_losses = []
                    mcfg = m.config.model
                    history = registry.read_jsonl(m.path / "metrics.jsonl")
                    problem = evaluation_problem(row, history, mcfg.x_dim, mcfg.likelihood)
                    if problem is not None:  # as in lvae.runs: the run fails, naming the epoch and the fix
                        err = (f"the evaluation of epoch {done} is not sane: {problem}. Training diverged: lower "
                               f"the learning rate (lr={lr}; --lr on the command line) or check the data.")
                        m.prov.update({"status": "failed", "error": err, "finished": registry._now()})
                        registry.atomic_write_json(m.path / "provenance.json", m.prov)
                        raise DivergedError(f"{m.config.name}: {err}")
                if row is not None:  # written before the checkpoint of its epoch, as in lvae.runs
                    row["epoch_seconds"] = secs / len(ms)
                    row["grid_size"] = len(ms)
                    registry.append_jsonl(m.path / "metrics.jsonl", row)
                    m.prov["metrics_rows"] = int(m.prov.get("metrics_rows", 0)) + 1
                if is_ckpt:
                    registry.save_checkpoint(m.path, m.model, trainer.model_optimizer(i, lr), done,
                                              m.train_losses, m.save_fp16)
                m.prov["wall_seconds"] += per_model_seconds
                m.prov["epochs"] = done
                if is_ckpt:
                    registry.atomic_write_json(m.path / "provenance.json", m.prov)
            if is_eval:
                trainer.sync_buffers_from_models()  # evaluation recomputed the BN statistics in place
            bar.set_postfix(epoch=done)
    finally:
        bar.close()
        pool.shutdown(wait=True)
    for m in ms:
        m.prov.update({"status": "complete" if m.prov["epochs"] >= epochs else "partial", "finished": registry._now()})
        m.prov.pop("error", None)
        registry.atomic_write_json(m.path / "provenance.json", m.prov)


def profile_grid(profile, seeds: Sequence[int] | None = None, **train_overrides: Any):
    """(configs, eval configs, keep-fp16 flags, epochs) of a profile's whole Fig-3 grid (every seed),
    exactly the runs that :func:`lvae.profiles.get_run` would train one by one."""
    from .profiles import experiment, load_profile

    p = load_profile(profile) if isinstance(profile, str) else profile
    cfgs, ecfgs, keep = [], [], []
    for s in (seeds or p.seeds):
        for v in p.variants:
            for d in p.depths:
                c, e = experiment(p, v, d, s, **train_overrides)
                cfgs.append(c)
                ecfgs.append(e)
                keep.append(v in p.keep_weights and d == p.max_depth)
    return cfgs, ecfgs, keep, p.epochs


def train_profile(profile, seeds: Sequence[int] | None = None, *, root: str | os.PathLike | None = None,
                  device: str | torch.device | None = None, progress: bool = True, compile: bool = False,
                  **train_overrides: Any) -> list[registry.Run]:
    """Train a profile's whole grid (e.g. ``paper``: 20 models x 3 seeds) with the grid trainer;
    the runs land in the registry where :func:`lvae.profiles.get_run` finds them."""
    cfgs, ecfgs, keep, epochs = profile_grid(profile, seeds, **train_overrides)
    return train_grid(cfgs, epochs, ecfgs, root=root, device=device, progress=progress, save_fp16=keep,
                      compile=compile)
