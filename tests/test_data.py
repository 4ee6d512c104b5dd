"""Data layer: real `datasets` loads of small parquet files / image folders written on the fly, no mocks."""

import io

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from nasiam_hf.data import (
    NORMALIZATION,
    EpochSampler,
    ViewDataset,
    build_transform,
    collate_views,
    load_image_splits,
    make_loader,
    set_loader_epoch,
    split_in_halves,
    load_splits,
    to_rgb,
    view_dataset_for,
)

SIZE = 8  # tiny images keep every test fast


def _png(color, size=SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_png(seed, size=SIZE) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_hf_parquet(path, columns: dict, features: dict):
    """A parquet file written by `datasets` (features metadata included, as on the Hub)."""
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return str(path)


def _write_plain_parquet(path, columns: dict):
    """A parquet file written by plain pyarrow: images as {bytes, path} structs, no `datasets` metadata."""
    table = {}
    for name, values in columns.items():
        if values and isinstance(values[0], bytes):
            table[name] = pa.array([{"bytes": v, "path": None} for v in values])
        else:
            table[name] = pa.array(values)
    pq.write_table(pa.table(table), str(path))
    return str(path)


def _cifar_like(tmp_path, n=12, num_classes=3, name="train.parquet"):
    return _write_hf_parquet(
        tmp_path / name,
        {"img": [_noise_png(i) for i in range(n)], "label": [i % num_classes for i in range(n)]},
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{k}" for k in range(num_classes)])},
    )


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


# ---------------------------------------------------------------------------------------------------------------------
# Loading and column detection
# ---------------------------------------------------------------------------------------------------------------------


def test_img_label_parquet_detected_and_standardised(tmp_path, cache):
    train = _cifar_like(tmp_path, n=12, num_classes=3)
    splits = load_image_splits(train_file=train, cache_dir=cache)
    assert splits.train.column_names == ["image", "label", "index"]
    assert isinstance(splits.train.features["image"], datasets.Image)
    assert splits.train["index"][:] == list(range(12))
    assert splits.num_labels == 3 and splits.id2label == {0: "c0", 1: "c1", 2: "c2"}
    assert splits.eval is None
    assert splits.name == "train.parquet"
    assert (splits.policy, splits.image_size) == ("cifar", 32)  # the CIFAR policy's size, from a sample of images
    assert "image size 32 (CIFAR policy): median longest side of 12 sampled images is 8 px" in splits.notes
    assert (splits.mean, splits.std) == NORMALIZATION["cifar10"]
    first = splits.train[0]["image"]
    assert first.size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(first.convert("RGB")), np.asarray(Image.open(io.BytesIO(_noise_png(0)))))


def test_image_fine_label_plain_parquet_detected(tmp_path, cache):
    columns = {
        "image": [_png((10 * i, 0, 0)) for i in range(6)],
        "coarse_label": [0] * 6,
        "fine_label": [0, 1, 2, 3, 4, 4],
    }
    train = _write_plain_parquet(tmp_path / "c100.parquet", columns)
    val = _write_plain_parquet(tmp_path / "c100_val.parquet", {k: v[:3] for k, v in columns.items()})
    splits = load_image_splits(train_file=train, validation_file=val, cache_dir=cache)
    assert splits.train.column_names == ["image", "label", "index"]
    assert isinstance(splits.train.features["image"], datasets.Image)  # struct column cast to Image
    assert splits.train["label"][:] == [0, 1, 2, 3, 4, 4]  # fine_label, not coarse_label
    assert splits.num_labels == 5 and splits.id2label == {i: str(i) for i in range(5)}
    assert len(splits.eval) == 3 and splits.eval["index"][:] == [0, 1, 2]
    assert splits.eval[2]["image"].getpixel((0, 0))[:3] == (20, 0, 0)


