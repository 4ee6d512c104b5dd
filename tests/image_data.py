"""Data made on the fly for the end-to-end data tests: CIFAR-10-like images generated from a seed, folders of images
in mixed modes, parquet files with or without labels, parquet shards and webdataset shards. Real files, real
images; nothing is read from outside the repository, so a fresh clone runs every test."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# (mode, extension) cycled over the images of a folder: JPEG holds RGB, L and CMYK; RGBA, P and 16-bit grey need PNG.
FOLDER_FORMATS = (("RGB", "jpg"), ("L", "JPEG"), ("RGBA", "png"), ("P", "png"), ("I;16", "png"), ("CMYK", "jpeg"))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_SPLITS = {"train": 0, "test": 1}


def cifar_images(count: int, split: str = "train", seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    """``count`` CIFAR-10-like images (32x32 RGB, 10 classes) and their labels, generated from ``(split, seed)``:
    each class has its own colour and a bright square at its own corner, with per-image noise and shift, so that a
    little training separates the classes; labels are in a seeded random order (not class-ordered)."""
    rng = np.random.default_rng([seed, _SPLITS.get(split, 2), 20])
    labels = rng.integers(0, len(CIFAR10_CLASSES), size=count).tolist()
    palette = np.random.default_rng(7).integers(30, 225, size=(len(CIFAR10_CLASSES), 3))
    images = []
    for label in labels:
        pixels = palette[label] + rng.normal(0, 30, size=(32, 32, 3))
        corner_y, corner_x = divmod(label % 4, 2)
        y, x = corner_y * 16 + rng.integers(0, 6), corner_x * 16 + rng.integers(0, 6)
        pixels[y:y + 10, x:x + 10] = 255 - palette[label]
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images, labels


def write_cifar_like_parquet(path: Path, count: int, split: str = "train", seed: int = 0) -> Path:
    """A class-ordered labelled file like the CIFAR-10 subset's (``img`` PNG bytes + a ``label`` ClassLabel with
    CIFAR-10's names, rows sorted by class): a plain head of it is one class."""
    import datasets

    images, labels = cifar_images(count, split, seed)
    order = sorted(range(count), key=lambda i: labels[i])
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))})
    datasets.Dataset.from_dict({"img": [images[i] for i in order], "label": [labels[i] for i in order]},
                               features=features).to_parquet(str(path))
    return path


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "I;16":  # 16-bit grey spanning the full range (what to_rgb scales by 1/257)
        return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    return image.convert(mode)


def write_mixed_folder(root: Path, images: list[Image.Image]) -> Path:
    """Unlabelled images at depths 0 to 3 in the modes of :data:`FOLDER_FORMATS`, plus one non-image file."""
    for i, image in enumerate(images):
        mode, extension = FOLDER_FORMATS[i % len(FOLDER_FORMATS)]
        folder = root / ["", "2021", "2021/trip", "2022/x/y"][i % 4]
        folder.mkdir(parents=True, exist_ok=True)
        in_mode(image, mode).save(folder / f"photo_{i:03d}.{extension}")
    (root / "2021" / "notes.txt").write_text("not an image")
    return root


def image_column(images: list[Image.Image], broken: dict[int, bytes] | None = None) -> list[dict]:
    """A parquet image column as datasets writes it (``{"bytes", "path"}``), with ``broken`` rows replaced."""
    broken = broken or {}
    return [{"bytes": broken.get(i, encode(image)), "path": None} for i, image in enumerate(images)]


def write_parquet(path: Path, images: list[Image.Image], labels: list[int] | None = None,
                  broken: dict[int, bytes] | None = None, row_group_size: int | None = None, **extra) -> Path:
    """One parquet file: ``image`` (and ``label`` when given, and the ``extra`` columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"image": image_column(images, broken), **({"label": labels} if labels is not None else {}), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return path


def write_labelled_parquet(path: Path, images: list[Image.Image], labels: list[int]) -> Path:
    """A labelled evaluation file with a ClassLabel column, as the Hub's CIFAR-10 files have."""
    import datasets

    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(10)])})
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(str(path))
    return path


def write_parquet_shards(folder: Path, images: list[Image.Image], sizes: list[int], row_group_size: int,
                         broken: dict[int, bytes] | None = None) -> tuple[Path, list[str]]:
    """Unlabelled parquet shards ``part-<i>.parquet`` of ``sizes`` rows (``broken``: image number -> bytes);
    returns the folder and every sample's stream key (``<shard>:<row>``)."""
    keys, start = [], 0
    for shard, size in enumerate(sizes):
        mine = {i - start: v for i, v in (broken or {}).items() if start <= i < start + size}
        write_parquet(folder / f"part-{shard}.parquet", images[start:start + size], broken=mine,
                      row_group_size=row_group_size)
        keys += [f"part-{shard}.parquet:{row}" for row in range(size)]
        start += size
    return folder, keys


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset shard: ``samples`` is a list of (key, {extension: bytes})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
