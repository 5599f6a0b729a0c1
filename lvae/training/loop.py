"""The training engine: one epoch loop for a stack of M >= 1 runs (book/protocol.md, "Optimisation").

:func:`train_stack` trains runs whose architecture and protocol agree in lockstep, epoch by epoch:
warm-up beta and learning rate of the epoch, the steps, one host sync at the epoch's end (are the
losses and parameters finite?), then evaluations every ``EvalConfig.every`` epochs, checkpoints,
the sanity checks and the roll-back to the last sane checkpoint (:mod:`lvae.training.checkpoints`). A single
run (:func:`get_or_train`) is a stack of one; :func:`lvae.training.grid.train_grid` stacks many.

The step strategy depends on M: :class:`SingleModel` (M = 1) is the model's own step
(:func:`lvae.training.step.objective_step`), bitwise the numbers of the committed runs on the CPU;
:class:`GridTrainer` (M > 1) stacks the weights (``torch.func.stack_module_state``) and trains all
models with one ``vmap`` of the same objective, equal to the one-by-one models up to rounding.

Every input of an epoch is ready before it starts (:func:`epoch_inputs`, prepared for the next
epoch in a background thread): each run's batches and reparameterisation noise, drawn from that
run's own generators (seeded by seed and epoch) in the order a pass draws them, so the numbers do
not depend on how runs are grouped. The step has static shapes, reads beta and the learning rate
from device tensors and keeps the losses on the device: on CUDA (``cuda_graph=True``, the default)
each stack's full-batch step -- forward, backward, clipping, Adam -- is captured once as a
``torch.cuda.CUDAGraph`` and replayed with the batch and noise copied into its static inputs
(a last partial batch, and ``compile=True``, run eagerly). The capture runs on the step's device, in
training mode, before the next epoch's prefetch starts (no other thread may use the device while a
stream captures); ``tests/cuda_standin.py`` runs it on the CPU in CI. The CPU ignores ``cuda_graph``.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from lvae.config import ConfigError, EvalConfig, RunConfig
from lvae.data import batches
from lvae.data.datasets import DATASETS, load_dataset
from lvae.model.network import HierarchicalVAE, draw_noise
from lvae.model.warmup import warmup_beta
from lvae.registry.runs import CHECKPOINT, SANE_CHECKPOINT, Run, check_run_name, results_dir, save_per_image
from lvae.registry.storage import DiskFullError, RunError, _now, append_jsonl, atomic_write_json, read_jsonl, run_lock
from lvae.training.checkpoints import (TrainingState, check_init_from, completed, keep_as_sane, mark_running,
                                       open_for_training, roll_back, save_checkpoint)
from lvae.training.optim import FlatAdam
from lvae.training.step import (DivergedError, NonFiniteLossError, Objective, autocast, check_precision,
                                compiled_objective, default_device, evaluate, evaluation_problem, fused_adam, generator,
                                learning_rate, make_optimizer, objective_step)

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before a capture (their effect is undone)


# -- the epoch's inputs ----------------------------------------------------------------------------
@dataclass
class EpochInputs:
    """One epoch of a stack's inputs, on the device: each distinct seed's training set in batch
    order and, per step, the stacked noise ``[M, k, B, d]`` of every noise tensor a pass draws."""

    names: list[str]  # the runs' directory names
    seeds: list[int]
    x: dict[int, torch.Tensor]  # seed -> [N, D]
    eps: list[list[torch.Tensor]]  # step -> noise tensors [M, k, B, d]
    batch_size: int

    @property
    def steps(self) -> int:
        return len(self.eps)

    def batch(self, step: int) -> torch.Tensor:
        """The step's minibatches ``[M, B, D]`` (one copy shared, expanded, when every seed is the same)."""
        start = step * self.batch_size
        if len(set(self.seeds)) == 1:
            xb = self.x[self.seeds[0]][start:start + self.batch_size]
            return xb.unsqueeze(0).expand(len(self.seeds), *xb.shape)
        return torch.stack([self.x[s][start:start + self.batch_size] for s in self.seeds])

    def select(self, names: Sequence[str]) -> EpochInputs:
        """The inputs of the runs ``names`` only (members that left the stack)."""
        keep = [self.names.index(n) for n in names]
        return EpochInputs(list(names), [self.seeds[j] for j in keep], self.x,
                           [[e[keep] for e in eps] for eps in self.eps], self.batch_size)


