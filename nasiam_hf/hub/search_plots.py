"""Search plots, drawn from ``search_history.json`` (see :mod:`nasiam_hf.hub.plots` for the conventions): the op
weights of every layer, the losses, how sure the genotype is, and the signs of a collapse."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..confidence import DECIDED_MAX_RELATIVE_ENTROPY, DECIDED_MIN_MARGIN, genotype_confidence
from .plots import (
    _check_epochs, _epoch_series, _legend_below, _line_style, _new_figure, _number, _step_series, _x_axis, op_colour,
    save_figures, short_run,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

CELLS = ("projector", "predictor")


def _weight_rows(history: Mapping, by_update: bool) -> tuple[list[tuple[float, Mapping]], str]:
    """(x, op weights by cell) in order, and the x label: per step when the run is short and the steps hold op
    weights, else per epoch."""
    if by_update:
        rows = [(row["step"], row["op_weights"]) for row in history.get("steps") or []
                if isinstance(row.get("op_weights"), Mapping) and _number(row.get("step"))]
        if rows:
            return rows, "update"
    return [(row.get("epoch", i) + 1, row.get("op_weights") or {})
            for i, row in enumerate(history.get("epochs") or [])], "epoch"


def alphas_figure(history: Mapping, by_update: bool) -> "Figure":
    """One panel per layer of each cell, with the softmaxed weight of every op (one colour per op, the same in every
    panel), zoomed on the range the weights cover, the uniform level dotted."""
    ops = list(history["ops"])
    rows, xlabel = _weight_rows(history, by_update)
    cells = []
    for cell in CELLS:
        layers = max((len(weights.get(cell) or []) for _, weights in rows), default=0)
        if layers:
            cells.append((cell, layers))
    if not cells:
        raise ValueError("search history has no 'op_weights' to plot")
    columns = max(layers for _, layers in cells)
    fig = _new_figure(2.6 * columns, 2.3 * len(cells) + 0.9, layout="constrained")
    axes = fig.subplots(len(cells), columns, squeeze=False, sharey=True)
    uniform = 1.0 / len(ops)
    values = [float(w) for _, weights in rows for cell, _ in cells for layer in (weights.get(cell) or [])
              for w in layer] + [uniform]
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
                for x, weights in rows:
                    layer_weights = weights.get(cell) or []
                    if c < len(layer_weights) and k < len(layer_weights[c]):
                        xs.append(x)
                        ys.append(float(layer_weights[c][k]))
                ax.plot(xs, ys, color=op_colour(op, ops), label=op, linewidth=1.4, **_line_style(len(xs)))
            ax.axhline(uniform, color="black", linewidth=0.6, linestyle=":")
            ax.set_title(f"{cell} layer {c + 1}", fontsize=9)
            ax.set_ylim(bottom, top)
            ax.tick_params(labelsize=7)
            _x_axis(ax, xlabel if r == len(cells) - 1 or c >= cells[r + 1][1] else "")  # labelled at the bottom
            if c == 0:
                ax.set_ylabel("op weight (softmax)", fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=op_colour(op, ops), linewidth=2) for op in ops]
    fig.legend(handles, ops, loc="outside lower center", ncol=min(len(ops), 7), fontsize=8, frameon=False)
    fig.suptitle("Architecture weights during the search (dotted: uniform)", fontsize=10)
    return fig


def loss_figure(history: Mapping, by_update: bool) -> "Figure":
    """The train and validation losses and, on an axis of its own, the collapse statistic (per epoch) or the
    learning rate (per update)."""
    epochs = history["epochs"]
    rows, series, xlabel = ((history["steps"], _step_series, "update") if by_update
                            else (epochs, _epoch_series, "epoch"))
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for key, label, colour in (("train_loss", "train loss (weight step)", "#1f77b4"),
                               ("val_loss", "validation loss (alpha step)", "#ff7f0e")):
        xs, ys = series(rows, key)
        if xs:
            ax.plot(xs, ys, color=colour, label=label, **_line_style(len(xs)))
    _x_axis(ax, xlabel)
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    key, label = ("lr", "learning rate") if by_update else ("collapse_std", "collapse std (0 = collapsed)")
    xs, ys = series(rows, key)
    if xs:
        twin = ax.twinx()
        twin.plot(xs, ys, color="#2ca02c", linestyle="--", label=label, **_line_style(len(xs)))
        twin.set_ylabel(label)
        twin.set_ylim(0.0, max(ys) * 1.15 if max(ys) > 0 else 1.0)
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    if lines:
        _legend_below(ax, lines, labels)
    ax.set_title("Search losses" + (" (per update)" if by_update else ""))
    return fig


def final_confidence(history: Mapping) -> dict:
    """The genotype's confidence: the history's own (the search's end), else computed from its last op weights."""
    confidence = history.get("confidence")
    if isinstance(confidence, Mapping) and confidence:
        return dict(confidence)
    last = (history.get("epochs") or [{}])[-1]
    return genotype_confidence(last.get("op_weights") or {}, history["ops"], history.get("genotype"))


def decided_series(history: Mapping, by_update: bool) -> tuple[list, list]:
    """(x, number of decided layers) along the search, from each record's op weights."""
    rows, _ = _weight_rows(history, by_update)
    xs, ys = [], []
    for x, weights in rows:
        confidence = genotype_confidence(weights, history["ops"])
        xs.append(x)
        ys.append(sum(bool(r["decided"]) for layers in confidence.values() for r in layers))
    return xs, ys


def confidence_figure(history: Mapping, by_update: bool) -> "Figure":
    """How sure the genotype is: per layer, the chosen op's margin over the runner-up and the relative entropy of the
    layer's weights (bars, the thresholds of :data:`~nasiam_hf.confidence.DECIDED_RULE` dashed; undecided layers in
    grey), and the number of decided layers along the search."""
    confidence = final_confidence(history)
    names, margins, entropies, decided = [], [], [], []
    for cell, layers in confidence.items():
        for row in layers:
            op = row["op"].removeprefix("linear_").replace("_pool_3x3", " pool")
            names.append(f"{cell[:4]} {row['layer']}: {op}")
            margins.append(float(row["margin"]))
            entropies.append(float(row["relative_entropy"]))
            decided.append(bool(row["decided"]))
    colours = ["#2ca02c" if d else "#9e9e9e" for d in decided]
    fig = _new_figure(max(9.0, 0.75 * len(names) + 4.0), 3.6, layout="constrained")
    panels = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2, 2, 1.3]})
    positions = list(range(len(names)))
    for ax, values, limit, title in (
            (panels[0], margins, DECIDED_MIN_MARGIN, "margin over the runner-up (>= to decide)"),
            (panels[1], entropies, DECIDED_MAX_RELATIVE_ENTROPY, "entropy relative to uniform (<= to decide)")):
        ax.bar(positions, values, color=colours)
        ax.axhline(limit, color="black", linestyle="--", linewidth=1.0)
        ax.set_xticks(positions)
        ax.set_xticklabels(names, fontsize=7, rotation=45, ha="right")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    panels[1].set_ylim(min(entropies + [DECIDED_MAX_RELATIVE_ENTROPY]) - 0.02, 1.005)
    xs, ys = decided_series(history, by_update)
    panels[2].plot(xs, ys, color="#2ca02c", **_line_style(len(xs)))
    panels[2].set_ylim(-0.2, len(names) + 0.2)
    _x_axis(panels[2], "update" if by_update and history.get("steps") else "epoch")
    panels[2].set_title(f"decided layers (of {len(names)})", fontsize=9)
    panels[2].tick_params(labelsize=7)
    fig.suptitle(f"Genotype confidence: {sum(decided)} of {len(names)} layers decided (grey: undecided)", fontsize=10)
    return fig


