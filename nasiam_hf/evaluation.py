"""Evaluation of frozen backbone features: feature extraction and the weighted kNN monitor (the linear probe is
:mod:`nasiam_hf.linear_probe`).

Loaders given to these functions yield dict batches with ``pixel_values`` ``(B, 3, H, W)`` and ``labels`` ``(B,)``
(other keys are ignored). Under several processes pass loaders that went through ``accelerator.prepare``: each rank
then encodes its own shard and :func:`extract_features` reassembles the full set, in loader order, with
``accelerator.gather_for_metrics`` (which also drops the samples duplicated to even out the last batch). Every rank
therefore holds the same features, computes the same kNN scores and, on cached features, trains the same probe
(the probe's shuffling and initialisation are seeded), so no further synchronisation is needed.

* :func:`extract_features`, :func:`knn_predict`, :func:`knn_accuracy`, :func:`evaluate_knn`: the kNN monitor of
  InstDisc / SimSiam (k 200, temperature 0.2, cosine similarity, memory = un-augmented training images).
* :func:`binomial_stderr`, :func:`wilson_interval`, :func:`describe_accuracy`, :func:`few_queries_warning`: every
  accuracy comes with its error and the number of images it was measured on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

MIN_QUERIES = 200  # below this, one image moves a top-1 by half a point or more: the figure is flagged
MORE_QUERIES_FLAGS = ("a larger labelled evaluation set (--validation_file / --validation_dir, or --eval_split), and "
                      "no or a larger --max_eval_samples")


# --------------------------------------------------------------------------------------------------------------------
# the error of an accuracy
# --------------------------------------------------------------------------------------------------------------------


def binomial_stderr(percent: float, n: int) -> float:
    """The standard error of an accuracy of ``percent`` % over ``n`` independent queries, in points:
    ``100 sqrt(p (1 - p) / n)``."""
    if n <= 0:
        return float("nan")
    p = min(max(float(percent) / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def wilson_interval(percent: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy, in percent (sound at 0 % and 100 %, where the standard error
    is 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = min(max(float(percent) / 100.0, 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def with_error(result: dict, n: int) -> dict:
    """``result`` (with ``top1`` in %) plus ``num_queries``, ``top1_stderr`` and ``top1_ci95``."""
    low, high = wilson_interval(result["top1"], n)
    return {**result, "num_queries": int(n), "top1_stderr": binomial_stderr(result["top1"], n),
            "top1_ci95": [low, high]}


def describe_accuracy(percent: float, n: int) -> str:
    """``"30.00% ± 10.25 (95 % CI 14.5-51.9, 20 queries)"``: the figure, its standard error, its interval."""
    low, high = wilson_interval(percent, n)
    return (f"{percent:.2f}% ± {binomial_stderr(percent, n):.2f} (95 % CI {low:.1f}-{high:.1f}, {n} "
            f"{'query' if n == 1 else 'queries'})")


def few_queries_warning(n: int, what: str, max_eval_samples: int | None = None) -> str | None:
    """A warning when ``what`` is measured on fewer than :data:`MIN_QUERIES` images, naming the flags for more."""
    if n >= MIN_QUERIES:
        return None
    cap = f" (--max_eval_samples {max_eval_samples} keeps only that many)" if max_eval_samples else ""
    return (f"warning: {what}: measured on {n} images only: one image moves it by {100.0 / max(n, 1):.2f} points "
            f"and its standard error is up to {binomial_stderr(50.0, n):.1f} points. For a figure that separates "
            f"runs, give at least {MIN_QUERIES}: {MORE_QUERIES_FLAGS}{cap}")


# --------------------------------------------------------------------------------------------------------------------
# feature extraction
# --------------------------------------------------------------------------------------------------------------------


def _features_of(output) -> torch.Tensor:
    """The ``(B, C)`` feature tensor of an encoder output (a tensor or a ModelOutput with ``pooler_output``)."""
    if isinstance(output, torch.Tensor):
        features = output
    elif getattr(output, "pooler_output", None) is not None:
        features = output.pooler_output
    else:
        raise TypeError(
            f"the encoder must return a (B, C) tensor or an output with `pooler_output`, got {type(output).__name__}"
        )
    if features.ndim != 2:
        raise ValueError(f"expected (B, C) features from the encoder, got shape {tuple(features.shape)}")
    return features


@torch.no_grad()
def extract_features(
    encoder: Callable,
    loader: Iterable,
    accelerator,
    normalize: bool = False,
    desc: str = "extracting features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image of ``loader`` with ``encoder`` in eval mode; return ``(features, labels)`` on the CPU.

    Features are float32 ``(N, C)`` (l2-normalised when ``normalize``), labels long ``(N,)``, both in loader order and
    gathered from all ranks with ``accelerator.gather_for_metrics``. The encoder runs under ``accelerator.autocast()``
    (so bf16 runs work) and gets its previous train/eval mode back afterwards.
    """
    was_training = getattr(encoder, "training", None)
    if was_training is not None:
        encoder.eval()
    all_features, all_labels = [], []
    try:
        for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
            pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            labels = batch["labels"].to(accelerator.device, non_blocking=True)
            with accelerator.autocast():
                features = _features_of(encoder(pixel_values))
            features = features.float()
            features, labels = accelerator.gather_for_metrics((features.contiguous(), labels.contiguous()))
            all_features.append(features.cpu())
            all_labels.append(labels.cpu())
    finally:
        if was_training is not None:
            encoder.train(was_training)
    if not all_features:
        raise ValueError("the loader yielded no batches")
    features = torch.cat(all_features).float()
    if normalize:
        features = F.normalize(features, dim=1)
    return features, torch.cat(all_labels).long()