def test_explicit_image_and_label_columns(tmp_path, cache):
    path = _write_hf_parquet(
        tmp_path / "two_images.parquet",
        {"dark": [_png((0, 0, 0))] * 4, "bright": [_png((255, 255, 255))] * 4, "y": [0, 1, 0, 1]},
        {"dark": datasets.Image(), "bright": datasets.Image(), "y": datasets.Value("int64")},
    )
    with pytest.raises(ValueError, match="--image_column"):  # two Image columns, none with a known name
        load_image_splits(train_file=path, label_column="y", cache_dir=cache)
    splits = load_image_splits(train_file=path, image_column="bright", label_column="y", cache_dir=cache)
    assert splits.train[0]["image"].getpixel((0, 0))[:3] == (255, 255, 255)
    assert splits.train["label"][:] == [0, 1, 0, 1]


def test_missing_columns_name_columns_and_flag(tmp_path, cache):
    no_image = _write_plain_parquet(tmp_path / "no_image.parquet", {"pixels": [1, 2], "label": [0, 1]})
    with pytest.raises(ValueError) as info:
        load_image_splits(train_file=no_image, cache_dir=cache)
    assert "--image_column" in str(info.value) and "'pixels'" in str(info.value) and "'label'" in str(info.value)

    no_label = _write_plain_parquet(tmp_path / "no_label.parquet", {"img": [_png((1, 2, 3))] * 2, "target": [0, 1]})
    unlabelled = load_image_splits(train_file=no_label, cache_dir=cache)  # fine for search / pretraining
    assert unlabelled.train.column_names == ["image", "index"] and not unlabelled.train_labelled
    with pytest.raises(ValueError) as info:  # linear evaluation and fine-tuning ask for labels
        load_image_splits(train_file=no_label, cache_dir=cache, require_labels=True)
    message = str(info.value)
    assert "--label_column" in message and "'target'" in message and "need labels" in message

    with pytest.raises(ValueError, match=r"'photo'.*--image_column.*'img'"):
        load_image_splits(train_file=no_label, image_column="photo", label_column="target", cache_dir=cache)


def test_source_count_is_checked(tmp_path):
    with pytest.raises(ValueError, match="got none"):
        load_image_splits()
    with pytest.raises(ValueError, match="--train_file.*--train_dir"):
        load_image_splits(train_file="a.parquet", train_dir=str(tmp_path))


def test_empty_dataset_error(tmp_path, cache):
    empty = _write_hf_parquet(
        tmp_path / "empty.parquet",
        {"img": [], "label": []},
        {"img": datasets.Image(), "label": datasets.Value("int64")},
    )
    with pytest.raises(ValueError, match=r"train file '.*empty\.parquet' is empty"):
        load_image_splits(train_file=empty, cache_dir=cache)
    good = _cifar_like(tmp_path)
    with pytest.raises(ValueError, match=r"validation file '.*empty\.parquet' is empty"):
        load_image_splits(train_file=good, validation_file=empty, cache_dir=cache)
    with pytest.raises(ValueError, match="empty after --max_train_samples"):
        load_image_splits(train_file=good, max_train_samples=0, cache_dir=cache)


def test_label_out_of_range_errors(tmp_path, cache):
    negative = _write_plain_parquet(tmp_path / "neg.parquet", {"img": [_png((0, 0, 0))] * 3, "label": [0, -3, 1]})
    with pytest.raises(ValueError, match=r"label -3 is outside \[0, 2\)"):
        load_image_splits(train_file=negative, cache_dir=cache)

    train = _cifar_like(tmp_path, n=6, num_classes=3)  # ClassLabel with 3 names
    val = _write_plain_parquet(tmp_path / "val.parquet", {"img": [_png((0, 0, 0))] * 2, "label": [2, 7]})
    with pytest.raises(ValueError, match=r"validation file .* label 7 is outside \[0, 3\) \(num_labels=3\)"):
        load_image_splits(train_file=train, validation_file=val, cache_dir=cache)


def test_image_folder_with_train_and_test_subfolders(tmp_path, cache):
    root = tmp_path / "folder"
    for split, count in (("train", 3), ("test", 2)):
        for name, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (SIZE, SIZE), color).save(root / split / name / f"{i}.png")
    splits = load_image_splits(train_dir=str(root), cache_dir=cache)
    assert splits.id2label == {0: "cat", 1: "dog"}
    assert len(splits.train) == 6 and len(splits.eval) == 4
    assert splits.name == "folder"
    by_label = {row["label"]: row["image"].getpixel((0, 0)) for row in splits.train}
    assert by_label == {0: (200, 0, 0), 1: (0, 0, 200)}

    only_train = load_image_splits(train_dir=str(root / "train"), validation_dir=str(root / "test"), cache_dir=cache)
    assert len(only_train.train) == 6 and len(only_train.eval) == 4 and only_train.num_labels == 2


