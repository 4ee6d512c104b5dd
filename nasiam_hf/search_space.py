"""The op registry, the paper's search spaces and genotype validation.

An op turns a ``(B, d_in)`` tensor into a ``(B, d_out)`` tensor. Every op is built through one function,
:func:`build_op`, so that the width and BatchNorm rule below is written exactly once:

* **Linear ops** (``linear_<act>``): ``Linear(d_in, d_out, bias=False) -> BatchNorm1d(d_out) -> act``.
* **Parameter-free ops** (pools, identity): when ``d_in != d_out`` a width adapter
  ``Linear(d_in, d_out, bias=False) -> BatchNorm1d -> ReLU`` runs first. A pool is then a 1-D pool with kernel 3,
  stride 1 and padding 1 along the feature axis (the length is kept) followed by ``BatchNorm1d``; identity adds nothing.
* **Output layer** (``output=True``, the last layer of the predictor and of SimCLR's projector): no BatchNorm and no
  activation anywhere in the op. A linear op becomes ``Linear(d_in, d_out, bias=True)``; a parameter-free op gets a
  plain ``Linear(d_in, d_out, bias=True)`` adapter when the widths differ and its pool runs without BatchNorm.

This follows the paper (BN after every linear and pooling op except the predictor's output layer) and generalises
the official code, whose widening linear layers were BN-free only by accident of their width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class OpSpec:
    """How to build one op: a linear op carries an activation factory, a parameter-free op a module factory."""

    name: str
    activation: Callable[[], nn.Module] | None = None
    parameter_free: Callable[[], nn.Module] | None = None
    pool: bool = False

    @property
    def is_linear(self) -> bool:
        return self.activation is not None


class FeaturePool1d(nn.Module):
    """A kernel-3, stride-1, padding-1 pool along the feature axis of a ``(B, D)`` tensor; the width is kept."""

    def __init__(self, mode: str):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"pool mode must be 'max' or 'avg', got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.max_pool1d if self.mode == "max" else F.avg_pool1d
        return pool(x.unsqueeze(1), kernel_size=3, stride=1, padding=1).squeeze(1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, kernel_size=3, stride=1, padding=1"


OPS: dict[str, OpSpec] = {}


def register_op(
    name: str,
    *,
    activation: Callable[[], nn.Module] | None = None,
    module: Callable[[], nn.Module] | None = None,
    pool: bool = False,
    overwrite: bool = False,
) -> OpSpec:
    """Register an op by name so genotypes and search spaces can use it.

    Pass ``activation`` (a factory such as ``nn.Mish``) for a ``Linear + BN + activation`` op, or ``module`` for a
    parameter-free op that keeps the width (``pool=True`` puts a BatchNorm after it, like the paper's pools).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an op name must be a non-empty string, got {name!r}")
    if (activation is None) == (module is None):
        raise ValueError(f"register_op({name!r}) needs exactly one of activation= or module=")
    if name in OPS and not overwrite:
        raise ValueError(f"op {name!r} is already registered; pass overwrite=True to replace it")
    spec = OpSpec(name=name, activation=activation, parameter_free=module, pool=pool)
    OPS[name] = spec
    return spec


register_op("max_pool_3x3", module=lambda: FeaturePool1d("max"), pool=True)
register_op("avg_pool_3x3", module=lambda: FeaturePool1d("avg"), pool=True)
register_op("identity", module=nn.Identity)
register_op("linear_relu", activation=nn.ReLU)
register_op("linear_silu", activation=nn.SiLU)
register_op("linear_hardswish", activation=nn.Hardswish)
register_op("linear_elu", activation=nn.ELU)
# Extra activations outside the paper's spaces, ready for a custom search space such as "S,linear_mish".
register_op("linear_mish", activation=nn.Mish)
register_op("linear_gelu", activation=nn.GELU)

IDENTITY = "identity"

SEARCH_SPACES: dict[str, tuple[str, ...]] = {
    # The paper's space S, in the order the official genotype files index it.
    "S": (
        "max_pool_3x3",
        "avg_pool_3x3",
        "identity",
        "linear_relu",
        "linear_silu",
        "linear_hardswish",
        "linear_elu",
    ),
    # The ablation S' of Table I: S without the two pools.
    "S_no_pool": ("identity", "linear_relu", "linear_silu", "linear_hardswish", "linear_elu"),
}


def register_search_space(name: str, ops: Sequence[str], overwrite: bool = False) -> tuple[str, ...]:
    """Register a named list of ops (each already registered) as a search space."""
    if name in SEARCH_SPACES and not overwrite:
        raise ValueError(f"search space {name!r} is already registered; pass overwrite=True to replace it")
    resolved = tuple(ops)
    for op in resolved:
        check_op_name(op, where=f"search space {name!r}")
    SEARCH_SPACES[name] = resolved
    return resolved


def resolve_search_space(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Turn a search-space spec into its ordered op names.

    ``spec`` is a registered space name (``"S"``), a comma-separated mix of space and op names
    (``"S,linear_mish"``: S plus Mish), or a list of op names. Duplicates are dropped, order is kept.
    """
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    ops: list[str] = []
    for part in parts:
        if part in SEARCH_SPACES:
            ops.extend(SEARCH_SPACES[part])
        elif part in OPS:
            ops.append(part)
        else:
            raise ValueError(
                f"unknown search space or op {part!r} in search space {spec!r}; "
                f"registered spaces: {sorted(SEARCH_SPACES)}, registered ops: {sorted(OPS)}"
            )
    ops = list(dict.fromkeys(ops))
    if len(ops) < 2:
        raise ValueError(f"search space {spec!r} must hold at least two ops, got {ops}")
    return tuple(ops)


def check_op_name(op: object, where: str) -> str:
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"unknown op {op!r} in {where}; allowed ops: {sorted(OPS)} (add one with register_op)")
    return op


def validate_genotype(genotype: object, num_layers: int | None, cell: str) -> list[str]:
    """Check a genotype (a list of op names) against the registry and, if given, the cell's layer count."""
    if isinstance(genotype, (str, bytes)) or not isinstance(genotype, Sequence):
        raise ValueError(f"{cell}_genotype must be a list of op names, got {genotype!r}")
    ops = [check_op_name(op, where=f"{cell}_genotype {list(genotype)!r}") for op in genotype]
    if num_layers is not None and len(ops) != num_layers:
        raise ValueError(
            f"{cell}_genotype has {len(ops)} ops ({ops}) but {cell}_layers is {num_layers}; "
            f"pass a genotype of {num_layers} ops or set {cell}_layers={len(ops)}"
        )
    return ops


def has_width_adapter(name: str, d_in: int, d_out: int) -> bool:
    """Whether op ``name`` between these widths starts with a Linear width adapter (a parameter-free op that changes
    the width)."""
    return d_in != d_out and not OPS[check_op_name(name, where="has_width_adapter")].is_linear


def build_op(name: str, d_in: int, d_out: int, output: bool = False) -> nn.Module:
    """Build op ``name`` mapping ``(B, d_in) -> (B, d_out)``, following the module docstring's single rule."""
    spec = OPS[check_op_name(name, where="build_op")]
    if spec.is_linear:
        if output:
            return nn.Linear(d_in, d_out, bias=True)
        return nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), spec.activation())
    layers: list[nn.Module] = []
    if has_width_adapter(name, d_in, d_out):
        if output:
            layers.append(nn.Linear(d_in, d_out, bias=True))
        else:
            layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU()]
    op = spec.parameter_free()
    if not isinstance(op, nn.Identity):
        layers.append(op)
    if spec.pool and not output:
        layers.append(nn.BatchNorm1d(d_out))
    if not layers:
        return nn.Identity()
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def is_parameter_free(name: str) -> bool:
    """Whether op ``name`` has no weights of its own where the width is kept (identity, the pools)."""
    return not OPS[check_op_name(name, where="is_parameter_free")].is_linear


