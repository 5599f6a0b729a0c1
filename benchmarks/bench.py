"""Side-by-side speed benchmarks: the library against the plain eager reference (benchmarks/reference.py).

    python benchmarks/bench.py                 # everything (about 10-15 minutes on the 2-core CPU)
    python benchmarks/bench.py --quick         # smaller repetitions / subsets (about 3 minutes)
    python benchmarks/bench.py --only step,iw  # sections: peak, step, epoch, iw, grid, bf16, book, gpu

The ``gpu`` section runs only where CUDA is present (it names the card): the LVAE-5 step at batch 256
as the eager step (lvae.training.step.train_step), then the engine's step (pre-drawn inputs, lvae.training.loop) in whole
epochs with the prefetch thread on, as training runs it: one model in fp32 and bf16, eager and captured as a
CUDA graph, then grid groups (3 and 6 stacked models) eager and captured, and 6 in bf16 captured.

Everything is measured in one process, reference and library interleaved and repeated, and the
median is reported, because the machine may be shared: the load average is printed with every
section. GFLOP/s are matmul FLOPs (counted with torch.utils.flop_counter on the reference, which
does the same matmuls as the library) per second, against the matmul peak measured at the start of
the same run. Results are also written as JSON (``--out``). No assertion is made on any timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import reference as ref  # noqa: E402

import lvae  # noqa: E402
from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from lvae.data import batches as datasets  # noqa: E402
from lvae.data.datasets import MNIST_FILES, data_dir, load_dataset  # noqa: E402
from lvae.model.bounds import iw_bound, iw_bound_batched  # noqa: E402
from lvae.model.network import draw_noise  # noqa: E402
from lvae.model.warmup import warmup_beta  # noqa: E402
from lvae.registry.storage import git_commit  # noqa: E402
from lvae.training.grid import train_grid  # noqa: E402
from lvae.training.loop import GridTrainer, SingleModel, epoch_inputs, get_or_train, run_epoch  # noqa: E402
from lvae.training.step import bf16_matmul, generator, learning_rate, make_optimizer, train_step  # noqa: E402

OUT: dict = {}
PRIMARY = 1  # which time the ratios use: 1 = CPU time (with --threads 1), 0 = wall time


def load() -> str:
    return "load avg %.2f %.2f %.2f" % os.getloadavg()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def med(ts):
    return statistics.median(ts)


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) since ``t0``. With one torch thread the CPU time
    is what the work costs on an idle core; the wall time also counts the other users' load."""
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def summarize(v: list[tuple[float, float]]) -> tuple[float, float]:
    return med([w for w, _ in v]), med([c for _, c in v])


# -- matmul peak -------------------------------------------------------------------------------------
def peak(reps: int) -> dict:
    res = {}
    for dt in (torch.float32, torch.bfloat16):
        best = 0.0
        for n in (1024, 2048):
            a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
            a @ b
            for _ in range(reps):
                t = now()
                a @ b
                best = max(best, 2 * n ** 3 / max(1e-9, since(t)[PRIMARY]) / 1e9)
        res[str(dt).replace("torch.", "")] = best
    print(f"[peak] matmul fp32 {res['float32']:.0f} GFLOP/s, bf16 {res['bfloat16']:.0f} GFLOP/s   ({load()})")
    return res


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


# the library's step variants: the default fp32 step and the opt-in modes (lvae.config.TrainConfig)
LIB_STEPS = {"library fp32": {}, "library fp32 compiled": {"compile": True},
             "library bf16": {"precision": "bf16"}, "library bf16 compiled": {"precision": "bf16", "compile": True}}


# -- one training step ---------------------------------------------------------------------------------
def lib_model(inference: str):
    torch.manual_seed(0)
    return lvae.build_model(ModelConfig.paper(5, inference=inference))


def make_lib_step(model, x, beta=0.5, **train):
    """The library's training step (lvae.training.step.train_step: the step of lvae.training.loop, noise drawn in it)."""
    cfg = TrainConfig(**train)
    opt = make_optimizer(model, cfg)
    g = generator("cpu", "noise", 0, 0)
    return lambda: train_step(model, opt, x, beta, cfg, g)


def make_ref_step(model, x, beta=0.5):
    opt = ref.make_optimizer(model)
    g = torch.Generator().manual_seed(0)
    return lambda: ref.train_step(model, opt, x, beta, g)


