""":func:`load_image_splits`: exactly one training source (and at most one validation source), standardised
into :class:`ImageSplits`: columns renamed, labels found (or not), subsets drawn, the image size chosen."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .folders import FolderListing, check_folder_labels, scan_image_folder, split_folders
from .images import check_on_bad_image
from .sources import (
    IMAGE_COLUMN_CANDIDATES, LABEL_COLUMN_CANDIDATES, RawSplit, demo_splits, find_column, folder_dataset,
    has_labels, hub_error, hub_id, hub_split_files, known_dataset, load_hub_split, load_hub_whole, load_local_files,
    pick_eval_split,
)
from .splits import ImageSplits, sample_image_sides
from .transforms import choose_image_size

if TYPE_CHECKING:
    import datasets


# --------------------------------------------------------------------------------------------------------------------
# Standardisation and labels
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    dataset: datasets.Dataset
    where: str
    labelled: bool
    notes: list[str]


def _standardise(raw: RawSplit, image_column: str | None, label_column: str | None, require_labels: bool) -> _Part:
    """Keep ``image`` (cast to an Image feature) and, when labelled, ``label``; add ``index``.

    ``index`` is added before any shuffle/select, so it is a cheap in-memory column holding the row's position in the
    original split. Labels are all-or-nothing: a column whose values are all missing or -1 is no label column.
    """
    import datasets
    import pyarrow.compute as pc

    dataset, where, notes = raw.dataset, raw.where, list(raw.notes)
    if len(dataset) == 0:
        raise ValueError(f"The {where} is empty (0 rows).")
    image_col = find_column(dataset.column_names, dataset.features, image_column, IMAGE_COLUMN_CANDIDATES, "image",
                            where)
    label_col = "label" if raw.labelled_hint else None
    if raw.labelled_hint is None:
        label_col = find_column(dataset.column_names, dataset.features, label_column, LABEL_COLUMN_CANDIDATES,
                                "label", where)
    if label_col == image_col:
        raise ValueError(f"{where}: column {image_col!r} cannot be both the image and the label column.")
    dataset = dataset.select_columns([image_col] + ([label_col] if label_col else []))
    dataset = dataset.rename_columns({c: n for c, n in ((image_col, "image"), (label_col, "label")) if c and c != n})
    image_feature = dataset.features["image"]
    if not isinstance(image_feature, datasets.Image) or not image_feature.decode:
        try:
            dataset = dataset.cast_column("image", datasets.Image())
        except Exception as error:
            raise ValueError(
                f"{where}: column {image_col!r} ({image_feature}) cannot be read as images; "
                "expected encoded images (bytes/paths). Pass --image_column to pick another column."
            ) from error
    labelled = label_col is not None
    if labelled:
        feature = dataset.features["label"]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            dataset = dataset.class_encode_column("label")  # class names, sorted
            feature = dataset.features["label"]
        is_int = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        if not isinstance(feature, datasets.ClassLabel) and not is_int:
            raise ValueError(f"{where}: label column {label_col!r} has type {feature}; expected integer class ids, "
                             "class names or a ClassLabel. Pass --label_column to pick another column.")
        column = dataset.data.column("label")
        high = pc.max(column).as_py()
        if high is None or high < 0:
            notes.append(f"{where}: the label column {label_col!r} holds no labels (all missing or -1): unlabelled")
            dataset, labelled = dataset.remove_columns("label"), False
        elif column.null_count:
            message = f"{where}: {column.null_count} of {len(dataset)} rows have no label"
            if require_labels:
                raise ValueError(f"{message}; linear evaluation and fine-tuning need labels on every row.")
            notes.append(f"{message}: labels ignored (unlabelled)")
            dataset, labelled = dataset.remove_columns("label"), False
    if require_labels and not labelled:
        hint = ("--folder_labels yes (class folders)" if raw.labelled_hint is not None
                else "--label_column (no label column found: columns " f"{raw.dataset.column_names})")
        raise ValueError(f"{where} has no labels, and linear evaluation and fine-tuning need labels: pass {hint}, "
                         "or labelled data with --validation_file / --validation_dir.")
    dataset = dataset.add_column("index", np.arange(len(dataset), dtype=np.int64))
    return _Part(dataset, where, labelled, notes)


def _label_names(parts: list[_Part]) -> list[str]:
    """Class names from the ClassLabel features (labelled parts must agree), else ``0..max``."""
    import datasets
    import pyarrow.compute as pc

    names = None
    for part in parts:
        feature = part.dataset.features["label"]
        if isinstance(feature, datasets.ClassLabel):
            if names is not None and list(feature.names) != names:
                raise ValueError(f"{part.where}: class names differ from the other split's: {list(feature.names)} "
                                 f"vs {names}.")
            names = list(feature.names)
    if names is None:
        high = max((pc.max(p.dataset.data.column("label")).as_py() for p in parts), default=-1)
        names = [str(i) for i in range(high + 1)]
    for part in parts:
        bounds = pc.min_max(part.dataset.data.column("label"))
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        bad = low if low < 0 else high if high >= len(names) else None
        if bad is not None:
            raise ValueError(f"{part.where}: label {bad} is outside [0, {len(names)}) (num_labels={len(names)}).")
    return names


def _truncate(dataset: datasets.Dataset, max_samples: int | None, seed: int) -> datasets.Dataset:
    """Shuffle with the seed, then keep the first n: a plain head of class-ordered data would be one class."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_samples))


