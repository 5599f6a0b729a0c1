"""The data rules of training: what the model sees in each epoch.

For the Bernoulli datasets the training images are kept real-valued
(:attr:`ImageData.x_train`) and **re-binarized every epoch** by Bernoulli
sampling in :func:`train_batches`; the **test set is binarized once**, with a
fixed seed (``test_seed``), when the dataset is loaded
(:func:`lvae.data.datasets.load_dataset`), and then stays fixed.  For the Gaussian
dataset (NORB) every epoch's training images are **dequantised** with uniform
noise ``U(0, 1/256)``; the test set is used as is.

All randomness is drawn from :class:`torch.Generator` objects seeded by a
deterministic function of ``(seed, epoch)`` (see :func:`derive_seed`), so
replaying an epoch gives bit-identical batches: a run resumed at an epoch
boundary sees exactly the data an uninterrupted run would have seen.

Files, downloads and the per-dataset loaders are in :mod:`lvae.data.datasets`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ImageData",
    "binarize",
    "derive_seed",
    "epoch_train_data",
    "first_examples",
    "fixed_binarized_train",
    "num_batches",
    "seeded_generator",
    "train_batches",
]

# --------------------------------------------------------------------------
# The dataset container
# --------------------------------------------------------------------------


@dataclass
class ImageData:
    """A loaded image dataset (images flattened to vectors).

    Attributes:
        name: dataset name (one of :data:`lvae.data.datasets.DATASETS`).
        x_train: float32 ``[N, D]`` in [0, 1].  Real-valued (*not* binarized):
            :func:`train_batches` re-binarizes (Bernoulli) or dequantises
            (Gaussian) it every epoch.
        y_train: int64 ``[N]`` class labels, or ``None`` when unknown.
        x_test: float32 ``[M, D]``.  For Bernoulli data binarized *once* at
            load time with a generator seeded from ``test_seed`` (fixed and
            reproducible); for Gaussian data the [0, 1] values as they are.
        y_test: int64 ``[M]`` class labels, or ``None``.
        image_shape: ``(height, width)`` of one image; ``D == height * width``.
        likelihood: ``"bernoulli"`` or ``"gaussian"``.
        meta: provenance (source files, their SHA-256, seeds used, ...).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    image_shape: tuple[int, int]
    likelihood: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def x_dim(self) -> int:
        """Number of pixels per image (``D``)."""
        return int(self.x_train.shape[1])

    @property
    def n_train(self) -> int:
        """Number of training images."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test images."""
        return int(self.x_test.shape[0])


# --------------------------------------------------------------------------
# Seeds, binarization, batching
# --------------------------------------------------------------------------


def derive_seed(*keys: int | str) -> int:
    """Deterministically map ``keys`` (e.g. ``("binarize", seed, epoch)``) to a
    63-bit seed for :meth:`torch.Generator.manual_seed`.

    Uses SHA-256 of the keys' ``repr``, so it is stable across processes,
    platforms and Python versions (unlike :func:`hash`).
    """
    digest = hashlib.sha256(repr(tuple(keys)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(*keys: int | str) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of ``keys``."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(*keys))
    return gen


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw a Bernoulli sample with probabilities ``x`` (values in [0, 1]).

    Returns a float32 tensor of 0s and 1s with ``x``'s shape:
    ``1`` where ``u < x`` for ``u ~ U[0, 1)`` drawn from ``generator`` (this is
    an exact Bernoulli(x) sample, ~2.5x faster than :func:`torch.bernoulli`
    on CPU).
    """
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    return (u < x).to(torch.float32)


def num_batches(n: int, batch_size: int) -> int:
    """Number of minibatches per epoch for ``n`` examples (last partial batch included)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return -(-n // batch_size)


def epoch_train_data(data: ImageData, epoch: int, seed: int) -> torch.Tensor:
    """The whole training set as the model sees it in ``epoch`` (unshuffled order).

    Bernoulli data: a fresh binarization from a generator seeded by
    ``derive_seed("train-noise", seed, epoch)``.  Gaussian data: ``x + U(0, 1/256)``
    from a generator seeded the same way, clipped to [0, 1].
    """
    gen = seeded_generator("train-noise", seed, epoch)
    if data.likelihood == "bernoulli":
        return binarize(data.x_train, gen)
    if data.likelihood == "gaussian":
        noise = torch.rand(data.x_train.shape, generator=gen, dtype=torch.float32)
        return (data.x_train + noise.mul_(1.0 / 256.0)).clamp_(0.0, 1.0)
    raise ValueError(f"unknown likelihood {data.likelihood!r}; expected 'bernoulli' or 'gaussian'")


def train_batches(data: ImageData, epoch: int, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield one epoch of shuffled training minibatches (float32 ``[B, D]``).

    * Order: a permutation from a generator seeded by
      ``derive_seed("train-permutation", seed, epoch)``.
    * Values: see :func:`epoch_train_data` -- Bernoulli data are re-binarized
      every epoch, Gaussian data are dequantised with ``U(0, 1/256)`` noise.

    The whole epoch is binarized (or dequantised) at once, then sliced.  Every
    example appears exactly once; the last, partial batch is included.  The
    same ``(seed, epoch)`` always gives identical batches (exact resume at
    epoch boundaries); a different epoch gives a new order and a new sample.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = data.n_train
    perm = torch.randperm(n, generator=seeded_generator("train-permutation", seed, epoch))
    x = epoch_train_data(data, epoch, seed)
    for start in range(0, n, batch_size):
        yield x[perm[start : start + batch_size]]


def fixed_binarized_train(data: ImageData, n: int | None, seed: int) -> torch.Tensor:
    """A fixed copy of the first ``n`` training images (all of them if ``n`` is
    ``None`` or larger than the training set) for evaluating the training-set
    bound.

    Bernoulli data are binarized with a generator seeded by
    ``derive_seed("fixed-train", seed)`` (same ``seed`` -> same copy); Gaussian
    data are returned as they are (a clone).
    """
    x = data.x_train if n is None else first_examples(data.x_train, min(n, data.n_train), f"{data.name} training set")
    if data.likelihood == "bernoulli":
        return binarize(x, seeded_generator("fixed-train", seed))
    return x.clone()


def first_examples(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """The first ``n`` rows of ``x`` (a copy unless all of them); ValueError naming the bad size."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"subset size for the {what} must be a positive int, got {n!r}")
    if n > x.shape[0]:
        raise ValueError(f"asked for the first {n} examples of the {what}, which has only {x.shape[0]}")
    return x[:n] if n == x.shape[0] else x[:n].clone()