def test_demo_dataset():
    splits = load_image_splits(dataset_name="demo")
    assert (len(splits.train), len(splits.eval)) == (1497, 300)
    assert splits.num_labels == 10 and splits.id2label[9] == "9"
    assert (splits.policy, splits.image_size, splits.name) == ("cifar", 32, "demo")
    assert set(splits.eval["label"][:]) == set(range(10)) and set(splits.train["label"][:]) == set(range(10))
    image = splits.train[0]["image"]
    assert image.size == (32, 32) and image.convert("RGB").mode == "RGB"
    assert np.asarray(image.convert("RGB")).shape == (32, 32, 3)
    # The hard-coded NORMALIZATION["demo"] matches the data.
    pixels = np.stack([np.asarray(row["image"].convert("RGB")) for row in splits.train]).astype(np.float64) / 255
    mean, std = NORMALIZATION["demo"]
    assert np.allclose(pixels.mean(axis=(0, 1, 2)), mean, atol=1e-3)
    assert np.allclose(pixels.std(axis=(0, 1, 2)), std, atol=1e-3)


def test_cifar_subset_max_samples_is_shuffled(cifar_subset, cache):
    train, test = cifar_subset
    kwargs = dict(train_file=str(train), validation_file=str(test), cache_dir=cache, max_eval_samples=20)
    splits = load_image_splits(max_train_samples=50, seed=0, **kwargs)
    assert len(splits.train) == 50 and len(splits.eval) == 20
    assert len(set(splits.train["label"][:])) >= 5  # a plain head of the class-ordered file is all airplanes
    assert len(set(splits.eval["label"][:])) >= 3
    assert splits.id2label[0] == "airplane" and splits.num_labels == 10
    indices = splits.train["index"][:]
    assert len(set(indices)) == 50 and indices != list(range(50))
    again = load_image_splits(max_train_samples=50, seed=0, **kwargs)
    other = load_image_splits(max_train_samples=50, seed=1, **kwargs)
    assert again.train["index"][:] == indices and other.train["index"][:] != indices


def test_dataset_folder_loads_only_train_and_the_first_labelled_eval_split(tmp_path, cache):
    """A dataset id resolves its splits' files first, then downloads only the train split and eval candidates in
    order: ImageNet-like, the test split is all -1 (skipped), and a broken extra split is never read."""
    folder = tmp_path / "dataset" / "data"
    folder.mkdir(parents=True)
    labels = {"train": [0, 1, 0, 1], "test": [-1, -1], "validation": [1, 0, 1]}
    for split, values in labels.items():
        _write_plain_parquet(folder / f"{split}-00000-of-00001.parquet",
                             {"image": [_noise_png(i) for i in range(len(values))], "label": values})
    (folder / "extra-00000-of-00001.parquet").write_bytes(b"not parquet")
    splits = load_image_splits(dataset_name=str(tmp_path / "dataset"), cache_dir=cache)
    assert (len(splits.train), len(splits.eval)) == (4, 3) and splits.eval["label"][:] == [1, 0, 1]
    assert splits.eval_source == f"split 'validation' of {str(tmp_path / 'dataset')!r}"
    assert any("split 'test'" in note and "no labels" in note for note in splits.notes)
    assert load_image_splits(dataset_name=str(tmp_path / "dataset"), cache_dir=cache, eval_split="test").eval_labelled \
        is False  # an explicit split is taken as it is
    with pytest.raises(ValueError, match=r"'dev'.*--eval_split.*'train'"):
        load_image_splits(dataset_name=str(tmp_path / "dataset"), cache_dir=cache, eval_split="dev")


