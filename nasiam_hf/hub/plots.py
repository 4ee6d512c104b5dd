"""Training and search plots. matplotlib's Agg canvas on explicit ``Figure`` objects, never ``pyplot``: importing
this module or plotting does not change the user's matplotlib backend. Every PNG is written atomically."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

# One colour per op, shared by the alpha curves and the genotype diagram; unknown ops take the fallback palette.
OP_COLOURS = {
    "max_pool_3x3": "#8c564b",
    "avg_pool_3x3": "#e377c2",
    "identity": "#7f7f7f",
    "linear_relu": "#1f77b4",
    "linear_silu": "#ff7f0e",
    "linear_hardswish": "#2ca02c",
    "linear_elu": "#d62728",
    "linear_mish": "#9467bd",
    "linear_gelu": "#17becf",
}
_FALLBACK_COLOURS = ("#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2")

def _new_figure(width: float, height: float) -> "Figure":
    """A figure drawn by the Agg canvas, without pyplot (no global backend switch, no figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: "Figure", path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def op_colour(op: str, ops: Sequence[str] = ()) -> str:
    """The colour of an op in every plot of this package."""
    if op in OP_COLOURS:
        return OP_COLOURS[op]
    unknown = [o for o in ops if o not in OP_COLOURS] or [op]
    index = unknown.index(op) if op in unknown else sum(map(ord, op))
    return _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)]


def _fmt(value: Any) -> str:
    return f"{float(value):.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _epoch_series(epochs: Sequence[Mapping], key: str) -> tuple[list, list]:
    """(epoch numbers, values) for the epochs where ``key`` holds a finite number."""
    xs, ys = [], []
    for i, row in enumerate(epochs):
        value = row.get(key)
        if _number(value):
            xs.append(row.get("epoch", i))
            ys.append(float(value))
    return xs, ys


def _legend_below(ax, lines, labels) -> None:
    ax.legend(lines, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, len(lines)),
              frameon=False)


def _line_style(n_points: int) -> dict:
    return {"marker": "o", "markersize": 3} if n_points <= 30 else {}


def _check_epochs(history: Mapping, what: str) -> list[Mapping]:
    epochs = history.get("epochs") if isinstance(history, Mapping) else None
    if not epochs:
        raise ValueError(f"{what} has no 'epochs' to plot")
    return list(epochs)


