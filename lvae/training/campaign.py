"""The long runs: the paper's schedule for the depth-5 pair, trained on a CPU across sessions.

The paper trains for 2,000 epochs (warm-up over 200, lr 1e-3, batch 256, fp32). A run asked for
300 epochs is exactly the first 300 epochs of the same run asked for 2,000 (the registry resumes a
run with more epochs), so one run per model and seed gives every budget on the way. The plan:

- LVAE+BN+WU-5 and VAE+BN+WU-5, seeds 0, 1 and 2, to 300 epochs;
- seed 0 of both on to 1,000 and 2,000 epochs;
- at every milestone (300, 1,000, 2,000) the full evaluation: per-unit KL, test L1 and L_5000 with
  per-image values (L_5000 on the first 2,000 test images) and the fp16 weights of that epoch kept
  (``model-fp16-e<E>.pt`` where the run goes on; where it ends, its ``model-fp16.pt``, which
  records its epoch); at 2,000 epochs also L_5000 on all 10,000 test images (``evals.jsonl``);
- between milestones, train and test L1 every 10 epochs (test L1 on all 10,000 test images).

These runs are the ``paper`` profile's runs of these cells with the compiled fp32 step
(``lvae.registry.profiles.experiment("paper", V, 5, seed, compile=True)``). They live in a registry of
their own outside the work tree (``$LVAE_LONG_RUNS``, default ``~/.cache/lvae/long-runs/runs``),
which no test, CI run or book build writes to; finished milestones reach ``results/`` through
``lvae runs export`` / ``lvae runs import`` (metrics, per-image values and fp16 weights).

One command starts (or restarts) the whole campaign in the background::

    python scripts/campaign.py start      # two workers, one thread each, nice 19
    python scripts/campaign.py status     # where every run stands
    python scripts/campaign.py stop

``start`` clones the repository's current commit into the campaign folder and runs the workers from
that clone, so editing the work tree never changes a running worker's code; every resume therefore
records the commit it trained with. Workers are safe to kill: each run resumes from its last
checkpoint (written every epoch) with the numbers an uninterrupted run gives on the same CPU and
thread count (``tests/test_campaign.py`` pins the step's numbers).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lvae.config import EvalConfig, RunConfig
from lvae.data.datasets import load_dataset
from lvae.registry.profiles import experiment, load_profile
from lvae.registry.runs import MILESTONE_WEIGHTS, WEIGHTS_FP16, Run, load_checkpoint, stored_run
from lvae.registry.storage import RunLockedError, atomic_write_bytes, run_lock
from lvae.training.loop import get_or_train
from lvae.training.step import evaluate_run

HOME_ENV = "LVAE_LONG_RUNS"
VARIANTS = ("lvae_bn_wu", "vae_bn_wu")
DEPTH = 5
SEEDS = (0, 1, 2)
MILESTONES = load_profile("paper").milestones  # (300, 1000, 2000): full evaluations and kept weights
LK_IMAGES = 2000  # test images of the L_5000 at each milestone (all 10,000 at the last: FULL_TEST_EPOCH)
FIRST_BUDGET = 300  # every seed trains this far
LONG_SEEDS = (0,)  # these go on to the paper's 2,000 epochs
FULL_TEST_EPOCH = MILESTONES[-1]  # L_5000 on all test images
FULL_TEST_IMAGES = 10000
THREADS = 1  # torch threads per worker, the same at every resume
WORKERS = 2


def home() -> Path:
    """The campaign folder: ``$LVAE_LONG_RUNS`` or ``~/.cache/lvae/long-runs``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "lvae" / "long-runs").expanduser()


def registry(root: Path | None = None) -> Path:
    return (root or home()) / "runs"


def run_config(variant: str, seed: int) -> RunConfig:
    """The run of ``variant`` and ``seed``: the ``paper`` profile's cell with the compiled fp32 step."""
    return experiment("paper", variant, DEPTH, seed, compile=True)[0]


