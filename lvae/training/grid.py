"""Many models at once: train a grid of run configurations in one process.

Models whose architecture and optimisation protocol agree (seeds of one configuration, or variants
that differ only in warm-up, e.g. VAE+BN vs VAE+BN+WU) form a *group* (:func:`group_key`); each
group is trained as one stack by the engine (:func:`lvae.training.loop.train_stack`, the loop every run
goes through): its weights are stacked and one step trains all of them with ``torch.func.vmap``
over :func:`lvae.model.bounds.training_bound` -- the same objective code as a single run. Groups run one
after the other. Each model keeps exactly the random streams of a single run (its parameters are
initialised after ``torch.manual_seed(seed)``, its batches and noise come from its own generators:
:func:`lvae.training.loop.epoch_inputs`), so a grid-trained model equals the one-by-one model up to
floating-point rounding (batched vs single matmuls); ``tests/test_grid.py`` checks this on CPU. A
group of one is trained by the single-model step, bitwise as :func:`lvae.training.loop.get_or_train`.

Results go into the ordinary run registry (:mod:`lvae.registry.runs`): the same ``config.json``,
``metrics.jsonl``, ``provenance.json``, ``checkpoint.pt`` (a per-model Adam state, so a grid run
can be resumed or extended by :func:`lvae.training.loop.get_or_train` and vice versa) and fp16 weights.
Evaluation (:func:`lvae.training.step.evaluate`) runs per model on its unstacked copy.

Device-agnostic (CPU or CUDA): on CUDA each group's step is replayed as a captured CUDA graph
(``cuda_graph=True``); ``compile=True`` (or ``TrainConfig(compile=True)``) wraps the vmapped
objective in ``torch.compile`` for full batches instead (tests/test_grid.py checks it against the
eager grid on the CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from lvae.config import EvalConfig, RunConfig
from lvae.data import batches
from lvae.data.datasets import load_dataset
from lvae.registry.runs import Run, check_run_name, results_dir, stored_run
from lvae.registry.storage import run_lock
from lvae.training.loop import Member, get_or_train, open_member, train_stack
from lvae.training.step import NonFiniteLossError, check_precision, default_device

# TrainConfig fields that may differ inside one stacked group (everything else must agree)
_PER_MODEL_FIELDS = ("seed", "warmup_epochs")


def group_key(cfg: RunConfig) -> str:
    """Configurations with equal keys can be stacked into one vmapped group."""
    train = {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(cfg.train)
             if f.name not in _PER_MODEL_FIELDS}
    return json.dumps({"model": dataclasses.asdict(cfg.model), "train": train}, sort_keys=True, default=str)


def group_configs(configs: Sequence[RunConfig]) -> list[list[RunConfig]]:
    groups: dict[str, list[RunConfig]] = {}
    for c in configs:
        groups.setdefault(group_key(c), []).append(c)
    return list(groups.values())


def train_grid(configs: Sequence[RunConfig], epochs: int, eval_config: EvalConfig | Sequence[EvalConfig] | None = None,
               *, root: str | os.PathLike | None = None, device: str | torch.device | None = None,
               progress: bool = True, save_fp16: bool | Sequence[bool] = True,
               data: batches.ImageData | None = None, stop_after: int | None = None, compile: bool = False,
               checkpoint_every: int | None = None, cuda_graph: bool = True,
               log: Callable[[str], None] | None = None) -> list[Run]:
    """Train every run of ``configs`` to ``epochs`` epochs, stacked by group; returns the Runs in order.

    Runs already complete with >= ``epochs`` are reused; runs with a checkpoint are resumed
    (models of one group that stand at different epochs are trained in separate stacks). Runs
    with ``init_from`` (finetuning) are trained one by one with :func:`lvae.training.loop.get_or_train`.
    Checkpoints are written at every evaluation, every ``checkpoint_every`` epochs and at the end.
    A run that diverges is marked failed and the others go on; the first such failure is raised
    (NonFiniteLossError) once every group is done.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    configs = list(configs)
    ecfgs = (list(eval_config) if isinstance(eval_config, (list, tuple))
             else [eval_config or EvalConfig()] * len(configs))
    fp16 = list(save_fp16) if isinstance(save_fp16, (list, tuple)) else [save_fp16] * len(configs)
    base = results_dir(root)
    dev = torch.device(device) if device is not None else default_device()
    log = log or (lambda s: print(s, file=sys.stderr) if progress else None)
    for cfg in configs:  # before any run directory is created
        check_run_name(cfg.name)

    done, errors = {}, []
    for i, cfg in enumerate(configs):  # the complete runs, and the finetuned ones trained one by one
        run = stored_run(base / cfg.dir_name)
        if run is not None and run.epochs >= epochs and run.status == "complete":
            done[i] = run
        elif cfg.train.init_from:
            done[i] = _finetune(cfg, epochs, ecfgs[i], base, dev, fp16[i], data, errors,
                                progress=progress, stop_after=stop_after, cuda_graph=cuda_graph)
    todo = [i for i in range(len(configs)) if i not in done]
    for i in todo:  # before any run directory is created
        check_precision(configs[i].train, dev)

    options = dict(progress=progress, stop_after=stop_after, checkpoint_every=checkpoint_every, compile=compile,
                   cuda_graph=cuda_graph, log=log)
    for (dataset, subset, test_seed, test_subset), idx in _by_data(configs, ecfgs, todo).items():
        d = data if data is not None else load_dataset(dataset, subset=subset, test_subset=test_subset,
                                                       test_seed=test_seed)
        for group in _groups(configs, ecfgs, idx):
            errors += _train_group([configs[i] for i in group], [ecfgs[i] for i in group], [fp16[i] for i in group],
                                   epochs, d, base, dev, **options)
            done.update((i, Run(base / configs[i].dir_name)) for i in group)
    if errors:
        raise errors[0]
    return [done[i] for i in range(len(configs))]