def _check_options(max_train_samples, max_eval_samples, folder_labels, on_bad_image, streaming, shuffle_buffer_size,
                   preprocessing_num_workers) -> None:
    check_folder_labels(folder_labels)
    check_on_bad_image(on_bad_image)
    for flag, value in (("--max_train_samples", max_train_samples), ("--max_eval_samples", max_eval_samples)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}.")
    if shuffle_buffer_size is not None:
        if not streaming:
            raise ValueError("--shuffle_buffer_size only applies with --streaming (map-style data is shuffled "
                             "exactly every epoch).")
        if shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be >= 1, got {shuffle_buffer_size}.")
    if preprocessing_num_workers is not None and preprocessing_num_workers < 1:
        raise ValueError(f"--preprocessing_num_workers must be >= 1, got {preprocessing_num_workers}.")


def _check_sources(dataset_name, train_file, train_dir, validation_file, validation_dir) -> None:
    passed = {flag: value for flag, value in (("--dataset_name", dataset_name), ("--train_file", train_file),
                                             ("--train_dir", train_dir)) if value is not None}
    if len(passed) != 1:
        raise ValueError(
            "Exactly one training data source is needed: --dataset_name, --train_file or --train_dir; "
            f"got {passed if passed else 'none'}."
        )
    if validation_file is not None and validation_dir is not None:
        raise ValueError(
            "Pass at most one of --validation_file and --validation_dir; "
            f"got {validation_file!r} and {validation_dir!r}."
        )


def _folder_parts(listings: list[FolderListing | None], roles: list[str]) -> list[RawSplit | None]:
    """Folder listings as splits sharing one sorted list of class names (the union of their class folders)."""
    names = sorted({c for listing in listings if listing is not None for c in listing.class_names}) or None
    return [folder_dataset(listing, names, role) if listing is not None else None
            for listing, role in zip(listings, roles)]


def _hub_eval(name: str, split_names: list[str], get_split, eval_split: str | None, train_split: str,
              label_column: str | None) -> tuple[RawSplit | None, list]:
    """The first labelled eval split of a Hub dataset (each candidate is downloaded alone), and notes."""
    notes = []
    for candidate in pick_eval_split(split_names, eval_split, train_split, repr(name)):
        dataset = get_split(candidate)
        if eval_split is not None or has_labels(dataset, label_column):
            return RawSplit(dataset, f"split {candidate!r} of {name!r}"), notes
        notes.append(f"split {candidate!r} of {name!r} has no labels: not used for evaluation")
    return None, notes


