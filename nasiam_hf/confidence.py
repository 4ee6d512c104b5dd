"""How sure a searched genotype is, layer by layer, and the one rule that calls a layer "decided".

A DARTS search ends with one op per layer whatever happened: the argmax of op weights that may still sit at uniform.
For every searched layer this module reports the chosen op's weight, its margin over the runner-up and the entropy of
the layer's weights relative to uniform (``H / log K``: 1 is uniform, 0 is one-hot). With ``--discretization
perturbation`` the equivalent is the chosen op's loss increase when masked against the runner-up's.

It stands alone (plain floats in, plain dicts out) so the search, the pretraining, the card and the benchmarks share
one computation: :func:`genotype_confidence`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

DECIDED_MIN_MARGIN = 0.05
DECIDED_MAX_RELATIVE_ENTROPY = 0.99
PERTURBATION_MIN_RELATIVE_MARGIN = 0.1
DECIDED_RULE = (
    f"a layer is decided when its chosen op outweighs the runner-up by at least {DECIDED_MIN_MARGIN} (softmax "
    f"weight) and the entropy of its op weights is at most {DECIDED_MAX_RELATIVE_ENTROPY} of uniform's; with "
    f"--discretization perturbation, when masking the chosen op raises the loss and the runner-up's increase is at "
    f"most {1 - PERTURBATION_MIN_RELATIVE_MARGIN:g} of it"
)
"""The criterion, in one place (the README quotes it).

Why these values. The search that prompted it ended with every weight between 0.140 and 0.146 (uniform 1/7 = 0.143):
margins of at most 0.006 and a relative entropy of 0.9999, which must read "undecided". A clear argmax, say one op at
twice the weight of each other (0.25 against 0.125), has a margin of 0.125 and a relative entropy of 0.980, which
must read "decided". The thresholds sit between: a margin of 0.05 means, for 7 ops near uniform, the chosen op's
alpha about 0.35 above the runner-up's (40 % more weight); a relative entropy of 0.99 means the layer has moved off
uniform, e.g. one op's alpha 0.5 above all the others. Both are needed: a margin alone passes a layer that is still a
near-uniform mixture with one op slightly ahead, the entropy alone passes a layer torn between two ops.