def _finetune(cfg: RunConfig, epochs: int, ecfg: EvalConfig, base: Path, dev: torch.device, save_fp16: bool,
              data: batches.ImageData | None, errors: list[NonFiniteLossError], **options) -> Run:
    """The run of ``cfg`` (with ``init_from``) trained on its own by :func:`lvae.training.loop.get_or_train`; a
    divergence is added to ``errors``."""
    try:
        return get_or_train(cfg, epochs, ecfg, root=base, device=dev, save_fp16=save_fp16, data=data, **options)
    except NonFiniteLossError as e:
        errors.append(e)
        return Run(base / cfg.dir_name)


def _by_data(configs: list[RunConfig], ecfgs: list[EvalConfig], todo: list[int]) -> dict[tuple, list[int]]:
    """The runs ``todo`` (indices) by the data they train and are evaluated on: (dataset, subset, test_seed,
    test_subset)."""
    by_data: dict[tuple, list[int]] = {}
    for i in todo:
        t = configs[i].train
        by_data.setdefault((t.dataset, t.subset, t.test_seed, ecfgs[i].test_subset), []).append(i)
    return by_data


def _groups(configs: list[RunConfig], ecfgs: list[EvalConfig], idx: list[int]) -> list[list[int]]:
    """The runs ``idx`` (indices) by group (:func:`group_key`) and evaluation."""
    groups: dict[str, list[int]] = {}
    for i in idx:
        groups.setdefault(group_key(configs[i]) + f"|{ecfgs[i]}", []).append(i)
    return list(groups.values())


def _train_group(configs: list[RunConfig], ecfgs: list[EvalConfig], fp16: list[bool], epochs: int,
                 data: batches.ImageData, base: Path, dev: torch.device, **options) -> list[NonFiniteLossError]:
    """Train one group: its run directories locked and opened, then one stack per epoch they stand at
    (:func:`lvae.training.loop.train_stack`); returns the stacks' divergences."""
    errors = []
    with contextlib.ExitStack() as locks:
        for cfg in configs:
            locks.enter_context(run_lock(base / cfg.dir_name))
        opened = [open_member(cfg, ecfg, base, dev, f, data, options["cuda_graph"], options["compile"])
                  for cfg, ecfg, f in zip(configs, ecfgs, fp16)]
        by_start: dict[int, list[Member]] = {}
        for m in opened:
            by_start.setdefault(m.state.start, []).append(m)
        for _, members in sorted(by_start.items()):
            try:
                train_stack(members, epochs, ecfgs[0], data, dev, **options)
            except NonFiniteLossError as e:
                errors.append(e)
    return errors
