"""Where images come from: unlabelled folders in any layout, files without labels, JSON-lines, webdataset shards,
the label decisions, the kNN monitor's sets, bad images and bad input. Real datasets loads of files made on the fly."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from image_data import write_tar
from nasiam_hf.data import (
    BadImageError, DataError, collate_views, load_image_splits, make_loader, scan_image_folder, view_dataset_for,
)
from nasiam_hf.data.transforms import choose_image_size


def _pixels(seed, width=12, height=10):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encoded(seed, fmt="PNG", width=12, height=10) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels(seed, width, height)).save(buffer, format=fmt)
    return buffer.getvalue()


def _save(path, seed, mode="RGB", width=12, height=10):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(_pixels(seed, width, height))
    if mode == "I;16":
        image = Image.fromarray(np.random.default_rng(seed).integers(0, 65535, (height, width)).astype(np.uint16))
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def _parquet(path, columns: dict, row_group_size=None):
    table = {k: pa.array([{"bytes": v, "path": None} for v in vals]) if vals and isinstance(vals[0], bytes)
             else pa.array(vals) for k, vals in columns.items()}
    pq.write_table(pa.table(table), str(path), row_group_size=row_group_size)
    return str(path)


def _tar(path, samples):
    """samples: list of (key, {extension: bytes})."""
    return str(write_tar(path, samples))


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


@pytest.fixture
def nested_folder(tmp_path):
    """Unlabelled images at several depths, in several modes, formats and letter cases, plus a non-image file."""
    root = tmp_path / "photos"
    for i, (relative, mode) in enumerate([("2021/trip/a.jpg", "RGB"), ("2021/b.JPEG", "L"), ("c.png", "RGBA"),
                                          ("2022/x/y/d.PNG", "P"), ("2022/e.png", "I;16"), ("f.webp", "RGB"),
                                          ("2023/g.BMP", "RGB")]):
        _save(root / relative, i, mode)
    (root / "2021" / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Unlabelled training data
# ---------------------------------------------------------------------------------------------------------------------


def test_unlabelled_nested_folder_of_mixed_modes(nested_folder, cache):
    splits = load_image_splits(train_dir=str(nested_folder), cache_dir=cache, seed=0)
    assert not splits.train_labelled and splits.eval is None and splits.num_labels == 0
    assert splits.train.column_names == ["image", "index"] and len(splits.train) == 7
    notes = "\n".join(splits.notes)
    assert "skipped 1 non-image file (e.g. '2021/notes.txt')" in notes
    assert "7 images in nested folders: no labels (pass --folder_labels yes" in notes
    views = view_dataset_for(splits)
    batch = collate_views(views.__getitems__(list(range(7))))
    assert set(batch) == {"pixel_values", "pixel_values_2", "index"}  # no labels where there are none
    assert batch["pixel_values"].shape == (7, 3, 32, 32) and torch.isfinite(batch["pixel_values"]).all()
    listed = scan_image_folder(str(nested_folder), "no")
    assert listed.keys == sorted(listed.keys) and len(listed.keys) == 7 and listed.classes is None


def test_parquet_without_label_column_is_unlabelled_and_loads(tmp_path, cache):
    path = _parquet(tmp_path / "photos.parquet", {"image": [_encoded(i) for i in range(6)], "caption": ["x"] * 6})
    splits = load_image_splits(train_file=path, cache_dir=cache)
    assert splits.train.column_names == ["image", "index"] and not splits.train_labelled
    sample = view_dataset_for(splits, kind="eval", mode="single")[2]
    assert set(sample) == {"pixel_values", "index"} and sample["index"] == 2


def test_json_lines_with_relative_paths_and_base64_bytes(tmp_path, cache):
    for i in range(3):
        _save(tmp_path / "images" / f"{i}.png", i)
    lines = [{"image": f"images/{i}.png", "label": "cat" if i % 2 else "dog"} for i in range(3)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    import base64

    (tmp_path / "bytes.jsonl").write_text(json.dumps({"image": {"bytes": base64.b64encode(_encoded(7)).decode()}}))
    splits = load_image_splits(train_file=str(tmp_path / "train.jsonl"), cache_dir=cache)
    assert splits.id2label == {0: "cat", 1: "dog"} and splits.train["label"][:] == [1, 0, 1]  # names sorted
    assert np.array_equal(np.asarray(splits.train[1]["image"].convert("RGB")), _pixels(1))
    inline = load_image_splits(train_file=str(tmp_path / "bytes.jsonl"), cache_dir=cache)
    assert np.array_equal(np.asarray(inline.train[0]["image"].convert("RGB")), _pixels(7))


def test_webdataset_shards_folder_and_glob(tmp_path, cache):
    for shard in range(2):
        _tar(tmp_path / "shards" / f"train-{shard}.tar",
             [(f"s{shard}{i}", {"jpg": _encoded(10 * shard + i, "JPEG"), "cls": str(i % 2).encode()})
              for i in range(3)])
    for spec in (str(tmp_path / "shards"), str(tmp_path / "shards" / "train-*.tar")):
        splits = load_image_splits(train_file=spec, cache_dir=cache)
        assert len(splits.train) == 6 and splits.train_labelled and splits.train["label"][:] == [0, 1, 0] * 2
    only = load_image_splits(train_file=str(tmp_path / "shards" / "train-1.tar"), cache_dir=cache)
    assert len(only.train) == 3


def test_arrow_folder_written_by_save_to_disk(tmp_path, cache):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"image": [{"bytes": _encoded(i), "path": None} for i in range(4)],
                                "label": [0, 1, 1, 0]}, features=features).save_to_disk(str(tmp_path / "saved"))
    splits = load_image_splits(train_file=str(tmp_path / "saved"), cache_dir=cache)  # its .json files are metadata
    assert len(splits.train) == 4 and splits.id2label == {0: "a", 1: "b"} and splits.train["label"][:] == [0, 1, 1, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Folder labels
# ---------------------------------------------------------------------------------------------------------------------


def _class_folders(root, names=("cat", "dog", "owl"), per_class=2):
    for c, name in enumerate(names):
        for i in range(per_class):
            _save(root / name / f"{i}.png", 10 * c + i)
    return root


@pytest.mark.parametrize("mode, labelled, note", [
    ("auto", True, "3 class folders, labels from folder names"),
    ("yes", True, "3 class folders, labels from the top-level folder names (--folder_labels yes)"),
    ("no", False, "6 images, no labels (--folder_labels no)"),
])
def test_folder_labels_on_class_folders(tmp_path, cache, mode, labelled, note):
    root = _class_folders(tmp_path / "classes")
    splits = load_image_splits(train_dir=str(root), folder_labels=mode, cache_dir=cache)
    assert splits.train_labelled is labelled and any(note in n for n in splits.notes)
    if labelled:
        assert splits.id2label == {0: "cat", 1: "dog", 2: "owl"} and splits.train["label"][:] == [0, 0, 1, 1, 2, 2]


def test_folder_labels_auto_needs_one_level_and_two_folders(tmp_path, cache):
    one = _class_folders(tmp_path / "one", names=("cat",))
    splits = load_image_splits(train_dir=str(one), cache_dir=cache)
    assert not splits.train_labelled and any("one folder 'cat': no labels" in n for n in splits.notes)
    assert load_image_splits(train_dir=str(one), folder_labels="yes", cache_dir=cache).id2label == {0: "cat"}
    flat = tmp_path / "flat"
    for i in range(3):
        _save(flat / f"{i}.jpg", i)
    assert any("3 images, no class folders: no labels" in n
               for n in load_image_splits(train_dir=str(flat), cache_dir=cache).notes)
    deep = tmp_path / "deep"
    for i, relative in enumerate(["cat/young/0.png", "cat/1.png", "dog/old/2.png"]):
        _save(deep / relative, i)
    assert not load_image_splits(train_dir=str(deep), cache_dir=cache).train_labelled  # not exactly one level
    by_top = load_image_splits(train_dir=str(deep), folder_labels="yes", cache_dir=cache)
    assert by_top.id2label == {0: "cat", 1: "dog"} and by_top.train["label"][:] == [0, 0, 1]


def test_folder_labels_yes_with_loose_images_and_bad_value(nested_folder, cache):
    with pytest.raises(ValueError, match=r"--folder_labels yes: train_dir .* images outside a class folder, e\.g\. "
                                         r"'c\.png'"):
        load_image_splits(train_dir=str(nested_folder), folder_labels="yes", cache_dir=cache)
    with pytest.raises(ValueError, match=r"--folder_labels 'maybe' is not one of \('auto', 'yes', 'no'\)"):
        load_image_splits(train_dir=str(nested_folder), folder_labels="maybe", cache_dir=cache)


# ---------------------------------------------------------------------------------------------------------------------
# The kNN monitor's sets
# ---------------------------------------------------------------------------------------------------------------------


def test_knn_sets_in_each_case(tmp_path, nested_folder, cache):
    labelled = _parquet(tmp_path / "labelled.parquet", {"img": [_encoded(i) for i in range(30)],
                                                        "label": [i % 3 for i in range(30)]})
    unlabelled = str(nested_folder)

    both = load_image_splits(train_file=labelled, validation_file=labelled, cache_dir=cache).knn_sets()
    assert (len(both.memory), len(both.queries)) == (30, 30) and "memory 30 labelled images" in both.note

    only_train = load_image_splits(train_file=labelled, cache_dir=cache).knn_sets(seed=1)
    assert (len(only_train.memory), len(only_train.queries)) == (27, 3)  # 90 / 10
    assert "only labelled set: split with seed 1 into memory 27 and queries 3" in only_train.note
    assert not set(only_train.memory["index"][:]) & set(only_train.queries["index"][:])
    assert only_train.queries["index"][:] == load_image_splits(train_file=labelled, cache_dir=cache).knn_sets(
        seed=1).queries["index"][:]  # seeded

    only_eval = load_image_splits(train_dir=unlabelled, validation_file=labelled, cache_dir=cache).knn_sets()
    assert (len(only_eval.memory), len(only_eval.queries)) == (27, 3) and "validation file" in only_eval.note

    memory, queries = only_eval.view_datasets(load_image_splits(train_dir=unlabelled, validation_file=labelled,
                                                                cache_dir=cache))
    assert (len(memory), len(queries)) == (27, 3) and set(memory[0]) == {"pixel_values", "labels", "index"}

    capped = load_image_splits(train_file=labelled, cache_dir=cache).knn_sets(max_queries=2)
    assert len(capped.queries) == 2 and len(capped.memory) == 28

    off = load_image_splits(train_dir=unlabelled, cache_dir=cache).knn_sets()
    assert not off.enabled and off.memory is None and off.note.startswith("kNN monitor off: no labelled data")
    assert "--validation_file" in off.note
    with pytest.raises(ValueError, match="kNN monitor off"):
        off.view_datasets(load_image_splits(train_dir=unlabelled, cache_dir=cache))


# ---------------------------------------------------------------------------------------------------------------------
# Image size, bad images, bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_image_size_from_a_sample_not_the_first_row(tmp_path, cache):
    images = [_encoded(0, width=48, height=40)] + [_encoded(i, "JPEG", width=300, height=200) for i in range(1, 80)]
    path = _parquet(tmp_path / "sizes.parquet", {"image": images})
    splits = load_image_splits(train_file=path, cache_dir=cache)
    assert (splits.image_size, splits.policy) == (224, "imagenet")
    assert "image size 224 (ImageNet policy): median longest side of 64 sampled images is 300 px" in splits.notes
    assert choose_image_size(None, None, [48, 300, 300]).image_size == 224
    assert choose_image_size(None, None, [32, 32, 500]).image_size == 32
    assert choose_image_size(96, None, [32]).policy == "imagenet"
    assert choose_image_size(None, "cifar10", [500]).image_size == 32  # known datasets keep their size
    with pytest.raises(ValueError, match="--image_size must be a positive integer, got 0"):
        choose_image_size(0, None, [32])


def test_bad_image_errors_name_file_and_row_and_skip_counts(tmp_path, cache):
    images = [_encoded(i) for i in range(10)]
    images[6] = b"truncated garbage"
    path = _parquet(tmp_path / "scraped.parquet", {"image": images})
    with pytest.raises(BadImageError, match=r"cannot decode the image of train file '.*scraped\.parquet', row 6"):
        load_image_splits(train_file=path, cache_dir=cache)  # found by the load-time sample, before any step
    splits = load_image_splits(train_file=path, cache_dir=cache, on_bad_image="skip")
    assert any(note.startswith("1 of 10 sampled training images cannot be decoded") for note in splits.notes)
    batch = collate_views(view_dataset_for(splits).__getitems__([5, 6, 7]))
    assert batch["index"].tolist() == [5, 7] and int(batch["bad_images"]) == 1
    assert batch["pixel_values"].shape[0] == 2

    splits.on_bad_image = "error"  # the error raised inside a DataLoader worker keeps its one-line message
    loader = make_loader(view_dataset_for(splits), batch_size=5, shuffle=False, num_workers=2)
    with pytest.raises(BadImageError) as info:
        list(loader)
    assert str(info.value).startswith("cannot decode the image of train file") and "\n" not in str(info.value)
    assert "row 6" in str(info.value) and "Traceback" in info.value.worker_traceback
    folder = tmp_path / "folder"
    _save(folder / "good.png", 1)
    (folder / "bad.jpg").write_bytes(b"no jpeg")
    with pytest.raises(BadImageError, match=r"file '.*bad\.jpg'"):
        load_image_splits(train_dir=str(folder), cache_dir=cache)


def test_empty_and_missing_inputs_name_what_is_wrong(tmp_path, cache):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match=r"has no images: looked for \.bmp, \.jpeg, \.jpg, \.png, \.webp files \(any "
                                         r"letter case, any depth\); skipped 1 other files such as 'readme\.md'"):
        load_image_splits(train_dir=str(tmp_path / "empty_dir"), cache_dir=cache)
    with pytest.raises(ValueError, match=r"train_dir '.*nowhere' does not exist"):
        load_image_splits(train_dir=str(tmp_path / "nowhere"), cache_dir=cache)
    with pytest.raises(ValueError, match=r"The train file '.*missing\.parquet' does not exist"):
        load_image_splits(train_file=str(tmp_path / "missing.parquet"), cache_dir=cache)
    empty = _parquet(tmp_path / "empty.parquet", {"image": pa.array([], pa.binary()).to_pylist()})
    with pytest.raises(ValueError, match=r"train file '.*empty\.parquet' is empty"):
        load_image_splits(train_file=empty, cache_dir=cache)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"Unsupported data file '.*x\.csv'"):
        load_image_splits(train_file=str(tmp_path / "x.csv"), cache_dir=cache)
    with pytest.raises(ValueError, match=r"pattern '.*nothing-\*\.tar' matches no file"):
        load_image_splits(train_file=str(tmp_path / "nothing-*.tar"), cache_dir=cache)
    with pytest.raises(ValueError, match="only applies with --streaming"):
        load_image_splits(train_dir=str(tmp_path / "empty_dir"), shuffle_buffer_size=10)
    with pytest.raises(ValueError, match=r"--on_bad_image 'ignore' is not one of"):
        load_image_splits(train_dir=str(tmp_path / "empty_dir"), on_bad_image="ignore")


def test_empty_row_groups_are_read_normally(tmp_path, cache):
    path = tmp_path / "gaps.parquet"
    empty = pa.table({"image": pa.array([], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    with pq.ParquetWriter(str(path), empty.schema) as writer:
        for count in (0, 3, 0, 2):
            rows = [{"bytes": _encoded(writer_rows), "path": None} for writer_rows in range(count)]
            writer.write_table(pa.table({"image": pa.array(rows, empty.schema.field("image").type)}))
    assert [pq.ParquetFile(str(path)).metadata.row_group(i).num_rows for i in range(4)] == [0, 3, 0, 2]
    assert len(load_image_splits(train_file=str(path), cache_dir=cache).train) == 5
    assert load_image_splits(train_file=str(path), streaming=True).stream.num_rows == 5


def test_webdataset_shard_without_image_key_names_the_keys(tmp_path, cache):
    path = _tar(tmp_path / "text.tar", [("a", {"txt": b"hello", "cls": b"1"})])
    with pytest.raises(DataError, match=r"webdataset shard 'text\.tar' has no image key: sample 'a' has the keys "
                                        r"\['cls', 'txt'\]"):
        load_image_splits(train_file=path, cache_dir=cache)
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(open(_tar(tmp_path / "full.tar", [("a", {"png": _encoded(0) * 20})]), "rb").read()[:1500])
    with pytest.raises(DataError, match=r"webdataset shard 'cut\.tar' cannot be read"):
        load_image_splits(train_file=str(truncated), cache_dir=cache)


def test_require_labels_names_the_flag_to_pass(tmp_path, nested_folder, cache):
    with pytest.raises(ValueError, match=r"train_dir .* has no labels, and linear evaluation and fine-tuning need "
                                         r"labels: pass --folder_labels yes"):
        load_image_splits(train_dir=str(nested_folder), require_labels=True, cache_dir=cache)
    partial = _parquet(tmp_path / "partial.parquet", {"img": [_encoded(i) for i in range(4)], "label": [0, None, 1, 1]})
    splits = load_image_splits(train_file=partial, cache_dir=cache)
    assert not splits.train_labelled and any("1 of 4 rows have no label" in n for n in splits.notes)
    with pytest.raises(ValueError, match=r"1 of 4 rows have no label; linear evaluation and fine-tuning need labels"):
        load_image_splits(train_file=partial, cache_dir=cache, require_labels=True)