# --------------------------------------------------------------------------------------------------------------------
# kNN monitor
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_predict(
    memory_features: torch.Tensor,
    memory_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.2,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores ``(Q, num_classes)`` of the query features against a memory bank.

    Features are l2-normalised here; each query takes its ``k`` most cosine-similar memory entries (``k`` is capped
    at the memory size), weights each by ``exp(similarity / temperature)`` and sums the weights per neighbour label.
    Queries are processed ``chunk_size`` at a time so the similarity matrix never exceeds ``chunk_size x N``.
    """
    if memory_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError("memory_features and query_features must be 2-D (N, C) tensors")
    if memory_features.shape[0] != memory_labels.shape[0]:
        raise ValueError(
            f"{memory_features.shape[0]} memory features but {memory_labels.shape[0]} memory labels"
        )
    if memory_features.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError("k and chunk_size must be >= 1 and temperature > 0")
    device = memory_features.device
    memory = F.normalize(memory_features.float(), dim=1)
    labels = memory_labels.to(device).long()
    k = min(k, memory.shape[0])
    out = []
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].to(device).float(), dim=1)
        sim, idx = (query @ memory.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        scores = torch.zeros(query.shape[0], num_classes, device=device)
        scores.scatter_add_(1, labels[idx], weights)
        out.append(scores)
    if not out:
        return torch.zeros(0, num_classes, device=query_features.device)
    return torch.cat(out).to(query_features.device)


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy in percent, with the number of queries and the
    top-1's standard error and 95 % interval (:func:`with_error`)."""
    labels = labels.to(scores.device)
    n = max(labels.shape[0], 1)
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    result = {"top1": 100.0 * hits[:, 0].sum().item() / n}
    if scores.shape[1] >= 5:
        result["top5"] = 100.0 * hits.any(dim=1).sum().item() / n
    return with_error(result, int(labels.shape[0]))


class KNNNeighbourhoodWarning(UserWarning):
    """The kNN vote is dominated by the memory's largest classes (k capped, or k above the average class size)."""


def knn_neighbourhood(k: int, memory_labels: torch.Tensor) -> tuple[int, str | None]:
    """The ``k`` the vote really uses (at most the memory size) and, when the result would mislead, why.

    The rule: warn when ``k`` exceeds the average number of memory images per class present. Each query's ``k``
    neighbours must then come from more than one class whatever the features, so the weighted vote leans towards the
    largest classes; when ``k`` reaches the memory size every query gets the same neighbours and the majority class.
    """
    size = int(memory_labels.shape[0])
    used = min(k, size)
    classes = int(torch.unique(memory_labels).numel())
    per_class = size / max(classes, 1)
    notes = []
    if used < k:
        notes.append(f"--knn_k {k} is more than the {size} memory images: the vote uses k={used}")
    if used > per_class:
        notes.append(
            f"k={used} is above the average class size of the memory ({per_class:.1f} images: {size} over "
            f"{classes} classes), so every neighbourhood reaches into other classes and the vote leans to the largest "
            f"ones; use a larger memory or --knn_k {max(1, int(per_class))} or less"
        )
    return used, ("kNN monitor: " + "; ".join(notes)) if notes else None


def knn_accuracy(
    memory_features: torch.Tensor,
    memory_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.2,
    chunk_size: int = 1024,
    warn: bool = True,
) -> dict[str, float]:
    """``{"top1": %, "top5": %, "k": k used, "num_queries", "top1_stderr", "top1_ci95"}`` of :func:`knn_predict`
    (``top5`` only when ``num_classes >= 5``).

    ``k`` in the result is the number of neighbours actually voting (:func:`knn_neighbourhood`); with ``warn`` a
    :class:`KNNNeighbourhoodWarning` says when it was capped or is a large share of the memory.
    """
    used, note = knn_neighbourhood(k, memory_labels)
    if note is not None and warn:
        warnings.warn(note, KNNNeighbourhoodWarning, stacklevel=2)
    scores = knn_predict(memory_features, memory_labels, query_features, num_classes, used, temperature, chunk_size)
    return {**_topk_accuracy(scores, query_labels), "k": used}


def evaluate_knn(
    encoder: Callable,
    memory_loader: Iterable,
    query_loader: Iterable,
    accelerator,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.2,
) -> dict[str, float]:
    """kNN accuracy of ``encoder``'s features: extract (l2-normalised) memory and query features, then vote.

    ``memory_loader`` must yield the *un-augmented* training images (test-time transform: resize/crop and
    normalisation only), as in the InstDisc/SimSiam monitor; ``query_loader`` yields the evaluation images.
    Every rank returns the same numbers (``k`` included: the neighbours actually voting); the main process warns
    when they mislead (:func:`knn_neighbourhood`).
    """
    memory, memory_labels = extract_features(encoder, memory_loader, accelerator, normalize=True, desc="kNN memory")
    query, query_labels = extract_features(encoder, query_loader, accelerator, normalize=True, desc="kNN queries")
    return knn_accuracy(memory, memory_labels, query, query_labels, num_classes, k, temperature,
                        warn=accelerator.is_main_process)


__all__ = [
    "KNNNeighbourhoodWarning",
    "MIN_QUERIES",
    "binomial_stderr",
    "describe_accuracy",
    "few_queries_warning",
    "with_error",
    "wilson_interval",
    "evaluate_knn",
    "extract_features",
    "knn_accuracy",
    "knn_neighbourhood",
    "knn_predict",
]