def test_offline_hub_id_error_mentions_local_alternatives(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "home" / "datasets")
    with pytest.raises(ValueError) as info:
        load_image_splits(dataset_name="cifar10", cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert "uoft-cs/cifar10" in message and "not in the local cache" in message and "offline" in message
    assert "--train_file" in message and "--train_dir" in message and "--dataset_name demo" in message


def test_data_arguments_round_trip(tmp_path, cache):
    from nasiam_hf.arguments import DataArguments, PretrainCommand

    path = _cifar_like(tmp_path, n=10)
    command = PretrainCommand.parse(["--train_file", path, "--max_train_samples", "4", "--image_size", "16",
                                     "--cache_dir", cache, "--output_dir", str(tmp_path / "out")])
    data = command.data
    assert data.train_split == "train" and data.no_augmentation is False and data.dataloader_num_workers is None
    splits = load_splits(data, seed=3)
    assert len(splits.train) == 4 and splits.image_size == 16
    assert splits.train["index"][:] == datasets.Dataset.from_dict({"i": list(range(10))}).shuffle(seed=3)["i"][:4]
    assert PretrainCommand.parse(["--no_augmentation", "--output_dir", "x"]).data.no_augmentation is True
    assert DataArguments().folder_labels == "auto"


# ---------------------------------------------------------------------------------------------------------------------
# Image modes
# ---------------------------------------------------------------------------------------------------------------------


def test_to_rgb_16_bit_gradient_is_kept():
    gradient = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))
    image = Image.fromarray(gradient)
    assert image.mode == "I;16"
    big_endian = Image.frombytes("I;16B", image.size, gradient.astype(">u2").tobytes())  # convert() would clip
    for source in (image, big_endian):
        rgb = np.asarray(to_rgb(source))
        assert to_rgb(source).mode == "RGB"
        row = rgb[0, :, 0].astype(int)
        assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) > 0)
        assert np.allclose(row, gradient[0] / 257, atol=1)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.fromarray(np.full((4, 4), 1000, np.int32)), (255, 255, 255)),  # I > 255: scaled by max
        (lambda: Image.fromarray(np.full((4, 4), 100, np.int32)), (100, 100, 100)),  # I <= 255: kept
        (lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128)),  # F in [0, 1]
        (lambda: Image.new("LA", (4, 4), (40, 255)), (40, 40, 40)),
    ],
    ids=["L", "1", "CMYK", "I-large", "I-small", "F", "LA-opaque"],
)
def test_to_rgb_modes(make, expected):
    out = to_rgb(make())
    assert out.mode == "RGB" and out.size == (4, 4)
    assert out.getpixel((0, 0)) == expected


def test_to_rgb_int_and_float_gradients():
    ramp = np.tile(np.arange(0, 4096, 256, dtype=np.int32), (2, 1))  # mode I, max 3840
    row = np.asarray(to_rgb(Image.fromarray(ramp)))[0, :, 0].astype(int)
    assert row[-1] == 255 and np.all(np.diff(row) > 0)
    ramp_f = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (2, 1))
    row_f = np.asarray(to_rgb(Image.fromarray(ramp_f)))[0, :, 0].astype(int)
    assert row_f[0] == 0 and row_f[-1] == 255 and np.all(np.diff(row_f) > 0)


def test_to_rgb_transparency_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent pixel
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (0, 0, 255) and out.getpixel((1, 0)) == (255, 255, 255)

    half = to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert half.getpixel((0, 0)) == (127, 127, 127)

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert to_rgb(palette).getpixel((1, 0)) == (0, 255, 0)  # no transparency: plain palette lookup
    palette.info["transparency"] = 1
    out = to_rgb(palette)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


# ---------------------------------------------------------------------------------------------------------------------
# Transforms, views, sampler, loader
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_splits(tmp_path, cache):
    return load_image_splits(train_file=_cifar_like(tmp_path, n=24, num_classes=4), cache_dir=cache, image_size=8)


def test_build_transform_shapes_and_blur():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    mean, std = NORMALIZATION["imagenet"]
    for kind in ("ssl", "light", "eval"):
        for policy, size in (("cifar", 16), ("imagenet", 24)):
            out = build_transform(kind, policy, size, mean, std)(image)
            assert out.shape == (3, size, size) and out.dtype == torch.float32
    names = [type(t).__name__ for t in build_transform("ssl", "imagenet", 224, mean, std).transforms]
    blur = build_transform("ssl", "imagenet", 224, mean, std).transforms[3].transforms[0]
    assert "GaussianBlur" not in str(build_transform("ssl", "cifar", 32, mean, std))
    assert names.count("RandomApply") == 2 and list(blur.kernel_size) == [23, 23]
    resize = build_transform("eval", "imagenet", 224, mean, std).transforms[0]
    assert list(resize.size) == [256]
    with pytest.raises(ValueError, match="kind"):
        build_transform("strong", "cifar", 32, mean, std)


