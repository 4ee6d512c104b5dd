"""What an image becomes before the model: the CIFAR / ImageNet policies, their statistics, the torchvision v2
pipelines, the decode-only transform of on-device augmentation, and the choice of the training image size."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Computed once with `sources.demo_splits()`: per-channel mean/std of the 1,497 train images after the 32x32 RGB
    # upscaling, pixels scaled to [0, 1] (numpy over all pixels: mean 0.30567, std 0.32356; grey, so equal channels).
    "demo": ((0.3057, 0.3057, 0.3057), (0.3236, 0.3236, 0.3236)),
}

POLICIES = ("cifar", "imagenet")
POLICY_SIZES = {"cifar": 32, "imagenet": 224}
# Images whose median longest side is at most this many pixels follow the CIFAR policy, larger ones ImageNet's.
CIFAR_MAX_SIDE = 64
IMAGENET_CROP_RATIO = 0.875  # evaluation crop / resized side (224 / 256)
TRANSFORM_KINDS = ("ssl", "light", "eval")


def blur_kernel_size(image_size: int) -> int:
    """About 10 % of the image side, odd (23 at 224), as in SimCLR/MoCo v2/SimSiam."""
    kernel = max(3, int(0.1 * image_size))
    return kernel if kernel % 2 else kernel + 1


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; expected one of {POLICIES}.")


def resize_edge(image_size: int, policy: str) -> int:
    """The shorter side an image is resized to before the evaluation centre crop: ``image_size`` for the CIFAR
    policy, ``int(image_size / 0.875)`` (256 at 224) for ImageNet."""
    _check_policy(policy)
    return int(image_size) if policy == "cifar" else int(image_size / IMAGENET_CROP_RATIO)


def build_transform(
    kind: str, policy: str, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable:
    """torchvision v2 pipeline from an RGB PIL image to a normalised float32 (3, S, S) tensor.

    kind: "ssl" (strong SimSiam/MoCo v2 augmentation; ImageNet adds blur), "light" (linear-probe training: crop +
    flip) or "eval" (deterministic: resize/center-crop only). policy: "cifar" or "imagenet".
    """
    from torchvision.transforms import v2

    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"Unknown transform kind {kind!r}; expected one of {TRANSFORM_KINDS}.")
    _check_policy(policy)
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if kind == "eval":  # CIFAR: no-ops at the native size, square output otherwise
        steps = [v2.Resize(resize_edge(image_size, policy)), v2.CenterCrop(image_size)]
    elif kind == "light":
        if policy == "cifar":
            steps = [v2.Resize(image_size), v2.CenterCrop(image_size), v2.RandomCrop(image_size, padding=4)]
        else:
            steps = [v2.RandomResizedCrop(image_size)]
        steps.append(v2.RandomHorizontalFlip())
    else:
        steps = [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if policy == "imagenet":
            steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5))
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + to_tensor)


def decode_size(policy: str, image_size: int) -> int:
    """Side of the square uint8 images served for on-device augmentation: the crop size for the CIFAR policy (the
    native size of CIFAR itself), ``image_size / 0.875`` (256 at 224) for ImageNet, where the random crop to
    ``image_size`` then happens on the device."""
    _check_policy(policy)
    return int(image_size) if policy == "cifar" else int(round(image_size / IMAGENET_CROP_RATIO))


def build_decode_transform(policy: str, image_size: int) -> Callable:
    """RGB PIL image -> uint8 ``(3, S, S)`` tensor, ``S = decode_size(policy, image_size)``: resize the shorter side
    to ``S`` (antialiased), centre-crop. Deterministic: the random views are drawn later, on the device
    (:class:`~nasiam_hf.data.augment.BatchAugmenter`)."""
    from torchvision.transforms import v2

    size = decode_size(policy, image_size)
    return v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.PILToTensor()])


# --------------------------------------------------------------------------------------------------------------------
# Image size and policy
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeChoice:
    """The training image size, its policy and statistics, and why (``note`` is the line the commands print)."""

    image_size: int
    policy: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    reason: str

    @property
    def note(self) -> str:
        name = "CIFAR" if self.policy == "cifar" else "ImageNet"
        return f"image size {self.image_size} ({name} policy): {self.reason}"


def choose_image_size(image_size: int | None, known: str | None, sampled_sides: Sequence[int]) -> SizeChoice:
    """Size, policy and statistics of a dataset.

    A known dataset keeps its size (CIFAR 32, ImageNet 224) and statistics. Otherwise the policy comes from the
    median longest side of ``sampled_sides`` (a seeded sample of images, never one row): at most
    :data:`CIFAR_MAX_SIDE` px -> CIFAR policy, else ImageNet; the size is ``image_size`` when given, else the
    policy's default (:data:`POLICY_SIZES`). A given size above 64 px always follows the ImageNet policy.
    """
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size or image_size <= 0):
        raise ValueError(f"--image_size must be a positive integer, got {image_size!r}.")
    median = statistics.median(sampled_sides) if sampled_sides else None
    seen = (f"median longest side of {len(sampled_sides)} sampled images is {median:g} px"
            if median is not None else "no image sampled")
    if known is not None:
        policy = "imagenet" if known == "imagenet" else "cifar"
        reason = f"known dataset {known!r}"
    elif image_size is not None:
        policy = "imagenet" if image_size > CIFAR_MAX_SIDE else "cifar"
        reason = f"--image_size {image_size} given ({seen})"
    elif median is None:
        raise ValueError("Cannot choose an image size without a sampled image: pass --image_size.")
    else:
        policy = "cifar" if median <= CIFAR_MAX_SIDE else "imagenet"
        reason = seen
    if image_size is None:
        size = POLICY_SIZES[policy]
    else:
        size = int(image_size)
        policy = "imagenet" if known == "imagenet" or size > CIFAR_MAX_SIDE else "cifar"
    stats_key = known if known in NORMALIZATION else ("imagenet" if policy == "imagenet" else "cifar10")
    mean, std = NORMALIZATION[stats_key]
    return SizeChoice(image_size=size, policy=policy, mean=mean, std=std, reason=reason)


__all__ = [
    "CIFAR_MAX_SIDE",
    "IMAGENET_CROP_RATIO",
    "NORMALIZATION",
    "POLICIES",
    "POLICY_SIZES",
    "TRANSFORM_KINDS",
    "SizeChoice",
    "blur_kernel_size",
    "build_decode_transform",
    "build_transform",
    "choose_image_size",
    "decode_size",
    "resize_edge",
]
