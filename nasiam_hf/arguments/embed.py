"""``nasiam-embed``'s arguments: which images, which model and which vector, where the parquet shards go."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .commands import Command
from .fields import _positive, flag
from .run import PrecisionArguments


@dataclass(frozen=True)
class EmbedDataArguments:
    """Every image of one source, read with the data layer's readers."""

    _argument_group_name: ClassVar[str] = "data"

    dataset_name: str | None = flag(None, "A Hub dataset id or alias (cifar10, cifar100, imagenet), or 'demo'.")
    dataset_config_name: str | None = flag(None, "Config name of the Hub dataset.")
    train_file: str | None = flag(
        None, "Local data: a parquet/arrow/JSON-lines file, a webdataset .tar, a folder or glob of them.")
    train_dir: str | None = flag(None, "A folder of images in any layout: every image under it, at any depth.")
    train_split: str = flag("train", "The split of --dataset_name to embed.")
    image_column: str | None = flag(None, "Image column (default: img/image/pixel_values, or the only image column).")
    label_column: str | None = flag(
        None, "Label column copied to the output (default: label/fine_label/labels when there is one).")
    folder_labels: Literal["auto", "yes", "no"] = flag(
        "auto", "Whether the folder names under --train_dir are labels (written to the output's label column).")
    streaming: bool = flag(
        False, "Read a Hub dataset's parquet/webdataset files shard by shard instead of downloading the split "
               "(local parquet and webdataset files and image folders are always read shard by shard).")
    on_bad_image: Literal["error", "skip"] = flag(
        "error", "An image that cannot be decoded: stop with its file and row ('error'), or leave its row out and "
                 "count it ('skip').")
    cache_dir: str | None = flag(None, "Where datasets caches downloads and arrow files.", resume="free")
    dataloader_num_workers: int | None = flag(
        None, "Processes that read, decode and preprocess the images (default: from the CPU count).", resume="free")

    def __post_init__(self):
        _positive("dataloader_num_workers", self.dataloader_num_workers, minimum=0)
        given = {f"--{k}": getattr(self, k) for k in ("dataset_name", "train_file", "train_dir")
                 if getattr(self, k) is not None}
        if len(given) != 1:
            raise ValueError("pass exactly one of --dataset_name, --train_file, --train_dir (the images to embed); "
                             f"got {given or 'none'}")


@dataclass(frozen=True)
class EmbedModelArguments:
    """The model and the vector taken from it."""

    _argument_group_name: ClassVar[str] = "model"

    model_name_or_path: str = flag(None, "A NASiam model folder or Hub id (e.g. the output_dir of nasiam-pretrain).",
                                   required=True)
    embed: Literal["backbone", "projector"] = flag(
        "backbone", "'backbone': the pooled backbone features (the pooler_output downstream tasks use); "
                    "'projector': the projector's output (the embedding the SSL loss saw).")

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("--model_name_or_path is required")


@dataclass(frozen=True)
class EmbedOutputArguments:
    """The parquet shards and how they are computed."""

    _argument_group_name: ClassVar[str] = "output"

    output_dir: str = flag(
        None, "Where the shards go (embeddings-XXXXX-of-YYYYY.parquet and embed_info.json); a rerun resumes, "
              "keeping the shards already written.", required=True, resume="free")
    dtype: Literal["float32", "float16"] = flag("float32", "Storage type of the vectors.")
    shard_size: int = flag(10_000, "Rows per parquet shard (the unit of resumption).")
    per_device_eval_batch_size: int = flag(256, "Images per forward pass on each device.", resume="free")
    overwrite_output_dir: bool = flag(
        False, "Replace the shards of an earlier embedding with other settings in --output_dir.", resume="free")
    debug: bool = flag(False, "Print the full traceback of an error (also: NASIAM_DEBUG=1).", resume="free")

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("--output_dir is required")
        _positive("shard_size", self.shard_size)
        _positive("per_device_eval_batch_size", self.per_device_eval_batch_size)


@dataclass(frozen=True)
class EmbedCommand(Command):
    """``nasiam-embed``: one vector per image of a folder, file, Hub dataset or stream, in parquet shards."""

    name: ClassVar[str] = "nasiam-embed"
    description: ClassVar[str] = (
        "Embed every image of a folder, file or dataset with a NASiam model: parquet shards of (key, embedding), "
        "resumable after a kill.")

    data: EmbedDataArguments = field(default=None)
    model: EmbedModelArguments = field(default=None)
    precision: PrecisionArguments = field(default_factory=PrecisionArguments)
    run: EmbedOutputArguments = field(default=None)


__all__ = ["EmbedCommand", "EmbedDataArguments", "EmbedModelArguments", "EmbedOutputArguments"]