def _raw_sources(dataset_name, dataset_config_name, train_file, train_dir, validation_file, validation_dir,
                 image_column, label_column, train_split, eval_split, cache_dir, num_proc, folder_labels, streaming,
                 with_eval=True, on_bad_image="error"):
    """``(name, train RawSplit or None when streamed, eval RawSplit or None, notes)``; without ``with_eval`` no
    eval split of the source is looked for (nor downloaded)."""
    train = evaluation = None
    notes: list[str] = []
    explicit_eval = validation_file is not None or validation_dir is not None
    find_eval = with_eval and not explicit_eval
    if dataset_name is not None and dataset_name.lower() == "demo":
        if streaming:
            raise ValueError("--streaming reads Hub ids and local shards; the embedded demo is loaded whole.")
        demo_train, demo_test = demo_splits()
        name = "demo"
        train = RawSplit(demo_train, "split 'train' of the demo dataset")
        if find_eval:
            evaluation = RawSplit(demo_test, "split 'test' of the demo dataset")
    elif dataset_name is not None:
        name = hub_id(dataset_name)
        split_files = hub_split_files(name, dataset_config_name, cache_dir)
        if split_files is not None:  # download only the splits used
            split_names = list(split_files)

            def get_split(split):
                return load_hub_split(name, dataset_config_name, split, split_files[split], cache_dir, num_proc)
        elif streaming:
            raise hub_error(name, None, streaming=True)
        else:  # the Hub is out of reach (or lists no files): a cached copy loads whole
            whole = load_hub_whole(name, dataset_config_name, cache_dir, num_proc)
            split_names, get_split = list(whole), whole.__getitem__
        if train_split not in split_names:
            raise ValueError(f"Train split {train_split!r} (--train_split) not in {name!r}; splits: {split_names}.")
        if not streaming:
            train = RawSplit(get_split(train_split), f"split {train_split!r} of {name!r}")
        if find_eval:
            evaluation, found = _hub_eval(name, split_names, get_split, eval_split, train_split, label_column)
            notes += found
    elif train_file is not None:
        name = os.path.basename(os.path.normpath(train_file))
        if not streaming:
            train = load_local_files(train_file, "train file", image_column, label_column, cache_dir, num_proc,
                                     on_bad_image)
    else:
        name = os.path.basename(os.path.normpath(train_dir))
        layout = split_folders(train_dir, train_split)  # train/ and test/ (or val/ ...) folders
        picked = ([] if layout is None or not find_eval
                  else pick_eval_split(list(layout), eval_split, train_split, repr(train_dir)))
        eval_listing = scan_image_folder(layout[picked[0]], folder_labels, "train_dir") if picked else None
        train_listing = (None if streaming else
                         scan_image_folder(layout[train_split] if layout else train_dir, folder_labels, "train_dir"))
        train, evaluation = _folder_parts([train_listing, eval_listing], ["train_dir", "train_dir"])
    if validation_file is not None:
        evaluation = load_local_files(validation_file, "validation file", image_column, label_column, cache_dir,
                                      num_proc, on_bad_image)
    elif validation_dir is not None:
        (evaluation,) = _folder_parts([scan_image_folder(validation_dir, folder_labels, "validation_dir")],
                                      ["validation_dir"])
    return name, train, evaluation, notes


