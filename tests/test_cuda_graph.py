"""The engine's CUDA-graph path (lvae.training.loop): on the CPU through the stand-in of tests/cuda_standin.py, where
the whole capture flow -- warm-up undone, replays, a partial last batch, resume, a recapture after a rebuild,
bf16 -- gives bitwise the numbers of the same steps run eagerly; on a GPU (the tests marked ``cuda``) for real.

The eager reference of a stand-in run is the same run with the same (capturable) optimizers and every step eager:
capturable Adam keeps its bias corrections on the device and so rounds differently from the default CPU Adam."""
from __future__ import annotations

import pytest
import torch
from cuda_standin import CaptureError, CudaStandin

import lvae.training.loop
import lvae.training.step
from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.data.datasets import load_dataset
from lvae.model.network import build_model, draw_noise
from lvae.registry.runs import CHECKPOINT, Run
from lvae.training.grid import train_grid
from lvae.training.loop import GridTrainer, SingleModel, epoch_inputs, get_or_train
from lvae.training.step import NonFiniteLossError, make_optimizer

EVAL = EvalConfig(every=1, iw_k=4, iw_chunk=4, test_subset=32, train_subset=32)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(name="g", seed=0, bn=True, inference="ladder", subset=80, precision="fp32", warmup=2):
    """80 training images in batches of 32: two full batches (replayed) and a partial one of 16 (eager)."""
    m = ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8), inference=inference, batch_norm=bn)
    t = TrainConfig(dataset="synthetic", subset=subset, seed=seed, batch_size=32, warmup_epochs=warmup,
                    precision=precision)
    return RunConfig(name=name, model=m, train=t)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", subset=80, test_subset=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def standin(monkeypatch):
    """The CPU plays a GPU whose steps are captured as (stand-in) CUDA graphs."""
    return CudaStandin().install(monkeypatch)


@pytest.fixture
def fast_bf16(monkeypatch):
    monkeypatch.setitem(lvae.training.step._BF16_FAST, "cpu", (True, "the stand-in's bf16 is taken as fast"))


def _all_eager(monkeypatch):
    """The eager reference: the stand-in's steppers and capturable optimizers, every step eager."""
    monkeypatch.setattr(lvae.training.loop.Stepper, "step", lambda self, x, eps: self.eager_step(x, eps))
    monkeypatch.setattr(lvae.training.loop.Stepper, "prepare", lambda self, x, eps: None, raising=False)
    monkeypatch.setattr(lvae.training.loop.Stepper, "_capture", lambda self, x, eps: pytest.fail("captured"))


def _weights(run: Run) -> dict:
    return torch.load(run.path / CHECKPOINT, weights_only=True)


