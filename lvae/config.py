"""Typed configuration of a model and of a training run.

Every choice that PROTOCOL.md lists as an ambiguity between the paper and the authors' code is a
field here, so that the book can show it as an ablation. Defaults follow PROTOCOL.md section 7:
the authors' code where it produced the numbers, the paper where the code is a quirk.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

INFERENCE = ("ladder", "bottom_up")
LIKELIHOODS = ("bernoulli", "gaussian")
NONLINEARITIES = ("leaky_relu", "tanh")
UP_INPUTS = ("mu", "d")
PRECISIONS = ("fp32", "bf16")

PAPER_LATENT_SIZES = (64, 32, 16, 8, 4)
PAPER_HIDDEN_SIZES = (512, 256, 128, 64, 32)


class ConfigError(ValueError):
    """An invalid configuration; the message names the field and the fix."""


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _check_sizes(name: str, sizes: tuple[int, ...]) -> None:
    if len(sizes) == 0:
        raise ConfigError(f"{name} is empty; give at least one layer size, e.g. {name}=(64,)")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ConfigError(f"{name}={sizes!r}: every size must be a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a VAE / LVAE (paper section 2, PROTOCOL.md section 1).

    ``latent_sizes`` and ``hidden_sizes`` are ordered bottom (z_1, next to x) to top (z_L).
    ``hidden_sizes[i]`` is the width of the two-layer MLP that computes the distribution of
    z_{i+1} from below (inference) and, mirrored, the MLP that maps z_{i+1} downwards
    (generative model).
    """

    x_dim: int = 784
    latent_sizes: tuple[int, ...] = PAPER_LATENT_SIZES
    hidden_sizes: tuple[int, ...] = PAPER_HIDDEN_SIZES
    inference: str = "ladder"  # "ladder" (LVAE, eqs 13-19) | "bottom_up" (VAE, eqs 7-12)
    batch_norm: bool = True
    likelihood: str = "bernoulli"  # "bernoulli" | "gaussian"
    nonlinearity: str = "leaky_relu"  # "leaky_relu" | "tanh"
    leak: float = 0.1  # paper: max(x, 0.1x); the authors' Lasagne default was 0.01
    mlp_layers: int = 2  # deterministic layers per MLP
    var_eps: float = 1e-5  # added to every variance (code: lv_eps_z, lv_eps_out)
    up_input: str = "mu"  # LVAE upward pass input: "mu" (code, default) | "d" (paper eq 13)
    share_top_down: bool = False  # LVAE: top-down Gaussian = generative p(z_i|z_i+1) (paper) or its own MLP (code)

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_sizes", tuple(self.latent_sizes))
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        if isinstance(self.x_dim, bool) or not isinstance(self.x_dim, int) or self.x_dim <= 0:
            raise ConfigError(f"x_dim={self.x_dim!r} must be a positive integer (784 for MNIST)")
        _check_sizes("latent_sizes", self.latent_sizes)
        _check_sizes("hidden_sizes", self.hidden_sizes)
        if len(self.latent_sizes) != len(self.hidden_sizes):
            raise ConfigError(
                f"latent_sizes has {len(self.latent_sizes)} layers but hidden_sizes has "
                f"{len(self.hidden_sizes)}; give one hidden size per stochastic layer"
            )
        _check_choice("inference", self.inference, INFERENCE)
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        _check_choice("nonlinearity", self.nonlinearity, NONLINEARITIES)
        _check_choice("up_input", self.up_input, UP_INPUTS)
        if self.mlp_layers < 1:
            raise ConfigError(f"mlp_layers={self.mlp_layers} must be >= 1")
        if not (0.0 <= self.leak < 1.0):
            raise ConfigError(f"leak={self.leak} must be in [0, 1)")
        if self.var_eps < 0:
            raise ConfigError(f"var_eps={self.var_eps} must be >= 0")

    @property
    def n_layers(self) -> int:
        return len(self.latent_sizes)

    @classmethod
    def paper(cls, n_layers: int = 5, **overrides: Any) -> "ModelConfig":
        """The paper's MNIST architecture with ``n_layers`` stochastic layers (dropped from the top)."""
        if not 1 <= n_layers <= len(PAPER_LATENT_SIZES):
            raise ConfigError(f"n_layers={n_layers} must be between 1 and {len(PAPER_LATENT_SIZES)}")
        sizes = {"latent_sizes": PAPER_LATENT_SIZES[:n_layers], "hidden_sizes": PAPER_HIDDEN_SIZES[:n_layers]}
        return cls(**{**sizes, **overrides})


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data protocol (PROTOCOL.md sections 2-4).

    ``epochs`` is deliberately absent: a run is identified by everything that shapes its
    trajectory, and the registry extends a run to as many epochs as asked for.
    """

    dataset: str = "mnist"
    subset: int | None = None  # first n training images (fast runs); None = all
    seed: int = 0
    batch_size: int = 256
    lr: float = 1e-3  # paper (the code's README example: 2e-4)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-4
    clip_norm: float = 4.0  # rescale gradients to total norm <= clip_norm (0 = off)
    clip_value: float = 0.9  # then clip every element to +-clip_value (0 = off)
    warmup_epochs: int = 200  # Nt; 0 = no warm-up (beta = 1 throughout)
    eq_samples: int = 1
    iw_samples: int = 1
    analytic_kl: bool = True  # analytic per-layer KL where both Gaussians are known (eq=iw=1 only)
    lr_decay: float = 1.0  # finetuning: lr *= lr_decay every lr_decay_every epochs
    lr_decay_every: int = 0
    init_from: str | None = None  # "<run_dir_name>@<epoch>" to start from another run's weights (finetuning)
    test_seed: int = 0  # fixed binarisation of the test set
    precision: str = "fp32"  # "fp32" | "bf16": bf16 autocast of the training step (matmuls in bf16, densities fp32)
    compile: bool = False  # torch.compile the training objective: same noise, rounding differs; ~1 min to compile

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        for name in ("batch_size", "eq_samples", "iw_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"subset={self.subset} must be a positive integer or None")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} must be >= 0 (0 = no warm-up)")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr_decay={self.lr_decay} must be in (0, 1]")
        _check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile={self.compile!r} must be True or False")
        if self.lr_decay_every < 0:
            raise ConfigError(f"lr_decay_every={self.lr_decay_every} must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """When and how a training run evaluates itself. Not part of the run key: it does not change
    the trajectory (evaluation uses its own random generators)."""

    every: int = 10  # train/test L1 and per-unit KL every `every` epochs (and at the last epoch)
    iw_samples: int = 5000  # K of the importance-weighted test bound
    iw_every: int = 0  # L_K every `iw_every` epochs (0 = only at the last epoch of a call)
    test_subset: int | None = None  # first n test images for L1 and KL (None = all 10,000)
    iw_subset: int | None = None  # first n of those for L_K (None = the same images)
    train_subset: int | None = 10000  # train L1 on a fixed binarisation of the first n train images
    iw_chunk: int = 500  # importance samples per chunk (memory bound)
    bn_stats: str = "recompute"  # "recompute": BN population stats over train_subset | "running"

    def __post_init__(self) -> None:
        if self.every < 1 or self.iw_samples < 1 or self.iw_every < 0 or self.iw_chunk < 1:
            raise ConfigError("EvalConfig: every, iw_samples, iw_chunk must be >= 1 and iw_every >= 0")
        _check_choice("bn_stats", self.bn_stats, ("recompute", "running"))


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's trajectory; hashed into its registry key."""

    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return cls(name=d["name"], model=from_dict(ModelConfig, d["model"]), train=from_dict(TrainConfig, d["train"]))

    @property
    def key(self) -> str:
        """A short stable hash of model + training config (the name is not hashed).

        Only fields that differ from their defaults are hashed, so adding a new field (with a
        default that reproduces the old behaviour) keeps every existing run's key. Never change
        an existing default: add a field instead.
        """
        payload = {"model": _non_default(self.model), "train": _non_default(self.train)}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def dir_name(self) -> str:
        return f"{self.name}-{self.key}"


def _non_default(obj: Any) -> dict[str, Any]:
    defaults = type(obj)()
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if getattr(obj, f.name) != getattr(defaults, f.name)}


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown fields with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**d)
