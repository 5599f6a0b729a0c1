"""The paper's experiments as named run configurations.

The four variants of Figs 3 and 7 / Table 2 (VAE, VAE+BN, VAE+BN+WU, LVAE+BN+WU) at depths 1-5,
with the paper's architecture and protocol; budgets (epochs, warm-up, subsets) come from a
profile, so the same names serve the 2-core CPU and a GPU.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from lvae.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from lvae.data.datasets import load_dataset

VARIANTS: dict[str, dict[str, Any]] = {
    # label, inference, batch norm, warm-up
    "vae": {"label": "VAE", "inference": "bottom_up", "batch_norm": False, "warmup": False},
    "vae_bn": {"label": "VAE+BN", "inference": "bottom_up", "batch_norm": True, "warmup": False},
    "vae_bn_wu": {"label": "VAE+BN+WU", "inference": "bottom_up", "batch_norm": True, "warmup": True},
    "lvae_bn_wu": {"label": "LVAE+BN+WU", "inference": "ladder", "batch_norm": True, "warmup": True},
    # the LVAE ablations of Fig 7 (appendix A)
    "lvae_bn": {"label": "LVAE+BN", "inference": "ladder", "batch_norm": True, "warmup": False},
    "lvae_wu": {"label": "LVAE+WU", "inference": "ladder", "batch_norm": False, "warmup": True},
}
FIG3_VARIANTS = ("vae", "vae_bn", "vae_bn_wu", "lvae_bn_wu")  # the four models of Fig 3 and Table 2
DEPTHS = (1, 2, 3, 4, 5)


def run_config(variant: str, depth: int, *, dataset: str = TrainConfig().dataset,
               warmup_epochs: int = TrainConfig().warmup_epochs,
               model: dict[str, Any] | None = None, **train: Any) -> RunConfig:
    """The run of ``variant`` (a key of VARIANTS) with ``depth`` stochastic layers.

    ``warmup_epochs`` is N_t for the variants with warm-up (others get 0; default: TrainConfig's, the
    paper's N_t); ``model`` overrides ModelConfig fields; other keywords override TrainConfig fields.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    base = {"inference": v["inference"], "batch_norm": v["batch_norm"]}
    if dataset == "norb":
        base.update(x_dim=1024, likelihood="gaussian", nonlinearity="tanh")
    elif dataset == "synthetic":
        base.update(x_dim=load_dataset("synthetic").x_dim)
    mcfg = ModelConfig.paper(depth, **{**base, **(model or {})})
    tcfg = TrainConfig(dataset=dataset, warmup_epochs=warmup_epochs if v["warmup"] else 0, **train)
    return RunConfig(name=f"{dataset}-{variant}-{depth}", model=mcfg, train=tcfg)


def grid(name: str, dataset: str = "mnist", depths: tuple[int, ...] = DEPTHS,
         variants: tuple[str, ...] | None = None, **kwargs: Any) -> list[RunConfig]:
    """Named grids: ``fig3`` = every variant x every depth (20 models)."""
    if name != "fig3":
        raise ConfigError(f"unknown grid {name!r}; known: 'fig3'")
    return [run_config(v, d, dataset=dataset, **kwargs) for v in (variants or FIG3_VARIANTS) for d in depths]


def finetune_config(parent: RunConfig, parent_epochs: int, lr_decay: float = 0.75, lr_decay_every: int = 200,
                    samples: int = 10) -> RunConfig:
    """Table 1's finetuning: continue from ``parent`` with lr x0.75 every 200 epochs, eq = iw = 10."""
    tcfg = replace(parent.train, init_from=f"{parent.dir_name}@{parent_epochs}", lr_decay=lr_decay,
                   lr_decay_every=lr_decay_every, eq_samples=samples, iw_samples=samples, warmup_epochs=0)
    return RunConfig(name=f"{parent.name}-ft", model=parent.model, train=tcfg)
