"""lvae: Ladder Variational Autoencoders (Sønderby et al., NeurIPS 2016), replicated in PyTorch."""
from .bounds import elbo, iw_bound, kl_per_unit, training_bound
from .config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig
from .models import HierarchicalVAE, build_model, count_parameters
from .warmup import warmup_beta

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "EvalConfig", "HierarchicalVAE", "ModelConfig", "RunConfig", "TrainConfig",
    "build_model", "count_parameters", "elbo", "iw_bound", "kl_per_unit", "training_bound", "warmup_beta",
]