def eval_config() -> EvalConfig:
    """The ``paper`` profile's evaluation (L1 on 10,000 training and all 10,000 test images and
    per-unit KL every 10 epochs, K = 5000), with L_K only at the end of each stage (= each
    milestone) and on the first 2,000 test images: L_5000 on the whole test set every 100 epochs
    would cost about 20 minutes of a CPU core each time."""
    return dataclasses.replace(experiment("paper", VARIANTS[0], DEPTH)[1], iw_every=0, iw_subset=LK_IMAGES)


@dataclass(frozen=True)
class Stage:
    """Train ``variant``/``seed`` to ``epochs`` (then keep its milestone), or, with ``full_test``,
    evaluate L_5000 at ``epochs`` on all 10,000 test images."""

    variant: str
    seed: int
    epochs: int
    full_test: bool = False

    @property
    def config(self) -> RunConfig:
        return run_config(self.variant, self.seed)

    def label(self) -> str:
        what = "L5000 on all 10,000 test images" if self.full_test else f"to {self.epochs} epochs"
        return f"{self.config.dir_name} {what}"


def plan() -> list[Stage]:
    """Every stage, most important first: each seed's first budget, then the long seeds on."""
    stages = [Stage(v, s, FIRST_BUDGET) for s in SEEDS for v in VARIANTS]
    for s in LONG_SEEDS:
        for e in MILESTONES:
            if e > FIRST_BUDGET:
                stages += [Stage(v, s, e) for v in VARIANTS]
        stages += [Stage(v, s, FULL_TEST_EPOCH, full_test=True) for v in VARIANTS]
    return stages


def _run(stage: Stage, root: Path) -> Run | None:
    return stored_run(registry(root) / stage.config.dir_name)


def _full_test_eval(run: Run, epochs: int) -> dict | None:
    k = eval_config().iw_k
    return next((r for r in run.evals() if r.get("epoch") == epochs and r.get("iw_k") == k
                 and r.get("n_iw") == r.get("n_test") == FULL_TEST_IMAGES), None)


def _goes_on(stage: Stage, stages: list[Stage]) -> bool:
    """Whether the plan trains the run of ``stage`` past its epochs (its fp16 weights then move on)."""
    return any((s.variant, s.seed) == (stage.variant, stage.seed) and s.epochs > stage.epochs for s in stages)


def stage_done(stage: Stage, root: Path | None = None, stages: list[Stage] | None = None) -> bool:
    """Whether ``stage`` is done: its evaluation recorded, or the run at least at its epochs with the
    milestone's fp16 weights kept (``model-fp16-e<E>.pt`` where the run goes on past E; the run's own
    ``model-fp16.pt``, which records its epoch, where it ends there)."""
    run = _run(stage, root or home())
    if run is None:
        return False
    if stage.full_test:
        return _full_test_eval(run, stage.epochs) is not None
    if run.epochs > stage.epochs:
        return True
    kept = (run.path / MILESTONE_WEIGHTS.format(epoch=stage.epochs)).exists() \
        if _goes_on(stage, plan() if stages is None else stages) else (run.path / WEIGHTS_FP16).exists()
    return run.epochs == stage.epochs and run.status == "complete" and kept


def keep_milestone(run: Run, epochs: int) -> Path:
    """Keep the run's fp16 weights of epoch ``epochs`` as ``model-fp16-e<epochs>.pt`` (the file
    records its epoch; refuses weights of another epoch)."""
    src = run.path / WEIGHTS_FP16
    have = load_checkpoint(src)["epoch"]
    if have != epochs:
        raise RuntimeError(f"{run.name}: {WEIGHTS_FP16} holds epoch {have}, not {epochs}; resume the run to "
                           f"{epochs} epochs first")
    dest = run.path / MILESTONE_WEIGHTS.format(epoch=epochs)
    atomic_write_bytes(dest, src.read_bytes())
    return dest


