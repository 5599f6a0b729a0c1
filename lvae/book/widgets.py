"""The layer/unit explorer (ipywidgets 8), interactive live *and* in static HTML.

Choose a model, a layer and a unit: a panel shows that unit's KL(q‖p) over training, the
histogram of its posterior means over test images, and a latent traversal (images decoded while
the unit moves and the other units stay at the posterior mean of one test image).

Every panel is precomputed as a PNG inside an ``Image`` widget; nested ``Stack`` widgets hold
them, and the model dropdown, layer dropdowns and unit sliders are tied to the stacks'
``selected_index`` with ``jslink``. The links run in the browser, so the published HTML (widget
state embedded by myst-nb, no kernel) stays interactive; in Jupyter/Colab the same widget works
as usual.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from lvae.book import plots
from lvae.report import latent_units, probes
from lvae.training.step import ACTIVE_UNIT_THRESHOLD


@dataclass
class UnitFrame:
    layer: int  # 0 = z1
    unit: int
    final_kl: float
    png: bytes
    title: str = ""  # shown as text above the panel


def unit_frames(run, model, x: torch.Tensor, image_index: int = 0, max_units: int | None = 16,
                steps: int = 9, label: str = "") -> list[list[UnitFrame]]:
    """Per layer, the panels of its units in order of decreasing final KL (at most ``max_units``)."""
    epochs, kl = latent_units.kl_history(run)
    means, _ = probes.posterior_means(model, x)
    image_shape = (28, 28) if x.shape[1] == 784 else (int(np.sqrt(x.shape[1])),) * 2
    x0 = x[image_index:image_index + 1]
    out: list[list[UnitFrame]] = []
    for layer, lay_kl in enumerate(kl):
        order = np.argsort(-lay_kl[-1])[: max_units or None]
        frames = []
        for rank, unit in enumerate(order):
            values = probes.traversal_values(means[layer], int(unit), steps)
            imgs = probes.traversal(model, x0, layer, int(unit), values).numpy()
            final = lay_kl[-1, unit]
            state = "active" if final > ACTIVE_UNIT_THRESHOLD else "inactive"
            title = (f"{label}: " if label else "") + \
                f"z{layer + 1}, unit {unit} (rank {rank + 1} by KL; final KL {final:.3g} nats, {state})"
            fig = plots.unit_panel(epochs, lay_kl[:, unit], means[layer][:, unit].numpy(), imgs, values,
                                   image_shape)
            frames.append(UnitFrame(layer, int(unit), float(lay_kl[-1, unit]),
                                    plots.to_png(fig, dpi=plots.UNIT_PANEL_DPI), title))
        out.append(frames)
    return out


def explorer(models: dict[str, tuple[Any, Any]], x: torch.Tensor, image_index: int = 0,
             max_units: int | None = 16, steps: int = 9):
    """The explorer widget for ``models`` = {label: (run, model)} on test images ``x``."""
    import ipywidgets as w

    if not hasattr(w, "Stack"):  # ipywidgets 7 (old Colab images): a kernel-driven fallback
        return _explorer_kernel(models, x, image_index, max_units, steps)
    # never wider than drawn: 1:1 in the text column, scaled down on a phone
    layout_img = w.Layout(width="100%", max_width=f"{plots.UNIT_PANEL_INCHES[0] * plots.UNIT_PANEL_DPI:.0f}px")
    variant_boxes, variant_names = [], []
    for label, (run, model) in models.items():
        frames = unit_frames(run, model, x, image_index, max_units, steps, label)
        layer_boxes, layer_names = [], []
        final_kl = latent_units.kl_history(run)[1]
        for layer, fr in enumerate(frames):
            n_units = final_kl[layer].shape[1]
            n_active = int((final_kl[layer][-1] > ACTIVE_UNIT_THRESHOLD).sum())
            panels = [w.VBox([w.HTML(html.escape(f.title)), w.Image(value=f.png, format="png", layout=layout_img)])
                      for f in fr]
            stack = w.Stack(panels, selected_index=0)
            slider = w.IntSlider(value=0, min=0, max=len(panels) - 1, continuous_update=True,
                                 layout=w.Layout(width="22em", max_width="100%"))
            w.jslink((slider, "value"), (stack, "selected_index"))
            layer_boxes.append(w.VBox([_row("unit (rank by KL)", slider), stack]))
            shown = "all shown" if len(fr) == n_units else f"top {len(fr)} by KL shown"
            layer_names.append(f"z{layer + 1}: {n_units} units, {n_active} active ({shown})")
        layer_dd = w.Dropdown(options=layer_names, index=0, layout=w.Layout(width="24em", max_width="100%"))
        layer_stack = w.Stack(layer_boxes, selected_index=0)
        w.jslink((layer_dd, "index"), (layer_stack, "selected_index"))
        variant_boxes.append(w.VBox([_row("layer", layer_dd), layer_stack]))
        variant_names.append(label)
    model_dd = w.ToggleButtons(options=variant_names, index=0, style={"button_width": "auto"})
    model_stack = w.Stack(variant_boxes, selected_index=0)
    w.jslink((model_dd, "index"), (model_stack, "selected_index"))
    return w.VBox([_row("model", model_dd), model_stack],
                  layout=w.Layout(border="1px solid #ddd", padding="6px", max_width="100%"))


def _row(text: str, control):
    """A label and its control on one line, the control below the label where the line is too
    narrow (a phone). The label is plain HTML: widget ``description``s are typeset with the
    MathJax 2 API by the static HTML widget manager, which fails under the book's MathJax 3."""
    import ipywidgets as w

    label = w.HTML(f"<b>{html.escape(text)}</b>", layout=w.Layout(width="11em"))
    return w.HBox([label, control], layout=w.Layout(flex_flow="row wrap", align_items="center"))


def _explorer_kernel(models, x, image_index, max_units, steps):  # pragma: no cover - ipywidgets 7 only
    import ipywidgets as w

    frames = {label: unit_frames(run, model, x, image_index, max_units, steps, label)
              for label, (run, model) in models.items()}
    model_dd = w.Dropdown(options=list(frames), description="model")
    layer_dd = w.Dropdown(options=[], description="layer")
    slider = w.IntSlider(min=0, max=0, description="unit (by KL)")
    title, image = w.HTML(), w.Image(format="png")

    def update(*_):
        fr = frames[model_dd.value]
        if len(layer_dd.options) != len(fr):
            layer_dd.options = [f"z{i + 1}" for i in range(len(fr))]
        layer = layer_dd.index or 0
        slider.max = len(fr[layer]) - 1
        frame = fr[layer][min(slider.value, slider.max)]
        title.value, image.value = html.escape(frame.title), frame.png

    for widget in (model_dd, layer_dd, slider):
        widget.observe(update, names="value")
    update()
    return w.VBox([model_dd, layer_dd, slider, title, image])


def frame_count(widget) -> int:
    """Number of precomputed panels in an explorer (for tests)."""
    import ipywidgets as w

    if isinstance(widget, w.Image):
        return 1
    children: Sequence = getattr(widget, "children", ())
    return sum(frame_count(c) for c in children)