Perturbation (DARTS-PT) scores ops by the loss increase when each is masked, in the units of the framework's loss, so
its rule is relative: the chosen op's increase must be positive (removing it hurts) and at least 10 % above the
runner-up's.
"""


def relative_entropy(weights: Sequence[float]) -> float:
    """Entropy of ``weights`` (normalised to sum 1) over ``log K``: 1 for uniform weights, 0 for one-hot."""
    total = float(sum(weights))
    if len(weights) < 2 or total <= 0:
        return 0.0
    probabilities = [float(w) / total for w in weights]
    entropy = -sum(p * math.log(p) for p in probabilities if p > 0)
    return entropy / math.log(len(weights))


def _round(value: float) -> float:
    return round(float(value), 6)


def layer_confidence(weights: Sequence[float], ops: Sequence[str], chosen: str | None = None,
                     masked_losses: Mapping[str, float] | None = None, base_loss: float | None = None) -> dict:
    """The confidence of one layer: ``chosen`` (default: the op of largest weight) against the best other op.

    With ``masked_losses`` (DARTS-PT: the loss with each op masked) and ``base_loss`` (nothing masked), the loss
    increases are reported too and decide ``decided``; otherwise the weights decide (:data:`DECIDED_RULE`).
    """
    if len(weights) != len(ops) or not ops:
        raise ValueError(f"{len(weights)} op weights for {len(ops)} ops {list(ops)}")
    weights = [float(w) for w in weights]
    index = ops.index(chosen) if chosen is not None else max(range(len(ops)), key=weights.__getitem__)
    others = [k for k in range(len(ops)) if k != index]
    runner = max(others, key=weights.__getitem__) if others else index
    margin = weights[index] - weights[runner] if others else 1.0
    entropy = relative_entropy(weights)
    record = {"op": ops[index], "weight": _round(weights[index]), "runner_up": ops[runner],
              "runner_up_weight": _round(weights[runner]), "margin": _round(margin),
              "relative_entropy": _round(entropy),
              "decided": bool(margin >= DECIDED_MIN_MARGIN and entropy <= DECIDED_MAX_RELATIVE_ENTROPY)}
    if masked_losses is not None and base_loss is not None:
        increases = {op: float(masked_losses[op]) - float(base_loss) for op in ops}
        rivals = [op for op in ops if op != ops[index]]
        rival = max(rivals, key=increases.__getitem__) if rivals else ops[index]
        gain, rival_gain = increases[ops[index]], increases[rival]
        record.update({"loss_increase": _round(gain), "runner_up_by_loss": rival,
                       "runner_up_loss_increase": _round(rival_gain), "loss_margin": _round(gain - rival_gain),
                       "decided": bool(gain > 0 and gain - rival_gain >= PERTURBATION_MIN_RELATIVE_MARGIN * gain)})
    return record


def genotype_confidence(op_weights: Mapping[str, Sequence[Sequence[float]]], ops: Sequence[str],
                        genotype: Mapping[str, Sequence[str]] | None = None,
                        perturbation_table: Sequence[Mapping] | None = None) -> dict[str, list[dict]]:
    """Per cell, one :func:`layer_confidence` record per layer (``layer`` numbered from 1).

    ``op_weights`` maps a cell to its softmaxed alphas (layers x ops, as ``search_history.json`` holds them) and
    ``ops`` names the columns. ``genotype`` gives the chosen ops when they are not the argmax (a cap on
    parameter-free layers, DARTS-PT); ``perturbation_table`` is DARTS-PT's table (``Discretization.table``) whose
    loss increases then decide each layer.
    """
    ops = list(ops)
    table = {(row["cell"], row["layer"]): row for row in perturbation_table or ()}
    result = {}
    for cell, layers in op_weights.items():
        if layers is None:
            continue
        chosen = list((genotype or {}).get(cell) or [])
        records = []
        for i, weights in enumerate(layers):
            row = table.get((cell, i))
            record = layer_confidence(weights, ops, chosen[i] if i < len(chosen) else None,
                                      row["masked_loss"] if row else None, row["base_loss"] if row else None)
            records.append({"layer": i + 1, **record})
        result[cell] = records
    return result


def undecided_layers(confidence: Mapping[str, Sequence[Mapping]] | None) -> list[str]:
    """``["projector layer 3", ...]`` for every layer not decided."""
    return [f"{cell} layer {row['layer']}" for cell, rows in (confidence or {}).items() if isinstance(rows, list)
            for row in rows if not row.get("decided")]


def describe_layer(cell: str, row: Mapping) -> str:
    """One line per layer, for the end of a search."""
    text = (f"{cell} layer {row['layer']}: {row['op']} weight {row['weight']:.4f}, margin {row['margin']:+.4f} over "
            f"{row['runner_up']}, relative entropy {row['relative_entropy']:.4f}")
    if "loss_increase" in row:
        text += (f", loss +{row['loss_increase']:.4g} when masked (runner-up {row['runner_up_by_loss']} "
                 f"+{row['runner_up_loss_increase']:.4g})")
    return text + (": decided" if row.get("decided") else ": UNDECIDED")


def describe_confidence(confidence: Mapping[str, Sequence[Mapping]]) -> list[str]:
    return [describe_layer(cell, row) for cell, rows in confidence.items() if isinstance(rows, list) for row in rows]


def undecided_warning(confidence: Mapping[str, Sequence[Mapping]] | None, framework: str | None = None,
                      source: str | None = None) -> str | None:
    """The warning for a genotype with undecided layers (None when every layer is decided or nothing is known)."""
    layers = undecided_layers(confidence)
    if not layers:
        return None
    total = sum(len(rows) for rows in confidence.values() if isinstance(rows, list))
    where = f"the genotype of {source}" if source else "the genotype"
    preset = f"--genotype {framework}-baseline" if framework else "--genotype <framework>-baseline"
    perturbation = any("loss_increase" in row for rows in confidence.values() if isinstance(rows, list)
                       for row in rows)
    rule = (f"masking the chosen op must raise the loss at least {1 / (1 - PERTURBATION_MIN_RELATIVE_MARGIN):.2f} "
            "times as much as masking the runner-up" if perturbation else
            f"a decided layer has a margin of at least {DECIDED_MIN_MARGIN} over the runner-up and a relative "
            f"entropy of at most {DECIDED_MAX_RELATIVE_ENTROPY}")
    return (f"warning: {where} is undecided in {len(layers)} of {total} layers ({', '.join(layers)}): the op kept "
            f"there was barely preferred, close to a coin toss ({rule}). Search longer (--num_train_epochs, or a "
            f"larger --max_train_steps), or pretrain a preset instead ({preset}, or a paper genotype such as "
            "simsiam-cifar10-resnet18)")


def genotype_record(genotype: Mapping[str, Sequence[str] | None], confidence: Mapping | None) -> dict:
    """The content of a search's ``genotype.json``: the op lists (``projector``, ``predictor``, as every reader
    expects them), and beside them how sure the search was of each layer (``confidence``) and the rule that calls a
    layer decided (``decided_rule``)."""
    record = {"projector": list(genotype["projector"]),
              "predictor": None if genotype.get("predictor") is None else list(genotype["predictor"])}
    if confidence:
        record.update(confidence=dict(confidence), decided_rule=DECIDED_RULE)
    return record


def confidence_summary(confidence: Mapping[str, Sequence[Mapping]] | None) -> dict | None:
    """``{"decided": n, "layers": total, "undecided": [names]}`` for records and cards."""
    if not confidence:
        return None
    total = sum(len(rows) for rows in confidence.values() if isinstance(rows, list))
    undecided = undecided_layers(confidence)
    return {"decided": total - len(undecided), "layers": total, "undecided": undecided}


__all__ = [
    "DECIDED_MAX_RELATIVE_ENTROPY",
    "DECIDED_MIN_MARGIN",
    "DECIDED_RULE",
    "PERTURBATION_MIN_RELATIVE_MARGIN",
    "confidence_summary",
    "describe_confidence",
    "describe_layer",
    "genotype_confidence",
    "genotype_record",
    "layer_confidence",
    "relative_entropy",
    "undecided_layers",
    "undecided_warning",
]