def run_stage(stage: Stage, root: Path, data, progress: bool = True, keep: bool = True) -> Run:
    """Do one stage (train, and with ``keep`` keep the milestone's weights, or the full-test
    evaluation); returns its run."""
    if stage.full_test:
        run = _run(stage, root)
        if run is None or run.epochs != stage.epochs:
            raise RuntimeError(f"{stage.label()}: the run is not at {stage.epochs} epochs")
        # held like training, so that a second worker skips it instead of evaluating it again
        with run_lock(run.path):
            if _full_test_eval(run, stage.epochs) is None:  # not done by a worker that held it before
                evaluate_run(run, iw_k=eval_config().iw_k, test_subset=None, iw_subset=None, progress=progress)
        return run
    run = get_or_train(stage.config, stage.epochs, eval_config(), root=registry(root), device="cpu",
                       progress=progress, data=data)
    if keep and run.epochs == stage.epochs:
        keep_milestone(run, stage.epochs)
    return run


def _ready(stage: Stage, stages: list[Stage], root: Path) -> bool:
    """Every earlier stage of the same run is done."""
    return all(stage_done(s, root, stages) for s in stages
               if (s.variant, s.seed) == (stage.variant, stage.seed) and (s.epochs, s.full_test) <
               (stage.epochs, stage.full_test))


def work(root: Path | None = None, reverse: bool = False, threads: int = THREADS, progress: bool = True,
         stages: list[Stage] | None = None, log=print) -> None:
    """One worker: repeatedly take the first stage (the last, with ``reverse``) that is not done,
    whose earlier stages are done and that no other worker holds; stop when none is left."""
    root = root or home()
    torch.set_num_threads(threads)
    stages = stages if stages is not None else plan()
    data = None
    while True:
        todo = [s for s in stages if not stage_done(s, root, stages) and _ready(s, stages, root)]
        for stage in reversed(todo) if reverse else todo:
            if data is None and not stage.full_test:
                tcfg = stage.config.train
                data = load_dataset(tcfg.dataset, subset=tcfg.subset, test_seed=tcfg.test_seed)
            t0 = time.time()
            log(f"{time.strftime('%H:%M:%S')} start {stage.label()}")
            try:
                run = run_stage(stage, root, data, progress, keep=_goes_on(stage, stages))
            except RunLockedError:
                log(f"{stage.label()}: {'evaluated' if stage.full_test else 'trained'} by another worker, skipped")
                continue
            if not stage_done(stage, root, stages):  # a stage that cannot finish would be redone forever
                raise RuntimeError(f"{stage.label()}: finished, but the run does not show it done ({run.status}, "
                                   f"{run.epochs} epochs); see {run.path}")
            m = run.metrics()[-1] if run.metrics() else {}
            log(f"{time.strftime('%H:%M:%S')} done {stage.label()} in {time.time() - t0:.0f} s: "
                f"test L1 {m.get('test_L1', float('nan')):.2f}")
            break
        else:
            log("nothing left for this worker" if not todo else "every remaining stage is held by another worker")
            return


def status(root: Path | None = None) -> list[dict]:
    """One row per run of the plan: epochs, status, last test L1 and L_5000, seconds per epoch."""
    root = root or home()
    rows = []
    for v, s in dict.fromkeys((st.variant, st.seed) for st in plan()):
        cfg = run_config(v, s)
        run = _run(Stage(v, s, FIRST_BUDGET), root)
        target = max(st.epochs for st in plan() if (st.variant, st.seed) == (v, s))
        row = {"run": cfg.dir_name, "epochs": 0, "target": target, "status": "not started"}
        if run is not None:
            metrics = run.metrics()
            lk = [r for r in metrics if r.get("test_LK") is not None]
            per_epoch = [r["epoch_seconds"] for r in metrics[-3:] if r.get("epoch_seconds")]
            row.update(epochs=run.epochs, status=run.status,
                       test_L1=metrics[-1].get("test_L1") if metrics else None,
                       test_LK=lk[-1]["test_LK"] if lk else None, LK_epoch=lk[-1]["epoch"] if lk else None,
                       seconds_per_epoch=sum(per_epoch) / len(per_epoch) if per_epoch else None,
                       milestones=sorted(int(p.stem.rsplit("-e", 1)[1])
                                         for p in run.path.glob(MILESTONE_WEIGHTS.format(epoch="*"))))
        rows.append(row)
    return rows


