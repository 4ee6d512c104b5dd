"""The siamese objectives (SimSiam, SimCLR, MoCo v2, BYOL, and the redundancy-reduction pair Barlow Twins and VICReg)
and their state (MoCo queue, momentum updates), correct under several processes.

Losses run in float32 (float64 for float64 inputs) whatever the autocast dtype. Anything that changes state (EMA
updates, queue writes) is an explicit call, made by the trainer after a weight step and never during an
architecture step. MoCo v2's key encoder runs through :func:`shuffled_key_encode` (Shuffle-BN / split-BN).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

FRAMEWORKS = ("simsiam", "simclr", "mocov2", "byol", "barlowtwins", "vicreg")

# The redundancy-reduction objectives' constants (Barlow Twins: Zbontar et al. 2021; VICReg: Bardes et al. 2022).
OFF_DIAGONAL_WEIGHT = 5e-3  # Barlow Twins' lambda (the paper; the authors' code passes 0.0051)
CORRELATION_SCALE = 1.0  # a constant factor on the Barlow Twins loss (solo-learn's scale_loss)
STANDARDISE_EPS = 1e-5  # BatchNorm1d's eps: the reference standardises with a non-affine BatchNorm
INVARIANCE_WEIGHT, VARIANCE_WEIGHT, COVARIANCE_WEIGHT = 25.0, 25.0, 1.0
VARIANCE_TARGET, VARIANCE_EPS = 1.0, 1e-4  # VICReg's hinge on the standard deviation, and its eps


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank order) keeping the autograd graph; a no-op on one process."""
    if _world()[1] == 1:
        return x
    return torch.cat(_AllGatherWithGrad.apply(x))


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if _world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def full(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least: losses never run in half precision, and float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _outside_autocast(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run ``loss`` with autocast off. :func:`full` lifts its inputs to float32, but under an active autocast (the
    model's forward runs in one) the matrix products would still run in half precision: bf16 keeps 3 significant
    digits, too few for Barlow Twins' ``1 - C_ii`` or for logits divided by a temperature."""

    @functools.wraps(loss)
    def in_float32(*args, **kwargs):
        tensor = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=tensor.device.type, enabled=False):
            return loss(*args, **kwargs)

    return in_float32


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -cos(p, stopgrad(z)), averaged over the batch (the paper's Eq. 3)."""
    return -F.cosine_similarity(full(p), full(z.detach()), dim=-1).mean()


@_outside_autocast
def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric SimSiam loss (the paper's Eq. 2): in [-1, 1], -1 when predictions match the other view."""
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


@_outside_autocast
def byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetric loss scaled for SGD: ``0.5 (D(p1, t2) + D(p2, t1))`` against the momentum targets, in
    [-1, 1].

    The BYOL paper sums ``2 - 2 cos`` over both directions (in [0, 8]): the same minimiser with 4x the gradient,
    which LARS' per-layer trust ratio absorbs and SGD does not. This is the scale of lightly's CIFAR-10 benchmark
    (SGD), and of SimSiam's loss, so the two frameworks share a learning rate range.
    """
    return 0.5 * (negative_cosine(p1, t2) + negative_cosine(p2, t1))


@_outside_autocast
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the global batch: local queries against the keys of every rank.

    Keys are gathered with their gradient; the positive of local sample ``i`` sits at ``rank * B + i`` of the other
    view's gathered block, so a run on W processes equals one process on the W-times larger batch.
    """
    rank, world = _world()
    batch = z1.shape[0]
    z1, z2 = F.normalize(full(z1), dim=1), F.normalize(full(z2), dim=1)
    keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # (2 * W * B, D)
    queries = torch.cat([z1, z2])  # (2 * B, D)
    logits = queries @ keys.T / temperature
    local = rank * batch + torch.arange(batch, device=z1.device)
    half = world * batch
    self_index = torch.cat([local, local + half])
    positive = torch.cat([local + half, local])
    rows = torch.arange(2 * batch, device=z1.device)
    logits[rows, self_index] = float("-inf")
    return F.cross_entropy(logits, positive)


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: each query against its key (positive) and the queue's keys (negatives); inputs normalised."""
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.T
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@_outside_autocast
def mocov2_loss(q1, q2, k1, k2, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric MoCo v2 loss ``L12 + L21``: each view's query against the other view's momentum key, summed.

    The sum, not the mean, is the symmetric loss of the MoCo CIFAR-10 demo and of the authors' code, trained there
    at lr 0.06 for batch 512 (0.03 per 256): each direction then takes the step the asymmetric reference takes, and
    weight decay is not doubled against it as a mean at twice the lr would.
    """
    q1, q2 = F.normalize(full(q1), dim=1), F.normalize(full(q2), dim=1)
    k1, k2 = F.normalize(full(k1), dim=1), F.normalize(full(k2), dim=1)
    queue = full(queue)
    return info_nce_loss(q1, k2, queue, temperature) + info_nce_loss(q2, k1, queue, temperature)


def standardise(z: torch.Tensor, eps: float = STANDARDISE_EPS) -> torch.Tensor:
    """Every feature centred and scaled over the batch (biased variance, ``eps`` inside the root): what a non-affine
    ``BatchNorm1d`` computes in training mode, without its running statistics."""
    centred = z - z.mean(dim=0)
    return centred / torch.sqrt(centred.pow(2).mean(dim=0) + eps)


def _off_diagonal(square: torch.Tensor) -> torch.Tensor:
    """The matrix with its diagonal set to zero (so sums over it run over the off-diagonal entries only)."""
    eye = torch.eye(square.shape[0], dtype=torch.bool, device=square.device)
    return square.masked_fill(eye, 0.0)


@_outside_autocast
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, off_diagonal_weight: float = OFF_DIAGONAL_WEIGHT,
                      scale: float = CORRELATION_SCALE) -> torch.Tensor:
    """Barlow Twins: ``scale * (sum_i (1 - C_ii)^2 + off_diagonal_weight * sum_{i != j} C_ij^2)``, where ``C`` is the
    (D, D) cross-correlation of the two views' embeddings, each standardised over the batch.

    The batch is the global one: the embeddings of every rank are gathered with their gradient and every rank
    computes the same ``C`` and loss. The gather's backward sums each rank's share of the gradient over the ranks and
    DDP averages it, so W processes take the step of one process on the W-times larger batch (the authors' code
    all-reduces ``C`` outside autograd instead, which leaves the gradient 1/W of that).
    """
    a, b = standardise(gather_with_grad(full(z1))), standardise(gather_with_grad(full(z2)))
    correlation = a.T @ b / a.shape[0]
    on_diagonal = (1.0 - torch.diagonal(correlation)).pow(2).sum()
    off_diagonal = _off_diagonal(correlation).pow(2).sum()
    return scale * (on_diagonal + off_diagonal_weight * off_diagonal)


@_outside_autocast
def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, invariance_weight: float = INVARIANCE_WEIGHT,
                variance_weight: float = VARIANCE_WEIGHT, covariance_weight: float = COVARIANCE_WEIGHT,
                variance_target: float = VARIANCE_TARGET, eps: float = VARIANCE_EPS) -> torch.Tensor:
    """VICReg: ``invariance_weight * I + variance_weight * V + covariance_weight * C``.

    * ``I``: the mean squared difference between the two views' embeddings (over this rank's images and features).
    * ``V``: per view, the mean over features of ``relu(variance_target - sqrt(var + eps))`` (unbiased variance over
      the batch), averaged over the two views.
    * ``C``: per view, the squared off-diagonal entries of the embeddings' covariance matrix (unbiased), summed and
      divided by the dimension, summed over the two views.

    ``V`` and ``C`` use the global batch: the embeddings are gathered with their gradient, as for
    :func:`barlow_twins_loss`. ``I`` is a mean over this rank's images, whose average over the ranks (DDP's) is the
    global mean.
    """
    z1, z2 = full(z1), full(z2)
    invariance = F.mse_loss(z1, z2)
    variance, covariance = z1.new_zeros(()), z1.new_zeros(())
    for z in (gather_with_grad(z1), gather_with_grad(z2)):
        centred = z - z.mean(dim=0)
        std = torch.sqrt(centred.pow(2).sum(dim=0) / (z.shape[0] - 1) + eps)
        variance = variance + F.relu(variance_target - std).mean() / 2
        cov = centred.T @ centred / (z.shape[0] - 1)
        covariance = covariance + _off_diagonal(cov).pow(2).sum() / z.shape[1]
    return invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance


def siamese_loss(framework: str, z1: torch.Tensor, z2: torch.Tensor, *, p1: torch.Tensor | None = None,
                 p2: torch.Tensor | None = None, t1: torch.Tensor | None = None, t2: torch.Tensor | None = None,
                 queue: torch.Tensor | None = None, temperature: float | None = None,
                 **constants: float) -> torch.Tensor:
    """The loss of ``framework`` from projections ``z``, predictions ``p`` and momentum outputs ``t`` of both views.

    One dispatch for every caller (the model's forward, the head-only losses of the search diagnostics):
    SimSiam needs p and z, BYOL p and t, SimCLR z and the temperature, MoCo v2 z, t (the keys), queue and
    temperature, Barlow Twins and VICReg z and their ``constants`` (the keyword arguments of
    :func:`barlow_twins_loss` / :func:`vicreg_loss`; ``NASiamConfig.loss_constants()`` gives them).
    """
    if framework == "simsiam":
        return simsiam_loss(p1, p2, z1, z2)
    if framework == "byol":
        return byol_loss(p1, p2, t1, t2)
    if framework == "simclr":
        return nt_xent_loss(z1, z2, temperature)
    if framework == "mocov2":
        return mocov2_loss(z1, z2, t1, t2, queue, temperature)
    if framework == "barlowtwins":
        return barlow_twins_loss(z1, z2, **constants)
    if framework == "vicreg":
        return vicreg_loss(z1, z2, **constants)
    raise ValueError(f"unknown framework {framework!r}; allowed frameworks: {list(FRAMEWORKS)}")


@torch.no_grad()
def shuffled_key_encode(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                        num_splits: int = 8) -> torch.Tensor:
    """MoCo's key encoder with BatchNorm statistics its query does not share (Shuffle-BN), in input order.

    The global key batch is shuffled and cut into ``num_splits`` BatchNorm groups, so a key and its query are
    normalised over different images: on one process the local batch is split (the SplitBatchNorm of the MoCo
    CIFAR-10 demo, 8 groups to stand for its 8 GPUs); on W processes the shuffle runs over all ranks, as in the
    MoCo reference, and each rank's share is split into ``num_splits // W`` groups (at least one: each rank's own
    BatchNorm is one group). The encoder's BatchNorm layers must be plain per-process BatchNorm, not SyncBatchNorm.
    A group holds at least 2 images (BatchNorm1d in the projector needs 2), so small batches use fewer groups.
    The shuffle draws from torch's global generator of the images' device (saved in every checkpoint, so a resumed
    run draws the same), and the permutation of rank 0 is broadcast.
    """
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    rank, world = _world()
    local = images.shape[0]
    everything = gather_no_grad(images)
    order = torch.randperm(everything.shape[0], device=images.device)
    if world > 1:
        dist.broadcast(order, src=0)
    mine = everything[order[rank * local:(rank + 1) * local]]
    groups = max(1, min(num_splits // world, local // 2))
    keys = torch.cat([encoder(part) for part in mine.tensor_split(groups)])
    keys = gather_no_grad(keys)
    restored = torch.empty_like(keys)
    restored[order] = keys
    return restored[rank * local:(rank + 1) * local]


def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Std over the batch of the l2-normalised outputs, averaged over channels.

    About ``1/sqrt(dim)`` for well-spread outputs and 0 for a collapsed (constant) output, as in the SimSiam paper.
    """
    return F.normalize(full(z.detach()), dim=1).std(dim=0).mean()


class MoCoQueue(nn.Module):
    """A ring buffer of normalised keys; writes take keys from every rank so all ranks hold the same queue."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = F.normalize(gather_no_grad(keys).float(), dim=1)
        size = self.keys.shape[0]
        keys = keys[-size:]
        index = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.keys[index] = keys.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


@torch.no_grad()
def ema_update(online: Iterable[torch.Tensor], target: Iterable[torch.Tensor], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for parameters listed in the same order."""
    online, target = list(online), list(target)
    if len(online) != len(target):
        raise ValueError(f"EMA needs matching parameter lists, got {len(online)} and {len(target)}")
    torch._foreach_lerp_(target, online, 1.0 - momentum)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: ``base`` at the start, rising to 1 at the end along a half cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
