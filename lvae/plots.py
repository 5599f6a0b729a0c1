"""Matplotlib figures of the book (paper Figs 3-7, 9-10), drawn from registry data.

Every function takes data (runs, arrays) and returns a :class:`matplotlib.figure.Figure`; chapters
only call them. Colours and markers are fixed per model variant so figures agree across chapters.
"""
from __future__ import annotations

import io
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from .experiments import VARIANTS

STYLE = {
    "vae": {"color": "#7f7f7f", "marker": "o"},
    "vae_bn": {"color": "#1f77b4", "marker": "s"},
    "vae_bn_wu": {"color": "#2ca02c", "marker": "^"},
    "lvae_bn_wu": {"color": "#d62728", "marker": "D"},
}
plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.spines.top": False,
                     "axes.spines.right": False, "font.size": 10})


def label(variant: str) -> str:
    """The paper's name of a variant (VAE, VAE+BN, VAE+BN+WU, LVAE+BN+WU)."""
    return VARIANTS[variant]["label"] if variant in VARIANTS else variant


def curves_vs_depth(panels: dict[str, dict[str, dict[int, float | None]]], paper_marks: dict[str, list] | None = None,
                    ylabel: str = "nats") -> Figure:
    """One panel per metric (e.g. train L1, test L1, test L5000), one line per variant over depth
    (Figs 3 and 7). ``paper_marks``: {panel: [(depth, value, label)]} drawn as stars."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4), squeeze=False)
    for ax, (title, table) in zip(axes[0], panels.items()):
        for variant, by_depth in table.items():
            ds = sorted(d for d, v in by_depth.items() if v is not None)
            ax.plot(ds, [by_depth[d] for d in ds], label=label(variant), **STYLE.get(variant, {}))
        for depth, value, lab in (paper_marks or {}).get(title, []):
            ax.plot([depth], [value], "*", color="k", ms=11, zorder=5)
            ax.annotate(lab, (depth, value), textcoords="offset points", xytext=(-4, 6), fontsize=8, ha="right")
        ax.set_title(title)
        ax.set_xlabel("stochastic layers")
        ax.set_xticks(sorted({d for t in table.values() for d in t}))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def kl_heatmaps(histories: dict[str, tuple[np.ndarray, list[np.ndarray]]], floor: float = 1e-3) -> Figure:
    """Per-unit KL(q||p) over training, log colour scale, one panel per model (paper Fig 4).
    Rows are units, grouped by layer (z1 at the top); white = collapsed (inactive) unit."""
    n = len(histories)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.8, 4.2), squeeze=False)
    im = None
    for ax, (title, (epochs, layers)) in zip(axes[0], histories.items()):
        mat = np.concatenate([lay.T for lay in layers], axis=0)  # [units, evals]
        mat = np.clip(mat, floor, None)
        im = ax.imshow(mat, aspect="auto", cmap="Greys", norm=LogNorm(vmin=floor, vmax=max(1.0, mat.max())),
                       interpolation="nearest", extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(mat), 0))
        edge = 0
        ticks, labels = [], []
        for i, lay in enumerate(layers):
            ticks.append(edge + lay.shape[1] / 2)
            labels.append(f"z{i + 1}")
            edge += lay.shape[1]
            if i < len(layers) - 1:
                ax.axhline(edge, color="#d62728", lw=0.8)
        ax.set_yticks(ticks, labels)
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label="KL(q‖p) per unit [nats]", shrink=0.9)
    return fig


def kl_lines(epochs: np.ndarray, layers: list[np.ndarray], title: str = "", floor: float = 1e-4) -> Figure:
    """Per-unit KL over epochs as lines on a log axis, one panel per layer."""
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers) + 0.6, 2.8), squeeze=False, sharey=True)
    for i, (ax, lay) in enumerate(zip(axes[0], layers)):
        ax.plot(epochs, np.clip(lay, floor, None), lw=0.8, alpha=0.7)
        ax.set_yscale("log")
        ax.set_title(f"z{i + 1} ({lay.shape[1]} units)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.axhline(0.01, color="k", ls=":", lw=0.8)
    axes[0][0].set_ylabel("KL per unit [nats]")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def layer_kl_bars(splits: dict[str, Sequence[float]]) -> Figure:
    """The test KL split layer-wise (paper Fig 5): one stacked bar per model."""
    fig, ax = plt.subplots(figsize=(1.6 * len(splits) + 2.5, 3.4))
    names = list(splits)
    depth = max(len(v) for v in splits.values())
    cmap = plt.get_cmap("viridis", depth)
    bottom = np.zeros(len(names))
    for i in range(depth):
        vals = np.array([splits[n][i] if i < len(splits[n]) else 0.0 for n in names])
        ax.bar(names, vals, bottom=bottom, color=cmap(i), label=f"z{i + 1}", edgecolor="white", lw=0.5)
        bottom += vals
    ax.set_ylabel("KL(q‖p) on the test set [nats]")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def pca_scatter(projections: list[np.ndarray], labels: np.ndarray, explained: list[np.ndarray] | None = None,
                title: str = "", ncols: int = 3) -> Figure:
    """First two principal components of each layer's posterior means, coloured by digit (Fig 6)."""
    n = len(projections)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols + 0.8, 2.9 * nrows + 0.3), squeeze=False)
    sc = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        proj = projections[i]
        y = proj[:, 1] if proj.shape[1] > 1 else np.zeros(len(proj))
        sc = ax.scatter(proj[:, 0], y, c=labels, cmap="tab10", s=4, alpha=0.7, vmin=-0.5, vmax=9.5, linewidths=0)
        ev = "" if explained is None else f" ({100 * explained[i][:2].sum():.0f}% of the variance)"
        ax.set_title(f"$z_{{{i + 1}}}${ev}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.02, right=0.86, bottom=0.03, top=0.88 if title else 0.93, wspace=0.08, hspace=0.2)
    cax = fig.add_axes((0.89, 0.15, 0.015, 0.65))
    cb = fig.colorbar(sc, cax=cax, ticks=range(10))
    cb.set_label("digit")
    if title:
        fig.suptitle(title, fontsize=11, y=0.99)
    return fig


def image_grid(images, image_shape: tuple[int, int], ncols: int = 10, ax=None, title: str = "") -> Figure:
    """Images (rows of ``images``) tiled in a grid, black on white like the paper's figures."""
    x = np.asarray(images, dtype=float).reshape(-1, *image_shape)
    nrows = int(np.ceil(len(x) / ncols))
    h, w = image_shape
    canvas = np.ones((nrows * (h + 1) + 1, ncols * (w + 1) + 1))
    for k, img in enumerate(x):
        r, c = divmod(k, ncols)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = 1 - img
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(ncols * 0.42, nrows * 0.42 + (0.3 if title else 0)))
    else:
        fig = ax.figure
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    if own:
        fig.tight_layout(pad=0.2)
    return fig


