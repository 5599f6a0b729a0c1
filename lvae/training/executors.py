"""Spreading a grid over a cluster: one submitit job per group of stacked models.

:func:`lvae.training.grid.group_configs` splits a grid into groups that train as one vmapped stack; the
groups are independent, so each becomes one job (:class:`GroupJob`) that calls
:func:`lvae.training.grid.train_grid` on its runs and writes them into the shared run registry (the
registry's per-run locks keep concurrent jobs apart). ``executor="slurm"`` submits the jobs with
``sbatch``; ``executor="local"`` starts them as processes on this machine (all at once). Runs that
are already complete are not submitted. A job stopped by its time limit is requeued and resumes
its runs from their last checkpoints.

Needs the optional ``cluster`` extra (submitit): ``pip install -e '.[cluster]'``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lvae.config import ConfigError, EvalConfig, RunConfig
from lvae.registry import runs
from lvae.registry.storage import RunError
from lvae.training.grid import group_configs, train_grid

EXECUTORS = ("local", "slurm")
JOBS_DIR = "lvae-jobs"


class GridJobError(RunError):
    """One or more jobs of a grid failed; the message names each job, its log and the fix."""


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """The resources of every job (one group of stacked models)."""

    partition: str | None = None  # slurm partition (None: the cluster's default)
    time_min: int = 24 * 60  # time limit of a job in minutes (slurm --time; local jobs are stopped too)
    gpus: int | None = None  # GPUs per job (None: slurm's default; local: 1 when this machine has CUDA)
    cpus: int | None = None  # CPU cores per job, also torch's thread count in the job (None: default)
    mem_gb: float | None = None  # memory per job (None: slurm's default)
    account: str | None = None  # slurm account (None: the user's default)


@dataclasses.dataclass(frozen=True)
class GroupJob:
    """The work of one job: train ``configs`` (one group) to ``epochs`` into the registry ``root``.

    Called in the job's process; returns the run directories. ``checkpoint`` tells submitit to
    requeue the same call when the time limit stops the job (the registry resumes the runs)."""

    configs: tuple[RunConfig, ...]
    epochs: int
    eval_configs: tuple[EvalConfig, ...]
    save_fp16: tuple[bool, ...]
    root: str
    device: str | None = None
    threads: int | None = None

    def __call__(self) -> list[str]:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        trained = train_grid(list(self.configs), self.epochs, list(self.eval_configs), root=self.root,
                             device=self.device, progress=False, save_fp16=list(self.save_fp16))
        return [str(r.path) for r in trained]

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def require_submitit(executor: str) -> Any:
    """The submitit module, or ConfigError naming the fix: the install command, or (for slurm) a
    machine with slurm's ``srun`` on the PATH."""
    if executor not in EXECUTORS:
        raise ConfigError(f"executor {executor!r} is not valid; choose one of {', '.join(EXECUTORS)}")
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"the {executor} executor needs submitit, which is not installed; install the cluster "
                          f"extra: pip install -e '.[cluster]'") from None
    if executor == "slurm" and shutil.which("srun") is None:
        raise ConfigError("the slurm executor needs slurm (no srun on the PATH here): run the command on the "
                          "cluster's login node, or use the local executor (--executor local) on this machine")
    return submitit


def make_executor(executor: str, folder: str | os.PathLike, options: JobOptions = JobOptions(),
                  device: str | None = None) -> Any:
    """A submitit executor for ``executor`` (local | slurm) with the resources of ``options``;
    job scripts and logs go to ``folder`` (for slurm it must be on a file system the nodes see)."""
    submitit = require_submitit(executor)
    ex = submitit.AutoExecutor(folder=Path(folder).resolve(), cluster=executor)
    gpus = options.gpus
    if gpus is None and executor == "local":  # local jobs see no GPU unless asked (CUDA_VISIBLE_DEVICES)
        gpus = 1 if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda") else 0
    params = {"timeout_min": options.time_min, "gpus_per_node": gpus, "cpus_per_task": options.cpus,
              "mem_gb": options.mem_gb, "slurm_partition": options.partition, "slurm_account": options.account}
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