def test_same_key_same_views_across_datasets_and_batches(tiny_splits):
    def make():
        return ViewDataset(tiny_splits.train, "two_view", tiny_splits.transform("ssl"), seed=7)

    first, second = make(), make()
    n = len(first)
    keys = [3 * n + 5, 3 * n + 2, 3 * n + 11]
    batch_a = first.__getitems__(keys)
    batch_b = second.__getitems__(list(reversed(keys)))[::-1]
    alone = second[keys[1]]
    for a, b in zip(batch_a, batch_b):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["pixel_values_2"], b["pixel_values_2"])
    assert torch.equal(batch_a[1]["pixel_values"], alone["pixel_values"])
    assert not torch.equal(batch_a[0]["pixel_values"], batch_a[0]["pixel_values_2"])  # two different views
    other_seed = ViewDataset(tiny_splits.train, "two_view", tiny_splits.transform("ssl"), seed=8)[keys[0]]
    assert not torch.equal(other_seed["pixel_values"], batch_a[0]["pixel_values"])


def test_views_follow_original_index_not_position(tiny_splits):
    transform = tiny_splits.transform("ssl")
    full = ViewDataset(tiny_splits.train, "two_view", transform, seed=1)
    half, _ = split_in_halves(tiny_splits.train, seed=4)
    part = ViewDataset(half, "two_view", transform, seed=1)
    row = part[len(part) * 2 + 3]  # epoch 2, position 3 of the shuffled half
    same = full[len(full) * 2 + row["index"]]
    assert row["index"] == same["index"] and torch.equal(row["pixel_values"], same["pixel_values"])


def test_epochs_give_different_views_and_rng_untouched(tiny_splits):
    dataset = ViewDataset(tiny_splits.train, "single", tiny_splits.transform("ssl"), seed=0)
    n = len(dataset)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    epoch0, epoch1 = dataset[4], dataset[n + 4]
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is not consumed
    assert epoch0["index"] == epoch1["index"] == 4 and "pixel_values_2" not in epoch0
    assert not torch.equal(epoch0["pixel_values"], epoch1["pixel_values"])


def test_augmentation_off_gives_identical_views(tiny_splits):
    off = view_dataset_for(tiny_splits, kind="ssl", augment=False)[5]
    on = view_dataset_for(tiny_splits, kind="ssl", augment=True)[5]
    assert torch.equal(off["pixel_values"], off["pixel_values_2"])
    assert not torch.equal(on["pixel_values"], on["pixel_values_2"])
    image = tiny_splits.train[5]["image"].convert("RGB")
    mean, std = torch.tensor(tiny_splits.mean).view(3, 1, 1), torch.tensor(tiny_splits.std).view(3, 1, 1)
    plain = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(off["pixel_values"], plain, atol=1e-6)


def test_collate_shapes_and_dtypes(tiny_splits):
    two = ViewDataset(tiny_splits.train, "two_view", tiny_splits.transform("ssl"))
    batch = collate_views(two.__getitems__([0, 1, 2]))
    assert set(batch) == {"pixel_values", "pixel_values_2", "labels", "index"}
    assert batch["pixel_values"].shape == batch["pixel_values_2"].shape == (3, 3, 8, 8)
    assert batch["pixel_values"].dtype == torch.float32 and type(batch["pixel_values"]) is torch.Tensor
    assert batch["labels"].dtype == batch["index"].dtype == torch.long
    assert batch["labels"].tolist() == [0, 1, 2] and batch["index"].tolist() == [0, 1, 2]
    single = collate_views(ViewDataset(tiny_splits.train, "single", tiny_splits.transform("eval")).__getitems__([1]))
    assert set(single) == {"pixel_values", "labels", "index"}


