"""Projector and predictor heads: a discrete MLP built from a genotype, and the searchable cell of mixed layers.

Both are described by a :class:`HeadSpec` (the widths of the searched layers and what follows them), so a searched
head, a preset head and a framework's standard head are all the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .search_space import build_op, check_op_name


@dataclass(frozen=True)
class HeadSpec:
    """Shape of one head.

    ``widths`` has one entry more than there are searched layers (layer ``i`` maps ``widths[i] -> widths[i+1]``).
    ``output_last`` marks the last searched layer as the head's output layer (no BN, no activation).
    ``output`` optionally appends a fixed, unsearched output layer: ``"linear_bn"`` is SimSiam's
    ``Linear(bias=False) + BatchNorm1d(affine=False)``, ``"linear"`` a plain ``Linear`` with bias.
    """

    widths: tuple[int, ...]
    output_last: bool = False
    output: str | None = None
    output_dim: int | None = None

    def __post_init__(self):
        if len(self.widths) < 2:
            raise ValueError(f"a head needs at least one layer, got widths {self.widths}")
        if self.output not in (None, "linear", "linear_bn"):
            raise ValueError(f"head output must be None, 'linear' or 'linear_bn', got {self.output!r}")
        if (self.output is None) != (self.output_dim is None):
            raise ValueError("head output and output_dim must be given together")

    @property
    def num_layers(self) -> int:
        return len(self.widths) - 1

    @property
    def out_features(self) -> int:
        return self.output_dim if self.output is not None else self.widths[-1]

    def layer_shapes(self) -> list[tuple[int, int, bool]]:
        """(d_in, d_out, is_output_layer) of every searched layer."""
        last = self.num_layers - 1
        return [(self.widths[i], self.widths[i + 1], self.output_last and i == last) for i in range(self.num_layers)]


def build_output_layer(spec: HeadSpec) -> nn.Module | None:
    if spec.output == "linear_bn":
        return nn.Sequential(
            nn.Linear(spec.widths[-1], spec.output_dim, bias=False), nn.BatchNorm1d(spec.output_dim, affine=False)
        )
    if spec.output == "linear":
        return nn.Linear(spec.widths[-1], spec.output_dim)
    return None


class MLPHead(nn.Module):
    """A discrete head: one op per layer, as the genotype says, then the spec's fixed output layer."""

    def __init__(self, genotype: Sequence[str], spec: HeadSpec):
        super().__init__()
        if len(genotype) != spec.num_layers:
            raise ValueError(f"genotype {list(genotype)} has {len(genotype)} ops, the head has {spec.num_layers} layers")
        self.genotype = list(genotype)
        self.layers = nn.ModuleList(
            build_op(op, d_in, d_out, output=out) for op, (d_in, d_out, out) in zip(genotype, spec.layer_shapes())
        )
        self.output = build_output_layer(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x if self.output is None else self.output(x)


class MixedLayer(nn.Module):
    """Every candidate op of one layer; the output is their sum weighted by softmaxed alphas (the paper's Eq. 4)."""

    def __init__(self, ops: Sequence[str], d_in: int, d_out: int, output: bool):
        super().__init__()
        self.ops = nn.ModuleList(build_op(op, d_in, d_out, output=output) for op in ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = weights[0] * self.ops[0](x)
        for w, op in zip(weights[1:], self.ops[1:]):
            out = out + w * op(x)
        return out


class SearchCell(nn.Module):
    """The searchable head: a chain of mixed layers whose op weights ``alphas`` (layers x ops) are parameters.

    Being an ``nn.Parameter``, ``alphas`` is saved in ``state_dict``, moves with ``.to()`` and is seen by DDP.
    """

    def __init__(self, ops: Sequence[str], spec: HeadSpec):
        super().__init__()
        self.op_names = [check_op_name(op, where="search space") for op in ops]
        self.layers = nn.ModuleList(
            MixedLayer(self.op_names, d_in, d_out, output=out) for d_in, d_out, out in spec.layer_shapes()
        )
        self.alphas = nn.Parameter(torch.zeros(spec.num_layers, len(self.op_names)))
        self.output = build_output_layer(spec)

    def op_weights(self) -> torch.Tensor:
        """Softmax of the alphas per layer: the weight of every op in every layer."""
        return torch.softmax(self.alphas.float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.op_weights().to(x.dtype)
        for layer, w in zip(self.layers, weights):
            x = layer(x, w)
        return x if self.output is None else self.output(x)

    def genotype(self) -> list[str]:
        """The op with the largest alpha in each layer (identity included), as Algorithm 1 derives it."""
        return [self.op_names[i] for i in self.alphas.detach().argmax(dim=-1).tolist()]
