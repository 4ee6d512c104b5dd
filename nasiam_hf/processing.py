"""The image processor saved beside every NASiam model, so ``AutoImageProcessor`` and pipelines prepare images the way
the model saw them at evaluation time.

No processor class of our own: transformers' ``BitImageProcessor`` (a ResNet-family processor: resize of the shortest
edge, center crop, rescale to [0, 1], normalise, RGB conversion) does what :func:`nasiam_hf.data.build_transform` does
for its ``"eval"`` kind, and every transformers version knows it, so a folder loads with
``AutoImageProcessor.from_pretrained`` without ``trust_remote_code``:

* ``"cifar"`` policy: shortest edge to ``image_size``, center crop ``image_size`` (a square image is only resized,
  nothing is cropped; a CIFAR image at its native size goes through untouched);
* ``"imagenet"`` policy: shortest edge to ``int(image_size / 0.875)`` (256 for 224), center crop ``image_size``.

Both use bilinear resampling, like ``torchvision.transforms.v2.Resize``'s default. Pretrained backbone weights bring
their own preprocessing (:class:`~nasiam_hf.backbone_weights.Preprocessing`: timm's ``pretrained_cfg``, torchvision's
weights transforms, a folder's ``preprocessor_config.json``), which :func:`image_processor_for_preprocessing` turns
into the processor, with any value the user sets instead. Two small differences remain:
the processor resizes a tensor where the data pipeline resizes a PIL image (antialiased both ways; values differ by
about one grey level), and when the crop leaves an odd margin its offset rounds down where torchvision rounds to
nearest (a one-pixel shift). At the native size (CIFAR at 32x32) both give the same tensor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .data.transforms import NORMALIZATION, resize_edge

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BitImageProcessor

    from .backbone_weights import Preprocessing
    from .configuration_nasiam import NASiamConfig
    from .data.splits import ImageSplits

# Statistics used when nothing better is known (e.g. a model converted from a torchvision state dict).
DEFAULT_STATS = {"cifar": NORMALIZATION["cifar10"], "imagenet": NORMALIZATION["imagenet"]}
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image codes


def build_image_processor(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    policy: str = "cifar",
    resize_size: int | None = None,
    resample: str = "bilinear",
) -> "BitImageProcessor":
    """A ``BitImageProcessor`` reproducing the ``"eval"`` transform of :mod:`nasiam_hf.data` for ``policy``
    (``resize_size``, the shorter side before the centre crop, and ``resample`` override the policy's).

    Save it with ``.save_pretrained(model_folder)`` (writes ``preprocessor_config.json``).
    """
    from transformers import BitImageProcessor

    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if resize_size is not None and (not isinstance(resize_size, int) or resize_size < image_size):
        raise ValueError(f"resize_size must be an integer of at least image_size ({image_size}), got {resize_size!r}")
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean and std must have the same non-zero length, got {mean} and {std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": resize_size if resize_size is not None else resize_edge(image_size, policy)},
        resample=RESAMPLE[resample],
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


def image_processor_for_preprocessing(preprocessing: "Preprocessing", image_size: int | None = None,
                                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                                      ) -> "BitImageProcessor":
    """The processor of pretrained weights' preprocessing (``BackboneInit.preprocessing``); ``image_size``, ``mean``
    and ``std`` replace the weights' values when given (a model trained at another resolution keeps the weights'
    crop ratio)."""
    size = image_size if image_size is not None else preprocessing.image_size
    resize = max(size, round(size * preprocessing.resize_size / preprocessing.image_size))
    return build_image_processor(size, mean if mean is not None else preprocessing.mean,
                                 std if std is not None else preprocessing.std, resize_size=resize,
                                 resample=preprocessing.interpolation if preprocessing.interpolation in RESAMPLE
                                 else "bilinear")


def image_processor_for_splits(splits: "ImageSplits") -> "BitImageProcessor":
    """The processor of a dataset loaded with :func:`nasiam_hf.data.load_image_splits` (its size, stats, policy)."""
    return build_image_processor(splits.image_size, splits.mean, splits.std, splits.policy)


def image_processor_for_config(config: "NASiamConfig", mean: Sequence[float] | None = None,
                               std: Sequence[float] | None = None) -> "BitImageProcessor":
    """A processor from a config alone: policy from the stem for torchvision ResNets (CIFAR stem -> ``"cifar"``),
    from the image size for other backbones (as the data layer decides: above 64 px ``"imagenet"``), CIFAR-10 or
    ImageNet stats unless ``mean``/``std`` are given."""
    if config.backbone_kind == "torchvision":
        policy = "cifar" if config.cifar_stem else "imagenet"
    else:
        policy = "imagenet" if config.image_size > 64 else "cifar"
    default_mean, default_std = DEFAULT_STATS[policy]
    return build_image_processor(config.image_size, mean or default_mean, std or default_std, policy)


def save_image_processor(folder: str | os.PathLike, splits: "ImageSplits") -> Path:
    """Write the dataset's processor into a model folder; returns the path of ``preprocessor_config.json``."""
    image_processor_for_splits(splits).save_pretrained(folder)
    return Path(folder) / "preprocessor_config.json"


def apply_preprocessing(splits: "ImageSplits", preprocessing: "Preprocessing | None" = None,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                        ) -> tuple["ImageSplits", "BitImageProcessor", str | None]:
    """The data statistics and the saved image processor of a run: ``mean``/``std`` when the user gave them, else
    those of the pretrained weights' ``preprocessing`` (timm's ``pretrained_cfg``, torchvision's transforms, a
    folder's processor), else the dataset's. Returns the splits with those statistics (so the views are normalised
    as the weights expect), the processor to save, and a line saying what was chosen (None: the dataset's)."""
    import dataclasses

    chosen_mean = mean if mean is not None else (preprocessing.mean if preprocessing else None)
    chosen_std = std if std is not None else (preprocessing.std if preprocessing else None)
    note = None
    if chosen_mean is not None or chosen_std is not None:
        splits = dataclasses.replace(splits, mean=tuple(chosen_mean or splits.mean),
                                     std=tuple(chosen_std or splits.std))
        where = "--image_mean/--image_std" if mean is not None or std is not None else preprocessing.source
        note = f"normalisation mean {list(splits.mean)}, std {list(splits.std)} ({where})"
    if preprocessing is not None:
        processor = image_processor_for_preprocessing(preprocessing, splits.image_size, splits.mean, splits.std)
    else:
        processor = image_processor_for_splits(splits)
    return splits, processor, note


__all__ = [
    "apply_preprocessing",
    "DEFAULT_STATS",
    "build_image_processor",
    "image_processor_for_config",
    "image_processor_for_preprocessing",
    "image_processor_for_splits",
    "save_image_processor",
]
