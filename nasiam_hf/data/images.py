"""Images one at a time: which files are images, decoding (bad images included) and lossless conversion to RGB."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image as PILImage

# File endings read as images (compared in lower case, so .JPG and .Png count too).
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
ON_BAD_IMAGE = ("error", "skip")


class DataError(ValueError):
    """Bad data found while reading (a ``ValueError``: the commands print it as one ``error:`` line).

    A DataLoader worker re-raises an error in the main process as ``type(error)(text)`` where ``text`` is
    "Caught ... in DataLoader worker ..." followed by the whole traceback; the constructor recognises that text,
    keeps it as ``worker_traceback`` and keeps the original one-line message as the message.
    """

    def __init__(self, message: object = ""):
        text = str(message)
        self.worker_traceback: str | None = None
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            self.worker_traceback = text
            last = text.rstrip().splitlines()[-1]
            marker = f"{type(self).__name__}: "
            text = last.split(marker, 1)[1] if marker in last else last
        super().__init__(text)


class BadImageError(DataError):
    """An image that cannot be decoded; the message names the file (or shard) and row."""


def check_on_bad_image(value: str) -> str:
    if value not in ON_BAD_IMAGE:
        raise ValueError(f"--on_bad_image {value!r} is not one of {ON_BAD_IMAGE}.")
    return value


def is_image_file(name: str) -> bool:
    """Whether a file name ends in one of :data:`IMAGE_EXTENSIONS`, in any letter case."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------------------------------
# Image modes
# --------------------------------------------------------------------------------------------------------------------

_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Transparent pixels are composited on WHITE, the way image viewers and browsers show them on a page.
TRANSPARENT_BACKGROUND = (255, 255, 255)


def _gray_to_rgb(values: np.ndarray) -> PILImage.Image:
    """uint8-range grey values (any float/int array) -> RGB image, rounding and clipping."""
    return PILImage.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Any PIL mode -> 8-bit RGB without the silent losses of ``convert("RGB")``.

    ``convert`` clips 16-bit and 32-bit grey to white and drops alpha, so: 16-bit modes are divided by 257 (65535 ->
    255); mode ``I`` is scaled by its maximum when it exceeds 255; mode ``F`` in [0, 1] is scaled by 255 (other
    ranges: kept if inside [0, 255], else min-max scaled); transparent images are composited on white
    (:data:`TRANSPARENT_BACKGROUND`). CMYK, L, 1, YCbCr and palette images go through ``convert``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _16BIT_MODES:
        return _gray_to_rgb(np.asarray(image).astype(np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        peak = values.max() if values.size else 0.0
        return _gray_to_rgb(values * (255.0 / peak) if peak > 255 else values)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            values = values * 255.0
        elif low < 0 or high > 255:
            values = (values - low) * (255.0 / max(high - low, 1e-12))
        return _gray_to_rgb(values)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------------


def _open(value: Any) -> PILImage.Image:
    """An encoded image (bytes, a path, a ``{"bytes", "path"}`` dict as datasets stores them) -> a loaded PIL image.

    Dicts go through ``datasets.Image().decode_example`` (EXIF orientation, remote ``hf://`` paths) when datasets
    is installed.
    """
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        image = PILImage.open(io.BytesIO(bytes(value)))
    elif isinstance(value, (str, os.PathLike)):
        image = PILImage.open(value)
    elif isinstance(value, dict):
        if value.get("bytes") is None and value.get("path") is None:
            raise ValueError("the row holds no image (neither 'bytes' nor 'path')")
        try:
            import datasets
        except ImportError:  # pragma: no cover - the GPU machine's image has no datasets
            raw = value.get("bytes")
            return _open(raw if raw is not None else value.get("path"))
        return datasets.Image().decode_example(value)
    elif value is None:
        raise ValueError("the row holds no image (None)")
    else:
        raise TypeError(f"not an encoded image: {type(value).__name__}")
    image.load()
    return image


def describe(value: Any, where: str) -> str:
    """Where an image comes from, for messages: its file path when it has one, else ``where`` (file/shard and row)."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    has_bytes = isinstance(value, dict) and value.get("bytes") is not None
    if path and not has_bytes:
        return f"{where} (file {os.fspath(path)!r})"
    return where


def decode_image(value: Any, where: str | Callable[[], str]) -> PILImage.Image:
    """Decode to an RGB image (:func:`to_rgb`); :class:`BadImageError` naming ``where`` (a string, or a callable
    giving it, for streams that name a row only when it is bad) and the file when the value cannot be decoded."""
    try:
        return to_rgb(_open(value))
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        where = where() if callable(where) else where
        if isinstance(error, PILImage.UnidentifiedImageError):
            reason = "not a file format PIL can read"
        elif isinstance(error, FileNotFoundError):
            path = os.fspath(error.filename) if error.filename is not None else ""
            reason = "no such file" + ("" if not path or os.path.isabs(path) else
                                       " (a relative path is read from the folder the command runs in)")
        elif isinstance(error, ValueError) and str(error).startswith("the row holds no image"):
            reason = str(error)
        else:
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise BadImageError(f"cannot decode the image of {describe(value, where)}: {reason}") from error


def decode_or_skip(value: Any, where: str | Callable[[], str], on_bad_image: str) -> PILImage.Image | None:
    """:func:`decode_image`, or None for a bad image when ``on_bad_image == "skip"``. ``value`` may be the
    :class:`BadImageError` a reader put in place of an image it could not find (a webdataset sample without one)."""
    try:
        if isinstance(value, BadImageError):
            raise value
        return decode_image(value, where)
    except BadImageError:
        if on_bad_image == "skip":
            return None
        raise


__all__ = [
    "IMAGE_EXTENSIONS",
    "ON_BAD_IMAGE",
    "TRANSPARENT_BACKGROUND",
    "BadImageError",
    "DataError",
    "check_on_bad_image",
    "decode_image",
    "decode_or_skip",
    "describe",
    "is_image_file",
    "to_rgb",
]
