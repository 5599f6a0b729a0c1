"""Helpers shared by several test modules."""
import torch

from lvae.config import ModelConfig, TrainConfig
from lvae.training.step import train_step


def same(a, b) -> bool:
    """Bit-for-bit equality of nested checkpoints / metrics (tensors compared exactly, with dtype)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def small_config(inference="ladder", bn=True, **kw):
    return ModelConfig(x_dim=30, latent_sizes=(8, 4, 2), hidden_sizes=(20, 12, 6), inference=inference,
                       batch_norm=bn, **kw)


def library_steps(model, opt, n=6, seed=0, cfg=TrainConfig()):
    """The library's own step (lvae.training.step.train_step) on six fixed random batches of 16 binary images of 30 pixels."""
    g = torch.Generator().manual_seed(seed)
    gx = torch.Generator().manual_seed(seed + 1)
    for _ in range(n):
        x = (torch.rand(16, 30, generator=gx) < 0.4).float()
        train_step(model, opt, x, 0.7, cfg, g)
    return [p.detach().clone() for p in model.parameters()]