def image_rows(rows: dict[str, np.ndarray], image_shape: tuple[int, int], ncols: int = 10) -> Figure:
    """Several labelled image grids stacked vertically (data / reconstructions / samples)."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(ncols * 0.42, sum(
        0.42 * np.ceil(len(v) / ncols) + 0.35 for v in rows.values())), squeeze=False)
    for ax, (title, imgs) in zip(axes[:, 0], rows.items()):
        image_grid(imgs, image_shape, ncols, ax=ax, title=title)
    fig.tight_layout(pad=0.3)
    return fig


def unit_panel(epochs: np.ndarray, kl: np.ndarray, means: np.ndarray, frames: np.ndarray, values: np.ndarray,
               image_shape: tuple[int, int], title: str) -> Figure:
    """One latent unit at a glance (explorer widget): its KL over training, the histogram of its
    posterior means over test images, and a traversal (decoded images as the unit moves)."""
    fig = plt.figure(figsize=(9.0, 2.3))
    gs = fig.add_gridspec(2, 3, width_ratios=[1, 1, 2.3], height_ratios=[1, 0.12])
    ax = fig.add_subplot(gs[:, 0])
    ax.plot(epochs, np.clip(kl, 1e-4, None), color="#d62728", marker=".")
    ax.set_yscale("log")
    ax.axhline(0.01, color="k", ls=":", lw=0.8)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_title("KL(q‖p) over training", fontsize=9)
    ax.tick_params(labelsize=7)
    ax = fig.add_subplot(gs[:, 1])
    ax.hist(means, bins=30, color="#1f77b4")
    for v in values:
        ax.axvline(v, color="k", lw=0.4, alpha=0.5)
    ax.set_title("posterior means (test)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_yticks([])
    ax = fig.add_subplot(gs[0, 2])
    h, w = image_shape
    strip = np.ones((h, len(frames) * (w + 1) - 1))
    for k, img in enumerate(np.asarray(frames).reshape(-1, h, w)):
        strip[:, k * (w + 1): k * (w + 1) + w] = 1 - img
    ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("traversal: decode as the unit moves", fontsize=9)
    ax = fig.add_subplot(gs[1, 2])
    ax.set_axis_off()
    ax.text(0.0, 0.5, f"unit value {values[0]:+.1f}", fontsize=7, va="center")
    ax.text(1.0, 0.5, f"{values[-1]:+.1f}", fontsize=7, va="center", ha="right")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.18, top=0.8, wspace=0.25)
    return fig


def to_png(fig: Figure, dpi: int = 80) -> bytes:
    """PNG bytes of ``fig`` (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def beta_schedule(epochs: int, warmup_epochs: int) -> Figure:
    """The warm-up weight beta per epoch (eq 20), with and without warm-up."""
    from .warmup import warmup_beta

    e = np.arange(epochs)
    fig, ax = plt.subplots(figsize=(4.5, 2.2))
    ax.step(e + 1, [warmup_beta(i, warmup_epochs) for i in e], where="post", color=STYLE["vae_bn_wu"]["color"],
            label=f"with warm-up ($N_t$ = {warmup_epochs})")
    ax.step(e + 1, [warmup_beta(i, 0) for i in e], where="post", ls="--", color=STYLE["vae_bn"]["color"],
            label="without")
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$\beta$")
    ax.set_ylim(-0.05, 1.1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