def load_image_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    train_dir: str | None = None,
    validation_file: str | None = None,
    validation_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    cache_dir: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    folder_labels: str = "auto",
    streaming: bool = False,
    preprocessing_num_workers: int | None = None,
    on_bad_image: str = "error",
    shuffle_buffer_size: int | None = None,
    require_labels: bool = False,
    with_eval: bool = True,
) -> ImageSplits:
    """Load train (and eval, when one exists) data from exactly one source and standardise it.

    Sources: a Hub id or alias (``cifar10``, ``cifar100``, ``imagenet``; only the train split and one eval split
    are downloaded), ``demo`` (embedded digits), local files (``train_file`` / ``validation_file``: a parquet,
    arrow, JSON-lines or webdataset ``.tar`` file, a folder of them or a glob) or an image folder (``train_dir`` /
    ``validation_dir``: any layout; ``folder_labels`` decides whether folder names are labels). Training data may be
    unlabelled; ``require_labels`` (linear evaluation, fine-tuning) makes that an error naming the flag to pass.

    ``streaming`` reads the training data as an :class:`~nasiam_hf.data.streaming.ImageStream` (``splits.stream``):
    exact resume, each rank reading its own shards; ``shuffle_buffer_size`` adds a shuffle buffer to it,
    which mixes more but gives up the exact resume. ``on_bad_image`` "error" stops at an undecodable image naming
    its file/shard and row, "skip" drops and counts it. ``preprocessing_num_workers`` goes to datasets' ``num_proc``.
    ``with_eval=False`` (a search, a pretraining without the kNN monitor) looks for no eval split of the source
    (a Hub id's eval split is then not downloaded); ``validation_file`` / ``validation_dir`` are still read.
    ``seed`` drives ``max_*_samples`` subsets and the sample of images that picks the image size (see
    :func:`~nasiam_hf.data.transforms.choose_image_size`); ``notes`` lists what was decided, for printing.
    """
    _check_options(max_train_samples, max_eval_samples, folder_labels, on_bad_image, streaming, shuffle_buffer_size,
                   preprocessing_num_workers)
    _check_sources(dataset_name, train_file, train_dir, validation_file, validation_dir)
    num_proc = preprocessing_num_workers
    name, train_raw, eval_raw, notes = _raw_sources(
        dataset_name, dataset_config_name, train_file, train_dir, validation_file, validation_dir, image_column,
        label_column, train_split, eval_split, cache_dir, num_proc, folder_labels, streaming, with_eval, on_bad_image,
    )
    stream = None
    if streaming:
        from .streaming import open_stream

        stream = open_stream(dataset_name=hub_id(dataset_name) if dataset_name else None,
                             dataset_config_name=dataset_config_name, train_file=train_file, train_dir=train_dir,
                             train_split=train_split, image_column=image_column, label_column=label_column,
                             folder_labels=folder_labels, cache_dir=cache_dir, seed=seed,
                             max_train_samples=max_train_samples, on_bad_image=on_bad_image,
                             shuffle_buffer_size=shuffle_buffer_size)
        if require_labels and not stream.labelled:
            raise ValueError(f"{stream.where} has no labels, and linear evaluation and fine-tuning need labels: pass "
                             "--label_column / --folder_labels yes, or labelled --validation_file / --validation_dir.")
        notes += list(stream.notes)
    train = _standardise(train_raw, image_column, label_column, require_labels) if train_raw is not None else None
    evaluation = (_standardise(eval_raw, image_column, label_column, require_labels)
                  if eval_raw is not None else None)
    parts: list[_Part] = [p for p in (train, evaluation) if p is not None]
    for part in parts:
        notes += part.notes
    labelled = [p for p in parts if p.labelled]
    names = _label_names(labelled) if labelled else []
    if stream is not None and stream.labelled:
        names = names or stream.class_names()

    train_ds = _truncate(train.dataset, max_train_samples, seed) if train is not None else None
    eval_ds = _truncate(evaluation.dataset, max_eval_samples, seed) if evaluation is not None else None
    for dataset, part, flag in ((train_ds, train, "--max_train_samples"), (eval_ds, evaluation, "--max_eval_samples")):
        if dataset is not None and len(dataset) == 0:
            raise ValueError(f"The {part.where} is empty after {flag}.")

    if train_ds is not None:
        sides, bad = sample_image_sides(train_ds, train.where, seed, on_bad_image)
    else:
        sides, bad = stream.sample_image_sides(seed)
    if bad:
        notes.append(f"{bad} of {len(sides) + bad} sampled training images cannot be decoded "
                     "(--on_bad_image skip: bad images are skipped and counted every epoch)")
    choice = choose_image_size(image_size, known_dataset(name), sides)
    notes.append(choice.note)
    return ImageSplits(
        train=train_ds,
        eval=eval_ds,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        mean=choice.mean,
        std=choice.std,
        image_size=choice.image_size,
        policy=choice.policy,
        name=name,
        train_labelled=stream.labelled if stream is not None else train.labelled,
        eval_labelled=evaluation.labelled if evaluation is not None else False,
        stream=stream,
        train_source=stream.where if stream is not None else train.where,
        eval_source=evaluation.where if evaluation is not None else None,
        on_bad_image=on_bad_image,
        notes=tuple(notes),
    )


__all__ = ["load_image_splits"]
