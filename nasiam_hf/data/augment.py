"""Random two-view augmentation of whole uint8 batches on the accelerator, seeded per sample.

The per-image path (:func:`~.transforms.build_transform` inside :class:`~.views.ViewDataset`) runs torchvision v2 on
one PIL image at a time in the data loader. Here the loader only decodes (``ViewDataset(mode="decode")`` serves uint8
``(B, 3, S, S)`` images with their ``index`` and ``epoch``) and :class:`BatchAugmenter` draws the views for the whole
batch at once, on whatever device the batch is on, with plain vectorised torch code (no kornia).

Randomness. Every random number of a view is a counter-based hash of ``(seed, epoch, index, view, draw)`` computed
on the device (:func:`uniforms`): no generator state, no host round-trip, and a sample's views depend on nothing
but those integers, so they are identical whatever batch, rank or worker the sample lands in, and a resumed run
draws exactly the views the uninterrupted one would have. The numbers differ from the per-image path's draws (that
path seeds torch's CPU generator with :func:`~.views.view_seed`), so the two paths give different views of the same
distribution, not the same views.

The "ssl" policy follows ``build_transform("ssl", ...)`` step by step, per sample:

1. RandomResizedCrop(scale (0.2, 1.0), ratio (3/4, 4/3)) with torchvision's sampling rule (10 tries of area and
   log-ratio, else a central crop), resampled with ``torchvision.ops.roi_align`` (bilinear; when the crop is larger
   than the output it averages several samples per output pixel, like antialiased resizing).
2. ColorJitter(0.4, 0.4, 0.4, 0.1) with probability 0.8: brightness, contrast, saturation and hue factors drawn
   per sample and applied in a random order drawn per sample (torchvision draws one order per call, i.e. per image).
3. RandomGrayscale(p=0.2), luma weights (0.299, 0.587, 0.114).
4. ImageNet policy only: GaussianBlur(kernel ``blur_kernel_size(size)``, sigma in [0.1, 2.0]) with probability 0.5,
   reflect padding.
5. Horizontal flip with probability 0.5, then normalisation with the dataset mean/std.

Known differences from the per-image path, all small: the colour ops run on float images in [0, 1] and quantise
only once at the end (PIL rounds to uint8 after every op and implements hue/contrast slightly differently); the crop
is taken from the decoded square (CIFAR: the image resized to ``image_size``, its native size for CIFAR itself;
ImageNet: the shorter side resized to ``image_size / 0.875`` = 256 and centre-cropped to 256x256) instead of the
full, possibly non-square image; the resampling filter is roi_align's bilinear average rather than PIL's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from .transforms import POLICIES, TRANSFORM_KINDS, blur_kernel_size, decode_size
from .views import view_key

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

# Draw slots of one view: every random quantity has a fixed slot, so adding a step never shifts the others.
CROP_TRIES = 10
_CROP = 0  # 4 per try: area, log-ratio, top, left
_FLIP = _CROP + 4 * CROP_TRIES
_JITTER_APPLY = _FLIP + 1
_JITTER_FACTORS = _JITTER_APPLY + 1  # brightness, contrast, saturation, hue
_JITTER_ORDER = _JITTER_FACTORS + 4  # 4 keys whose argsort is the order
_GRAY = _JITTER_ORDER + 4
_BLUR_APPLY = _GRAY + 1
_BLUR_SIGMA = _BLUR_APPLY + 1
NUM_DRAWS = _BLUR_SIGMA + 1


# ---------------------------------------------------------------------------------------------------------------------
# Counter-based random numbers
# ---------------------------------------------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) and ``c < 2**32``, without overflowing int64."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + (((high * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2**32) whose output bits all depend on every input bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_ints(*values: torch.Tensor | int, device: torch.device | str | None = None) -> torch.Tensor:
    """A 32-bit hash (int64 tensor) of a tuple of integers (tensors broadcast together; each value's 64 bits count)."""
    tensors = [torch.as_tensor(v, dtype=torch.int64, device=device) for v in values]
    h = torch.zeros((), dtype=torch.int64, device=tensors[0].device)
    for position, value in enumerate(tensors):
        for word in (value & _M32, (value >> 32) & _M32):
            h = _fmix32(h ^ ((word + _GOLDEN * (2 * position + 1)) & _M32))
    return h


def uniforms(seed: int, epoch: torch.Tensor | int, index: torch.Tensor, view: int, count: int = NUM_DRAWS
             ) -> torch.Tensor:
    """``(B, count)`` float32 uniforms in [0, 1); draw ``j`` of sample ``b`` hashes
    ``(seed, epoch_b, index_b, view, j)``.

    ``index`` (and ``epoch``, a tensor or one int) live on the device the numbers are wanted on.
    """
    index = torch.as_tensor(index, dtype=torch.int64)
    epoch = torch.as_tensor(epoch, dtype=torch.int64, device=index.device).expand_as(index)
    key = hash_ints(seed, epoch, index, view, device=index.device)  # (B,)
    draws = torch.arange(count, dtype=torch.int64, device=index.device)
    bits = _fmix32(key[:, None] ^ _fmix32((draws * _GOLDEN + 0x7F4A7C15) & _M32)[None, :])
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


# ---------------------------------------------------------------------------------------------------------------------
# Geometric ops
# ---------------------------------------------------------------------------------------------------------------------


def random_resized_crop_boxes(u: torch.Tensor, height: int, width: int, scale: Sequence[float] = (0.2, 1.0),
                              ratio: Sequence[float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop boxes ``(B, 4)`` as ``(top, left, h, w)`` (float, integer-valued) by torchvision's RandomResizedCrop rule.

    ``u`` is ``(B, 4 * tries)`` uniforms (area, log-ratio, top, left per try). The first try whose box fits the
    image wins; when none fits, the central crop of the ratio-clamped full image is used, as torchvision does.
    """
    tries = u.shape[1] // 4
    u = u[:, : 4 * tries].view(-1, tries, 4)
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1)).clamp_max(height - h)
    left = torch.floor(u[..., 3] * (width - w + 1)).clamp_max(width - w)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # first fitting try (0 when none fits)
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    boxes = torch.stack([pick(top), pick(left), pick(h), pick(w)], dim=1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=boxes.dtype, device=boxes.device)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Resample each image's ``(top, left, h, w)`` box to ``size x size`` (float images; bilinear, area-averaged when
    shrinking), through ``torchvision.ops.roi_align`` with pixel-centre alignment."""
    from torchvision.ops import roi_align

    top, left, h, w = boxes.to(images.dtype).unbind(1)
    batch_index = torch.arange(images.shape[0], device=images.device, dtype=images.dtype)
    rois = torch.stack([batch_index, left, top, left + w, top + h], dim=1)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def random_crop_boxes(u: torch.Tensor, height: int, width: int, size: int, padding: int) -> torch.Tensor:
    """``RandomCrop(size, padding)`` boxes ``(top, left, size, size)`` in the coordinates of the padded image."""
    top = torch.floor(u[:, 0] * (height + 2 * padding - size + 1))
    left = torch.floor(u[:, 1] * (width + 2 * padding - size + 1))
    full = torch.full_like(top, float(size))
    return torch.stack([top, left, full, full], dim=1)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[..., top: top + size, left: left + size]


def hflip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose ``flip`` (bool, ``(B,)``) is set."""
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


# ---------------------------------------------------------------------------------------------------------------------
# Colour ops (float images in [0, 1], one factor per sample)
# ---------------------------------------------------------------------------------------------------------------------


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` luma of RGB images."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = rgb_to_gray(images).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (f * images + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * images + (1.0 - f) * rgb_to_gray(images)).clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (a fraction of a turn, per sample) in HSV space, like torchvision's tensor op.

    RGB -> (H, S, V) as torchvision computes it; back to RGB through the closed form
    ``c_n = V - V * S * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 H) mod 6`` and ``n`` = 5, 3, 1 for R, G, B
    (equal to the six-sector table, without materialising it).
    """
    r, g, b = images.unbind(1)
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    delta = maxc - minc
    saturation = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    h6 = torch.remainder(hue + shift.view(-1, 1, 1), 1.0) * 6.0
    chroma = maxc * saturation
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h6, 6.0)
        channels.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1).clamp_(0.0, 1.0)


def color_jitter(images: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor
                 ) -> torch.Tensor:
    """ColorJitter on the samples where ``apply`` is set.

    ``factors`` ``(B, 4)``: brightness, contrast and saturation factors and the hue shift; ``order`` ``(B, 4)``: a
    permutation of the four ops (0 brightness, 1 contrast, 2 saturation, 3 hue) per sample. Slot by slot, each
    sample gets the op its order names there. Brightness, contrast and saturation are all blends
    ``clamp(f * x + (1 - f) * target)`` towards black, the mean grey level or the grey image, so one blend per slot
    serves all three; samples that are not jittered get ``f = 1`` (and no hue shift) and pass through bit for bit.
    """
    out = images
    for slot in range(4):
        which = order[:, slot]
        gray = rgb_to_gray(out)
        target = torch.where((which == 0).view(-1, 1, 1, 1), torch.zeros_like(gray),
                             torch.where((which == 1).view(-1, 1, 1, 1), gray.mean(dim=(1, 2, 3), keepdim=True),
                                         gray))
        factor = factors.gather(1, which.clamp_max(2)[:, None]).squeeze(1)
        f = _per_sample(torch.where(apply & (which < 3), factor, torch.ones_like(factor)))
        out = (f * out + (1.0 - f) * target).clamp_(0.0, 1.0)
        hue = apply & (which == 3)
        out = torch.where(hue.view(-1, 1, 1, 1), adjust_hue(out, factors[:, 3]), out)
    return out


def random_grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    return torch.where(apply.view(-1, 1, 1, 1), rgb_to_gray(images).expand_as(images), images)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``(B, kernel_size)`` normalised 1-D Gaussian kernels, one per sigma (torchvision's construction)."""
    half = (kernel_size - 1) / 2.0
    x = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    pdf = torch.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur per sample (reflect padding); samples with ``apply`` unset get a unit impulse kernel,
    which leaves them unchanged."""
    batch, channels, height, width = images.shape
    kernels = gaussian_kernels(sigma, kernel_size)
    impulse = torch.zeros_like(kernels)
    impulse[:, kernel_size // 2] = 1.0
    kernels = torch.where(apply[:, None], kernels, impulse).to(images.dtype)
    weight = kernels.repeat_interleave(channels, dim=0)  # (B * C, k)
    pad = kernel_size // 2
    x = images.reshape(1, batch * channels, height, width)
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), weight[:, None, :, None], groups=batch * channels)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), weight[:, None, None, :], groups=batch * channels)
    return x.view(batch, channels, height, width)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


# ---------------------------------------------------------------------------------------------------------------------
# The augmenter
# ---------------------------------------------------------------------------------------------------------------------


class BatchAugmenter:
    """Views of a decoded uint8 batch, drawn on the batch's device.

    ``kind`` "ssl" (two strong views, the policy of ``build_transform("ssl", ...)``), "light" (crop + flip, the
    linear-probe policy) or "eval" (the deterministic resize/centre crop; every view identical). ``policy`` "cifar"
    or "imagenet" selects the crop size rule and the blur, ``mean``/``std`` the normalisation, ``seed`` the stream
    (use the seed the per-image ViewDataset would get). Call it on a batch dict with ``pixel_values`` (uint8,
    ``(B, 3, S, S)`` with ``S = decode_size(policy, image_size)``), ``index`` and ``epoch``: it returns a new dict
    whose ``pixel_values``, ``pixel_values_2``, ... are float32 normalised views; other keys are kept.
    """

    def __init__(self, kind: str, policy: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                 seed: int = 0, num_views: int = 2):
        if kind not in TRANSFORM_KINDS:
            raise ValueError(f"unknown augmentation kind {kind!r}; expected one of {TRANSFORM_KINDS}")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
        self.kind, self.policy, self.image_size = kind, policy, int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.seed, self.num_views = int(seed), int(num_views)
        self.decode_size = decode_size(policy, self.image_size)
        self.blur_kernel = blur_kernel_size(self.image_size) if (policy == "imagenet" and kind == "ssl") else None

    def view(self, images: torch.Tensor, index: torch.Tensor, epoch: torch.Tensor | int, view: int) -> torch.Tensor:
        """One normalised float32 view ``(B, 3, image_size, image_size)`` of uint8 ``images``."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"BatchAugmenter needs uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        size = self.image_size
        x = images.to(torch.float32).div_(255.0)
        if self.kind == "eval":
            x = center_crop(x, size) if x.shape[-1] != size or x.shape[-2] != size else x
            return normalize(x.contiguous(), self.mean, self.std)
        u = uniforms(self.seed, epoch, index.to(images.device), view)
        height, width = x.shape[-2:]
        if self.kind == "light" and self.policy == "cifar":
            x = center_crop(x, size) if (height, width) != (size, size) else x
            x = F.pad(x, (4, 4, 4, 4))
            x = crop_resize(x, random_crop_boxes(u[:, _CROP:], size, size, size, 4), size)
        else:
            scale = (0.2, 1.0) if self.kind == "ssl" else (0.08, 1.0)
            x = crop_resize(x, random_resized_crop_boxes(u[:, _CROP:_FLIP], height, width, scale), size)
        if self.kind == "ssl":
            factors = torch.stack([
                0.6 + 0.8 * u[:, _JITTER_FACTORS],  # brightness in [0.6, 1.4]
                0.6 + 0.8 * u[:, _JITTER_FACTORS + 1],  # contrast
                0.6 + 0.8 * u[:, _JITTER_FACTORS + 2],  # saturation
                -0.1 + 0.2 * u[:, _JITTER_FACTORS + 3],  # hue shift in [-0.1, 0.1]
            ], dim=1)
            order = torch.argsort(u[:, _JITTER_ORDER:_JITTER_ORDER + 4], dim=1)
            x = color_jitter(x, u[:, _JITTER_APPLY] < 0.8, factors, order)
            x = random_grayscale(x, u[:, _GRAY] < 0.2)
            if self.blur_kernel is not None:
                sigma = 0.1 + 1.9 * u[:, _BLUR_SIGMA]
                x = gaussian_blur(x, sigma, u[:, _BLUR_APPLY] < 0.5, self.blur_kernel)
        x = hflip(x, u[:, _FLIP] < 0.5)
        return normalize(x, self.mean, self.std)

    def __call__(self, batch: dict) -> dict:
        images = batch["pixel_values"]
        if images.dtype != torch.uint8:
            raise ValueError(
                "BatchAugmenter expects the uint8 images of a ViewDataset in 'decode' mode; got "
                f"{images.dtype} pixel_values (is --augmentation_device accelerator set on a per-image loader?)"
            )
        index = batch["index"].to(images.device)
        epoch = batch["epoch"].to(images.device) if "epoch" in batch else 0
        out = {k: v for k, v in batch.items() if not k.startswith("pixel_values")}
        first = None
        for view in range(self.num_views):
            if first is None or self.kind != "eval":  # eval views carry no randomness: draw one, share it
                first = self.view(images, index, epoch, view)
            out[view_key(view)] = first
        return out


__all__ = [
    "BatchAugmenter",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "crop_resize",
    "gaussian_blur",
    "hash_ints",
    "hflip",
    "normalize",
    "random_grayscale",
    "random_resized_crop_boxes",
    "uniforms",
]
