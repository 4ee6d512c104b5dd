"""The data flags of every command."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .fields import _positive, flag


@dataclass(frozen=True)
class DataArguments:
    """Where the images come from and how they are served."""

    _argument_group_name: ClassVar[str] = "data"

    dataset_name: str | None = flag(
        None, "A Hub dataset id or alias (cifar10, cifar100, imagenet), or 'demo' (embedded digits, no download).")
    dataset_config_name: str | None = flag(None, "Config name of the Hub dataset.")
    train_file: str | None = flag(
        None, "Local training data: a parquet/arrow/JSON-lines file, a webdataset .tar, a folder or glob of them.")
    validation_file: str | None = flag(None, "Local labelled evaluation data (same formats as --train_file).")
    train_dir: str | None = flag(
        None, "A folder of images in any layout (jpg/jpeg/png/webp/bmp); class sub-folders give labels "
              "(see --folder_labels).")
    validation_dir: str | None = flag(None, "A folder of labelled evaluation images (class sub-folders).")
    folder_labels: Literal["auto", "yes", "no"] = flag(
        "auto", "Whether the folder names under --train_dir are labels: 'auto' only when every image sits one level "
                "below a folder and there are at least two folders.")
    image_column: str | None = flag(None, "Image column (default: img/image/pixel_values, or the only image column).")
    label_column: str | None = flag(None, "Label column (default: label/fine_label/labels; none: unlabelled).")
    train_split: str = flag("train", "Split used for training.")
    eval_split: str | None = flag(None, "Split used for evaluation (default: the first labelled of test/validation).")
    streaming: bool = flag(
        False, "Stream the training data (Hub ids, parquet/webdataset shards, image folders) instead of loading it: "
               "the order of each epoch is derived from (seed, epoch), so a resumed run continues exactly.")
    shuffle_buffer_size: int | None = flag(
        None, "With --streaming: mix samples through a shuffle buffer of this size. This trades exact resume for "
              "mixing (the buffer's content is lost when a run stops).")
    max_train_samples: int | None = flag(None, "Keep a fixed seeded subset of n training samples.")
    max_eval_samples: int | None = flag(None, "Keep a fixed seeded subset of n evaluation samples.")
    image_size: int | None = flag(
        None, "Training resolution (default: the policy's size, CIFAR 32 or ImageNet 224, chosen from a sample of "
              "images, or what the pretrained weights expect).")
    image_mean: str | None = flag(
        None, "Normalisation mean, three comma-separated values (default: the pretrained weights' statistics with "
              "--backbone_weights, else the dataset's: CIFAR or ImageNet).")
    image_std: str | None = flag(None, "Normalisation std, three comma-separated values (default: as --image_mean).")
    no_augmentation: bool = flag(
        False, "Ablation (paper Table II): no augmentation, both views are the same image; for linear evaluation, "
               "the probe trains on cached features.")
    on_bad_image: Literal["error", "skip"] = flag(
        "error", "An image that cannot be decoded: stop with its file and row ('error'), or skip it and count it "
                 "('skip', for scraped data).", resume="free")
    cache_dir: str | None = flag(None, "Where datasets caches downloads and arrow files.", resume="free")
    dataloader_num_workers: int | None = flag(
        None, "DataLoader workers (default: from the CPU count and dataset size).", resume="free")
    preprocessing_num_workers: int | None = flag(
        None, "Processes datasets uses to prepare a non-streamed dataset (num_proc).", resume="free")

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples", "image_size", "shuffle_buffer_size",
                     "preprocessing_num_workers"):
            _positive(name, getattr(self, name))
        _positive("dataloader_num_workers", self.dataloader_num_workers, minimum=0)
        if self.shuffle_buffer_size is not None and not self.streaming:
            raise ValueError("--shuffle_buffer_size applies to --streaming only")
        sources = {f"--{k}": getattr(self, k) for k in ("dataset_name", "train_file", "train_dir")}
        given = {k: v for k, v in sources.items() if v is not None}
        if len(given) > 1:
            raise ValueError(f"pass exactly one of --dataset_name, --train_file, --train_dir; got {given}")
        if self.validation_file is not None and self.validation_dir is not None:
            raise ValueError("pass at most one of --validation_file and --validation_dir")
        self.statistics()

    def statistics(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """``--image_mean`` and ``--image_std`` as tuples of three floats (None when not given)."""
        values = []
        for name in ("image_mean", "image_std"):
            text = getattr(self, name)
            if text is None:
                values.append(None)
                continue
            try:
                numbers = tuple(float(v) for v in text.split(","))
            except ValueError:
                numbers = ()
            if len(numbers) != 3 or (name == "image_std" and min(numbers) <= 0):
                raise ValueError(f"--{name} must be three comma-separated numbers"
                                 + (" above 0" if name == "image_std" else "") + f", e.g. 0.5,0.5,0.5; got {text!r}")
            values.append(numbers)
        return values[0], values[1]

    def require_source(self) -> None:
        """The training data source is needed by every command; checked before anything is loaded."""
        if self.dataset_name is None and self.train_file is None and self.train_dir is None:
            raise ValueError("no training data: pass --dataset_name, --train_file or --train_dir "
                             "(or --dataset_name demo for the embedded digits)")