def epoch_inputs(data: batches.ImageData, epoch: int, configs: Sequence[RunConfig],
                 device: torch.device) -> EpochInputs:
    """The inputs of ``epoch`` for runs ``configs`` (one protocol): each run's batches
    (``data.train_batches`` of its seed) and noise (its ``generator(device, "noise", seed, epoch)``,
    drawn step by step in the order and shapes of :func:`lvae.model.network.draw_noise`)."""
    tcfg, mcfg = configs[0].train, configs[0].model
    seeds = [c.train.seed for c in configs]
    x = {s: torch.cat(list(batches.train_batches(data, epoch, s, tcfg.batch_size))).to(device)
         for s in dict.fromkeys(seeds)}
    n, k = data.n_train, tcfg.eq_samples * tcfg.iw_samples
    noise = [generator(device, "noise", s, epoch) for s in seeds]
    per_step = [[draw_noise(mcfg, k, min(tcfg.batch_size, n - start), g, device) for g in noise]
                for start in range(0, n, tcfg.batch_size)]
    eps = [[e.unsqueeze(0) for e in draws[0]] if len(draws) == 1 else [torch.stack(d) for d in zip(*draws)]
           for draws in per_step]
    return EpochInputs([c.dir_name for c in configs], seeds, x, eps, tcfg.batch_size)


