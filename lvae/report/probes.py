"""Probes of a trained model for the chapters: posterior means and their PCA, reconstructions, latent
traversals, the LVAE merge's sharpening, the IW bound as K grows, and the per-unit KL of a run's
committed weights, on the test images of :func:`test_data`. Everything here runs the model's own
passes (:mod:`lvae.model.network`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lvae.data.datasets import load_dataset
from lvae.model.bounds import KL_SAMPLES, iw_bound, kl_per_unit
from lvae.model.network import HierarchicalVAE
from lvae.registry.runs import WEIGHTS_FP16

__all__ = ["test_data", "posterior_means", "pca", "reconstruct", "traversal_values", "traversal", "merge_sharpening",
           "iw_curve", "has_weights", "kl_units_from_weights"]


def test_data(profile, n: int | None = None):
    """The profile's dataset with the first ``n`` test images (labels included)."""
    return load_dataset(profile.dataset, subset=1, test_subset=n)


@torch.no_grad()
def posterior_means(model: HierarchicalVAE, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(means, variances) of q(z_i|.) per layer, bottom to top, ``[B, d_i]`` each (one pass, eval mode)."""
    model.eval()
    p = model(x, 1, torch.Generator().manual_seed(0))
    return [layer.q.mu[0] for layer in p.layers], [layer.q.var[0] for layer in p.layers]


def pca(z: torch.Tensor | np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(projections [B, k], explained-variance ratios [k]) of the rows of ``z``."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    var = s**2 / max(1, len(z) - 1)
    k = min(k, vt.shape[0])
    return z @ vt[:k].T, var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)


@torch.no_grad()
def reconstruct(model: HierarchicalVAE, x: torch.Tensor) -> torch.Tensor:
    """Mean of p(x|z_1) with every z at its posterior mean (conditional reconstructions, Fig 9b)."""
    means, _ = posterior_means(model, x)
    return model.decode(means[0])


@torch.no_grad()
def _down_means(model: HierarchicalVAE, x: torch.Tensor, layer: int, z_layer: torch.Tensor) -> torch.Tensor:
    """z_1 (mean) below a given z_``layer`` ``[B, d]``: for the LVAE the mean of q(z_i|z_i+1, x) all the
    way down (the merge with the image's upward pass); for the VAE, whose inference has no top-down
    path, the mean of p(z_i|z_i+1)."""
    if model.config.inference == "ladder":
        samples = model.posterior(model.upward(x), 1, z={layer: z_layer}, mean=True)
        return samples[0].z[0]
    return model.generate(z_layer, layer, mean=True)[0]


def traversal_values(means: torch.Tensor, unit: int, steps: int = 9) -> np.ndarray:
    """Values for a unit's traversal: from its 2nd to 98th percentile over the test images'
    posterior means, widened to at least +-2 around their median."""
    v = means[:, unit].double().numpy()
    lo, mid, hi = np.percentile(v, [2, 50, 98])
    lo, hi = min(lo, mid - 2.0), max(hi, mid + 2.0)
    return np.linspace(lo, hi, steps)


@torch.no_grad()
def traversal(model: HierarchicalVAE, x: torch.Tensor, layer: int, unit: int, values: Sequence[float]) -> torch.Tensor:
    """Decoded images ``[len(values), x_dim]`` as unit ``unit`` of layer ``layer`` (0 = z_1) moves
    through ``values`` while the other units of that layer stay at the posterior mean of the single
    image ``x`` ([1, x_dim]); the layers below follow (see :func:`_down_means`)."""
    model.eval()
    means, _ = posterior_means(model, x)
    z = means[layer].repeat(len(values), 1)
    z[:, unit] = torch.as_tensor(np.asarray(values), dtype=z.dtype)
    z1 = _down_means(model, x.expand(len(values), -1), layer, z)
    return model.decode(z1)


@torch.no_grad()
def merge_sharpening(model: HierarchicalVAE, x: torch.Tensor) -> list[dict[str, float]]:
    """Per LVAE layer below the top, in one posterior pass (eval mode): mean variance of the upward
    Gaussian, of the top-down one and of their precision-weighted merge q (eqs 17-18). The merge is
    never wider than either input."""
    if model.config.inference != "ladder":
        raise ValueError("merge_sharpening needs an LVAE (ModelConfig(inference='ladder')): the VAE does not merge")
    model.eval()
    p = model(x, 1, torch.Generator().manual_seed(0))
    rows = []
    for i, layer in enumerate(p.layers[:-1]):
        var_hat, var_t, var_q = layer.up.var, layer.down.var[0], layer.q.var[0]
        rows.append({"layer": f"z{i + 1}", "bottom-up var": float(var_hat.mean()),
                     "top-down var": float(var_t.mean()), "merged var": float(var_q.mean()),
                     "merged ≤ both (all units)": bool((var_q <= torch.minimum(var_hat, var_t) + 1e-7).all())})
    return rows


@torch.no_grad()
def iw_curve(model: HierarchicalVAE, x: torch.Tensor, ks: Sequence[int] = (1, 5, 50, 500),
             seed: int = 0) -> dict[int, dict[str, float]]:
    """{K: row} of test L_K (mean and s.e. over ``x``), in the order of ``ks``: the IW bound
    tightens as K grows (eq 6)."""
    model.eval()
    rows = {}
    for k in ks:
        v = iw_bound(model, x, k, chunk_size=500, generator=torch.Generator().manual_seed(seed)).double()
        rows[k] = {"K": k, "L_K": float(v.mean()), "s.e.": float(v.std() / np.sqrt(len(v)))}
    return rows


def has_weights(run) -> bool:
    """Whether a run's committed fp16 weights are in the registry. The full checkpoint is not
    counted: it stays on the machine that trained the run, so a chapter that used it would show
    other numbers on a fresh clone."""
    return run is not None and run.ok and (run.path / WEIGHTS_FP16).exists()


def kl_units_from_weights(run, x: torch.Tensor, samples: int | None = None, batch_size: int = 1000,
                          seed: int = 0) -> list[np.ndarray]:
    """Per-layer, per-unit KL(q||p) on the images ``x`` of a run's final weights, computed now with
    :func:`lvae.model.bounds.kl_per_unit`: closed form where q and p are both Gaussians given the samples,
    averaged over ``samples`` (default :data:`lvae.model.bounds.KL_SAMPLES`) posterior samples per image.
    Training stored a one-sample estimate for the VAE's lower layers; this is the number to compare."""
    model = run.load_model()
    g = torch.Generator().manual_seed(seed)
    total = None
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        kl = [k.double() * len(xb) for k in kl_per_unit(model, xb, True, g, samples or KL_SAMPLES)]
        total = kl if total is None else [a + b for a, b in zip(total, kl)]
    return [(t / len(x)).numpy() for t in total]
