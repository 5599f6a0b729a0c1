"""Matplotlib figures of the book (paper Figs 3-7, 9-10), drawn from registry data.

Every function takes data (runs, arrays) and returns a :class:`matplotlib.figure.Figure`; chapters
only call them. Colours and markers are fixed per model variant so figures agree across chapters.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from lvae.model.warmup import warmup_beta
from lvae.registry.experiments import VARIANTS

STYLE = {
    "vae": {"color": "#7f7f7f", "marker": "o"},
    "vae_bn": {"color": "#1f77b4", "marker": "s"},
    "vae_bn_wu": {"color": "#2ca02c", "marker": "^"},
    "lvae_bn_wu": {"color": "#d62728", "marker": "D"},
    "lvae_bn": {"color": "#9467bd", "marker": "v"},
    "lvae_wu": {"color": "#ff7f0e", "marker": "P"},
}
plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.spines.top": False,
                     "axes.spines.right": False, "font.size": 10})


def label(variant: str) -> str:
    """The paper's name of a variant (VAE, VAE+BN, VAE+BN+WU, LVAE+BN+WU)."""
    return VARIANTS[variant]["label"] if variant in VARIANTS else variant


def curves_vs_depth(panels: dict[str, dict[str, dict[int, Any]]], paper_marks: dict[str, list] | None = None,
                    ylabel: str = "nats") -> Figure:
    """One panel per metric (e.g. train L1, test L1, test L5000), one line per variant over depth
    (Figs 3 and 7). A value is a number or an estimate over seeds (``.value`` and ``.estimate``,
    :class:`lvae.report.seed_means.SeedMean`), drawn with its 95 % CI as an error bar where known.
    ``paper_marks``: {panel: [(depth, value, label)]} drawn as stars."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4), squeeze=False)
    for ax, (title, table) in zip(axes[0], panels.items()):
        for variant, by_depth in table.items():
            ds = sorted(d for d, v in by_depth.items() if _value(v) is not None)
            err = [_half_width(by_depth[d]) for d in ds]
            ax.errorbar(ds, [_value(by_depth[d]) for d in ds], yerr=err if any(e > 0 for e in err) else None,
                        label=label(variant), capsize=3, **STYLE.get(variant, {}))
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


def _value(v: Any) -> float | None:
    return getattr(v, "value", v)


def _half_width(v: Any) -> float:
    """The CI half-width of an estimate over seeds; 0 for a plain number or an unknown interval."""
    est = getattr(v, "estimate", None)
    h = getattr(est, "half_width", float("nan"))
    return float(h) if np.isfinite(h) else 0.0


def learning_curves(curves: dict[str, dict[str, list[dict[str, Any]]]], titles: dict[str, str] | None = None,
                    ylabel: str = r"$\mathcal{L}_1$ [nats]",
                    marks: dict[str, list[tuple[float, str, str]]] | None = None) -> Figure:
    """Train (full lines) and test (dashed) L1 over epochs, one panel per budget, one colour per
    variant (paper Fig 2). Every seed is a thin line, the mean over the seeds a thick one (over the
    epochs every seed reached); a partial run's lines end where it stopped and its state is in the
    legend. ``curves``: :func:`lvae.report.budgets.learning_curves`; ``titles``: {budget: panel title};
    ``marks``: {budget: [(value, label, variant)]}, horizontal dotted lines (the paper's final numbers)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.6), squeeze=False,
                             sharey=marks is None)
    for ax, (budget, by_variant) in zip(axes[0], curves.items()):
        for value, text, variant in (marks or {}).get(budget, []):
            ax.axhline(value, ls=":", lw=1.2, color=STYLE.get(variant, {}).get("color", "k"), label=text)
        for variant, seeds in by_variant.items():
            color = STYLE.get(variant, {}).get("color")
            for key, ls in (("train", "-"), ("test", "--")):
                x_key = "epochs" if key == "train" else "test_epochs"
                for c in seeds:
                    ax.plot(c[x_key], c[key], ls=ls, lw=0.7, alpha=0.45, color=color)
                common = sorted(set.intersection(*[set(c[x_key].tolist()) for c in seeds])) if seeds else []
                if common:
                    mean = [np.mean([c[key][list(c[x_key]).index(e)] for c in seeds]) for e in common]
                    ax.plot(common, mean, ls=ls, lw=1.8, color=color,
                            label=f"{label(variant)} {key} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})")
            for c in seeds:
                if c["state"] != "complete":
                    ax.plot([], [], ls=":", color=color, label=f"{label(variant)} seed {c['seed']}: {c['state']}")
        ax.set_title((titles or {}).get(budget, budget), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    # the first epochs (warm-up, beta < 1) are far below the rest: an axis shows the last 80 % and the marks;
    # the panels share one axis unless marks are drawn (a 300-epoch panel next to a 10-epoch one)
    shared = [v for by in curves.values() for v in _late(by)]
    for ax, (budget, by) in zip(axes[0], curves.items()):
        late = shared if marks is None else _late(by) + [v for v, _, _ in marks.get(budget, [])]
        if late:
            lo, hi = min(late), max(late)
            pad = 0.08 * (hi - lo) + 0.5
            ax.set_ylim(lo - 2 * pad, hi + pad)  # room below for the legend
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def _late(by_variant: dict[str, list[dict[str, Any]]]) -> list[float]:
    """The values of the last 80 % of every curve (the first epochs, beta < 1, are far below the rest)."""
    return [v for seeds in by_variant.values() for c in seeds for key, x_key in
            (("train", "epochs"), ("test", "test_epochs")) for e, v in zip(c[x_key], c[key])
            if len(c[x_key]) and e >= 0.2 * max(c[x_key]) and np.isfinite(v)]


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
    """The test KL split layer-wise (paper Fig 5): one stacked bar per variant, ``splits``: {variant:
    KL per layer} (e.g. ``layers`` of :func:`lvae.report.latent_units.layer_kl`)."""
    fig, ax = plt.subplots(figsize=(1.6 * len(splits) + 2.5, 3.4))
    variants = list(splits)
    depth = max(len(v) for v in splits.values())
    cmap = plt.get_cmap("viridis", depth)
    bottom = np.zeros(len(variants))
    for i in range(depth):
        vals = np.array([splits[v][i] if i < len(splits[v]) else 0.0 for v in variants])
        ax.bar([label(v) for v in variants], vals, bottom=bottom, color=cmap(i), label=f"z{i + 1}",
               edgecolor="white", lw=0.5)
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


def image_rows(rows: dict[str, np.ndarray], image_shape: tuple[int, int], ncols: int = 10,
               title: str = "") -> Figure:
    """Several labelled image grids stacked vertically (data / reconstructions / samples), under
    ``title`` (e.g. the model that made them)."""
    head = 0.4 if title else 0.0
    fig, axes = plt.subplots(len(rows), 1, figsize=(ncols * 0.42, head + sum(
        0.42 * np.ceil(len(v) / ncols) + 0.35 for v in rows.values())), squeeze=False)
    for ax, (row_title, imgs) in zip(axes[:, 0], rows.items()):
        image_grid(imgs, image_shape, ncols, ax=ax, title=row_title)
    if title:
        fig.suptitle(title, fontsize=11, fontweight="bold")
    fig.tight_layout(pad=0.3)
    return fig


# explorer panels are drawn at this size and resolution (620 px), shown 1:1 in the text column at
# 1280 px, so that their text at these sizes reads like the body text; on a phone they scale down
UNIT_PANEL_INCHES = (6.2, 4.2)
UNIT_PANEL_DPI = 100
UNIT_PANEL_FONT = {"title": 12, "label": 11, "ticks": 11}  # points


def unit_panel(epochs: np.ndarray, kl: np.ndarray, means: np.ndarray, frames: np.ndarray, values: np.ndarray,
               image_shape: tuple[int, int], title: str = "") -> Figure:
    """One latent unit at a glance (explorer widget): a traversal (decoded images as the unit
    moves, full width on top), its KL over training and the histogram of its posterior means over
    test images. The widget writes the title as text above the panel (``title`` draws it in the
    figure instead)."""
    fs = UNIT_PANEL_FONT
    fig = plt.figure(figsize=UNIT_PANEL_INCHES)
    gs = fig.add_gridspec(2, 2, height_ratios=[1.15, 2.0], hspace=0.65, wspace=0.3)
    ax = fig.add_subplot(gs[0, :])
    h, w = image_shape
    strip = np.ones((h, len(frames) * (w + 1) - 1))
    for k, img in enumerate(np.asarray(frames).reshape(-1, h, w)):
        strip[:, k * (w + 1): k * (w + 1) + w] = 1 - img
    ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    ax.set_xticks([k * (w + 1) + (w - 1) / 2 for k in range(len(frames))], [f"{v:+.1f}" for v in values])
    ax.set_yticks([])
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=fs["ticks"], length=0)
    ax.set_xlabel("unit value (the other units at the test image's posterior mean)", fontsize=fs["label"])
    ax.set_title("traversal: decoded as the unit moves", fontsize=fs["title"])
    ax = fig.add_subplot(gs[1, 0])
    ax.plot(epochs, np.clip(kl, 1e-4, None), color="#d62728", marker=".")
    ax.set_yscale("log")
    ax.axhline(0.01, color="k", ls=":", lw=0.8)
    ax.set_xlabel("epoch", fontsize=fs["label"])
    ax.set_ylabel("nats", fontsize=fs["label"])
    ax.set_title("KL(q‖p) over training", fontsize=fs["title"])
    ax.tick_params(labelsize=fs["ticks"])
    ax = fig.add_subplot(gs[1, 1])
    ax.hist(means, bins=30, color="#1f77b4")
    for v in values:
        ax.axvline(v, color="k", lw=0.5, alpha=0.5)
    ax.set_title("posterior means (test)", fontsize=fs["title"])
    ax.set_xlabel("unit value", fontsize=fs["label"])
    ax.tick_params(labelsize=fs["ticks"])
    ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=fs["title"], x=0.01, ha="left")
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.11, top=0.86 if title else 0.93)
    return fig


def to_png(fig: Figure, dpi: int = 80) -> bytes:
    """PNG bytes of ``fig`` (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def beta_schedule(epochs: int, warmup_epochs: int) -> Figure:
    """The warm-up weight beta per epoch (eq 20), with and without warm-up."""
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