def plot_search_history(history: Mapping, folder: str | os.PathLike) -> list[Path]:
    """Plot a search run (the content of ``search_history.json``): ``alphas.png``, ``search_loss.png`` and
    ``search_diagnostics.png``.

    ``alphas.png`` has one panel per layer of each cell, with the softmaxed weight of every op across epochs (one
    colour per op, the same in every panel); ``search_loss.png`` has the train and validation losses and, on a second
    axis, the collapse statistic.
    """
    folder = Path(folder)
    epochs = _check_epochs(history, "search history")
    ops = list(history.get("ops") or [])
    if not ops:
        raise ValueError("search history has no 'ops' list (op names in the order of the weights)")

    cells = []
    for cell in ("projector", "predictor"):
        layers = max((len((row.get("op_weights") or {}).get(cell) or []) for row in epochs), default=0)
        if layers:
            cells.append((cell, layers))
    if not cells:
        raise ValueError("search history has no 'op_weights' to plot")
    columns = max(layers for _, layers in cells)
    fig = _new_figure(2.6 * columns, 2.3 * len(cells) + 0.9)
    axes = fig.subplots(len(cells), columns, squeeze=False, sharey=True)
    uniform = 1.0 / len(ops)
    # zoomed on the range the weights cover (short searches move them little), the uniform level included
    values = [float(w) for row in epochs for cell, _ in cells
              for layer in ((row.get("op_weights") or {}).get(cell) or []) for w in layer] + [uniform]
    margin = 0.1 * (max(values) - min(values)) or 0.01
    bottom, top = max(0.0, min(values) - margin), min(1.0, max(values) + margin)
    for r, (cell, layers) in enumerate(cells):
        for c in range(columns):
            ax = axes[r][c]
            if c >= layers:
                ax.set_axis_off()
                continue
            for k, op in enumerate(ops):
                xs, ys = [], []
                for i, row in enumerate(epochs):
                    weights = (row.get("op_weights") or {}).get(cell) or []
                    if c < len(weights) and k < len(weights[c]):
                        xs.append(row.get("epoch", i))
                        ys.append(float(weights[c][k]))
                ax.plot(xs, ys, color=op_colour(op, ops), label=op, linewidth=1.4, **_line_style(len(xs)))
            ax.axhline(uniform, color="black", linewidth=0.6, linestyle=":")
            ax.set_title(f"{cell} layer {c + 1}", fontsize=9)
            ax.set_ylim(bottom, top)
            ax.tick_params(labelsize=7)
            if r == len(cells) - 1 or c >= cells[r + 1][1]:  # no panel below this one
                ax.set_xlabel("epoch", fontsize=8)
            if c == 0:
                ax.set_ylabel("op weight (softmax)", fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=op_colour(op, ops), linewidth=2) for op in ops]
    fig.legend(handles, ops, loc="lower center", ncol=min(len(ops), 7), fontsize=8, frameon=False)
    fig.suptitle("Architecture weights during the search (dotted: uniform)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    written = [_save_png(fig, folder / "alphas.png")]

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for key, label, colour in (("train_loss", "train loss (weight step)", "#1f77b4"),
                               ("val_loss", "validation loss (alpha step)", "#ff7f0e")):
        xs, ys = _epoch_series(epochs, key)
        if xs:
            ax.plot(xs, ys, color=colour, label=label, **_line_style(len(xs)))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    xs, ys = _epoch_series(epochs, "collapse_std")
    if xs:
        twin = ax.twinx()
        twin.plot(xs, ys, color="#2ca02c", linestyle="--", label="collapse std", **_line_style(len(xs)))
        twin.set_ylabel("collapse std (0 = collapsed)")
        twin.set_ylim(0.0, max(ys) * 1.15 if max(ys) > 0 else 1.0)
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    if lines:
        _legend_below(ax, lines, labels)
    ax.set_title("Search losses")
    written.append(_save_png(fig, folder / "search_loss.png"))
    written.append(plot_search_diagnostics(epochs, folder / "search_diagnostics.png"))
    return written


def plot_search_diagnostics(epochs: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """``search_diagnostics.png``: the signs of a collapse into parameter-free ops, one panel each: the identity and
    parameter-free shares of the genotype, the collapse statistic, and the largest eigenvalue of the alphas' Hessian
    (on the epochs it was measured; it rises before DARTS collapses)."""
    fig = _new_figure(12.0, 3.4)
    panels = fig.subplots(1, 3)
    series = (
        (panels[0], (("identity_share", "identity share", "#7f7f7f"),
                     ("parameter_free_share", "parameter-free share", "#e377c2")), "share of width-keeping layers"),
        (panels[1], (("collapse_std", "collapse std", "#2ca02c"),), "std of l2-normalised outputs"),
        (panels[2], (("alpha_hessian_top_eigenvalue", "top Hessian eigenvalue", "#d62728"),), "eigenvalue"),
    )
    for ax, keys, ylabel in series:
        drawn = False
        for key, label, colour in keys:
            xs, ys = _epoch_series(epochs, key)
            if xs:
                ax.plot(xs, ys, color=colour, label=label, **_line_style(len(xs)))
                drawn = True
        if drawn:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    panels[0].set_ylim(-0.05, 1.05)
    panels[0].set_title("Parameter-free ops in the genotype", fontsize=9)
    panels[1].set_title("Representation collapse", fontsize=9)
    panels[2].set_title("Curvature of the validation loss in alpha space", fontsize=9)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_training_history(history: Mapping, folder: str | os.PathLike) -> list[Path]:
    """Plot a pretraining run (the content of ``training_history.json``).

    Writes ``loss.png`` (loss, learning rate on a second axis), ``knn_accuracy.png`` (kNN top-1 on the epochs that
    have one; a note when none has) and ``collapse.png`` (collapse statistic, with a dashed line at
    ``history["collapse_reference"]`` = 1/sqrt(projection_dim) when given).
    """
    folder = Path(folder)
    epochs = _check_epochs(history, "training history")
    written = []

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = _epoch_series(epochs, "loss")
    ax.plot(xs, ys, color="#1f77b4", label="training loss", **_line_style(len(xs)))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    xs, ys = _epoch_series(epochs, "lr")
    if xs:
        twin = ax.twinx()
        twin.plot(xs, ys, color="#7f7f7f", linestyle=":", label="learning rate")
        twin.set_ylabel("learning rate")
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    _legend_below(ax, lines, labels)
    ax.set_title("Pretraining loss")
    written.append(_save_png(fig, folder / "loss.png"))

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = _epoch_series(epochs, "knn_top1")
    if xs:
        ax.plot(xs, ys, color="#d62728", label="kNN top-1", **_line_style(len(xs)))
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no kNN evaluation was recorded in this run", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 accuracy (%)")
    ax.set_title("kNN monitor (frozen backbone features)")
    written.append(_save_png(fig, folder / "knn_accuracy.png"))

    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = _epoch_series(epochs, "collapse_std")
    ax.plot(xs, ys, color="#2ca02c", label="std of l2-normalised outputs", **_line_style(len(xs)))
    reference = history.get("collapse_reference")
    if _number(reference):
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.0,
                   label=f"healthy: 1/sqrt(d) = {reference:.4f}")
        ys = ys + [reference]
    ax.set_ylim(0.0, max(ys) * 1.15 if ys and max(ys) > 0 else 1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("collapse std (0 = collapsed)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Representation collapse monitor")
    written.append(_save_png(fig, folder / "collapse.png"))
    return written