@dataclasses.dataclass
class GridJobs:
    """The submitted jobs of a grid; :meth:`wait` collects the runs."""

    configs: list[RunConfig]
    root: Path
    jobs: list[Any]  # submitit jobs, one per group
    groups: list[list[int]]  # the indexes into ``configs`` each job trains

    def wait(self) -> list[runs.Run]:
        """Wait for every job; the runs of ``configs`` in order. Raises GridJobError naming every
        failed job (its runs, its error, its log) once all jobs have ended."""
        failed = []
        for job, idx in zip(self.jobs, self.groups):
            job.wait()
            error = job.exception()
            if error is not None:
                names = ", ".join(self.configs[i].name for i in idx)
                failed.append(f"job {job.job_id} ({names}): {_last_error(error)} (log: {job.paths.stderr})")
        if failed:
            raise GridJobError(f"{len(failed)} of {len(self.jobs)} job(s) failed: " + "; ".join(failed) +
                               ". Fix the cause and run the same command again: complete runs are kept and the "
                               "others resume from their last checkpoints")
        return [runs.Run(self.root / c.dir_name) for c in self.configs]


def _last_error(error: BaseException) -> str:
    """The exception line (``SomeError: message``) that ends the job's traceback, else the first line."""
    text = str(error)
    found = re.findall(r"^\w[\w.]*(?:Error|Exception|Interrupt)\b.*$", text, re.M)
    return found[-1] if found else (text.splitlines() or [type(error).__name__])[0]


def _per_config(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def submit_grid(configs: Sequence[RunConfig], epochs: int,
                eval_config: EvalConfig | Sequence[EvalConfig] | None = None, *, executor: str = "local",
                root: str | os.PathLike | None = None, device: str | None = None,
                save_fp16: bool | Sequence[bool] = True, folder: str | os.PathLike = JOBS_DIR,
                options: JobOptions = JobOptions(), log: Callable[[str], None] | None = None) -> GridJobs:
    """Submit one job per group of ``configs`` (:func:`lvae.training.grid.group_configs`) that is not complete
    with >= ``epochs`` in registry ``root``; arguments as :func:`lvae.training.grid.train_grid` takes them."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be a positive integer")
    configs = list(configs)
    ecfgs = _per_config(eval_config or EvalConfig(), len(configs))
    fp16 = _per_config(save_fp16, len(configs))
    for c in configs:
        runs.check_run_name(c.name)
    base = runs.results_dir(root).resolve()
    ex = make_executor(executor, folder, options, device)
    todo = []
    for i, c in enumerate(configs):
        run = runs.stored_run(base / c.dir_name)
        if run is not None and run.epochs >= epochs and run.status == "complete":
            continue
        todo.append(i)
    free = list(todo)
    jobs, groups = [], []
    for group in group_configs([configs[i] for i in todo]):
        idx = []
        for c in group:  # the positions of the group's configs (equal configs: the first unused)
            j = next(j for j in free if configs[j] == c)
            free.remove(j)
            idx.append(j)
        work = GroupJob(tuple(configs[i] for i in idx), epochs, tuple(ecfgs[i] for i in idx),
                        tuple(bool(fp16[i]) for i in idx), str(base), None if device is None else str(device),
                        options.cpus)
        ex.update_parameters(name=f"lvae-{group[0].name}")
        jobs.append(ex.submit(work))
        groups.append(idx)
    if log is not None:
        ids = ", ".join(str(j.job_id) for j in jobs) or "none"
        log(f"lvae: {len(jobs)} {executor} job(s) for {len(todo)} run(s) ({len(configs) - len(todo)} already "
            f"complete): ids {ids}; logs in {ex.folder}")
    return GridJobs(configs, base, jobs, groups)


def train_grid_on(executor: str, configs: Sequence[RunConfig], epochs: int,
                  eval_config: EvalConfig | Sequence[EvalConfig] | None = None, **kwargs: Any) -> list[runs.Run]:
    """:func:`submit_grid` and wait: the runs of ``configs`` in order, all complete (GridJobError
    otherwise). Interrupted (Ctrl-C) while waiting, it leaves slurm jobs running."""
    submitted = submit_grid(configs, epochs, eval_config, executor=executor, **kwargs)
    try:
        return submitted.wait()
    except KeyboardInterrupt:
        ids = " ".join(str(j.job_id) for j in submitted.jobs)
        print(f"lvae: stopped waiting; slurm jobs go on (cancel them with `scancel {ids}`). Once they have ended, "
              f"run the same command again to collect their runs (complete runs are not trained again)",
              file=sys.stderr)
        raise
