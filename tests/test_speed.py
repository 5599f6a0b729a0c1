"""The speed work changes no numbers: foreach Adam / clipping are bitwise identical to the plain
loops, the evaluation fast paths agree with the generic code to floating-point rounding, and the
opt-in bf16 mode stays within 0.2 nats of fp32. (No timings here: see benchmarks/.)"""
import io
import math

import pytest
import torch

import lvae
from lvae import datasets
from lvae.bounds import _log_weights, iw_bound, training_bound
from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.engine import get_or_train
from lvae.optim import FlatAdam
from lvae.train import make_optimizer, train_step


def _small(inference="ladder", bn=True, **kw):
    return ModelConfig(x_dim=30, latent_sizes=(8, 4, 2), hidden_sizes=(20, 12, 6), inference=inference,
                       batch_norm=bn, **kw)


def _steps(model, opt, clip, n=6, seed=0):
    cfg = TrainConfig()
    g = torch.Generator().manual_seed(seed)
    gx = torch.Generator().manual_seed(seed + 1)
    params = list(model.parameters())
    for _ in range(n):
        x = (torch.rand(16, 30, generator=gx) < 0.4).float()
        loss = -training_bound(model, x, 0.7, 1, 1, True, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip(params, cfg)
        opt.step()
    return [p.detach().clone() for p in params]


def _plain_clip(params, cfg):
    torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm, foreach=False)
    torch.nn.utils.clip_grad_value_(params, cfg.clip_value, foreach=False)


def _lib_steps(model, opt, n=6, seed=0, cfg=TrainConfig()):
    """The library's own step (lvae.train.train_step) on the batches _steps uses."""
    g = torch.Generator().manual_seed(seed)
    gx = torch.Generator().manual_seed(seed + 1)
    for _ in range(n):
        x = (torch.rand(16, 30, generator=gx) < 0.4).float()
        train_step(model, opt, x, 0.7, cfg, g)
    return [p.detach().clone() for p in model.parameters()]


def _plain_adam(model, cfg=TrainConfig()):
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, foreach=False)


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_optimizer_and_clipping_bitwise_identical_to_plain_loops(inference):
    """FlatAdam + its flat clipping (the library's step) = per-parameter Adam + plain clipping, bit for bit."""
    torch.manual_seed(0)
    a = lvae.build_model(_small(inference))
    torch.manual_seed(0)
    b = lvae.build_model(_small(inference))
    pa = _steps(a, _plain_adam(a), _plain_clip)
    opt = make_optimizer(b, TrainConfig())
    assert isinstance(opt, FlatAdam)
    pb = _lib_steps(b, opt)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    # the parameters, gradients and moments really are views of the flat buffers
    assert all(p.grad is not None and p.grad.untyped_storage().data_ptr() == opt._flat_param.grad.untyped_storage().data_ptr()
               for p in b.parameters())


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_flat_adam_state_dict_interchangeable_with_torch_adam():
    """Checkpoints keep torch.optim.Adam's per-parameter layout: a FlatAdam state resumes in a plain
    Adam and a plain Adam state resumes in a FlatAdam, with bitwise the same continuation."""
    cfg = TrainConfig()
    torch.manual_seed(0)
    a = lvae.build_model(_small())
    opt_a = make_optimizer(a, cfg)
    _lib_steps(a, opt_a, n=3)
    sd = _round_trip(opt_a.state_dict())  # as through a checkpoint file
    assert set(sd["state"]) == set(range(len(list(a.parameters()))))
    # continue 3 steps: (1) the FlatAdam itself, (2) a plain Adam loaded from its state dict,
    # (3) a FlatAdam loaded from the plain Adam's state dict
    torch.manual_seed(1)
    b = lvae.build_model(_small())
    b.load_state_dict(a.state_dict())
    plain = _plain_adam(b)
    plain.load_state_dict(sd)
    torch.manual_seed(2)
    c = lvae.build_model(_small())
    c.load_state_dict(a.state_dict())
    opt_c = make_optimizer(c, cfg)
    opt_c.load_state_dict(_round_trip(plain.state_dict()))
    pa = _lib_steps(a, opt_a, n=3, seed=7)
    pb = _steps(b, plain, _plain_clip, n=3, seed=7)
    pc = _lib_steps(c, opt_c, n=3, seed=7)
    for x, y, z in zip(pa, pb, pc):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert float(opt_c.state_dict()["state"][0]["step"]) == 6


def _generic_iw(model, x, k, chunk, g):
    with torch.no_grad():
        up = model.upward(x)
        parts = [torch.logsumexp(_log_weights(model.forward_from(x, up, min(chunk, k - s), g)), 0)
                 for s in range(0, k, chunk)]
        return torch.logsumexp(torch.stack(parts), 0) - math.log(k)


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_iw_fast_path_matches_generic_path(inference, bn, likelihood):
    torch.manual_seed(0)
    model = lvae.build_model(_small(inference, bn, likelihood=likelihood))
    x = torch.rand(64, 30)
    if likelihood == "bernoulli":
        x = (x < 0.4).float()
    model.train()
    with torch.no_grad():  # non-trivial batch-norm population statistics
        for _ in range(3):
            model(x, 1, torch.Generator().manual_seed(5))
    model.eval()
    a = _generic_iw(model, x[:10], 37, 8, torch.Generator().manual_seed(1))
    b = iw_bound(model, x[:10], 37, 8, torch.Generator().manual_seed(1))
    torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-4)
    if bn:  # batch norm left in training mode (batch statistics of each chunk): the ordinary layers
        model.train()
        a = _generic_iw(model, x[:10], 37, 8, torch.Generator().manual_seed(1))
        b = iw_bound(model, x[:10], 37, 8, torch.Generator().manual_seed(1))
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-4)
    assert not b.is_inference()
    c = iw_bound(model, x[:10], 37, 37, torch.Generator().manual_seed(1))  # chunking changes only rounding
    assert torch.isfinite(c).all()


