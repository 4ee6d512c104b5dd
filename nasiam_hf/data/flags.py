"""The commands' data flags (:class:`nasiam_hf.arguments.DataArguments`) turned into :func:`load_image_splits`."""

from __future__ import annotations

from ..arguments import DataArguments
from .loading import load_image_splits
from .splits import ImageSplits


def load_splits(data: DataArguments, seed: int, *, image_size: int | None = None,
                require_labels: bool = False, with_eval: bool = True) -> ImageSplits:
    """The data of ``data``'s flags (``image_size`` overrides ``--image_size`` when given; ``require_labels`` for the
    commands that train on labels: linear evaluation and fine-tuning; ``with_eval=False`` for the commands that use
    no eval split, so that none is downloaded: the search, a pretraining without the kNN monitor)."""
    data.require_source()
    return load_image_splits(
        dataset_name=data.dataset_name, dataset_config_name=data.dataset_config_name, train_file=data.train_file,
        train_dir=data.train_dir, validation_file=data.validation_file, validation_dir=data.validation_dir,
        image_column=data.image_column, label_column=data.label_column, train_split=data.train_split,
        eval_split=data.eval_split, cache_dir=data.cache_dir, max_train_samples=data.max_train_samples,
        max_eval_samples=data.max_eval_samples, seed=seed,
        image_size=image_size if image_size is not None else data.image_size, folder_labels=data.folder_labels,
        streaming=data.streaming, preprocessing_num_workers=data.preprocessing_num_workers,
        on_bad_image=data.on_bad_image, shuffle_buffer_size=data.shuffle_buffer_size, require_labels=require_labels,
        with_eval=with_eval,
    )