def _width_kept_ops(genotype: Sequence[str], widths: Sequence[int]) -> list[str]:
    return [op for op, d_in, d_out in zip(genotype, widths[:-1], widths[1:]) if d_in == d_out]


def identity_share(genotype: Sequence[str], widths: Sequence[int]) -> float:
    """Share of identity ops over the layers that keep their width (a width-changing identity is not a skip)."""
    kept = _width_kept_ops(genotype, widths)
    return sum(op == IDENTITY for op in kept) / len(kept) if kept else 0.0


def parameter_free_share(genotype: Sequence[str], widths: Sequence[int]) -> float:
    """Share of parameter-free ops (identity, pools) over the layers that keep their width: DARTS' collapse
    measure. Where the width changes a parameter-free op carries a Linear adapter, so it is not counted."""
    kept = _width_kept_ops(genotype, widths)
    return sum(is_parameter_free(op) for op in kept) / len(kept) if kept else 0.0


@dataclass
class Genotype:
    """The searched architecture: one op name per layer of the projector cell and, where used, the predictor cell."""

    projector: list[str]
    predictor: list[str] | None = None

    def to_dict(self) -> dict[str, list[str] | None]:
        predictor = None if self.predictor is None else list(self.predictor)
        return {"projector": list(self.projector), "predictor": predictor}

    @classmethod
    def from_dict(cls, data: dict) -> "Genotype":
        """Build from parsed JSON, checking every op name (genotypes are data, never code)."""
        if not isinstance(data, dict) or "projector" not in data:
            raise ValueError(f"a genotype must be a JSON object with a 'projector' list, got {data!r}")
        projector = validate_genotype(data["projector"], None, "projector")
        predictor = data.get("predictor")
        if predictor is not None:
            predictor = validate_genotype(predictor, None, "predictor")
        return cls(projector=projector, predictor=predictor)
