"""lvae.training.optim: FlatAdam and the clipping on one flat buffer are bitwise the plain torch loops, and
their state dicts interchangeable with torch.optim.Adam's."""
import io

import pytest
import torch
from helpers import library_steps, small_config

import lvae
from lvae.config import TrainConfig
from lvae.model.bounds import training_bound
from lvae.training.optim import FlatAdam
from lvae.training.step import make_optimizer


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


def _plain_adam(model, cfg=TrainConfig()):
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, foreach=False)


@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_optimizer_and_clipping_bitwise_identical_to_plain_loops(inference):
    """FlatAdam + its flat clipping (the library's step) = per-parameter Adam + plain clipping, bit for bit."""
    torch.manual_seed(0)
    a = lvae.build_model(small_config(inference))
    torch.manual_seed(0)
    b = lvae.build_model(small_config(inference))
    pa = _steps(a, _plain_adam(a), _plain_clip)
    opt = make_optimizer(b, TrainConfig())
    assert isinstance(opt, FlatAdam)
    pb = library_steps(b, opt)
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
    a = lvae.build_model(small_config())
    opt_a = make_optimizer(a, cfg)
    library_steps(a, opt_a, n=3)
    sd = _round_trip(opt_a.state_dict())  # as through a checkpoint file
    assert set(sd["state"]) == set(range(len(list(a.parameters()))))
    # continue 3 steps: (1) the FlatAdam itself, (2) a plain Adam loaded from its state dict,
    # (3) a FlatAdam loaded from the plain Adam's state dict
    torch.manual_seed(1)
    b = lvae.build_model(small_config())
    b.load_state_dict(a.state_dict())
    plain = _plain_adam(b)
    plain.load_state_dict(sd)
    torch.manual_seed(2)
    c = lvae.build_model(small_config())
    c.load_state_dict(a.state_dict())
    opt_c = make_optimizer(c, cfg)
    opt_c.load_state_dict(_round_trip(plain.state_dict()))
    pa = library_steps(a, opt_a, n=3, seed=7)
    pb = _steps(b, plain, _plain_clip, n=3, seed=7)
    pc = library_steps(c, opt_c, n=3, seed=7)
    for x, y, z in zip(pa, pb, pc):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert float(opt_c.state_dict()["state"][0]["step"]) == 6