def test_epoch_sampler_permutations():
    sampler = EpochSampler(10, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(10)) and epoch0 != list(range(10)) and len(sampler) == 10
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(10, 20)) and [k - 10 for k in epoch1] != epoch0
    assert list(EpochSampler(10, seed=3)) == epoch0
    ordered = EpochSampler(10, shuffle=False)
    ordered.set_epoch(2)
    assert list(ordered) == list(range(20, 30))


def _batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def _assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loaders_reproducible_across_constructions_and_workers(tiny_splits):
    def loader(workers):
        views = ViewDataset(tiny_splits.train, "two_view", tiny_splits.transform("ssl"), seed=2)
        result = make_loader(views, batch_size=5, shuffle=True, seed=2, num_workers=workers, persistent_workers=False)
        set_loader_epoch(result, 1)
        return result

    reference = _batches(loader(0))
    assert len(reference) == 5 and sum(len(b["index"]) for b in reference) == 24
    _assert_same_batches(reference, _batches(loader(0)))
    _assert_same_batches(reference, _batches(loader(2)))
    set_loader_epoch(again := loader(0), 2)
    assert not torch.equal(_batches(again)[0]["index"], reference[0]["index"])


def test_set_epoch_reaches_sampler_through_accelerate(tiny_splits):
    """Accelerate's set_epoch reaches the EpochSampler on one rank and on several, and survives skip_first_batches
    (the mid-epoch resume): the same batches as a plain loader of that epoch."""
    from accelerate import Accelerator
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from accelerate.state import AcceleratorState

    views = ViewDataset(tiny_splits.train, "two_view", tiny_splits.transform("ssl"), seed=5)
    plain = make_loader(views, batch_size=6, shuffle=True, seed=5, num_workers=0)
    set_loader_epoch(plain, 3)
    expected = _batches(plain)
    try:
        accelerator = Accelerator(cpu=True)
        prepared = accelerator.prepare(make_loader(views, batch_size=6, shuffle=True, seed=5, num_workers=0))
        set_loader_epoch(prepared, 3)
        _assert_same_batches(expected, _batches(prepared))  # DataLoaderShard.__iter__ re-applies epoch 3
        set_loader_epoch(prepared, 3)
        _assert_same_batches(expected[1:], _batches(accelerator.skip_first_batches(prepared, 1)))
    finally:
        AcceleratorState._reset_state(True)
    for rank in range(2):  # the second rank of two: every other batch of the same epoch order
        shard = prepare_data_loader(make_loader(views, batch_size=3, shuffle=True, seed=5, num_workers=0),
                                    num_processes=2, process_index=rank, put_on_device=False)
        set_loader_epoch(shard, 3)
        ranks = _batches(shard)
        assert torch.cat([b["index"] for b in ranks]).tolist() == torch.cat(
            [b["index"][rank * 3:rank * 3 + 3] for b in expected]).tolist()
        set_loader_epoch(shard, 3)
        _assert_same_batches(ranks[1:], _batches(skip_first_batches(shard, 1)))


def test_batch_larger_than_dataset_with_drop_last(tiny_splits):
    views = ViewDataset(tiny_splits.train, "single", tiny_splits.transform("eval"))
    with pytest.raises(ValueError, match=r"Batch size 64 .*24 samples.*--per_device_train_batch_size"):
        make_loader(views, batch_size=64, shuffle=True, drop_last=True)
    assert len(make_loader(views, batch_size=64, shuffle=True, drop_last=False)) == 1
    assert make_loader(views, batch_size=4, shuffle=True).num_workers == 0  # tiny data: no worker processes


def test_split_in_halves_disjoint_and_covering(tiny_splits):
    first, second = split_in_halves(tiny_splits.train, portion=0.5, seed=0)
    a, b = set(first["index"][:]), set(second["index"][:])
    assert len(first) == len(second) == 12 and not a & b and a | b == set(range(24))
    assert sorted(a) != list(range(12))  # shuffled before cutting
    third, _ = split_in_halves(tiny_splits.train, portion=0.25, seed=0)
    assert len(third) == 6
    with pytest.raises(ValueError, match="empty"):
        split_in_halves(tiny_splits.train.select([0]), portion=0.5)
