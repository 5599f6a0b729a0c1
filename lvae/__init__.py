"""lvae: Ladder Variational Autoencoders (Sønderby et al., NeurIPS 2016), replicated in PyTorch."""
import re

import torch

TORCH_FLOOR = (2, 6)  # torch.nn.utils.get_total_norm / clip_grads_with_norm_ (lvae.training.optim); pyproject.toml says the same


def check_torch(version: str) -> None:
    """Refuse a torch older than :data:`TORCH_FLOOR` (a preinstalled one, say Colab's or a cluster's image), naming
    the fix, instead of an ``AttributeError`` at the first training step."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m is None or (int(m[1]), int(m[2])) >= TORCH_FLOOR:
        return
    floor = ".".join(map(str, TORCH_FLOOR))
    raise ImportError(f"lvae needs torch >= {floor} (it uses torch.nn.utils.get_total_norm and clip_grads_with_norm_, "
                      f"new in 2.6); this Python has torch {version}. Upgrade it: pip install 'torch>={floor}' (with "
                      f"the index URL of your CUDA build, e.g. --index-url https://download.pytorch.org/whl/cu124).")


check_torch(torch.__version__)

from lvae.config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from lvae.model.bounds import elbo, iw_bound, kl_per_unit, training_bound  # noqa: E402 -- after the torch check
from lvae.model.network import HierarchicalVAE, build_model, count_parameters  # noqa: E402
from lvae.model.warmup import warmup_beta  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "TORCH_FLOOR", "check_torch",
    "ConfigError", "EvalConfig", "HierarchicalVAE", "ModelConfig", "RunConfig", "TrainConfig",
    "build_model", "count_parameters", "elbo", "iw_bound", "kl_per_unit", "training_bound", "warmup_beta",
]