def bench_step(reps: int, inner: int, peak_fp32: float) -> list[dict]:
    rows = []
    x = (torch.rand(256, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    for inference, label in (("ladder", "LVAE-5"), ("bottom_up", "VAE-5")):
        lm = lib_model(inference)
        rm = ref.RefModel(ladder=inference == "ladder")
        rm.load_state_dict(lm.state_dict())
        # same weights, same noise: the reference computes the same objective
        with torch.no_grad():
            a = ref.RefModel.elbo(rm, x, 0.5, torch.Generator().manual_seed(3)).mean()
            b = lvae.elbo(lm, x, 0.5, True, torch.Generator().manual_seed(3)).mean()
        fns = {"reference": make_ref_step(rm, x)}
        for name, train in LIB_STEPS.items():
            fns[name] = make_lib_step(lib_model(inference), x, **train)
        flops = flops_of(lambda: fns["reference"]())
        warm = {}
        for name, f in fns.items():  # warm-up (and compilation)
            t = time.perf_counter()
            for _ in range(3):
                f()
            warm[name] = time.perf_counter() - t
            if "compiled" in name:
                print(f"    [{label} {name}: first 3 steps incl. torch.compile {warm[name]:.0f} s]")
        ts = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                t = now()
                for _ in range(inner):
                    f()
                w, c = since(t)
                ts[k].append((w / inner, c / inner))
        r0 = summarize(ts["reference"])[PRIMARY]
        print(f"[step] {label} batch 256: {flops / 1e9:.2f} GFLOP/step; same objective: ref {a:.4f} vs lib {b:.4f}   ({load()})")
        for k, v in ts.items():
            w, c = summarize(v)
            m = (w, c)[PRIMARY]
            row = {"what": f"train step {label} (batch 256)", "impl": k, "ms": 1e3 * m, "wall_ms": 1e3 * w,
                   "cpu_ms": 1e3 * c, "ratio": m / r0, "gflops": flops / m / 1e9, "peak_frac": flops / m / 1e9 / peak_fp32,
                   **({"compile_s": warm[k]} if "compiled" in k else {})}
            rows.append(row)
            print(f"    {k:14s} {1e3 * m:7.1f} ms (wall {1e3 * w:6.1f})  x{m / r0:5.2f} of reference  "
                  f"{flops / m / 1e9:6.1f} GFLOP/s = {100 * flops / m / 1e9 / peak_fp32:4.0f}% of fp32 peak")
    return rows


# -- one epoch --------------------------------------------------------------------------------------------
def bench_epoch(reps: int, subset: int | None, peak_fp32: float) -> list[dict]:
    data = load_dataset("mnist", subset=subset, test_subset=100)
    n = len(data.x_train)
    rows = []
    x0 = torch.zeros(256, 784)
    for inference, label in (("ladder", "LVAE-5"),):
        flops = flops_of(make_ref_step(ref.RefModel(ladder=True), x0)) * n / 256
        lm = lib_model(inference)
        rm = ref.RefModel(ladder=inference == "ladder")
        rm.load_state_dict(lm.state_dict())
        cfg = TrainConfig(warmup_epochs=200)
        run_cfg = RunConfig(name="bench-epoch", model=lm.config, train=cfg)
        stepper = SingleModel(lm, make_optimizer(lm, cfg), run_cfg, torch.device("cpu"))
        ropt = ref.make_optimizer(rm)
        g = torch.Generator().manual_seed(0)

        def ref_epoch(epoch):
            for x in datasets.train_batches(data, epoch, 0, 256):
                ref.train_step(rm, ropt, x, min(1.0, epoch / 200), g)

        ts = {"reference": [], "library fp32": []}
        for r in range(reps):
            t = now()
            ref_epoch(r)
            ts["reference"].append(since(t))
            t = now()
            lib_epoch(stepper, data, r, run_cfg)
            ts["library fp32"].append(since(t))
        r0 = summarize(ts["reference"])[PRIMARY]
        print(f"[epoch] {label}, {n} images, batch 256   ({load()})")
        for k, v in ts.items():
            w, c = summarize(v)
            m = (w, c)[PRIMARY]
            rows.append({"what": f"epoch {label} ({n} images)", "impl": k, "ms": 1e3 * m, "wall_ms": 1e3 * w,
                         "cpu_ms": 1e3 * c, "ratio": m / r0, "gflops": flops / m / 1e9,
                         "peak_frac": flops / m / 1e9 / peak_fp32})
            print(f"    {k:14s} {m:7.2f} s (wall {w:6.2f})  x{m / r0:5.2f}  {flops / m / 1e9:6.1f} GFLOP/s")
    return rows


def lib_epoch(stepper, data, epoch: int, run_cfg: RunConfig) -> None:
    """One epoch as lvae.training.loop.train_stack trains it: the inputs prepared, the steps, one host sync."""
    cfg = run_cfg.train
    stepper.set_epoch([warmup_beta(epoch, cfg.warmup_epochs)], learning_rate(epoch, cfg))
    run_epoch(stepper, epoch_inputs(data, epoch, [run_cfg], stepper.device)).cpu()


# -- IW-5000 evaluation -----------------------------------------------------------------------------------
def bench_iw(n_ratio: int, n_abs: int, k: int, peak_fp32: float) -> list[dict]:
    data = load_dataset("mnist", subset=1000, test_subset=max(n_ratio, n_abs))
    xt = data.x_test
    chunk, batch = 500, 50  # as lvae.training.step.evaluate: 25,000 rows per chunk
    lm = lib_model("ladder").eval()
    rm = ref.RefModel(ladder=True)
    rm.load_state_dict(lm.state_dict())
    rm.eval()

    def lib(n):  # as lvae.training.step.evaluate: one worker thread per torch thread
        g = generator("cpu", "eval", 0, 0)
        return iw_bound_batched(lm, xt[:n], k, chunk, batch, g, workers=torch.get_num_threads())

    def refi(n):
        g = torch.Generator().manual_seed(0)
        rch = max(1, 25_000 // batch // 1)  # the same rows per chunk
        return torch.cat([rm.iw_bound(xt[s:s + batch], k, min(chunk, rch), g) for s in range(0, n, batch)])

    fl_lib = flops_of(lambda: iw_bound(lm, xt[:batch], chunk, chunk)) * (k / chunk) / batch  # per image
    fl_ref = flops_of(lambda: rm.iw_bound(xt[:batch], chunk, chunk, None)) * (k / chunk) / batch
    lib(batch)
    ts = {"reference": [], "library fp32": []}
    for _ in range(2):
        t = now()
        a = refi(n_ratio)
        ts["reference"].append(since(t))
        t = now()
        b = lib(n_ratio)
        ts["library fp32"].append(since(t))
    r0 = summarize(ts["reference"])[PRIMARY]
    rows = []
    print(f"[iw] LVAE-5 L_{k} on {n_ratio} test images: ref {a.mean():.3f}, lib {b.mean():.3f} (different noise); "
          f"matmul GFLOP per image: library {fl_lib / 1e9:.1f}, reference {fl_ref / 1e9:.1f}   ({load()})")
    for name, v in ts.items():
        w, c = summarize(v)
        m = (w, c)[PRIMARY]
        fl = fl_ref if name == "reference" else fl_lib
        rows.append({"what": f"IW-{k} LVAE-5, {n_ratio} images", "impl": name, "ms": 1e3 * m, "wall_ms": 1e3 * w,
                     "cpu_ms": 1e3 * c, "ratio": m / r0, "gflops": fl * n_ratio / m / 1e9,
                     "peak_frac": fl * n_ratio / m / 1e9 / peak_fp32})
        print(f"    {name:14s} {m:7.1f} s (wall {w:6.1f})  x{m / r0:5.2f}  {fl * n_ratio / m / 1e9:6.1f} GFLOP/s")
    if n_abs:
        t = now()
        lib(n_abs)
        w, c = since(t)
        m = (w, c)[PRIMARY]
        full = m * 10_000 / n_abs
        rows.append({"what": f"IW-{k} LVAE-5, {n_abs} images", "impl": "library fp32", "ms": 1e3 * m,
                     "wall_ms": 1e3 * w, "cpu_ms": 1e3 * c, "gflops": fl_lib * n_abs / m / 1e9,
                     "peak_frac": fl_lib * n_abs / m / 1e9 / peak_fp32, "extrapolated_full_test_min": full / 60})
        print(f"    library on {n_abs} images: {m:.1f} s (wall {w:.1f}) -> full 10,000-image test set "
              f"{full / 60:.1f} min at this thread count (extrapolated x{10_000 / n_abs:.0f})   ({load()})")
    return rows


# -- grid trainer vs one by one ----------------------------------------------------------------------------
def bench_grid(subset: int) -> list[dict]:
    data = load_dataset("mnist", subset=subset, test_subset=100)
    cfgs = [RunConfig(name=f"bench-s{s}", model=ModelConfig.paper(5, inference="bottom_up"),
                      train=TrainConfig(subset=subset, seed=s)) for s in range(3)]
    ecfg = EvalConfig(every=100, iw_k=10, test_subset=100, train_subset=100)
    with tempfile.TemporaryDirectory() as d:
        t = now()
        for c in cfgs:
            get_or_train(c, 1, ecfg, root=Path(d) / "a", device="cpu", progress=False, data=data)
        one = since(t)[PRIMARY]
        t = now()
        train_grid(cfgs, 1, ecfg, root=Path(d) / "b", device="cpu", progress=False, data=data)
        grid = since(t)[PRIMARY]
    print(f"[grid] 3 seeds of VAE-5, 1 epoch of {subset} images (+ a small evaluation): one by one {one:.1f} s, "
          f"grid {grid:.1f} s (x{grid / one:.2f})   ({load()})")
    return [{"what": f"3 x VAE-5, 1 epoch, {subset} images", "impl": "one by one", "ms": 1e3 * one, "ratio": 1.0},
            {"what": f"3 x VAE-5, 1 epoch, {subset} images", "impl": "lvae.training.grid (vmap)", "ms": 1e3 * grid,
             "ratio": grid / one}]


# -- bf16 quality: the same short run in fp32 and bf16 -----------------------------------------------------
def bench_bf16(subset: int, epochs: int, seeds: int) -> list[dict]:
    """Test L1 of the same short runs in fp32 and bf16. One short run's L1 moves by ~0.5 nats with
    any rounding-level perturbation (seed-to-seed sd is similar), so the comparison is averaged over
    ``seeds`` seeds; the per-seed differences are printed too. Where bf16 matmuls are not fast
    (lvae.training.step.bf16_matmul) training refuses bf16, and so the section is skipped."""
    fast, why = bf16_matmul("cpu")
    if not fast:
        print(f"[bf16] skipped: no fast bf16 matmul here ({why}); lvae refuses precision='bf16' on this CPU")
        return []
    data = load_dataset("mnist", subset=subset, test_subset=1000)
    ecfg = EvalConfig(every=epochs, iw_k=1, test_subset=1000, train_subset=1000)
    out: dict = {"fp32": [], "bf16": []}
    secs: dict = {"fp32": 0.0, "bf16": 0.0}
    with tempfile.TemporaryDirectory() as d:
        for seed in range(seeds):
            for precision in ("fp32", "bf16"):
                cfg = RunConfig(name=f"bf16-check-{precision}-{seed}", model=ModelConfig.paper(5),
                                train=TrainConfig(subset=subset, warmup_epochs=2, precision=precision, seed=seed))
                t = now()
                run = get_or_train(cfg, epochs, ecfg, root=d, device="cpu", progress=False, data=data)
                secs[precision] += since(t)[PRIMARY]
                out[precision].append(run.last("test_L1"))
    diffs = [b - a for a, b in zip(out["fp32"], out["bf16"])]
    mean = {k: statistics.mean(v) for k, v in out.items()}
    sd = statistics.stdev(out["fp32"]) if seeds > 1 else float("nan")
    print(f"[bf16] LVAE-5, {epochs} epochs on {subset} MNIST images, {seeds} seeds: mean test L1 fp32 "
          f"{mean['fp32']:.3f}, bf16 {mean['bf16']:.3f}, mean difference {mean['bf16'] - mean['fp32']:+.3f} nats "
          f"(must stay within 0.2); per seed {[round(x, 2) for x in diffs]}, fp32 seed-to-seed sd {sd:.2f}   ({load()})")
    return [{"what": f"LVAE-5 {epochs} epochs on {subset} images, mean test L1 of {seeds} seeds (1000 images)",
             "impl": p, "ms": 1e3 * secs[p] / seeds, "test_L1": mean[p],
             **({"diff_vs_fp32": mean[p] - mean["fp32"], "per_seed_diff": diffs} if p == "bf16" else {})}
            for p in ("fp32", "bf16")]


# -- GPU: eager step, engine step, captured step, grid groups ---------------------------------------------
def _cuda_ms(fn, steps: int, reps: int) -> float:
    """Median milliseconds per call of ``fn`` over ``reps`` runs of ``steps`` calls (CUDA events)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return med(times)


def _gpu_data():
    """MNIST when its files are on disk (``$LVAE_DATA``: the GPU machine has no network), else random images of
    MNIST's size (the same timings: the step does not look at the pixels' values)."""
    if all((data_dir() / "mnist" / f).is_file() for f in MNIST_FILES):
        return load_dataset("mnist"), "MNIST"
    g = torch.Generator().manual_seed(0)
    return (datasets.ImageData("mnist", torch.rand(60_000, 784, generator=g), None,
                               (torch.rand(10_000, 784, generator=g) < 0.5).float(), None, (28, 28), "bernoulli"),
            "random images of MNIST's size (no MNIST under $LVAE_DATA)")


def _epoch_ms(stepper, data, cfgs, dev, reps: int) -> float:
    """Median ms per step over ``reps`` epochs run as lvae.training.loop.train_stack runs them: beta and lr set, a due
    capture, then the next epoch's inputs prepared on the prefetch thread while the epoch's steps run (the first
    epoch, which captures, is not timed)."""
    n = len(cfgs)
    times = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        inputs = epoch_inputs(data, 0, cfgs, dev)
        for e in range(reps + 1):
            stepper.set_epoch([0.5] * n, cfgs[0].train.lr)
            stepper.prepare(inputs.batch(0), inputs.eps[0])
            nxt = pool.submit(epoch_inputs, data, e + 1, cfgs, dev)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_epoch(stepper, inputs)
            end.record()
            torch.cuda.synchronize()
            if e:
                times.append(start.elapsed_time(end) / inputs.steps)
            inputs = nxt.result()
    return med(times)


def bench_gpu(steps: int, reps: int) -> list[dict]:
    """LVAE-5 at batch 256 on the GPU: the plain eager step (lvae.training.step.train_step) per step, then the engine's
    step in whole MNIST epochs with the prefetch thread on, as training runs it: one model and grid groups of 3 and
    6, eager and captured as a CUDA graph, fp32 and bf16 (a grid row: the group's step, and per model). A row that
    fails is printed and stored with its error, and the others go on (the section is meant for a first GPU run)."""
    if not torch.cuda.is_available():
        print("[gpu] skipped: no CUDA device")
        return []
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    OUT["machine"]["gpu"] = card
    fast, why = bf16_matmul(dev)
    print(f"[gpu] {card}; bf16 {'fast' if fast else 'not fast'}: {why}   ({load()})")
    data, what = _gpu_data()
    print(f"[gpu] epochs of {len(data.x_train)} {what}, {datasets.num_batches(len(data.x_train), 256)} steps each, "
          f"{reps} timed after one that captures, prefetch thread on")
    mcfg = ModelConfig.paper(5, inference="ladder")

    def models(n):
        out = []
        for s in range(n):
            torch.manual_seed(s)
            out.append(lvae.build_model(mcfg).to(dev))
        return out

    def configs(n, precision):
        return [RunConfig(name=f"gpu-{s}", model=mcfg, train=TrainConfig(seed=s, precision=precision))
                for s in range(n)]

    rows = []

    def row(name, n, fn):
        nonlocal base
        try:
            ms = fn()
        except Exception as e:  # noqa: BLE001 -- report and go on
            print(f"    {name:40s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            rows.append({"what": f"GPU train step LVAE-5 (batch 256), {card}", "impl": name, "ms": None,
                         "error": f"{type(e).__name__}: {e}"[:2000]})
            return
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        base = base or ms
        rows.append({"what": f"GPU train step LVAE-5 (batch 256), {card}", "impl": name, "ms": ms,
                     "ms_per_model": ms / n, "ratio": ms / n / base, "prefetch": name != EAGER})
        print(f"    {name:40s} {ms:7.2f} ms per step, {ms / n:6.2f} ms per model step, x{ms / n / base:5.2f} of eager")

    base = None
    cfg = TrainConfig()
    x = (torch.rand(256, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float().to(dev)

    def plain():
        (m,) = models(1)
        opt, g = make_optimizer(m, cfg), generator(dev, "noise", 0, 0)
        for _ in range(5):
            train_step(m, opt, x, 0.5, cfg, g)
        return _cuda_ms(lambda: train_step(m, opt, x, 0.5, cfg, g), steps, reps)

    row(EAGER, 1, plain)
    for precision in ("fp32", "bf16") if fast else ("fp32",):
        for graph in (False, True):
            def single(graph=graph, precision=precision):
                cfgs = configs(1, precision)
                (m,) = models(1)
                st = SingleModel(m, make_optimizer(m, cfgs[0].train, capturable=graph), cfgs[0], dev, cuda_graph=graph)
                return _epoch_ms(st, data, cfgs, dev, reps)

            row(f"engine step{' bf16' if precision == 'bf16' else ''}{', CUDA graph' if graph else ''}", 1, single)
    for n, precision, graph in ((3, "fp32", False), (3, "fp32", True), (6, "fp32", False), (6, "fp32", True),
                                *(((6, "bf16", True),) if fast else ())):
        def grid(n=n, precision=precision, graph=graph):
            cfgs = configs(n, precision)
            return _epoch_ms(GridTrainer(models(n), cfgs, dev, cuda_graph=graph), data, cfgs, dev, reps)

        row(f"grid of {n}{' bf16' if precision == 'bf16' else ''}{', CUDA graph' if graph else ''}", n, grid)
    return rows


EAGER = "eager step (lvae.training.step.train_step)"


# -- the cached book rebuild -------------------------------------------------------------------------------
def bench_book(timeout: int) -> list[dict]:
    """`lvae book --profile smoke --no-html` twice: the second run finds every run in the registry."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for attempt in ("first (trains smoke runs if missing)", "cached"):
            t = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, "-m", "lvae.cli", "book", "--profile", "smoke", "--no-html",
                                    "--out", d], cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
                ok = p.returncode == 0
                tail = (p.stdout + p.stderr).strip().splitlines()[-1:] if not ok else []
            except subprocess.TimeoutExpired:
                ok, tail = False, [f"timed out after {timeout} s"]
            s = time.perf_counter() - t
            print(f"[book] smoke profile, chapters only, {attempt}: {s:.1f} s {'ok' if ok else 'FAILED ' + str(tail)}"
                  f"   ({load()})")
            rows.append({"what": f"book rebuild (smoke, no HTML), {attempt}", "impl": "library", "ms": 1e3 * s,
                         "ok": ok})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="peak,step,epoch,iw,grid,bf16,book,gpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine one thread measured in CPU time is the "
                         "stable figure; 2 threads on 2 busy cores measures the neighbours)")
    ap.add_argument("--iw-images", type=int, default=None, help="images for the absolute IW-5000 time (default 1000)")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--wall", action="store_true", help="ratios from wall time even with one thread")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    global PRIMARY
    PRIMARY = 1 if ns.threads == 1 and not ns.wall else 0
    print("timings: " + ("CPU time of this process (one torch thread: robust to other users' load; wall "
                         "time in parentheses)" if PRIMARY else "wall time"))
    only = set(ns.only.split(","))
    OUT["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": ns.threads, "torch": torch.__version__,
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_start": os.getloadavg(),
                      **git_commit()}
    print(f"{OUT['machine']['cpu']}, {os.cpu_count()} cores, {ns.threads} torch threads, torch {torch.__version__}, "
          f"{OUT['machine']['date']}   ({load()})")
    pk = peak(3 if ns.quick else 5)
    OUT["peak"] = pk
    fast, why = bf16_matmul("cpu")
    OUT["machine"]["bf16_fast"], OUT["machine"]["bf16_probe"] = fast, why
    print(f"bf16 matmul on this CPU: {'fast' if fast else 'NOT fast (bf16 rows measure the slow path)'}: {why}")
    rows = []
    if "step" in only:
        rows += bench_step(5 if ns.quick else 9, 3 if ns.quick else 5, pk["float32"])
    if "epoch" in only:
        rows += bench_epoch(1 if ns.quick else 2, 10_000 if ns.quick else None, pk["float32"])
    if "iw" in only:
        n_abs = ns.iw_images if ns.iw_images is not None else (0 if ns.quick else 1000)
        rows += bench_iw(50 if ns.quick else 100, n_abs, 5000, pk["float32"])
    if "grid" in only:
        rows += bench_grid(2560 if ns.quick else 10_240)
    if "bf16" in only:
        rows += bench_bf16(10_000, 2 if ns.quick else 4, 2 if ns.quick else 4)
    if "book" in only:
        rows += bench_book(1800)
    if "gpu" in only:
        rows += bench_gpu(20 if ns.quick else 50, 3 if ns.quick else 5)
    OUT["rows"] = rows
    OUT["machine"]["load_end"] = os.getloadavg()
    Path(ns.out).write_text(json.dumps(OUT, indent=2))
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