def _same_runs(a: Run, b: Run) -> None:
    """Bitwise the same weights, Adam state and metrics (timings aside)."""
    drop = {"epoch_seconds", "iw_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in a.metrics()] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b.metrics()]
    assert (a.path / CHECKPOINT).exists() == (b.path / CHECKPOINT).exists()
    if not (a.path / CHECKPOINT).exists():  # a run that failed before its first sane checkpoint
        return
    wa, wb = _weights(a), _weights(b)
    assert wa["epoch"] == wb["epoch"]
    for k, v in wa["model"].items():
        assert torch.equal(wb["model"][k], v), (a.name, k)
    for j, s in wa["optimizer"]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(wb["optimizer"]["state"][j][key], s[key]), (a.name, j, key)


def _single(cfg: RunConfig) -> SingleModel:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    return SingleModel(model, make_optimizer(model, cfg.train, capturable=True), cfg, torch.device("cpu"))


def _grid(cfgs: list[RunConfig]) -> GridTrainer:
    models = []
    for c in cfgs:
        torch.manual_seed(c.train.seed)
        models.append(build_model(c.model))
    return GridTrainer(models, cfgs, torch.device("cpu"))


def _inputs(cfg: RunConfig, stack: int, n: int = 4):
    gx, g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        x = (torch.rand(stack, cfg.train.batch_size, cfg.model.x_dim, generator=gx) < 0.4).float()
        eps = [torch.stack([e] * stack) for e in draw_noise(cfg.model, 1, cfg.train.batch_size, g, "cpu")]
        out.append((x, eps))
    return out


# -- the stand-in refuses what a real capture refuses --------------------------------------------------------------
def test_the_standin_undoes_the_capture_and_replays_into_the_same_tensors(standin):
    a, out = torch.ones(3), {}
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        a.mul_(2)
        out["b"] = a + 1
    assert torch.equal(a, torch.ones(3))  # undone
    assert bool(out["b"].isnan().all())  # a capture computes nothing: the output holds garbage until a replay
    g.replay()
    assert torch.equal(a, torch.full((3,), 2.0)) and torch.equal(out["b"], torch.full((3,), 3.0))
    g.replay()
    assert torch.equal(a, torch.full((3,), 4.0)) and torch.equal(out["b"], torch.full((3,), 5.0))


@pytest.mark.parametrize("bad", ["item", "randn"])
def test_the_standin_refuses_a_host_sync_or_a_random_draw_in_a_capture(standin, bad):
    a = torch.ones(3)
    with pytest.raises(CaptureError, match="host sync" if bad == "item" else "random draw"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            float(a.sum()) if bad == "item" else torch.randn(3)


def test_the_standin_refuses_a_capture_of_a_non_capturable_optimizer(standin):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    stepper = SingleModel(model, make_optimizer(model, cfg.train, capturable=False), cfg, torch.device("cpu"))
    stepper.set_epoch([0.5], 1e-3)
    with pytest.raises(RuntimeError, match="capturable is False"):
        stepper.step(*_inputs(cfg, 1)[0])


def test_the_standin_refuses_a_replay_after_the_optimizer_state_was_replaced(standin):
    """Loading an optimizer state after the capture makes new moment buffers: the graph would update the old ones."""
    cfg = _cfg()
    stepper = _single(cfg)
    stepper.set_epoch([0.5], 1e-3)
    (x, eps), *_ = _inputs(cfg, 1)
    stepper.step(x, eps)
    stepper.optimizer.load_state_dict(stepper.optimizer.state_dict())
    with pytest.raises(CaptureError, match="Adam exp_avg is not the tensor captured"):
        stepper.step(x, eps)


def test_the_standin_refuses_work_of_another_thread_during_a_capture(standin):
    pool = lvae.training.loop.ThreadPoolExecutor(max_workers=1)
    try:
        job = pool.submit(torch.ones, 3)
        with pytest.raises(CaptureError, match="may run CUDA work during the capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                pass
        job.result()
        with torch.cuda.graph(torch.cuda.CUDAGraph()):  # waited for: allowed
            pass
    finally:
        pool.shutdown()


# -- fix 1: bf16 is captured with a capturable fused Adam ---------------------------------------------------------
def test_a_bf16_step_is_captured_and_its_replays_are_the_eager_steps(standin, fast_bf16):
    """bf16 takes the fused Adam kernel; a capture needs it capturable (before the fix: "capturable is False").
    One model: the vmapped grid step in bf16 fails on the CPU whether captured or not (batch norm under vmap and
    CPU autocast: "expected scalar type BFloat16 but found Float"); the GPU tests below take the grid in bf16."""
    stack = 1
    cfgs = [_cfg(seed=s, precision="bf16") for s in range(stack)]
    make = (lambda: _single(cfgs[0])) if stack == 1 else (lambda: _grid(cfgs))
    captured, eager = make(), make()
    for s in (captured, eager):
        s.set_epoch([0.5] * stack, 1e-3)
    for x, eps in _inputs(cfgs[0], stack):
        assert torch.equal(captured.step(x, eps), eager.eager_step(x, eps))
    assert standin.replays == 4
    for a, b in zip(captured.optimizer.state_tensors() + captured.buffers(),
                    eager.optimizer.state_tensors() + eager.buffers()):
        assert torch.equal(a, b)


# -- fix 2: no prefetch runs during a capture ---------------------------------------------------------------------
def test_the_next_epochs_inputs_are_prepared_after_the_capture(tmp_path, data, standin):
    """The prefetch of the next epoch runs on another thread; under capture_error_mode="global" no other thread may
    use the device while a stream captures (before the fix: the capture began with the prefetch in flight)."""
    run = get_or_train(_cfg(), 3, EVAL, root=tmp_path, device="cpu", progress=False, data=data)
    assert run.status == "complete" and len(standin.graphs) == 1 and standin.replays == 3 * 2


# -- fix 3: a rebuilt grid trains its survivors in training mode ---------------------------------------------------
def _spoil(monkeypatch, seed: int, epoch: int) -> None:
    """The evaluation of member ``seed`` after ``epoch`` epochs is not sane (a NaN): it fails, the others go on."""
    real = lvae.training.loop.evaluate

    def spoiled(model, d, tcfg, ecfg, e, *args, **kwargs):
        out = real(model, d, tcfg, ecfg, e, *args, **kwargs)
        return {**out, "test_L1": float("nan")} if tcfg.seed == seed and e + 1 == epoch else out

    monkeypatch.setattr(lvae.training.loop, "evaluate", spoiled)


def test_a_grid_rebuilt_after_a_failure_trains_its_survivors_with_batch_norm_in_training_mode(tmp_path, data,
                                                                                                monkeypatch):
    """Three stacked models, one fails at the evaluation of epoch 1; the two survivors, restacked, go on in training
    mode (before the fix: batch norm in eval mode, as the evaluation left the models) and give the one-by-one
    models' numbers up to rounding (tests/test_grid.py's tolerances)."""
    cfgs = [_cfg(f"m{s}", seed=s) for s in range(3)]
    modes = []
    run_epoch = lvae.training.loop.run_epoch

    def recording(stepper, inputs, progress=None):
        if isinstance(stepper, GridTrainer):
            modes.append((len(stepper.models), all(m.training for m in stepper.objective.modules())))
        return run_epoch(stepper, inputs, progress)

    monkeypatch.setattr(lvae.training.loop, "run_epoch", recording)
    _spoil(monkeypatch, seed=1, epoch=1)
    with pytest.raises(NonFiniteLossError, match="^m1: the evaluation of epoch 1 is not sane"):
        train_grid(cfgs, 3, EVAL, root=tmp_path / "grid", device="cpu", progress=False, data=data)
    assert modes == [(3, True), (2, True), (2, True)]
    for c in (cfgs[0], cfgs[2]):
        grid = Run(tmp_path / "grid" / c.dir_name)
        alone = get_or_train(c, 3, EVAL, root=tmp_path / "alone", device="cpu", progress=False, data=data)
        assert grid.status == "complete" and grid.epochs == 3
        for ra, rb in zip(alone.metrics(), grid.metrics()):
            for key in ("train_loss", "train_L1", "test_L1"):
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-4), (c.name, ra["epoch"], key)
        wa, wb = _weights(alone), _weights(grid)
        for k, v in wa["model"].items():
            torch.testing.assert_close(wb["model"][k], v, rtol=1e-3, atol=1e-4, msg=f"{c.name} {k}")


# -- fix 5: the capture is on the step's device ---------------------------------------------------------------------
@pytest.mark.parametrize("stack", [1, 2])
def test_a_step_on_another_device_is_captured_on_that_device(standin, stack):
    """A step on cuda:1 while cuda:0 is current (before the fix: captured on cuda:0's stream, so nothing of the
    step would be captured and every replay would return a stale loss)."""
    cfgs = [_cfg(seed=s) for s in range(stack)]
    stepper, eager = [(_single(cfgs[0]) if stack == 1 else _grid(cfgs)) for _ in range(2)]
    stepper.device = torch.device("cuda", 1)  # the stand-in's cuda:1 (its tensors stay on the CPU)
    for s in (stepper, eager):
        s.set_epoch([0.5] * stack, 1e-3)
    for x, eps in _inputs(cfgs[0], stack, 3):
        assert torch.equal(stepper.step(x, eps), eager.eager_step(x, eps))
    assert standin.graphs[0].device == 1 and standin.device == 0


# -- the whole capture flow is bitwise the eager flow ---------------------------------------------------------------
@pytest.mark.parametrize("stack,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_the_captured_training_is_bitwise_the_eager_training(tmp_path, data, monkeypatch, fast_bf16, stack,
                                                             precision):
    """Three epochs of 2 replayed full batches and an eager partial one, evaluations in between (batch norm to
    eval mode and back, its statistics recomputed in place): the same numbers as every step eager."""
    cfgs = [_cfg(f"s{s}", seed=s, precision=precision) for s in range(stack)]

    def train(root):
        return train_grid(cfgs, 3, EVAL, root=root, device="cpu", progress=False, data=data)

    with monkeypatch.context() as m:
        standin = CudaStandin().install(m)
        captured = train(tmp_path / "captured")
        assert len(standin.graphs) == 1 and standin.replays == 3 * 2
    with monkeypatch.context() as m:
        CudaStandin().install(m)
        _all_eager(m)
        eager = train(tmp_path / "eager")
    for a, b in zip(captured, eager):
        _same_runs(a, b)


def test_a_resumed_captured_run_is_bitwise_the_uninterrupted_one(tmp_path, data, monkeypatch):
    """Stopped after one epoch and resumed (a new stepper, loaded from the checkpoint before its capture)."""
    cfgs = [_cfg("r0", seed=0), _cfg("r1", seed=1)]
    with monkeypatch.context() as m:
        standin = CudaStandin().install(m)
        part = train_grid(cfgs, 3, EVAL, root=tmp_path / "a", device="cpu", progress=False, data=data, stop_after=1)
        assert all(r.status == "partial" for r in part)
        resumed = train_grid(cfgs, 3, EVAL, root=tmp_path / "a", device="cpu", progress=False, data=data)
        assert len(standin.graphs) == 2
        whole = train_grid(cfgs, 3, EVAL, root=tmp_path / "b", device="cpu", progress=False, data=data)
    with monkeypatch.context() as m:
        CudaStandin().install(m)
        _all_eager(m)
        eager = train_grid(cfgs, 3, EVAL, root=tmp_path / "c", device="cpu", progress=False, data=data)
    for a, b, c in zip(resumed, whole, eager):
        _same_runs(a, b)
        _same_runs(a, c)


def test_a_grid_rebuilt_after_a_failure_is_captured_again(tmp_path, data, monkeypatch):
    """One of three fails at epoch 1: the two survivors are restacked and their step captured anew; the numbers are
    those of every step eager."""
    cfgs = [_cfg(f"f{s}", seed=s) for s in range(3)]
    _spoil(monkeypatch, seed=1, epoch=1)
    out = {}
    for how in ("captured", "eager"):
        with monkeypatch.context() as m:
            standin = CudaStandin().install(m)
            if how == "eager":
                _all_eager(m)
            with pytest.raises(NonFiniteLossError, match="^f1: "):
                train_grid(cfgs, 3, EVAL, root=tmp_path / how, device="cpu", progress=False, data=data)
            out[how] = standin
    assert len(out["captured"].graphs) == 2  # the stack of three, then the two survivors
    for c in cfgs:
        a, b = Run(tmp_path / "captured" / c.dir_name), Run(tmp_path / "eager" / c.dir_name)
        assert a.status == b.status == ("failed" if c.train.seed == 1 else "complete")
        _same_runs(a, b)


# -- on a GPU -------------------------------------------------------------------------------------------------------
def _cuda_pair(cfgs):
    dev = torch.device("cuda")
    made = []
    for graph in (True, False):
        models = []
        for c in cfgs:
            torch.manual_seed(c.train.seed)
            models.append(build_model(c.model).to(dev))
        if len(cfgs) == 1:
            opt = make_optimizer(models[0], cfgs[0].train, capturable=True)
            made.append(SingleModel(models[0], opt, cfgs[0], dev, cuda_graph=graph))
        else:
            made.append(GridTrainer(models, cfgs, dev, cuda_graph=graph))
    return made


@CUDA
@pytest.mark.parametrize("stack,precision", [(1, "fp32"), (3, "fp32"), (1, "bf16"), (3, "bf16")])
def test_cuda_graph_replays_follow_the_eager_steps(stack, precision):
    """The real capture (fix 1: bf16 too): replays of the graph against eager steps, 6 steps, with the prefetch of
    other inputs running on another thread after the capture, as in training."""
    cfgs = [_cfg(seed=s, precision=precision) for s in range(stack)]
    captured, eager = _cuda_pair(cfgs)
    for s in (captured, eager):
        s.set_epoch([0.5] * stack, 1e-3)
    batches = [(x.cuda(), [e.cuda() for e in eps]) for x, eps in _inputs(cfgs[0], stack, 6)]
    captured.prepare(*batches[0])
    data = load_dataset("synthetic", subset=4096, test_subset=32)
    with lvae.training.loop.ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(epoch_inputs, data, 1, cfgs, torch.device("cuda"))
        la = torch.stack([captured.step(x, eps) for x, eps in batches])
        lb = torch.stack([eager.step(x, eps) for x, eps in batches])
        nxt.result()
    assert captured._graph is not None and eager._graph is None
    tol = {"rtol": 2e-2, "atol": 2e-2} if precision == "bf16" else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(la, lb, **tol)
    for a, b in zip(captured.optimizer.state_tensors()[:1], eager.optimizer.state_tensors()[:1]):
        torch.testing.assert_close(a, b, **tol)
    print(f"max |captured - eager| loss after 6 steps ({stack} x {precision}): {float((la - lb).abs().max()):.3g}")


@CUDA
def test_cuda_grid_with_a_failure_and_a_resume_trains_with_graphs(tmp_path, monkeypatch):
    """train_grid on the GPU with graphs (prefetch on, a member failing, the survivors recaptured, a resume) against
    the same grid without graphs."""
    cuda_data = load_dataset("synthetic", subset=80, test_subset=32)
    cfgs = [_cfg(f"c{s}", seed=s) for s in range(3)]
    _spoil(monkeypatch, seed=1, epoch=1)
    runs = {}
    for graph in (True, False):
        root = tmp_path / str(graph)
        with pytest.raises(NonFiniteLossError, match="^c1: "):
            train_grid(cfgs, 2, EVAL, root=root, device="cuda", progress=False, data=cuda_data, cuda_graph=graph)
        runs[graph] = train_grid([cfgs[0], cfgs[2]], 3, EVAL, root=root, device="cuda", progress=False,
                                 data=cuda_data, cuda_graph=graph)
    for a, b in zip(runs[True], runs[False]):
        assert a.status == b.status == "complete" and a.epochs == 3
        for ra, rb in zip(a.metrics(), b.metrics()):
            assert ra["test_L1"] == pytest.approx(rb["test_L1"], rel=1e-3, abs=1e-3), (a.name, ra["epoch"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_a_step_on_the_second_gpu_is_captured_there():
    """Fix 5 for real: cuda:1 while cuda:0 is current."""
    cfg = _cfg()
    dev = torch.device("cuda", 1)
    steppers = []
    for graph in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg.model).to(dev)
        steppers.append(SingleModel(model, make_optimizer(model, cfg.train, capturable=True), cfg, dev, graph))
    for s in steppers:
        s.set_epoch([0.5], 1e-3)
    for x, eps in _inputs(cfg, 1, 4):
        x, eps = x.to(dev), [e.to(dev) for e in eps]
        torch.testing.assert_close(steppers[0].step(x, eps), steppers[1].step(x, eps), rtol=1e-4, atol=1e-4)
