"""The training engine (lvae.training.loop): one loop for a stack of M >= 1 runs. A run trained by it is
bitwise the plain step-by-step loop on the CPU; the capture-ready step (static inputs refilled in
place, a step undone after a CUDA-graph warm-up) changes no number; an epoch's inputs do not depend
on how runs are grouped; a diverging member of a stack fails alone."""
from __future__ import annotations

import json

import pytest
import torch

import lvae.training.loop
from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.data import batches as batching
from lvae.data.datasets import load_dataset
from lvae.model.checkpoint_format import upgrade_state_dict
from lvae.model.network import build_model, draw_noise
from lvae.model.warmup import warmup_beta
from lvae.registry.runs import CHECKPOINT, Run
from lvae.training.grid import train_grid
from lvae.training.loop import GridTrainer, SingleModel, epoch_inputs, get_or_train, run_epoch
from lvae.training.step import NonFiniteLossError, generator, learning_rate, make_optimizer, train_step

EVAL = EvalConfig(every=10, iw_k=4, iw_chunk=4, test_subset=32, train_subset=32)


def _cfg(name="e", inference="ladder", bn=True, seed=0, warmup=2, **train):
    m = ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8), inference=inference, batch_norm=bn)
    t = TrainConfig(dataset="synthetic", subset=96, seed=seed, batch_size=32, warmup_epochs=warmup, **train)
    return RunConfig(name=name, model=m, train=t)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", subset=96, test_subset=32)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _plain_loop(cfg: RunConfig, data, epochs: int) -> dict[str, torch.Tensor]:
    """The single-run trainer written out: lvae.training.step.train_step over each epoch's batches, the
    noise drawn from the run's own generator as the step asks for it."""
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg.model)
    opt = make_optimizer(model, tcfg)
    for epoch in range(epochs):
        model.train()
        for group in opt.param_groups:
            group["lr"] = learning_rate(epoch, tcfg)
        g = generator("cpu", "noise", tcfg.seed, epoch)
        for x in batching.train_batches(data, epoch, tcfg.seed, tcfg.batch_size):
            train_step(model, opt, x, warmup_beta(epoch, tcfg.warmup_epochs), tcfg, g)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("inference,bn", [("ladder", True), ("bottom_up", False)])
def test_a_single_run_is_bitwise_the_plain_loop(tmp_path, data, inference, bn):
    cfg = _cfg(inference=inference, bn=bn)
    run = get_or_train(cfg, 3, EVAL, root=tmp_path, device="cpu", progress=False, data=data)
    want = _plain_loop(cfg, data, 3)
    got = upgrade_state_dict(torch.load(run.path / CHECKPOINT, weights_only=True)["model"], inference == "ladder")
    assert set(want) <= set(got)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def _stepper(cfg: RunConfig) -> SingleModel:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    return SingleModel(model, make_optimizer(model, cfg.train), cfg, torch.device("cpu"))


def _batches(cfg: RunConfig, n: int = 5):
    gx, g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        x = (torch.rand(1, cfg.train.batch_size, cfg.model.x_dim, generator=gx) < 0.4).float()
        eps = [e.unsqueeze(0) for e in draw_noise(cfg.model, 1, cfg.train.batch_size, g, "cpu")]
        out.append((x, eps))
    return out


def _params(stepper) -> list[torch.Tensor]:
    return [p.detach().clone() for p in stepper.models[0].parameters()]


