"""Argparse glue for the data flags (transitional: typed argument dataclasses replace it)."""

from __future__ import annotations

import argparse

from .folders import FOLDER_LABELS
from .images import ON_BAD_IMAGE
from .loading import load_image_splits
from .splits import ImageSplits


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Data flags in the style of transformers' ``examples/pytorch/*_no_trainer.py`` scripts."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name", type=str, default=None,
        help="Hub dataset id or alias (cifar10, cifar100, imagenet), or 'demo' (embedded digits, no download).",
    )  # fmt: skip
    group.add_argument("--dataset_config_name", type=str, default=None, help="Config name of the Hub dataset.")
    group.add_argument(
        "--train_file", type=str, default=None,
        help="Local parquet/arrow/JSON-lines/webdataset .tar file (or a folder or glob of them) with the train images.",
    )  # fmt: skip
    group.add_argument("--validation_file", type=str, default=None, help="Local data file(s) for evaluation.")
    group.add_argument("--train_dir", type=str, default=None, help="Image folder (any layout) for training.")
    group.add_argument("--validation_dir", type=str, default=None, help="Image folder for evaluation.")
    group.add_argument(
        "--folder_labels", type=str, default="auto", choices=FOLDER_LABELS,
        help="Folder names as labels: auto (only one class folder level, at least two classes), yes or no.",
    )  # fmt: skip
    group.add_argument("--image_column", type=str, default=None, help="Image column (default: img/image/pixel_values).")
    group.add_argument(
        "--label_column", type=str, default=None, help="Label column (default: label/fine_label/labels)."
    )
    group.add_argument("--train_split", type=str, default="train", help="Split used for training.")
    group.add_argument(
        "--eval_split", type=str, default=None, help="Split used for evaluation (default: test/validation/valid/val)."
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where datasets caches downloads and arrow files.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Keep n shuffled train samples (debugging).")
    group.add_argument("--max_eval_samples", type=int, default=None, help="Keep n shuffled eval samples (debugging).")
    group.add_argument(
        "--image_size", type=int, default=None, help="Crop size (default: 32 for CIFAR-like data, 224 for ImageNet)."
    )
    group.add_argument(
        "--no_augmentation", action="store_true",
        help="Ablation (paper Table II): no augmentation, both views are the same un-augmented image.",
    )  # fmt: skip
    group.add_argument(
        "--dataloader_num_workers", type=int, default=None,
        help="DataLoader workers (default: chosen from the CPU count and dataset size).",
    )  # fmt: skip
    group.add_argument(
        "--preprocessing_num_workers", type=int, default=None, help="Processes for datasets' loading (num_proc)."
    )
    group.add_argument(
        "--on_bad_image", type=str, default="error", choices=ON_BAD_IMAGE,
        help="An image that cannot be decoded: stop with an error naming it, or skip it and count it.",
    )  # fmt: skip
    return parser


def splits_from_args(args: argparse.Namespace, require_labels: bool = False) -> ImageSplits:
    """:func:`load_image_splits` with the flags of :func:`add_data_args` (seed from ``args.seed``, default 0)."""
    seed = getattr(args, "seed", None)
    return load_image_splits(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_file=args.train_file,
        train_dir=args.train_dir,
        validation_file=args.validation_file,
        validation_dir=args.validation_dir,
        image_column=args.image_column,
        label_column=args.label_column,
        train_split=args.train_split,
        eval_split=args.eval_split,
        cache_dir=args.cache_dir,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        seed=0 if seed is None else int(seed),
        image_size=args.image_size,
        folder_labels=getattr(args, "folder_labels", "auto"),
        preprocessing_num_workers=getattr(args, "preprocessing_num_workers", None),
        on_bad_image=getattr(args, "on_bad_image", "error"),
        require_labels=require_labels,
    )


__all__ = ["add_data_args", "splits_from_args"]