def diagnostics_figure(epochs: Sequence[Mapping]) -> "Figure":
    """The signs of a collapse into parameter-free ops, one panel each: the identity and parameter-free shares of
    the genotype, the collapse statistic, and the largest eigenvalue of the alphas' Hessian (on the epochs it was
    measured; it rises before DARTS collapses). A panel with nothing recorded says so."""
    fig = _new_figure(12.0, 3.4, layout="constrained")
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
            ax.text(0.5, 0.5, "not measured (--hessian_every)" if keys[0][0].startswith("alpha") else
                    "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    panels[0].set_ylim(-0.05, 1.05)
    panels[0].set_title("Parameter-free ops in the genotype", fontsize=9)
    panels[1].set_title("Representation collapse", fontsize=9)
    panels[2].set_title("Curvature of the validation loss in alpha space", fontsize=9)
    return fig


def search_figures(history: Mapping) -> dict[str, "Figure"]:
    """The figures of a search run: ``alphas.png``, ``search_loss.png``, ``search_confidence.png`` and
    ``search_diagnostics.png`` (under two epochs the first three are drawn against updates)."""
    epochs = _check_epochs(history, "search history")
    if not history.get("ops"):
        raise ValueError("search history has no 'ops' list (op names in the order of the weights)")
    by_update = short_run(history)
    return {"alphas.png": alphas_figure(history, by_update), "search_loss.png": loss_figure(history, by_update),
            "search_confidence.png": confidence_figure(history, by_update),
            "search_diagnostics.png": diagnostics_figure(epochs)}


def plot_search_history(history: Mapping, folder: str | os.PathLike) -> list[Path]:
    """Write the figures of :func:`search_figures` into ``folder``; returns their paths."""
    return save_figures(search_figures(history), folder)


__all__ = ["alphas_figure", "confidence_figure", "decided_series", "diagnostics_figure", "final_confidence",
           "loss_figure", "plot_search_history", "search_figures"]
