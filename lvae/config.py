"""Typed configuration of a model and of a training run.

Every choice on which the paper and the authors' code differ is a field here, so that the book
can show it as an ablation. Defaults follow the authors' code where it produced the numbers and the
paper where the code is a quirk; book/protocol.md gives the source of every default
(:data:`lvae.report.protocol.SOURCES`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
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
    """An invalid configuration; the message names the field and the fix.

    When one field's value is at fault, ``owner`` (the config class name), ``field``, ``value`` and
    ``reason`` (the message after ``field=value``) are set, so that a front end can name the value
    in its own terms (the command line: ``--eval-iw-chunk 0 must be >= 1 ...``).
    """

    def __init__(self, message: str, *, owner: str | None = None, field: str | None = None, value: Any = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.owner, self.field, self.value, self.reason = owner, field, value, reason


def _invalid(obj: Any, name: str, reason: str) -> ConfigError:
    """The error for field ``name`` of config ``obj``: ``name=value reason``."""
    value = getattr(obj, name)
    return ConfigError(f"{name}={value!r} {reason}", owner=type(obj).__name__, field=name, value=value, reason=reason)


def _check_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise _invalid(obj, name, f"is not valid; choose one of {', '.join(map(repr, choices))}")


def _check_sizes(obj: Any, name: str) -> None:
    sizes = getattr(obj, name)
    if len(sizes) == 0:
        raise _invalid(obj, name, "is empty; give at least one layer size, e.g. (64,)")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise _invalid(obj, name, "has a size that is not a positive integer")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_positive_int(obj: Any, name: str, optional: bool = False, hint: str = "") -> None:
    v = getattr(obj, name)
    if optional and v is None:
        return
    if not _is_int(v) or v < 1:
        raise _invalid(obj, name, f"must be a positive integer{' or None' if optional else ''}{hint}")


FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: the training step computes in float32
SEED_LIMIT = 2**63  # torch.manual_seed takes a 64-bit integer


def _check_finite(obj: Any, *names: str) -> None:
    """Every float field must be a finite number that float32 holds: nan or inf would switch a check off
    silently (clip_norm=nan disables clipping) or make every step non-finite (lr=inf), and a number
    beyond float32 (lr=1e39) becomes inf in the step."""
    for name in names:
        v = getattr(obj, name)
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) \
                    or abs(x) > FLOAT32_MAX:
                default = obj.__dataclass_fields__[name].default
                raise _invalid(obj, name, f"must be a finite number within float32's range (|x| <= 3.4e38; "
                                          f"default {default})")


def _check_seed(obj: Any, name: str) -> None:
    v = getattr(obj, name)
    if not _is_int(v) or not 0 <= v < SEED_LIMIT:
        raise _invalid(obj, name, "must be an integer from 0 to 2**63 - 1 (e.g. 0, 1, 2)")


def _check_init_from(obj: Any) -> None:
    """``init_from`` is None or ``"<run>@<epoch>"`` (``"<run>"``: its checkpoint at any epoch)."""
    v = obj.init_from
    if v is None:
        return
    name, sep, epoch = v.partition("@") if isinstance(v, str) else ("", "", "")
    if not name or (sep and not (epoch.isascii() and epoch.isdigit())):
        raise _invalid(obj, "init_from", "must be '<run>@<epoch>', a run folder name and the epoch of its "
                                         "checkpoint (e.g. mnist-lvae_bn_wu-5-f75a10fd09@10), or None")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a VAE / LVAE (paper sections 2 and 3; book/protocol.md).

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
        _check_positive_int(self, "x_dim", hint=" (784 for MNIST)")
        _check_sizes(self, "latent_sizes")
        _check_sizes(self, "hidden_sizes")
        if len(self.latent_sizes) != len(self.hidden_sizes):
            raise _invalid(self, "hidden_sizes", f"has {len(self.hidden_sizes)} layer(s) but latent_sizes has "
                                                 f"{len(self.latent_sizes)}; give one hidden size per stochastic layer")
        _check_choice(self, "inference", INFERENCE)
        _check_choice(self, "likelihood", LIKELIHOODS)
        _check_choice(self, "nonlinearity", NONLINEARITIES)
        _check_choice(self, "up_input", UP_INPUTS)
        _check_positive_int(self, "mlp_layers")
        _check_finite(self, "leak", "var_eps")
        if not (0.0 <= self.leak < 1.0):
            raise _invalid(self, "leak", "must be in [0, 1)")
        if self.var_eps < 0:
            raise _invalid(self, "var_eps", "must be >= 0")

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
    """Optimisation and data protocol (paper section 3; book/protocol.md).

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
    warmup_epochs: int = 200  # Nt (the paper's); 0 = no warm-up (beta = 1 throughout). Written only here
    eq_samples: int = 1  # the training objective (authors' code): eq_samples x iw_samples posterior samples
    iw_samples: int = 1  # per image, importance-weighted over iw_samples (IWAE); the test bound's K is EvalConfig.iw_k
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
            _check_positive_int(self, name)
        _check_positive_int(self, "subset", optional=True)
        _check_seed(self, "seed")
        _check_seed(self, "test_seed")
        _check_init_from(self)
        if not _is_int(self.warmup_epochs) or self.warmup_epochs < 0:
            raise _invalid(self, "warmup_epochs", "must be an integer >= 0 (0 = no warm-up)")
        _check_finite(self, "lr", "adam_betas", "adam_eps", "clip_norm", "clip_value", "lr_decay")
        if not self.lr > 0:
            raise _invalid(self, "lr", "must be > 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise _invalid(self, "adam_betas", "must be two numbers in [0, 1) (the default: 0.9, 0.999)")
        if not self.adam_eps > 0:
            raise _invalid(self, "adam_eps", "must be > 0")
        for name in ("clip_norm", "clip_value"):
            if getattr(self, name) < 0:
                raise _invalid(self, name, "must be >= 0 (0 = off)")
        if not 0 < self.lr_decay <= 1:
            raise _invalid(self, "lr_decay", "must be in (0, 1]")
        _check_choice(self, "precision", PRECISIONS)
        if not isinstance(self.compile, bool):
            raise _invalid(self, "compile", "must be True or False")
        if not _is_int(self.lr_decay_every) or self.lr_decay_every < 0:
            raise _invalid(self, "lr_decay_every", "must be an integer >= 0 (0 = no decay)")


@dataclass(frozen=True)
class EvalConfig:
    """When and how a training run evaluates itself. Not part of the run key: it does not change
    the trajectory (evaluation uses its own random generators).

    Its defaults, like TrainConfig's, are the only place they are written: a profile that omits a key,
    ``run_config``, ``lvae eval`` / ``evaluate_run`` and the paper's budget (lvae.report.protocol) read them."""

    every: int = 10  # train/test L1 and per-unit KL every `every` epochs (and at the last epoch)
    iw_k: int = 5000  # K of the importance-weighted test bound L_K (the paper's). Written only here
    iw_every: int = 0  # L_K every `iw_every` epochs (0 = only at the last epoch of a call)
    test_subset: int | None = None  # first n test images for L1 and KL (None = all 10,000)
    iw_subset: int | None = None  # first n of those for L_K (None = the same images)
    train_subset: int | None = 10000  # train L1 on a fixed binarisation of the first n train images
    iw_chunk: int = 500  # importance samples per chunk (memory bound)
    bn_stats: str = "recompute"  # "recompute": BN population stats over train_subset | "running"

    def __post_init__(self) -> None:
        for name in ("every", "iw_k", "iw_chunk"):
            _check_positive_int(self, name)
        if not _is_int(self.iw_every) or self.iw_every < 0:
            raise _invalid(self, "iw_every", "must be an integer >= 0 (0 = only at the last epoch)")
        for name in ("test_subset", "iw_subset", "train_subset"):
            _check_positive_int(self, name, optional=True)
        _check_choice(self, "bn_stats", ("recompute", "running"))


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


def upgrade_eval_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored ``eval`` section in today's field names: runs written before the rename call the K of
    L_K ``iw_samples`` (today ``iw_k``; ``TrainConfig.iw_samples`` is the training objective's)."""
    return {("iw_k" if k == "iw_samples" else k): v for k, v in stored.items()}


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