# -- step strategies -------------------------------------------------------------------------------
class Stepper(abc.ABC):
    """A stack's training step (subclasses: :class:`SingleModel`, :class:`GridTrainer`), with its
    beta ``[M]`` as a device tensor and, on CUDA, the full-batch step captured as a CUDA graph."""

    models: list[HierarchicalVAE]
    optimizer: FlatAdam

    def __init__(self, configs: Sequence[RunConfig], device: torch.device, cuda_graph: bool, compile: bool):
        self.configs = list(configs)
        self.tcfg, self.mcfg = configs[0].train, configs[0].model
        self.device = torch.device(device)
        self.beta = torch.zeros(len(configs), device=self.device)
        self.compile = compile or self.tcfg.compile  # full batches through torch.compile
        self.cuda_graph = graphed(cuda_graph, self.device, self.compile)
        self._graph: torch.cuda.CUDAGraph | None = None

    # what a subclass provides
    @abc.abstractmethod
    def eager_step(self, x: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        """One Adam step of every model; ``x`` [M, B, D], ``eps`` [M, k, B, d] each; returns the losses [M]."""

    @abc.abstractmethod
    def buffers(self) -> list[torch.Tensor]:
        """The model buffers a step changes (batch-norm statistics)."""

    def sync_to_models(self) -> None:
        """Make each nn.Module hold its current weights (for evaluation and checkpoints)."""

    def sync_buffers_from_models(self) -> None:
        """Carry on the buffers an evaluation recomputed in the nn.Modules (batch-norm statistics)."""

    @abc.abstractmethod
    def optimizer_of(self, i: int) -> torch.optim.Optimizer:
        """Model i's optimizer (for its checkpoint)."""

    @abc.abstractmethod
    def finite(self) -> torch.Tensor:
        """[M] bool: whether each model's parameters are all finite."""

    @abc.abstractmethod
    def nonfinite_parameters(self, i: int) -> list[str]:
        """Names of model i's parameters that hold a non-finite value."""

    def modules(self) -> list[torch.nn.Module]:
        """The modules whose forward the step runs (training mode during an epoch)."""
        return list(self.models)

    # the shared part
    def set_epoch(self, betas: Sequence[float], lr: float) -> None:
        """beta of each model and the learning rate of the coming epoch (in place: a captured graph sees them),
        and every module of the step in training mode (an evaluation leaves the models in eval mode)."""
        self.beta.copy_(torch.tensor(betas, dtype=self.beta.dtype))
        self.optimizer.set_lr(lr)
        for m in self.modules():
            m.train()

    def prepare(self, x: torch.Tensor, eps: list[torch.Tensor]) -> None:
        """Capture the full-batch step now if one is due (on CUDA, not captured yet, ``x`` a full batch). The
        training loop calls it after :meth:`set_epoch` (the graph records the training-mode step) and before it
        hands the next epoch's inputs to its prefetch thread: no other thread may use the device while a stream
        captures (``capture_error_mode="global"``, kept so that any such work fails loudly)."""
        if self.cuda_graph and self._graph is None and x.shape[1] == self.tcfg.batch_size:
            self._capture(x, eps)

    def step(self, x: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`eager_step`, or on CUDA for full batches the replay of its captured graph."""
        if not self.cuda_graph or x.shape[1] != self.tcfg.batch_size:
            return self.eager_step(x, eps)
        self.prepare(x, eps)
        with torch.cuda.device(self.device):  # the graph's device, whichever is current
            self._x.copy_(x)
            for static, e in zip(self._eps, eps):
                static.copy_(e)
            self._graph.replay()
        return self._graph_loss.clone()

    @contextlib.contextmanager
    def preserved_state(self):
        """Undo, on exit, every step taken inside: parameters, gradients, Adam state and buffers
        are restored to their values on entry (in place: their memory stays where it is)."""
        state = self.optimizer.state_tensors() + self.buffers()
        saved = [t.detach().clone() for t in state]
        try:
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(state, saved):
                    t.copy_(s)

    def _capture(self, x: torch.Tensor, eps: list[torch.Tensor]) -> None:
        """Capture :meth:`eager_step` on static inputs as a CUDA graph. The warm-up steps it needs
        (on a side stream, as PyTorch requires) are undone (:meth:`preserved_state`), so the
        trajectory is that of the eager steps."""
        self._x = torch.zeros_like(x, memory_format=torch.contiguous_format)
        self._eps = [torch.zeros_like(e, memory_format=torch.contiguous_format) for e in eps]
        graph = torch.cuda.CUDAGraph()
        # on the step's device, whichever is current, and on a capture stream of that device (torch.cuda.graph's
        # default capture stream belongs to the device current when it was first made): else the step's kernels
        # would run outside the capture, and the replays would return a stale loss (PyTorch issue 87794)
        with torch.cuda.device(self.device), self.preserved_state():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_STEPS):
                    self.eager_step(self._x, self._eps)
            torch.cuda.current_stream(self.device).wait_stream(side)
            with torch.cuda.graph(graph, stream=side):
                self._graph_loss = self.eager_step(self._x, self._eps)
        self._graph = graph


class SingleModel(Stepper):
    """M = 1: the model's own parameters and FlatAdam, the step of :func:`lvae.training.step.objective_step`
    (bitwise the single-run trainer's numbers on the CPU)."""

    def __init__(self, model: HierarchicalVAE, optimizer: FlatAdam, config: RunConfig, device: torch.device,
                 cuda_graph: bool = True, compile: bool = False):
        super().__init__([config], device, cuda_graph, compile)
        self.models, self.optimizer = [model], optimizer
        self._eager = Objective(model, self.tcfg)
        self._full = compiled_objective(model, self.tcfg) if self.compile else self._eager

    def eager_step(self, x, eps):
        loss = self._full if x.shape[1] == self.tcfg.batch_size else self._eager
        return objective_step(loss, self.optimizer, x[0], self.beta[0], [e[0] for e in eps], self.tcfg).reshape(1)

    def buffers(self):
        return list(self.models[0].buffers())

    def optimizer_of(self, i):
        return self.optimizer

    def finite(self):
        return torch.stack([torch.isfinite(p.detach()).all() for p in self.models[0].parameters()]).all().reshape(1)

    def nonfinite_parameters(self, i):
        return [n for n, p in self.models[0].named_parameters() if not bool(torch.isfinite(p).all())]


class GridTrainer(Stepper):
    """M > 1 models of one architecture and protocol (seeds, warm-up may differ: ``lvae.training.grid.group_key``)
    stacked and trained in lockstep by one vmapped step. Adam is elementwise, so one Adam over the
    stacked parameters is every model's own Adam; the gradient-norm clipping is per model."""

    def __init__(self, models: Sequence[HierarchicalVAE], configs: Sequence[RunConfig], device: torch.device,
                 optimizers: Sequence[torch.optim.Optimizer] | None = None, compile: bool = False,
                 cuda_graph: bool = True):
        super().__init__(configs, device, cuda_graph, compile)
        self.models = list(models)
        params, buffers = stack_module_state(self.models)
        self.names = list(params)
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.stacked_buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self.objective = Objective(copy.deepcopy(self.models[0]).to("meta"), self.tcfg)
        self.optimizer = FlatAdam(list(self.params.values()), self.tcfg.lr, self.tcfg.adam_betas, self.tcfg.adam_eps,
                                  fused=fused_adam(self.tcfg), capturable=self.cuda_graph)
        if optimizers is not None:
            self._load_optimizer_states(optimizers)

        def one(params, buffers, x, beta, eps):
            p = {"model." + k: v for k, v in params.items()}
            b = {"model." + k: v for k, v in buffers.items()}
            return functional_call(self.objective, (p, b), (x, beta, eps))

        self._loss = vmap(one, in_dims=(0, 0, 0, 0, 0), randomness="error")
        # as lvae.training.step.train_step: full batches through the compiled graph, a last partial batch eager
        self._loss_full = torch.compile(self._loss) if self.compile else self._loss

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
        for i, m in enumerate(self.models):
            state = {k: v[i] for k, v in self.params.items()}
            state.update({k: v[i] for k, v in self.stacked_buffers.items()})
            m.load_state_dict(state)

    @torch.no_grad()
    def sync_buffers_from_models(self) -> None:
        for i, m in enumerate(self.models):
            for k, v in m.named_buffers():
                self.stacked_buffers[k][i].copy_(v)

    def optimizer_of(self, i: int) -> torch.optim.Optimizer:
        """A per-model Adam holding model i's slice of the stacked Adam state."""
        m = self.models[i]
        opt = make_optimizer(m, self.tcfg, self.cuda_graph)
        opt.set_lr(self.optimizer.param_groups[0]["lr"])
        for name, p in m.named_parameters():
            st = self.optimizer.state.get(self.params[name])
            if st:
                opt.state[p] = {"step": st["step"].detach().clone().cpu(), "exp_avg": st["exp_avg"][i].clone(),
                                "exp_avg_sq": st["exp_avg_sq"][i].clone()}
        opt.adopt_state()
        return opt

    def buffers(self):
        return list(self.stacked_buffers.values())

    def modules(self):
        # the stacked step runs the objective's copy of models[0], which keeps the mode that model had when the
        # stack was built (eval, after an evaluation, for a stack rebuilt from survivors)
        return [*self.models, self.objective]

    def finite(self):
        return torch.stack([torch.isfinite(p.detach()).flatten(1).all(1) for p in self.params.values()]).all(0)

    def nonfinite_parameters(self, i):
        return [n for n, p in self.params.items() if not bool(torch.isfinite(p[i]).all())]

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

    def eager_step(self, x, eps):
        with autocast(self.tcfg, self.device):
            loss = self._loss_full if x.shape[1] == self.tcfg.batch_size else self._loss
            losses = loss(self.params, self.stacked_buffers, x, self.beta, eps)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self._clip()
        self.optimizer.step()
        return losses.detach()


def run_epoch(stepper: Stepper, inputs: EpochInputs, progress=None) -> torch.Tensor:
    """Every step of one epoch; returns the losses [steps, M], on the device (no host sync)."""
    losses = []
    for s in range(inputs.steps):
        losses.append(stepper.step(inputs.batch(s), inputs.eps[s]))
        if progress is not None:
            progress.update(1)
    return torch.stack(losses)


# -- the loop --------------------------------------------------------------------------------------
@dataclass
class Member:
    """One run of a stack: its configuration, directory and training state."""

    config: RunConfig
    path: Path
    state: TrainingState
    save_fp16: bool
    history: list[dict] = field(default_factory=list)  # its evaluations (for evaluation_problem)
    sane_epoch: int | None = None  # the checkpoint a failure rolls back to
    error: NonFiniteLossError | None = None


def graphed(cuda_graph: bool, device: torch.device, compile: bool) -> bool:
    """Whether a step on ``device`` is captured as a CUDA graph: asked for, on CUDA, not compiled."""
    return cuda_graph and torch.device(device).type == "cuda" and not compile


def open_member(config: RunConfig, ecfg: EvalConfig, base: Path, dev: torch.device, save_fp16: bool,
                data: batches.ImageData, cuda_graph: bool = True, compile: bool = False) -> Member:
    """Open the (locked) run directory of ``config`` for training
    (:func:`lvae.training.checkpoints.open_for_training`)."""
    tcfg, mcfg = config.train, config.model
    if data.x_dim != mcfg.x_dim or data.likelihood != mcfg.likelihood:
        raise ConfigError(f"dataset {tcfg.dataset!r} has x_dim={data.x_dim}, likelihood={data.likelihood!r} but "
                          f"{config.name} expects x_dim={mcfg.x_dim}, likelihood={mcfg.likelihood!r}; fix ModelConfig")
    path = base / config.dir_name
    capturable = graphed(cuda_graph, dev, compile or tcfg.compile)
    return Member(config, path, open_for_training(config, ecfg, path, base, dev, capturable), save_fp16)


def make_stepper(members: Sequence[Member], dev: torch.device, compile: bool = False,
                 cuda_graph: bool = True) -> Stepper:
    """:class:`SingleModel` for one member, :class:`GridTrainer` for several."""
    if len(members) == 1:
        m = members[0]
        return SingleModel(m.state.model, m.state.optimizer, m.config, dev, cuda_graph, compile)
    return GridTrainer([m.state.model for m in members], [m.config for m in members], dev,
                       [m.state.optimizer for m in members], compile, cuda_graph)


class Stack:
    """The members of a stack still training and their :class:`Stepper`, rebuilt when members leave."""

    def __init__(self, members: Sequence[Member], dev: torch.device, compile: bool, cuda_graph: bool):
        self.active = list(members)
        self.tcfg = self.active[0].config.train  # the protocol (learning-rate schedule) of the whole stack
        self.dev, self.compile, self.cuda_graph = dev, compile, cuda_graph
        self.stepper = make_stepper(self.active, dev, compile, cuda_graph)

    @property
    def configs(self) -> list[RunConfig]:
        """The active members' configurations: whose inputs the prefetch prepares."""
        return [m.config for m in self.active]

    def drop(self, bad: set[int]) -> None:
        """The members ``bad`` (indices into ``active``) leave; the step is rebuilt from the survivors' current
        weights and Adam states."""
        survivors = [m for i, m in enumerate(self.active) if i not in bad]
        if survivors:
            for i, m in enumerate(self.active):
                if i not in bad:
                    m.state.optimizer = self.stepper.optimizer_of(i)
            self.stepper = make_stepper(survivors, self.dev, self.compile, self.cuda_graph)
        self.active = survivors


@dataclass
class EpochEnd:
    """One epoch of a stack at its host sync, and what is due after it."""

    epoch: int  # 0-based: epoch + 1 epochs are done
    lr: float
    betas: list[float]  # of the active members
    losses: torch.Tensor  # [steps, M], on the host
    finite: torch.Tensor  # [M] bool: whether each member's parameters are all finite
    seconds: float  # from the epoch's start to the host sync
    evaluated: bool  # an evaluation is due
    checkpointed: bool  # a checkpoint is due


def train_stack(members: Sequence[Member], epochs: int, ecfg: EvalConfig, data: batches.ImageData,
                dev: torch.device, *, progress: bool = True, stop_after: int | None = None,
                checkpoint_every: int | None = 1, compile: bool = False, cuda_graph: bool = True,
                log: Callable[[str], None] | None = None) -> list[Run]:
    """Train ``members`` (opened by :func:`open_member`, one protocol, all at the same epoch) to
    ``epochs`` epochs in lockstep, or ``stop_after`` more; returns their Runs.

    Per epoch, after the steps: a member whose loss or parameters are not finite fails; at every
    ``ecfg.every``-th epoch and the last, each member is evaluated and fails if the evaluation is
    not sane (:func:`lvae.training.step.evaluation_problem`), else its row is written; then checkpoints
    (at evaluations, every ``checkpoint_every`` epochs, and at the end) and provenance. A failed
    member rolls back to its last sane checkpoint, is marked ``failed`` and leaves the stack; the
    others go on. Raises the first failure (NonFiniteLossError, DivergedError) once the rest are
    done, and DiskFullError at once (every member ``failed``, resumable once there is space).
    """
    members = list(members)
    start, end = _epoch_range(members, epochs, stop_after, dev)
    _start_session(members, dev, start, epochs)
    if log is not None and len(members) > 1:
        log(f"lvae.training.grid: {len(members)} model(s) {[m.config.name for m in members]} "
            f"epochs {start}->{end} on {dev}")
    bar = _progress_bar(members, data, end - start, progress)
    stack = Stack(members, dev, compile, cuda_graph)
    pool = ThreadPoolExecutor(max_workers=1)  # prepares the next epoch's inputs
    try:
        _train_epochs(stack, start, end, epochs, ecfg, data, checkpoint_every, pool, bar)
    except DiskFullError as e:
        _fail_for_disk_full(stack.active, e)
        raise
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        for m in members:
            (m.path / SANE_CHECKPOINT).unlink(missing_ok=True)
    _finish_session(stack.active, epochs)
    _raise_failures(members)
    return [Run(m.path) for m in members]


def _epoch_range(members: list[Member], epochs: int, stop_after: int | None, dev: torch.device) -> tuple[int, int]:
    """The epochs the stack starts at and ends at; refuses members at different epochs and a precision ``dev``
    lacks (:func:`lvae.training.step.check_precision`)."""
    start = members[0].state.start
    if any(m.state.start != start for m in members):
        raise ValueError("train_stack: the members stand at different epochs; stack those at one epoch")
    check_precision(members[0].config.train, dev)
    return start, epochs if stop_after is None else min(epochs, start + stop_after)


def _start_session(members: list[Member], dev: torch.device, start: int, epochs: int) -> None:
    """Mark each member running, read its evaluations and keep its checkpoint as the sane one to roll back to."""
    extra = {"trainer": f"lvae.training.grid ({len(members)} stacked)"} if len(members) > 1 else {}
    for m in members:
        mark_running(m.path, m.state.prov, m.config.train.seed, dev, start, epochs, **extra)
        m.history = read_jsonl(m.path / "metrics.jsonl")
        m.sane_epoch = keep_as_sane(m.path, start) if (m.path / CHECKPOINT).exists() else None


def _progress_bar(members: list[Member], data: batches.ImageData, epochs: int, progress: bool) -> tqdm:
    """The bar of the steps of ``epochs`` epochs, named by the run (or the grid's size and first run)."""
    n_batches = batches.num_batches(len(data.x_train), members[0].config.train.batch_size)
    desc = members[0].path.name if len(members) == 1 else f"grid[{len(members)}] {members[0].config.name}"
    return tqdm(total=epochs * n_batches, desc=desc, unit="step", disable=not progress, leave=False)


def _train_epochs(stack: Stack, start: int, end: int, epochs: int, ecfg: EvalConfig, data: batches.ImageData,
                  checkpoint_every: int | None, pool: ThreadPoolExecutor, bar: tqdm) -> None:
    """Epochs ``start`` to ``end`` of ``stack``, each one's inputs prepared by ``pool`` while the one before trains:
    set up the epoch, run its steps, check them at the host sync, evaluate and checkpoint what is due, then roll
    back the members that failed. Stops early when none is left."""
    nxt = pool.submit(epoch_inputs, data, start, stack.configs, stack.dev) if start < end else None
    for epoch in range(start, end):
        t0 = time.perf_counter()
        inputs, lr, betas = _set_up_epoch(stack, nxt.result(), epoch)
        nxt = pool.submit(epoch_inputs, data, epoch + 1, stack.configs, stack.dev) if epoch + 1 < end else None
        losses = run_epoch(stack.stepper, inputs, bar).float().cpu()  # [steps, M]: the epoch's one host sync
        finite = stack.stepper.finite().cpu()
        seconds = time.perf_counter() - t0
        ep = EpochEnd(epoch, lr, betas, losses, finite, seconds, *_due(epoch + 1, end, epochs, ecfg, checkpoint_every))
        failed = _non_finite_errors(stack.stepper, ep)
        if ep.evaluated or ep.checkpointed or failed:
            stack.stepper.sync_to_models()
        failed += _evaluate_and_save(stack, ep, {i for i, _ in failed}, ecfg, data, epochs)
        if ep.evaluated:
            stack.stepper.sync_buffers_from_models()  # evaluation recomputed the BN statistics in place
        _record_time(stack.active, {i for i, _ in failed}, time.perf_counter() - t0, ep)
        _drop_failed(stack, failed)
        if not stack.active:
            break
        bar.set_postfix(epoch=epoch + 1, loss=f"{float(losses[:, 0].mean()):.2f}", beta=f"{betas[0]:.2f}")


def _set_up_epoch(stack: Stack, inputs: EpochInputs, epoch: int) -> tuple[EpochInputs, float, list[float]]:
    """The inputs of ``epoch`` (of the members still in the stack), its learning rate and betas, set in the step; a
    due capture is made here, before the caller hands the next epoch to the prefetch: no other thread may use the
    device meanwhile."""
    lr = learning_rate(epoch, stack.tcfg)
    betas = [warmup_beta(epoch, m.config.train.warmup_epochs) for m in stack.active]
    names = [m.config.dir_name for m in stack.active]
    if inputs.names != names:  # members left the stack since these inputs were prepared
        inputs = inputs.select(names)
    stack.stepper.set_epoch(betas, lr)
    stack.stepper.prepare(inputs.batch(0), inputs.eps[0])
    return inputs, lr, betas


def _due(done: int, end: int, epochs: int, ecfg: EvalConfig, checkpoint_every: int | None) -> tuple[bool, bool]:
    """Whether an evaluation and a checkpoint are due after ``done`` epochs: evaluations every ``ecfg.every``
    epochs and at the last, checkpoints at evaluations, every ``checkpoint_every`` epochs and at ``end``."""
    evaluated = done % ecfg.every == 0 or done == epochs
    return evaluated, evaluated or done == end or bool(checkpoint_every and done % checkpoint_every == 0)


def _non_finite_errors(stepper: Stepper, ep: EpochEnd) -> list[tuple[int, NonFiniteLossError]]:
    """The members (indices) whose step losses or parameters are not finite after the epoch, with their errors."""
    errors = [(i, _non_finite_error(stepper, i, ep.losses[:, i], bool(ep.finite[i]), ep.epoch, ep.lr))
              for i in range(len(ep.finite))]
    return [(i, e) for i, e in errors if e is not None]


def _evaluate_and_save(stack: Stack, ep: EpochEnd, bad: set[int], ecfg: EvalConfig, data: batches.ImageData,
                       epochs: int) -> list[tuple[int, DivergedError]]:
    """Each member not in ``bad``: its mean loss kept for its next row, its evaluation if due, then its checkpoint if
    due (the sane one to roll back to when evaluated). Returns the members whose evaluation is not sane."""
    failed, done, n = [], ep.epoch + 1, len(stack.active)
    for i, m in enumerate(stack.active):
        if i in bad:
            continue
        m.state.pending.append(float(ep.losses[:, i].mean()))
        if ep.evaluated:
            problem = _evaluate(m, data, ecfg, ep.epoch, epochs, ep.betas[i], ep.lr, ep.seconds / n, n, stack.dev)
            if problem is not None:
                failed.append((i, problem))
                continue
        if ep.checkpointed:
            save_checkpoint(m.path, m.state.model, stack.stepper.optimizer_of(i), done, m.state.pending, m.save_fp16)
            if ep.evaluated:
                m.sane_epoch = keep_as_sane(m.path, done)
    return failed


def _record_time(active: list[Member], bad: set[int], seconds: float, ep: EpochEnd) -> None:
    """Each member not in ``bad``: its share of the epoch's wall time, and at a checkpoint its provenance written."""
    for i, m in enumerate(active):
        if i in bad:
            continue
        prov = m.state.prov
        prov["wall_seconds"] += seconds / len(active)
        if ep.checkpointed:
            prov.update({"epochs": ep.epoch + 1, "metrics_rows": len(m.history)})
            atomic_write_json(m.path / "provenance.json", prov)


def _drop_failed(stack: Stack, failed: list[tuple[int, NonFiniteLossError]]) -> None:
    """Roll each failed member back and mark it failed (:func:`_fail`); the others go on as a new stack."""
    for i, error in sorted(failed):
        _fail(stack.active[i], error)
    if failed:
        stack.drop({i for i, _ in failed})


def _fail_for_disk_full(active: list[Member], error: DiskFullError) -> None:
    """Mark every active member failed on a full disk (resumable once there is space)."""
    for m in active:
        (m.path / SANE_CHECKPOINT).unlink(missing_ok=True)  # frees its space
        m.state.prov.update({"status": "failed", "error": str(error), "finished": _now()})
        with contextlib.suppress(OSError, RunError):  # the disk may be too full for this one, too
            atomic_write_json(m.path / "provenance.json", m.state.prov)


def _finish_session(active: list[Member], epochs: int) -> None:
    """Mark each member that trained to the end complete (all ``epochs`` done) or partial."""
    for m in active:
        prov = m.state.prov
        prov.update({"status": "complete" if prov["epochs"] >= epochs else "partial", "finished": _now()})
        prov.pop("error", None)
        atomic_write_json(m.path / "provenance.json", prov)


def _raise_failures(members: list[Member]) -> None:
    """Raise the first member's failure, naming the others that failed too."""
    failed = [m for m in members if m.error is not None]
    if not failed:
        return
    if len(members) == 1:
        raise failed[0].error
    others = f" (also failed: {', '.join(m.config.name for m in failed[1:])})" if len(failed) > 1 else ""
    raise type(failed[0].error)(f"{failed[0].config.name}: {failed[0].error}{others}")


def _non_finite_error(stepper: Stepper, i: int, losses: torch.Tensor, finite: bool, epoch: int,
                      lr: float) -> NonFiniteLossError | None:
    """The failure of member i after ``epoch`` (its step losses, its parameters' finiteness), or None."""
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        step = int(bad.nonzero()[0])
        return NonFiniteLossError(
            f"non-finite loss ({losses[step].item()}) at epoch {epoch + 1}, step {step + 1}; "
            f"lower the learning rate (lr={lr}; --lr on the command line) or check the data.")
    if not finite:
        return NonFiniteLossError(
            f"non-finite gradients at epoch {epoch + 1} (step {len(losses)}, the last of the epoch, whose loss was "
            f"finite) made parameters {stepper.nonfinite_parameters(i)[:3]} non-finite; lower the learning rate "
            f"(lr={lr}; --lr on the command line) or check the data.")
    return None


def _evaluate(m: Member, data: batches.ImageData, ecfg: EvalConfig, epoch: int, epochs: int, beta: float,
              lr: float, seconds: float, stacked: int, dev: torch.device) -> DivergedError | None:
    """Evaluate member ``m`` after ``epoch`` and write its row; the failure if it is not sane."""
    done = epoch + 1
    mcfg = m.config.model
    with_iw = done == epochs or (ecfg.iw_every > 0 and done % ecfg.iw_every == 0)
    per_image: dict = {}
    pending = m.state.pending
    row = {"epoch": done, "beta": beta, "lr": lr, "train_loss": sum(pending) / len(pending),
           **evaluate(m.state.model, data, m.config.train, ecfg, epoch, with_iw, dev, per_image=per_image),
           "epoch_seconds": seconds}
    if stacked > 1:
        row["grid_size"] = stacked
    problem = evaluation_problem(row, m.history, mcfg.x_dim, mcfg.likelihood)
    if problem is not None:
        return DivergedError(f"the evaluation of epoch {done} is not sane: {problem}. Training diverged: lower the "
                             f"learning rate (lr={lr}; --lr on the command line) or check the data.")
    if with_iw:
        row["per_image"] = save_per_image(m.path, row, per_image)
    # the row is written before the checkpoint of its epoch: a kill in between replays the epoch
    append_jsonl(m.path / "metrics.jsonl", row)
    m.history.append(row)
    m.state.pending = []
    return None


def _fail(m: Member, error: NonFiniteLossError) -> None:
    """Roll member ``m`` back to its last sane checkpoint and mark it failed; ``m.error`` says why and what is kept."""
    kept_epoch, kept = roll_back(m.path, m.sane_epoch, m.save_fp16)
    message = f"{error} {kept}"
    m.state.prov.update({"status": "failed", "error": message, "finished": _now(), "epochs": kept_epoch,
                         "metrics_rows": len(m.history)})
    atomic_write_json(m.path / "provenance.json", m.state.prov)
    m.error = type(error)(message)


# -- one run ---------------------------------------------------------------------------------------
def get_or_train(config: RunConfig, epochs: int, eval_config: EvalConfig | None = None, *,
                 root: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 progress: bool = True, save_fp16: bool = True, data: batches.ImageData | None = None,
                 stop_after: int | None = None, cuda_graph: bool = True) -> Run:
    """Return the run of ``config`` with at least ``epochs`` epochs, training or resuming as needed.

    ``stop_after`` stops (cleanly, with a checkpoint) after that many new epochs: for tests and
    for splitting long runs over sessions. ``cuda_graph``: on CUDA, replay the step as a captured
    CUDA graph (no effect on the CPU). Bad arguments and unavailable data are refused before
    the run directory is created. Raises RunLockedError when another process trains the run,
    RunError for a damaged or incompatible run directory (the message names the fix),
    NonFiniteLossError (DivergedError for an evaluation that is not sane; after marking the run
    failed) when training diverges, DiskFullError when the disk is full, and
    :class:`lvae.training.step.PrecisionError` for ``precision="bf16"`` on hardware without fast bf16.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be a positive integer")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ConfigError(f"stop_after={stop_after!r} must be a positive integer or None")
    if not isinstance(config, RunConfig):
        raise TypeError(f"get_or_train takes an lvae.RunConfig, got {type(config).__name__}")
    check_run_name(config.name)
    ecfg = eval_config or EvalConfig()
    base = results_dir(root)
    path = base / config.dir_name
    done = completed(path, epochs)  # also refuses an incompatible or damaged run directory
    if done is not None:
        return done
    tcfg, mcfg = config.train, config.model
    if data is None:
        if tcfg.dataset not in DATASETS:
            raise ConfigError(f"dataset={tcfg.dataset!r} is not valid; choose one of {', '.join(DATASETS)}")
        data = load_dataset(tcfg.dataset, subset=tcfg.subset, test_subset=ecfg.test_subset,
                                     test_seed=tcfg.test_seed)
    if data.x_dim != mcfg.x_dim or data.likelihood != mcfg.likelihood:
        raise ConfigError(f"dataset {tcfg.dataset!r} has x_dim={data.x_dim}, likelihood={data.likelihood!r} but the "
                          f"model expects x_dim={mcfg.x_dim}, likelihood={mcfg.likelihood!r}; fix ModelConfig")
    dev = torch.device(device) if device is not None else default_device()
    check_precision(tcfg, dev)
    if tcfg.init_from and not (path / CHECKPOINT).exists():  # refused before the run folder exists
        check_init_from(tcfg.init_from, base)
    with run_lock(path):
        done = completed(path, epochs)  # another process may have finished it while we waited
        if done is not None:
            return done
        member = open_member(config, ecfg, base, dev, save_fp16, data, cuda_graph)
        return train_stack([member], epochs, ecfg, data, dev, progress=progress, stop_after=stop_after,
                           cuda_graph=cuda_graph)[0]
