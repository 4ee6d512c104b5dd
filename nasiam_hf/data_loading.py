"""The bridge from the typed ``DataArguments`` to the data layer's loader (merged into ``nasiam_hf.data`` later)."""

from __future__ import annotations

from .arguments import DataArguments


def load_splits(data: DataArguments, seed: int, image_size: int | None = None):
    """:func:`nasiam_hf.data.load_image_splits` with the flags of ``data`` (``image_size`` overrides its own)."""
    from .data import load_image_splits

    return load_image_splits(
        dataset_name=data.dataset_name, dataset_config_name=data.dataset_config_name, train_file=data.train_file,
        train_dir=data.train_dir, validation_file=data.validation_file, validation_dir=data.validation_dir,
        image_column=data.image_column, label_column=data.label_column, train_split=data.train_split,
        eval_split=data.eval_split, cache_dir=data.cache_dir, max_train_samples=data.max_train_samples,
        max_eval_samples=data.max_eval_samples, seed=seed,
        image_size=image_size if image_size is not None else data.image_size,
    )