# -- the background processes ----------------------------------------------------------------------
def _pids(root: Path) -> dict[int, int]:
    pids = {}
    for f in sorted((root / "logs").glob("worker-*.pid")):
        try:
            pid = int(f.read_text())
            os.kill(pid, 0)
        except (ValueError, OSError):
            continue
        pids[int(f.stem.split("-")[1])] = pid
    return pids


def _snapshot(repo: Path, root: Path) -> str:
    """Clone ``repo``'s current commit into ``root/src`` (the code the workers run); returns the commit."""
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "lvae"],
                           check=True, capture_output=True, text=True).stdout.strip()
    if dirty:
        raise SystemExit(f"lvae/ has uncommitted changes ({dirty.splitlines()[0]} ...): commit them first, so that "
                         f"the runs record the code they trained with")
    src = root / "src"
    shutil.rmtree(src, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(repo), str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "checkout", "--quiet", commit], check=True)
    return commit


def start(root: Path | None = None, workers: int = WORKERS, threads: int = THREADS) -> list[int]:
    """Start the workers in the background (``nice 19``), from a clone of this repository's commit."""
    root = root or home()
    running = _pids(root)
    if running:
        raise SystemExit(f"the campaign is already running (workers {sorted(running.values())}); "
                         f"`python scripts/campaign.py stop` first")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    registry(root).mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    commit = _snapshot(repo, root)
    src = root / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "TQDM_MININTERVAL": "60",
           HOME_ENV: str(root)}
    pids = []
    for i in range(workers):
        log = open(root / "logs" / f"worker-{i}.log", "a")
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} worker {i} started at {commit[:10]}\n")
        log.flush()
        cmd = ["nice", "-n", "19", sys.executable, "-m", "lvae.training.campaign", "work", "--threads", str(threads)]
        if i % 2:
            cmd.append("--reverse")
        p = subprocess.Popen(cmd, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        (root / "logs" / f"worker-{i}.pid").write_text(str(p.pid))
        pids.append(p.pid)
    return pids


def stop(root: Path | None = None) -> list[int]:
    """Stop the workers (SIGTERM; each run resumes from its last checkpoint)."""
    pids = list(_pids(root or home()).values())
    for pid in pids:
        os.killpg(pid, signal.SIGTERM)
    return pids


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except BrokenPipeError:  # `python scripts/campaign.py status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python scripts/campaign.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("start", help="start the workers in the background")
    sub.add_parser("status", help="where every run stands")
    sub.add_parser("stop", help="stop the workers")
    w = sub.add_parser("work", help="one worker, in the foreground")
    w.add_argument("--reverse", action="store_true", help="take the plan from its end (a second worker)")
    w.add_argument("--threads", type=int, default=THREADS)
    ns = ap.parse_args(argv)
    if ns.cmd == "start":
        pids = start()
        print(f"started {len(pids)} workers {pids}; logs in {home() / 'logs'}; runs in {registry()}")
    elif ns.cmd == "stop":
        print(f"stopped {stop() or 'no workers'}")
    elif ns.cmd == "work":
        work(reverse=ns.reverse, threads=ns.threads, log=lambda s: print(s, flush=True))
    else:
        def num(v, fmt="{:.2f}"):
            return "—" if v is None else fmt.format(v)

        for row in status():
            extra = "" if "milestones" not in row else (
                f"  test L1 {num(row['test_L1'])}  L5000 {num(row['test_LK'])} (epoch {num(row['LK_epoch'], '{}')})  "
                f"{num(row['seconds_per_epoch'], '{:.1f}')} s/epoch  milestones kept {row['milestones']}")
            print(f"{row['run']}: {row['epochs']}/{row['target']} {row['status']}{extra}")


if __name__ == "__main__":
    main()
