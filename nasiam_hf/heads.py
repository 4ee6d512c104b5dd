"""Projector and predictor heads: a discrete MLP built from a genotype, and the searchable cell of mixed layers.

Both are described by a :class:`HeadSpec` (the widths of the searched layers and what follows them), so a searched
head, a preset head and a framework's standard head are all the same code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .search_space import OPS, build_op, check_op_name


HEAD_OUTPUTS = (None, "linear", "linear_bn", "linear_no_bias")


@dataclass(frozen=True)
class HeadSpec:
    """Shape of one head.

    ``widths`` has one entry more than there are searched layers (layer ``i`` maps ``widths[i] -> widths[i+1]``).
    ``output_last`` marks the last searched layer as the head's output layer (no BN, no activation).
    ``output`` optionally appends a fixed, unsearched output layer: ``"linear_bn"`` is SimSiam's
    ``Linear(bias=False) + BatchNorm1d(affine=False)``, ``"linear"`` a plain ``Linear`` with bias, ``"linear_no_bias"``
    one without (Barlow Twins and VICReg, whose losses standardise or centre the embeddings: a bias would get no
    gradient).
    """

    widths: tuple[int, ...]
    output_last: bool = False
    output: str | None = None
    output_dim: int | None = None

    def __post_init__(self):
        if len(self.widths) < 2:
            raise ValueError(f"a head needs at least one layer, got widths {self.widths}")
        if self.output not in HEAD_OUTPUTS:
            raise ValueError(f"head output must be one of {HEAD_OUTPUTS}, got {self.output!r}")
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
    if spec.output in ("linear", "linear_no_bias"):
        return nn.Linear(spec.widths[-1], spec.output_dim, bias=spec.output == "linear")
    return None


class MLPHead(nn.Module):
    """A discrete head: one op per layer, as the genotype says, then the spec's fixed output layer."""

    def __init__(self, genotype: Sequence[str], spec: HeadSpec):
        super().__init__()
        if len(genotype) != spec.num_layers:
            raise ValueError(
                f"genotype {list(genotype)} has {len(genotype)} ops, the head has {spec.num_layers} layers"
            )
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
    """Every candidate op of one layer; the output is their sum weighted by softmaxed alphas (the paper's Eq. 4).

    The candidates run fused rather than one by one. Every op that starts with a Linear (each linear op and, where the
    width changes, the adapter in front of each parameter-free op; see :func:`~.search_space.build_op`) owns a block
    of ``d_out`` rows of one shared ``front = Linear(d_in, n * d_out)`` and, unless this is an output layer, a block
    of one shared ``front_bn = BatchNorm1d(n * d_out)``; each block then gets its op's activation. The BatchNorms
    that follow the pools share one ``pool_bn`` the same way. BatchNorm treats every feature on its own and a Linear's
    rows are independent, so this is exactly the computation of separate ops, with one matmul instead of ``n``.

    ``ops[k](x)`` computes candidate ``k`` alone from its blocks of the shared parameters (for inspection and
    tests), and :meth:`export_op` returns it as the stand-alone module :func:`~.search_space.build_op` builds.
    """

    def __init__(self, ops: Sequence[str], d_in: int, d_out: int, output: bool):
        super().__init__()
        self.op_names = [check_op_name(op, where="mixed layer") for op in ops]
        self.d_in, self.d_out, self.is_output = d_in, d_out, output
        specs = [OPS[op] for op in self.op_names]
        # op index -> block index in `front` (ops starting with a Linear), in `free` (parameter-free modules) and in
        # `pool_bn` (pools followed by a BatchNorm).
        self._front = {k: i for i, k in enumerate(k for k, s in enumerate(specs) if s.is_linear or d_in != d_out)}
        self._free = {k: i for i, k in enumerate(k for k, s in enumerate(specs) if not s.is_linear)}
        self._pool = {k: i for i, k in enumerate(k for k, s in enumerate(specs) if s.pool and not s.is_linear
                                                   and not output)}
        n_front = len(self._front)
        self.front = nn.Linear(d_in, n_front * d_out, bias=output) if n_front else None
        self.front_bn = nn.BatchNorm1d(n_front * d_out) if n_front and not output else None
        # The activation after each front block: the op's own, ReLU for a parameter-free op's adapter; none in an
        # output layer.
        self.front_acts = nn.ModuleList(
            (specs[k].activation() if specs[k].is_linear else nn.ReLU()) for k in self._front
        ) if not output else None
        self.free = nn.ModuleList(specs[k].parameter_free() for k in self._free)
        self.pool_bn = nn.BatchNorm1d(len(self._pool) * d_out) if self._pool else None

    def candidate_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every candidate op, in search-space order."""
        outs: list[torch.Tensor | None] = [None] * len(self.op_names)
        if self.front is not None:
            h = self.front(x)
            if self.front_bn is not None:
                h = self.front_bn(h)
            blocks = h.split(self.d_out, dim=1)
            for k, i in self._front.items():
                outs[k] = blocks[i] if self.front_acts is None else self.front_acts[i](blocks[i])
        for k, i in self._free.items():
            outs[k] = self.free[i](x if outs[k] is None else outs[k])
        if self.pool_bn is not None:
            pools = list(self._pool)
            normed = self.pool_bn(torch.cat([outs[k] for k in pools], dim=1)).split(self.d_out, dim=1)
            for k, y in zip(pools, normed):
                outs[k] = y
        return outs

    @property
    def keeps_width(self) -> bool:
        return self.d_in == self.d_out

    def forward(self, x: torch.Tensor, weights: torch.Tensor, aux_skip_weight: float = 0.0) -> torch.Tensor:
        """``sum_k weights[k] * op_k(x)``, plus ``aux_skip_weight * x`` on a layer that keeps its width (DARTS-'s
        auxiliary skip; see :mod:`~nasiam_hf.search_methods`)."""
        stacked = torch.stack(self.candidate_outputs(x), dim=1)  # (B, K, d_out)
        out = (stacked * weights.to(stacked.dtype).view(1, -1, 1)).sum(dim=1)
        if aux_skip_weight and self.keeps_width:
            out = out + aux_skip_weight * x
        return out

    # -- one candidate at a time (inspection, tests) --------------------------------------------------------------
    @property
    def ops(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
        """One callable per candidate op computing its output alone, from its blocks of the shared parameters."""
        return tuple(functools.partial(self._run_op, k=k) for k in range(len(self.op_names)))

    def _block(self, k_index: int) -> slice:
        return slice(k_index * self.d_out, (k_index + 1) * self.d_out)

    @staticmethod
    def _batch_norm_block(bn: nn.BatchNorm1d, x: torch.Tensor, block: slice) -> torch.Tensor:
        """``bn`` restricted to the features of ``block`` (its running statistics are updated in place when
        training, as the fused forward would)."""
        use_batch = bn.training or bn.running_mean is None
        momentum = 0.0 if bn.momentum is None else bn.momentum
        return F.batch_norm(
            x, None if bn.running_mean is None else bn.running_mean[block],
            None if bn.running_var is None else bn.running_var[block],
            None if bn.weight is None else bn.weight[block], None if bn.bias is None else bn.bias[block],
            use_batch, momentum, bn.eps,
        )

    def _run_op(self, x: torch.Tensor, k: int) -> torch.Tensor:
        h = x
        if k in self._front:
            i = self._front[k]
            block = self._block(i)
            h = F.linear(x, self.front.weight[block], None if self.front.bias is None else self.front.bias[block])
            if self.front_bn is not None:
                h = self.front_acts[i](self._batch_norm_block(self.front_bn, h, block))
        if k in self._free:
            h = self.free[self._free[k]](h)
        if k in self._pool:
            h = self._batch_norm_block(self.pool_bn, h, self._block(self._pool[k]))
        return h

    @torch.no_grad()
    def export_op(self, k: int) -> nn.Module:
        """Candidate ``k`` as the module ``build_op`` builds, holding a copy of its blocks of the shared parameters."""
        module = build_op(self.op_names[k], self.d_in, self.d_out, output=self.is_output)
        module.train(self.training)
        layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d))]
        sources: list[tuple[nn.Module, slice]] = []
        if k in self._front:
            block = self._block(self._front[k])
            sources.append((self.front, block))
            if self.front_bn is not None:
                sources.append((self.front_bn, block))
        if k in self._pool:
            sources.append((self.pool_bn, self._block(self._pool[k])))
        if len(layers) != len(sources):  # pragma: no cover - build_op and this class follow the same rule
            raise RuntimeError(f"op {self.op_names[k]!r}: {len(layers)} layers for {len(sources)} parameter blocks")
        for target, (source, block) in zip(layers, sources):
            for name, tensor in (*target.named_parameters(recurse=False), *target.named_buffers(recurse=False)):
                value = getattr(source, name)
                tensor.copy_(value if value.ndim == 0 else value[block])
        return module


class SearchCell(nn.Module):
    """The searchable head: a chain of mixed layers whose op weights ``alphas`` (layers x ops) are parameters.

    Being an ``nn.Parameter``, ``alphas`` is saved in ``state_dict``, moves with ``.to()`` and is seen by DDP.
    ``aux_skip_weight`` (a float, 0 by default) adds DARTS-'s auxiliary skip to every width-keeping layer; the search
    sets it each step from its schedule, so it is not state to save.
    """

    def __init__(self, ops: Sequence[str], spec: HeadSpec):
        super().__init__()
        self.op_names = [check_op_name(op, where="search space") for op in ops]
        self.layers = nn.ModuleList(
            MixedLayer(self.op_names, d_in, d_out, output=out) for d_in, d_out, out in spec.layer_shapes()
        )
        self.alphas = nn.Parameter(torch.zeros(spec.num_layers, len(self.op_names)))
        self.output = build_output_layer(spec)
        self.aux_skip_weight = 0.0

    def op_weights(self) -> torch.Tensor:
        """Softmax of the alphas per layer (in float32 at least): the weight of every op in every layer."""
        return torch.softmax(self.alphas.to(torch.promote_types(self.alphas.dtype, torch.float32)), dim=-1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The cell on ``x``; ``weights`` (layers x ops) replaces the softmaxed alphas, e.g. to mask an op."""
        weights = (self.op_weights() if weights is None else weights).to(x.dtype)
        for layer, w in zip(self.layers, weights):
            x = layer(x, w, self.aux_skip_weight)
        return x if self.output is None else self.output(x)

    def width_keeping_layers(self) -> list[bool]:
        """Whether each layer keeps its width (where identity is a true skip and DARTS-'s skip applies)."""
        return [layer.keeps_width for layer in self.layers]

    def genotype(self) -> list[str]:
        """The op with the largest alpha in each layer (identity included), as Algorithm 1 derives it."""
        return [self.op_names[i] for i in self.alphas.detach().argmax(dim=-1).tolist()]
