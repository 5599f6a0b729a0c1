"""The training step (lvae.training.step): the step with pre-drawn noise is bitwise the step that draws it,
the learning rate reaches Adam, and the opt-in bf16 mode is refused, naming the fp32 option, where
bf16 matrix multiplication is not fast."""
from __future__ import annotations

import pytest
import torch
from helpers import library_steps, small_config

import lvae.training.step
from lvae.config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.data import datasets
from lvae.model.bounds import training_bound
from lvae.model.network import build_model, draw_noise
from lvae.training.loop import get_or_train
from lvae.training.step import (Objective, PrecisionError, bf16_matmul, check_precision, make_optimizer, objective_step,
                                train_step)

MODEL = ModelConfig(x_dim=30, latent_sizes=(6, 3), hidden_sizes=(16, 8))


def _batches(n=5, seed=1):
    gx = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 30, generator=gx) < 0.4).float() for _ in range(n)]


def _twins(cfg: TrainConfig):
    """Two models with the same initial weights, and an optimizer for each."""
    torch.manual_seed(0)
    a = build_model(MODEL)
    torch.manual_seed(0)
    b = build_model(MODEL)
    return a, b, make_optimizer(a, cfg), make_optimizer(b, cfg)


@pytest.mark.parametrize("eq,iw", [(1, 1), (2, 3)])
def test_the_step_with_pre_drawn_noise_is_bitwise_the_step_that_draws_it(eq, iw):
    """Objective + objective_step (noise drawn before the step, beta a tensor) = the loss computed with
    the generator inside the pass and a float beta, then the same backward, clipping and Adam."""
    cfg = TrainConfig(eq_samples=eq, iw_samples=iw)
    a, b, opt_a, opt_b = _twins(cfg)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, x in enumerate(_batches()):
        beta = (0.0, 0.25, 1.0)[i % 3]
        loss_a = -training_bound(a, x, beta, eq, iw, cfg.analytic_kl, ga, check=False).mean()
        opt_a.zero_grad()
        loss_a.backward()
        lvae.training.step.clip_gradients(opt_a, cfg)
        opt_a.step()
        eps = draw_noise(MODEL, eq * iw, len(x), gb, "cpu")
        loss_b = objective_step(Objective(b, cfg), opt_b, x, torch.tensor(beta), eps, cfg)
        assert torch.equal(loss_a.detach(), loss_b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_train_step_is_the_objective_step_with_the_generators_draws():
    cfg = TrainConfig()
    a, b, opt_a, opt_b = _twins(cfg)
    ga, gb = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for x in _batches():
        la = train_step(a, opt_a, x, 0.5, cfg, ga)
        lb = objective_step(Objective(b, cfg), opt_b, x, torch.tensor(0.5), draw_noise(MODEL, 1, len(x), gb, "cpu"),
                            cfg)
        assert torch.equal(la, lb)


def test_set_lr_reaches_the_flat_adam():
    cfg = TrainConfig()
    model = build_model(MODEL)
    opt = make_optimizer(model, cfg)
    opt.set_lr(2.5e-4)
    assert opt.param_groups[0]["lr"] == 2.5e-4 and opt._inner.param_groups[0]["lr"] == 2.5e-4
    flat, grad, m, v, step = opt.state_tensors()
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in model.parameters())
    assert m.shape == v.shape == grad.shape == flat.shape and step.dim() == 0


def test_bf16_probe_is_cached_per_process():
    first = bf16_matmul("cpu")
    assert isinstance(first[0], bool) and "bf16" in first[1]
    assert bf16_matmul("cpu") is first


def test_bf16_without_fast_hardware_is_refused_with_the_fp32_alternative(tmp_path, monkeypatch):
    monkeypatch.setitem(lvae.training.step._BF16_FAST, "cpu", (False, "a 512 x 512 matmul took 9.00 ms in bf16 and "
                                                              "1.00 ms in fp32 on this CPU (DEFAULT)"))
    cfg = RunConfig("b", ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8)),
                    TrainConfig(dataset="synthetic", subset=64, batch_size=32, precision="bf16"))
    with pytest.raises(PrecisionError, match=r"needs fast bf16 matrix multiplication, which this hardware lacks: a "
                                             r"512 x 512 matmul took 9\.00 ms.*--precision fp32"):
        get_or_train(cfg, 1, EvalConfig(iw_k=4, test_subset=32), root=tmp_path, device="cpu", progress=False)
    assert not any(tmp_path.iterdir())  # refused before the run directory exists
    assert issubclass(PrecisionError, ConfigError)
    check_precision(TrainConfig(precision="fp32"), "cpu")  # fp32 is never refused
    monkeypatch.setitem(lvae.training.step._BF16_FAST, "cpu", (True, "fast"))
    check_precision(cfg.train, "cpu")


def test_bf16_mode_within_02_nats_of_fp32(tmp_path):
    """The opt-in bf16 autocast mode: same short run, test L1 within 0.2 nats of fp32."""
    data = datasets.load_dataset("synthetic", subset=512, test_subset=200)
    ecfg = EvalConfig(every=4, iw_k=10, test_subset=200, train_subset=200)
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = RunConfig(name=f"bf-{precision}", model=ModelConfig(x_dim=64, latent_sizes=(8, 4),
                                                                  hidden_sizes=(64, 32)),
                        train=TrainConfig(dataset="synthetic", subset=512, batch_size=64, warmup_epochs=2,
                                          precision=precision))
        run = get_or_train(cfg, 4, ecfg, root=tmp_path, device="cpu", progress=False, data=data)
        out[precision] = run.last("test_L1")
    assert abs(out["bf16"] - out["fp32"]) < 0.2, out


def test_precision_field_keeps_existing_run_keys():
    assert RunConfig("a").key == RunConfig("a", train=TrainConfig(precision="fp32")).key
    assert RunConfig("a").key != RunConfig("a", train=TrainConfig(precision="bf16")).key
    with pytest.raises(lvae.config.ConfigError):
        TrainConfig(precision="fp16")


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_compiled_step_matches_eager_step():
    """TrainConfig(compile=True): the same noise and the same objective, so a few steps from the same
    start agree with the eager steps to floating-point rounding (fused kernels round differently).
    The last, smaller batch of an epoch runs eagerly: one compiled graph per run."""
    torch.manual_seed(0)
    a = lvae.build_model(small_config())
    torch.manual_seed(0)
    b = lvae.build_model(small_config())
    eager, comp = TrainConfig(batch_size=16), TrainConfig(batch_size=16, compile=True)
    pa = library_steps(a, make_optimizer(a, eager), n=3, cfg=eager)
    pb = library_steps(b, make_optimizer(b, comp), n=3, cfg=comp)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = (torch.rand(16, 30, generator=torch.Generator().manual_seed(4)) < 0.4).float()
    from lvae.model.network import draw_noise
    from lvae.training.step import compiled_objective
    eps = draw_noise(b.config, 1, 16, g1, "cpu")
    la = -training_bound(b, x, 0.7, 1, 1, True, g2).mean()
    lb = compiled_objective(b, comp)(x, torch.tensor(0.7), eps)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
