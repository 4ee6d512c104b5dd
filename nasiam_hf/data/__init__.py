"""Data layer: from "a dataset name, some files or a folder" to batches of reproducible augmented views.

* :func:`load_image_splits` (:mod:`.loading`) turns a Hub id, local parquet / arrow / JSON-lines / webdataset files,
  an image folder in any layout or the embedded ``demo`` into :class:`ImageSplits` (:mod:`.splits`): columns
  ``image``, ``index`` and, when labelled, ``label``; the kNN monitor's sets (:meth:`ImageSplits.knn_sets`).
  Where images come from and how columns are found: :mod:`.sources`, :mod:`.folders`, :mod:`.webdataset`.
* :func:`build_transform` (:mod:`.transforms`) gives the torchvision v2 pipelines ("ssl", "light", "eval") of the
  CIFAR or ImageNet policy; :func:`choose_image_size` picks the size from a sample of images.
* :class:`ViewDataset` + :class:`EpochSampler` + :func:`make_loader` (:mod:`.views`) serve views whose randomness
  depends only on ``(seed, epoch, index, view)``; :class:`BatchAugmenter` (:mod:`.augment`) draws them on the device.
* :class:`ImageStream` / :class:`StreamLoader` (:mod:`.streaming`, :mod:`.lanes`, :mod:`.shards`) stream shards
  with an order derived from (seed, epoch) alone and exact resume.

Imports run one way: each module imports only modules listed before it in images, transforms, views, augment,
folders, webdataset, file_problems, sources, shards, lanes, streaming, splits, loading, flags, fingerprint (and
``..network``, ``..arguments``).
"""

from .augment import BatchAugmenter
from .flags import load_splits
from .folders import FOLDER_LABELS, FolderListing, scan_image_folder
from .images import IMAGE_EXTENSIONS, ON_BAD_IMAGE, BadImageError, DataError, decode_image, to_rgb
from .lanes import lane_batches_at, resume_point, resume_rotation
from .loading import load_image_splits
from .shards import key_index
from .sources import (
    DATASET_ALIASES, EVAL_SPLIT_CANDIDATES, IMAGE_COLUMN_CANDIDATES, LABEL_COLUMN_CANDIDATES, hub_split_files,
    resolve_data_files,
)
from .splits import ImageSplits, KnnSets, split_in_halves, view_dataset_for
from .streaming import ImageStream, StreamLoader, StreamState, open_stream
from .transforms import (
    IMAGENET_CROP_RATIO, NORMALIZATION, POLICIES, TRANSFORM_KINDS, SizeChoice, blur_kernel_size,
    build_decode_transform, build_transform, choose_image_size, decode_size, resize_edge,
)
from .views import (
    VIEW_MODES, EpochSampler, ViewDataset, collate_views, default_num_workers, make_loader,
    set_loader_epoch, view_key, view_seed,
)

__all__ = [
    "DATASET_ALIASES",
    "EVAL_SPLIT_CANDIDATES",
    "FOLDER_LABELS",
    "IMAGENET_CROP_RATIO",
    "IMAGE_COLUMN_CANDIDATES",
    "IMAGE_EXTENSIONS",
    "LABEL_COLUMN_CANDIDATES",
    "NORMALIZATION",
    "ON_BAD_IMAGE",
    "POLICIES",
    "TRANSFORM_KINDS",
    "VIEW_MODES",
    "BadImageError",
    "BatchAugmenter",
    "DataError",
    "EpochSampler",
    "FolderListing",
    "ImageSplits",
    "ImageStream",
    "KnnSets",
    "SizeChoice",
    "StreamLoader",
    "StreamState",
    "ViewDataset",
    "blur_kernel_size",
    "build_decode_transform",
    "build_transform",
    "choose_image_size",
    "collate_views",
    "decode_image",
    "decode_size",
    "default_num_workers",
    "hub_split_files",
    "key_index",
    "lane_batches_at",
    "load_image_splits",
    "load_splits",
    "make_loader",
    "open_stream",
    "resize_edge",
    "resolve_data_files",
    "resume_point",
    "resume_rotation",
    "scan_image_folder",
    "set_loader_epoch",
    "split_in_halves",
    "to_rgb",
    "view_dataset_for",
    "view_key",
    "view_seed",
]
