"""Image folders in any layout: list the images (sorted, deterministic), count what is not an image, and decide
whether folder names are labels (``--folder_labels auto|yes|no``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .images import IMAGE_EXTENSIONS, is_image_file

FOLDER_LABELS = ("auto", "yes", "no")
SPLIT_FOLDER_NAMES = ("train", "test", "validation", "valid", "val")


@dataclass(frozen=True)
class FolderListing:
    """The images of a folder: ``files`` (absolute paths, sorted by their relative path), ``keys`` (the relative
    paths, POSIX style: stable sample keys), ``classes`` (each image's class folder, or None when the folder is
    unlabelled), the number of non-image files ``skipped``, and the notes to print."""

    root: str
    files: list[str]
    keys: list[str]
    classes: list[str] | None
    skipped: int
    notes: tuple[str, ...]

    @property
    def class_names(self) -> list[str]:
        return sorted(set(self.classes)) if self.classes is not None else []


def check_folder_labels(value: str) -> str:
    if value not in FOLDER_LABELS:
        raise ValueError(f"--folder_labels {value!r} is not one of {FOLDER_LABELS}.")
    return value


def list_images(root: str, role: str) -> tuple[list[str], int, str | None]:
    """``(relative image paths sorted, number of other files, one example of another file)`` under ``root``, any
    depth, following symbolic links (each real folder once)."""
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        raise ValueError(f"{role} {root!r} {what}.")
    found, skipped, example, seen = [], 0, None, set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        relative = os.path.relpath(folder, root)
        for name in sorted(names):
            path = name if relative == "." else f"{relative}/{name}"
            if is_image_file(name):
                found.append(path.replace(os.sep, "/"))
            else:
                skipped += 1
                example = example or path
    return sorted(found), skipped, example


def split_folders(root: str, train_split: str) -> dict[str, str] | None:
    """``{split: path}`` when ``root`` holds only split folders (``train/``, ``test/``, ...) including the train
    split, else None (the folder itself is the training data)."""
    if not os.path.isdir(root):
        return None
    entries = [e for e in sorted(os.listdir(root)) if not e.startswith(".")]
    folders = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    names = set(SPLIT_FOLDER_NAMES) | {train_split}
    if train_split not in folders or any(e not in names for e in folders):
        return None
    if any(is_image_file(e) for e in entries if e not in folders):
        return None
    return {name: os.path.join(root, name) for name in folders}


def scan_image_folder(root: str, folder_labels: str = "auto", role: str = "train_dir") -> FolderListing:
    """List a folder's images and decide its labels.

    ``auto``: folder names are labels only when every image sits exactly one level below a folder and there are at
    least two such folders. ``yes``: the top folder under ``root`` is each image's label (an image directly in
    ``root`` is an error). ``no``: unlabelled. The decision is one of the notes, either way.
    """
    check_folder_labels(folder_labels)
    relative, skipped, example = list_images(root, role)
    where = f"{role} {root!r}"
    if not relative:
        extensions = ", ".join(IMAGE_EXTENSIONS)
        raise ValueError(f"{where} has no images: looked for {extensions} files (any letter case, any depth)"
                         + (f"; skipped {skipped} other files such as {example!r}." if skipped else "."))
    notes = []
    if skipped:
        notes.append(f"{where}: skipped {skipped} non-image file{'s' if skipped != 1 else ''} (e.g. {example!r})")
    parts = [path.split("/") for path in relative]
    tops = sorted({p[0] for p in parts if len(p) > 1})
    count = f"{len(relative)} images"
    classes = None
    if folder_labels == "yes":
        loose = next(("/".join(p) for p in parts if len(p) == 1), None)
        if loose is not None:
            raise ValueError(f"--folder_labels yes: {where} has images outside a class folder, e.g. {loose!r}; "
                             "move them into class folders or pass --folder_labels auto/no.")
        classes = [p[0] for p in parts]
        notes.append(f"{where}: {len(tops)} class folder{'s' if len(tops) != 1 else ''}, labels from the top-level "
                     f"folder names (--folder_labels yes)")
    elif folder_labels == "no":
        notes.append(f"{where}: {count}, no labels (--folder_labels no)")
    elif all(len(p) == 2 for p in parts) and len(tops) >= 2:
        classes = [p[0] for p in parts]
        notes.append(f"{where}: {len(tops)} class folders, labels from folder names")
    elif all(len(p) == 1 for p in parts):
        notes.append(f"{where}: {count}, no class folders: no labels")
    elif all(len(p) == 2 for p in parts):
        notes.append(f"{where}: {count} in one folder {tops[0]!r}: no labels "
                     "(one class; pass --folder_labels yes to use it)")
    else:
        notes.append(f"{where}: {count} in nested folders: no labels "
                     "(pass --folder_labels yes to use the top-level folder names)")
    files = [os.path.join(root, *p) for p in parts]
    return FolderListing(root=root, files=files, keys=relative, classes=classes, skipped=skipped, notes=tuple(notes))


__all__ = [
    "FOLDER_LABELS",
    "SPLIT_FOLDER_NAMES",
    "FolderListing",
    "check_folder_labels",
    "list_images",
    "scan_image_folder",
    "split_folders",
]