def test_inference_mode_dense_matches_forward():
    torch.manual_seed(0)
    model = lvae.build_model(_small())
    x = (torch.rand(40, 30) < 0.4).float()
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        a = model.upward(x)
    with torch.inference_mode():
        b = model.upward(x)
    for (ma, va), (mb, vb) in zip(a, b):
        torch.testing.assert_close(mb, ma, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6)


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
    a = lvae.build_model(_small())
    torch.manual_seed(0)
    b = lvae.build_model(_small())
    eager, comp = TrainConfig(batch_size=16), TrainConfig(batch_size=16, compile=True)
    pa = _lib_steps(a, make_optimizer(a, eager), n=3, cfg=eager)
    pb = _lib_steps(b, make_optimizer(b, comp), n=3, cfg=comp)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = (torch.rand(16, 30, generator=torch.Generator().manual_seed(4)) < 0.4).float()
    from lvae.models import draw_noise
    from lvae.train import compiled_objective
    eps = draw_noise(b.config, 1, 16, g1, "cpu")
    la = -training_bound(b, x, 0.7, 1, 1, True, g2).mean()
    lb = compiled_objective(b, comp)(x, torch.tensor(0.7), eps)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)


def test_benchmark_table_reads_bench_results(tmp_path, monkeypatch):
    """The reproduce chapter and benchmarks/table.py show bench.py's JSON; a missing file names the fix."""
    import json

    from lvae.benchmark_tables import benchmark_table
    res = {"machine": {"cpu": "X", "cores": 2, "threads": 1, "torch": "2", "date": "d", "load_start": [0.1, 0, 0],
                       "load_end": [0.2, 0, 0]},
           "peak": {"float32": 100.0, "bfloat16": 200.0},
           "rows": [{"what": "step", "impl": "reference", "ms": 50.0, "wall_ms": 60.0, "ratio": 1.0, "gflops": 40.0,
                     "peak_frac": 0.4},
                    {"what": "step", "impl": "library fp32 compiled", "ms": 2500.0, "ratio": 0.5, "compile_s": 44.0}]}
    (tmp_path / "r.json").write_text(json.dumps(res))
    machine, rows = benchmark_table(tmp_path / "r.json")
    assert "1 torch thread(s) (CPU time of one thread)" in machine and "fp32 100 GFLOP/s" in machine
    assert rows[0]["time"] == "50.0 ms" and rows[0]["% of fp32 peak"] == "40%" and rows[0]["notes"] == "wall 60.0 ms"
    assert rows[1]["time"] == "2.5 s" and rows[1]["x reference"] == "0.50" and "compilation 44 s" in rows[1]["notes"]
    # the book's narrow form: one row per benchmark, a (time, ratio, % peak) cell per implementation
    from lvae.benchmark_tables import benchmark_summary
    from lvae.book import table
    speed, other = benchmark_summary(rows + [{"benchmark": "grid", "implementation": "lvae.grid (vmap)", "time": "6.8 s",
                                              "x reference": "", "GFLOP/s": "", "% of fp32 peak": "", "notes": ""}])
    assert speed == [{"benchmark": "step", "reference": ("50.0 ms", "1.00x", "40%"),
                      "library fp32 compiled": ("2.5 s", "0.50x")}]
    assert other == ["step, reference: wall 60.0 ms", "step, library fp32 compiled: first steps incl. compilation 44 s",
                     "grid, lvae.grid (vmap): 6.8 s"]
    assert "<td>50.0 ms<br>1.00x<br>40%</td>" in table(speed, ["benchmark", "reference"])._repr_html_()
    assert "step | 50.0 ms 1.00x 40%" in repr(table(speed, ["benchmark", "reference"]))
    res["machine"].update(git_commit="0123456789abcdef", git_dirty=False)
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert ", commit 0123456;" in benchmark_table(tmp_path / "r.json")[0]
    monkeypatch.setattr("lvae.benchmark_tables.benchmark_results_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="benchmarks/bench.py"):
        benchmark_table()


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_threaded_iw_equals_sequential(inference):
    """iw_bound_batched with worker threads draws the same noise in the same order and computes each
    batch with the same code: the numbers of one batch after another on one generator, to rounding."""
    from lvae.bounds import iw_bound_batched

    torch.manual_seed(0)
    model = lvae.build_model(_small(inference)).eval()
    x = (torch.rand(23, 30, generator=torch.Generator().manual_seed(2)) < 0.4).float()
    g = torch.Generator().manual_seed(1)
    seq = torch.cat([iw_bound(model, x[s:s + 5], 37, 8, g) for s in range(0, 23, 5)])
    threads = torch.get_num_threads()
    par = iw_bound_batched(model, x, 37, 8, 5, torch.Generator().manual_seed(1), workers=3, rows=16)
    assert torch.get_num_threads() == threads  # restored
    torch.testing.assert_close(par, seq, rtol=1e-5, atol=1e-5)
    one = iw_bound_batched(model, x, 37, 8, 5, torch.Generator().manual_seed(1), workers=1, rows=16)
    torch.testing.assert_close(one, seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, par, rtol=1e-5, atol=1e-5)  # intra-op threads may round differently