def test_the_capture_ready_step_on_static_inputs_is_bitwise_the_eager_step():
    """As a replayed CUDA graph does: the batch and the noise are copied into static tensors, beta
    and the learning rate are read from device tensors; the numbers are those of the eager step."""
    cfg = _cfg()
    eager, static = _stepper(cfg), _stepper(cfg)
    for s in (eager, static):
        s.set_epoch([0.4], 1e-3)
    batches = _batches(cfg)
    x_static = torch.zeros_like(batches[0][0])
    eps_static = [torch.zeros_like(e) for e in batches[0][1]]
    for x, eps in batches:
        a = eager.eager_step(x, eps)
        x_static.copy_(x)
        for s, e in zip(eps_static, eps):
            s.copy_(e)
        b = static.eager_step(x_static, eps_static)
        assert torch.equal(a, b)
    for p, q in zip(_params(eager), _params(static)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("stack", [1, 2])
def test_warm_up_steps_before_a_capture_are_undone(stack):
    """The steps a CUDA-graph capture needs first leave no trace: parameters, gradients, Adam
    moments, its step counter and the batch-norm statistics are restored bit for bit."""
    cfgs = [_cfg(seed=s) for s in range(stack)]

    def make():
        if stack == 1:
            return _stepper(cfgs[0])
        models = []
        for c in cfgs:
            torch.manual_seed(c.train.seed)
            models.append(build_model(c.model))
        return GridTrainer(models, cfgs, torch.device("cpu"))

    batches = [(x.expand(stack, *x.shape[1:]), [e.expand(stack, *e.shape[1:]) for e in eps])
               for x, eps in _batches(cfgs[0])]
    plain, warmed = make(), make()
    for s in (plain, warmed):
        s.set_epoch([0.5] * stack, 1e-3)
    with warmed.preserved_state():
        for x, eps in batches[:3]:
            warmed.eager_step(torch.zeros_like(x), [torch.zeros_like(e) for e in eps])
    for x, eps in batches:
        assert torch.equal(plain.eager_step(x, eps), warmed.eager_step(x, eps))
    for a, b in zip(plain.optimizer.state_tensors() + plain.buffers(), warmed.optimizer.state_tensors() + warmed.buffers()):
        assert torch.equal(a, b)


def test_an_epochs_inputs_do_not_depend_on_the_grouping(data):
    """Each run's batches and noise come from its own generators: a run's slice of a stack's
    inputs is bitwise its inputs alone."""
    a, b = _cfg("a", seed=0), _cfg("b", seed=5)
    both = epoch_inputs(data, 1, [a, b], torch.device("cpu"))
    alone = epoch_inputs(data, 1, [b], torch.device("cpu"))
    assert both.steps == alone.steps == 3
    for s in range(both.steps):
        assert torch.equal(both.batch(s)[1], alone.batch(s)[0])
        for e2, e1 in zip(both.eps[s], alone.eps[s]):
            assert torch.equal(e2[1], e1[0])
    assert torch.equal(both.select([b.dir_name]).eps[0][0], alone.eps[0][0])


def test_run_epoch_keeps_the_losses_on_the_device_one_row_per_step(data):
    cfg = _cfg()
    stepper = _stepper(cfg)
    stepper.set_epoch([0.0], 1e-3)
    losses = run_epoch(stepper, epoch_inputs(data, 0, [cfg], torch.device("cpu")))
    assert losses.shape == (3, 1) and bool(torch.isfinite(losses).all())


def test_a_diverging_member_of_a_stack_fails_alone(tmp_path, data, monkeypatch):
    """One of two stacked runs gets an insane evaluation: it is rolled back and marked failed, the
    other completes; the failure is raised, naming the run, once the stack is done."""
    cfgs = [_cfg("ok", seed=0), _cfg("bad", seed=1)]
    real = lvae.training.loop.evaluate

    def spoiled(model, d, tcfg, ecfg, epoch, *args, **kwargs):
        out = real(model, d, tcfg, ecfg, epoch, *args, **kwargs)
        return {**out, "test_L1": float("nan")} if tcfg.seed == 1 and epoch + 1 == 2 else out

    monkeypatch.setattr(lvae.training.loop, "evaluate", spoiled)
    ecfg = EvalConfig(every=1, iw_k=4, iw_chunk=4, test_subset=32, train_subset=32)
    with pytest.raises(NonFiniteLossError, match=r"^bad: the evaluation of epoch 2 is not sane.*keeps its checkpoint "
                                                 r"of epoch 1"):
        train_grid(cfgs, 3, ecfg, root=tmp_path, device="cpu", progress=False, data=data)
    ok, bad = (Run(tmp_path / c.dir_name) for c in cfgs)
    assert ok.status == "complete" and ok.epochs == 3 and [r["epoch"] for r in ok.metrics()] == [1, 2, 3]
    assert bad.status == "failed" and bad.epochs == 1 and [r["epoch"] for r in bad.metrics()] == [1]
    assert torch.load(bad.path / CHECKPOINT, weights_only=True)["epoch"] == 1
    prov = json.loads((ok.path / "provenance.json").read_text())
    assert prov["trainer"] == "lvae.training.grid (2 stacked)" and "error" not in prov
