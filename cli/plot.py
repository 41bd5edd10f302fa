"""`xconv profile --plot`: the profile's memory figures as a picture (matplotlib, the `plot` extra).

Left: the peak step memory, exact and patched side by side, stacked by what is live at the peak.
Right: what the largest layers' inputs keep for backward, before and after the patch.
Figures only come from the ProfileResult; matplotlib is imported when a plot is drawn.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xconv_patch.measure import ProfileResult

from .render import size

MISSING = "--plot needs matplotlib: pip install 'xconv-patch[plot]'"

STACK = (
    ("parameters", ("parameters",)),
    ("gradients", ("gradients",)),
    ("optimizer state", ("optimizer_state",)),
    ("saved activations", ("activations",)),
    ("other (temporaries, inputs)", ("temporaries", "inputs")),
)
"""The stacked segments and the breakdown keys each adds up (MemTracker's activations at the peak are
what the forward saved for backward and has not been freed yet)."""


class PlotError(ValueError):
    """--plot cannot be drawn (matplotlib missing, a format it cannot write, no such folder)."""


@dataclass(frozen=True)
class PlotData:
    """What the plot draws, in bytes: the stacked peak per model, and the largest layers' saved input."""

    title: str
    predicted: bool
    peak: dict[str, dict[str, int]]
    layers: list[tuple[str, int, int, str]]
    """Per conv: name, saved bytes before, after, and how its input is kept after (recomputed, probed ...)."""


def check_plot_target(path: Path) -> None:
    """Raise PlotError now, before any measurement, if `path` cannot be written as a plot."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise PlotError(MISSING) from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in formats:
        raise PlotError(f"--plot {path}: unknown image format {path.suffix or '(none)'!r}; use one of "
                        f"{', '.join('.' + name for name in sorted(formats))}")
    if not path.parent.is_dir():
        raise PlotError(f"--plot {path}: no such folder {path.parent}")


def plot_data(result: ProfileResult, top: int = 12) -> PlotData:
    """The figures the plot shows: the peak's breakdown per model, and the `top` convs whose input
    kept the most before the patch (saved bytes before and after)."""
    peak = {
        name: {label: sum(variant.breakdown[key] for key in keys) for label, keys in STACK}
        for name, variant in (("exact", result.exact), ("xconv", result.xconv))
    }
    measured = [layer for layer in result.layers if layer["activation_bytes_before"] is not None]
    largest = sorted(measured, key=lambda layer: layer["activation_bytes_before"], reverse=True)[:top]
    layers = [
        (layer["name"], layer["activation_bytes_before"], layer["activation_bytes_after"], layer["storage"])
        for layer in largest
    ]
    spec = result.spec
    shape = "x".join(map(str, (spec.batch_size, *result.input_shape)))
    kind = "predicted" if result.predicted else "measured"
    title = f"{spec.model}, input {shape}, {spec.dtype}, recipe {result.conversion['recipe']} ({kind})"
    return PlotData(title, result.predicted, peak, layers)


def save_plot(result: ProfileResult, path: Path, top: int = 12) -> None:
    """Draw plot_data(result) and write it to `path` (the format follows the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    data = plot_data(result, top)
    figure = Figure(figsize=(12, 5.2), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(1, 1.5))
    _stacked_peak(left, data)
    _layer_bars(right, data)
    figure.suptitle(data.title, fontsize=10)
    figure.savefig(path, dpi=110)


def _stacked_peak(axis: Any, data: PlotData) -> None:
    names = list(data.peak)
    bottoms = [0.0] * len(names)
    for label, _ in STACK:
        heights = [data.peak[name][label] / 2**20 for name in names]
        axis.bar(names, heights, bottom=bottoms, label=label, width=0.6)
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights, strict=True)]
    for index, name in enumerate(names):
        axis.annotate(size(sum(data.peak[name].values())), (index, bottoms[index]), ha="center", va="bottom",
                      fontsize=9)
    ratio = bottoms[0] / bottoms[1] if bottoms[1] else float("nan")
    axis.set_title(f"peak step memory, exact / xconv {ratio:.2f}x\n(the tensors live at the moment of the peak)",
                   fontsize=10)
    axis.set_ylabel("MiB")
    axis.set_ylim(0, max(bottoms) * 1.1)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3, frameon=False)


def _layer_bars(axis: Any, data: PlotData) -> None:
    if not data.layers:
        axis.text(0.5, 0.5, "no per-layer byte figures (the model could not be analysed)", ha="center",
                  transform=axis.transAxes)
        axis.set_axis_off()
        return
    layers = data.layers[::-1]
    before = [value / 2**20 for _, value, _, _ in layers]
    after = [value / 2**20 for _, _, value, _ in layers]
    rows = range(len(layers))
    axis.barh([row + 0.2 for row in rows], before, height=0.4, label="exact (torch's layers)", color="tab:gray")
    axis.barh([row - 0.2 for row in rows], after, height=0.4, label="xconv", color="tab:green")
    for row, (_, _, kept, storage) in zip(rows, layers, strict=True):
        axis.annotate(f" {size(kept)} ({storage})", (kept / 2**20, row - 0.2), va="center", fontsize=7)
    axis.set_yticks(list(rows), [name for name, _, _, _ in layers], fontsize=8)
    axis.set_xlabel("MiB kept for backward (the conv's input, or its projection and masks)")
    axis.set_title(f"the {len(layers)} convs whose input keeps the most", fontsize=10)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
