"""Streamed training data: order from (seed, epoch) alone, ranks that never overlap, exact resume against real
multi-worker DataLoaders, seeded halves and subsets, webdataset and folder streams, bad shards. Tiny images, real
parquet/tar files, in process (ranks are passed explicitly)."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from nasiam_hf.data import (
    NORMALIZATION, BadImageError, BatchAugmenter, DataError, build_decode_transform, build_transform, collate_views,
    decode_image, key_index, lane_batches_at, load_image_splits, open_stream, resume_point, resume_rotation,
)
from nasiam_hf.data.views import make_views

B = 4
TRANSFORM = build_transform("ssl", "cifar", 8, *NORMALIZATION["cifar10"])


def _png(seed, size=8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _shards(folder, sizes, row_group_size, bad=()):
    """Parquet shards ``part-<i>.parquet`` of ``sizes`` rows (labels row % 3); ``bad``: (shard, row) undecodable."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard, size in enumerate(sizes):
        images = [{"bytes": b"broken" if (shard, row) in bad else _png(100 * shard + row), "path": None}
                  for row in range(size)]
        pq.write_table(pa.table({"img": images, "label": [row % 3 for row in range(size)]}),
                       str(folder / f"part-{shard}.parquet"), row_group_size=row_group_size)
        keys += [f"part-{shard}.parquet:{row}" for row in range(size)]
    return str(folder), keys


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory):
    """4 shards x 24 rows, row groups of 8: 12 units."""
    return _shards(tmp_path_factory.mktemp("even"), [24] * 4, 8)


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Shards of 24, 16 and 12 rows, row groups of 4: 13 units, so two lanes get different numbers of batches."""
    return _shards(tmp_path_factory.mktemp("uneven"), [24, 16, 12], 4)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [dict(batch) for batch in loader]


def _same(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_order_depends_only_on_seed_and_epoch(even_shards):
    folder, keys = even_shards
    first = _epoch(open_stream(train_file=folder).loader(B, transform=TRANSFORM, seed=5), 3)
    again = _epoch(open_stream(train_file=folder).loader(B, transform=TRANSFORM, seed=5), 3)
    _same(first, again)  # rebuilt from scratch: the same batches, views included
    order = [i for b in first for i in b["index"].tolist()]
    other_epoch = [i for b in _epoch(open_stream(train_file=folder).loader(B, transform=TRANSFORM, seed=5), 4)
                   for i in b["index"].tolist()]
    other_seed = [i for b in _epoch(open_stream(train_file=folder).loader(B, transform=TRANSFORM, seed=6), 3)
                  for i in b["index"].tolist()]
    assert sorted(order) == sorted(other_epoch) == sorted(key_index(k) for k in keys)
    assert order != other_epoch and order != other_seed
    in_batch = {tuple(sorted(b["labels"].tolist())) for b in first}
    assert len(in_batch) > 1  # rows of several row groups get mixed inside the window


def test_two_ranks_are_disjoint_and_cover_every_key_once_per_epoch(even_shards):
    folder, keys = even_shards
    stream = open_stream(train_file=folder)
    expected = sorted(key_index(k) for k in keys)
    for workers in (0, 2):
        loaders = [stream.loader(B, transform=TRANSFORM, seed=1, rank=r, world_size=2, num_workers=workers)
                   for r in range(2)]
        for epoch in (0, 1):
            seen = [[i for b in _epoch(loader, epoch) for i in b["index"].tolist()] for loader in loaders]
            assert not set(seen[0]) & set(seen[1])
            assert sorted(seen[0] + seen[1]) == expected
            assert [len(s) // B for s in seen] == [loaders[0].batches_per_epoch(r, epoch) for r in range(2)]
        assert loaders[0].steps_in_epoch(0) == min(loaders[0].batches_per_epoch(r, 0) for r in range(2)) == 12
        assert loaders[1].total_steps(2) == 24 and len(loaders[1]) == 12


def test_round_robin_model_matches_torch_workers(uneven_shards):
    """lane_batches_at models the DataLoader's worker order, exhausted lanes included."""
    folder, _ = uneven_shards
    loader = open_stream(train_file=folder).loader(B, transform=TRANSFORM, num_workers=2)
    totals = loader.plan(0).lane_batches()
    assert totals[0] != totals[1]  # one lane runs out first
    raw = torch.utils.data.DataLoader(loader.dataset(), batch_size=B, num_workers=2, collate_fn=collate_views)
    lanes = [int(batch["lane"][0]) for batch in raw]
    assert len(lanes) == sum(totals)
    for position, lane in enumerate(lanes):
        before, after = lane_batches_at(totals, position), lane_batches_at(totals, position + 1)
        assert [a - b for a, b in zip(after, before)] == [int(i == lane) for i in range(2)]
        assert resume_rotation(before) == lane
    assert resume_point(totals, 3, B) == (1, [2 * B, 1 * B])
    assert resume_rotation([3, 3, 3]) == 0 and resume_rotation([4, 3, 3]) == 1
    assert resume_rotation([3, 3, 1]) == 2  # lane 2 ran out: it yields nothing, then lane 0 goes on, as from 0
    with pytest.raises(ValueError, match="past the end"):
        lane_batches_at(totals, sum(totals) + 1)


@pytest.mark.parametrize("position", [0, 3, 8, 12])
def test_resume_replays_the_rest_of_the_epoch_exactly(uneven_shards, position):
    folder, _ = uneven_shards
    stream = open_stream(train_file=folder)
    reference = _epoch(stream.loader(B, transform=TRANSFORM, seed=2, num_workers=2), 1)
    interrupted = stream.loader(B, transform=TRANSFORM, seed=2, num_workers=2)
    interrupted.set_epoch(1)
    batches = iter(interrupted)
    _same([next(batches) for _ in range(position)], reference[:position])
    state = interrupted.state_dict()
    batches.close()
    assert (state["epoch"], state["batches"], state["lanes"]) == (1, position, 2)
    for workers in (2, 0):  # the same workers, or the two lanes interleaved in this process
        resumed = stream.loader(B, transform=TRANSFORM, seed=2, num_workers=workers)
        notes = resumed.load_state_dict(state)
        assert bool(notes) == (workers == 0)
        resumed.set_epoch(1)
        _same([dict(b) for b in resumed], reference[position:])


def test_resume_checks_the_run_and_keeps_the_lane_count(even_shards):
    folder, _ = even_shards
    stream = open_stream(train_file=folder)
    state = stream.loader(B, transform=TRANSFORM, num_workers=2).state_dict()
    three = stream.loader(B, transform=TRANSFORM, num_workers=3)
    assert three.load_state_dict(state) == ["stream resume keeps the saved 2 lanes: 2 DataLoader workers (asked 3)"]
    assert (three.lanes, three.num_workers) == (2, 2)
    with pytest.raises(ValueError, match=r"--per_device_train_batch_size 4, this run has 8"):
        stream.loader(8, transform=TRANSFORM).load_state_dict(state)
    with pytest.raises(ValueError, match=r"number of processes 1, this run has 2"):
        stream.loader(B, transform=TRANSFORM, world_size=2).load_state_dict(state)
    finished = stream.loader(B, transform=TRANSFORM)
    _epoch(finished, 3)
    after = stream.loader(B, transform=TRANSFORM)
    after.load_state_dict(finished.state_dict())  # saved after the last batch of epoch 3: resumes at epoch 4
    assert after.epoch == 4 and after.state.batches == 0


def test_views_follow_the_per_sample_seeding(even_shards):
    folder, _ = even_shards
    stream = open_stream(train_file=folder)
    batch = _epoch(stream.loader(B, transform=TRANSFORM, seed=9), 2)[0]
    encoded = {key_index(f"part-{s}.parquet:{r}"): row["img"] for s in range(4)
               for r, row in enumerate(pq.read_table(f"{folder}/part-{s}.parquet").to_pylist())}
    for j, index in enumerate(batch["index"].tolist()):
        with torch.random.fork_rng(devices=[]):  # the map-style ViewDataset's seeding: (seed, epoch, index, view)
            views = make_views(decode_image(encoded[index], "x"), [TRANSFORM, TRANSFORM], 9, 2, index, False)
        assert torch.equal(views["pixel_values"], batch["pixel_values"][j])
        assert torch.equal(views["pixel_values_2"], batch["pixel_values_2"][j])
    decoded = _epoch(stream.loader(B, "decode", build_decode_transform("cifar", 8), seed=9), 2)[0]
    assert decoded["pixel_values"].dtype == torch.uint8 and decoded["epoch"].tolist() == [2] * B
    views = BatchAugmenter("ssl", "cifar", 8, *NORMALIZATION["cifar10"], seed=9)(decoded)
    assert views["pixel_values"].shape == (B, 3, 8, 8)


def test_stream_halves_are_disjoint_complete_and_fixed(even_shards):
    folder, keys = even_shards
    stream = open_stream(train_file=folder)
    first, second = stream.halves(0.5, seed=3)
    assert first.num_rows + second.num_rows == 96 and 30 < first.num_rows < 66
    seen = {}
    for name, half in (("first", first), ("second", second)):
        loader = half.loader(2, transform=TRANSFORM, seed=3)
        epochs = [sorted(i for b in _epoch(loader, e) for i in b["index"].tolist()) for e in (0, 1)]
        assert epochs[0] == epochs[1]  # the same half every epoch
        seen[name] = set(epochs[0])
    assert not seen["first"] & seen["second"]
    # every sample is in one half; a half's one lane holds back its last partial batch (batch 2: at most 1 row)
    assert len(seen["first"]) == first.num_rows // 2 * 2 and len(seen["second"]) == second.num_rows // 2 * 2
    assert seen["first"] | seen["second"] <= {key_index(k) for k in keys}
    again, _ = open_stream(train_file=folder).halves(0.5, seed=3)
    assert [k.tolist() for k in again.keep] == [k.tolist() for k in first.keep]
    with pytest.raises(ValueError, match="--train_portion must be in"):
        stream.halves(1.0)


def test_max_train_samples_is_a_fixed_subset_chosen_without_decoding(tmp_path, even_shards):
    folder, keys = even_shards
    subset = open_stream(train_file=folder, max_train_samples=20, seed=4)
    assert subset.num_rows == 20 and "stream subset: 20 of 96 samples" in subset.notes[-1]
    kept = {key_index(f"part-{u.file}.parquet:{u.first_row + p}") for u, k in zip(subset.source.units, subset.keep)
            for p in k.tolist()}
    loader = subset.loader(B, transform=TRANSFORM, seed=4)
    for epoch in (0, 1, 2):  # 20 rows, one lane, batches of 4: every kept sample, every epoch
        assert sorted(i for b in _epoch(loader, epoch) for i in b["index"].tolist()) == sorted(kept)
    assert [k.tolist() for k in open_stream(train_file=folder, max_train_samples=20, seed=5).keep] != [
        k.tolist() for k in subset.keep]
    # chosen from the footers alone: shards whose every image is broken give the same subset ("error" mode)
    broken, _ = _shards(tmp_path, [24] * 4, 8, bad={(s, r) for s in range(4) for r in range(24)})
    assert [k.tolist() for k in open_stream(train_file=broken, max_train_samples=20, seed=4).keep] == [
        k.tolist() for k in subset.keep]
    splits = load_image_splits(train_file=folder, streaming=True, max_train_samples=20, seed=4)
    assert splits.stream.num_rows == 20 and splits.train is None and splits.streaming


def _tar_shards(folder, count, per_shard, drop_image=None):
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(count):
        with tarfile.open(folder / f"shard-{shard:02d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"img{shard}{i:03d}"
                members = {"cls": str(i % 2).encode()}
                if (shard, i) != drop_image:
                    members["png"] = _png(shard * 100 + i)
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(f"shard-{shard:02d}.tar/{key}")
    return str(folder), keys


def test_webdataset_tar_stream(tmp_path):
    folder, keys = _tar_shards(tmp_path / "wds", 4, 6)
    stream = open_stream(train_file=folder)
    assert stream.num_rows is None and stream.labelled
    loader = stream.loader(2, transform=TRANSFORM, seed=0, num_workers=2)
    with pytest.raises(TypeError, match="pass --max_train_steps"):
        len(loader)
    reference = _epoch(loader, 0)
    assert sorted(i for b in reference for i in b["index"].tolist()) == sorted(key_index(k) for k in keys)
    assert {tuple(b["labels"].tolist()) for b in reference} <= {(0, 1), (1, 0), (0, 0), (1, 1)}
    interrupted = stream.loader(2, transform=TRANSFORM, seed=0, num_workers=2)
    interrupted.set_epoch(0)
    batches = iter(interrupted)
    [next(batches) for _ in range(5)]
    state = interrupted.state_dict()
    batches.close()
    resumed = stream.loader(2, transform=TRANSFORM, seed=0, num_workers=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    _same([dict(b) for b in resumed], reference[5:])  # the skipped samples are passed over by their tar headers
    counted = stream.subset(10, seed=0)
    assert counted.num_rows == 10 and len(counted.loader(2, transform=TRANSFORM)) == 5


def test_folder_stream_with_class_folders(tmp_path):
    for split, count in (("train", 6), ("test", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(count):
                path = tmp_path / "pets" / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_png(10 * c + i + 100 * (split == "test")))
    splits = load_image_splits(train_dir=str(tmp_path / "pets"), streaming=True)
    assert splits.stream.labelled and splits.stream.num_rows == 12 and splits.stream.class_names() == ["cat", "dog"]
    assert len(splits.eval) == 4 and splits.eval_labelled and splits.id2label == {0: "cat", 1: "dog"}  # test/
    batches = _epoch(splits.stream.loader(3, transform=TRANSFORM, num_workers=2), 0)  # 2 lanes x 2 batches of 3
    assert sorted(i for b in batches for i in b["index"].tolist()) == sorted(
        key_index(f"{n}/{i}.png") for n in ("cat", "dog") for i in range(6))
    assert sorted(b for batch in batches for b in batch["labels"].tolist()) == [0] * 6 + [1] * 6
    assert any("2 class folders, labels from folder names" in note for note in splits.notes)


def test_bad_images_and_shards_in_a_stream(tmp_path):
    folder, _ = _shards(tmp_path / "bad", [16, 16], 8, bad={(1, 5)})
    for workers in (0, 2):
        with pytest.raises(BadImageError, match=r"parquet shard 'part-1\.parquet', row 5: not a file format"):
            _epoch(open_stream(train_file=folder).loader(B, transform=TRANSFORM, num_workers=workers), 0)
    skipped = _epoch(open_stream(train_file=folder, on_bad_image="skip").loader(B, transform=TRANSFORM,
                                                                                num_workers=2), 0)
    assert sum(int(b["bad_images"]) for b in skipped) == 1 and all(b["index"].shape == (B,) for b in skipped)
    opened = open_stream(train_file=folder)
    (tmp_path / "bad" / "part-0.parquet").rename(tmp_path / "moved.parquet")  # gone after the stream was opened
    with pytest.raises(DataError, match=r"parquet shard 'part-0\.parquet' \(row group \d\) cannot be read: "
                                        r"FileNotFoundError"):
        _epoch(opened.loader(B, transform=TRANSFORM, num_workers=2), 0)  # raised in a worker: no hang
    (tmp_path / "moved.parquet").rename(tmp_path / "bad" / "part-0.parquet")
    (tmp_path / "bad" / "part-2.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"parquet shard 'part-2\.parquet' cannot be read"):
        open_stream(train_file=folder)
    tars, _ = _tar_shards(tmp_path / "wds", 1, 4, drop_image=(0, 2))
    with pytest.raises(BadImageError, match=r"webdataset shard 'shard-00\.tar', sample 'img0002': no 'png' member"):
        _epoch(open_stream(train_file=tars).loader(2, transform=TRANSFORM), 0)
    with pytest.raises(ValueError, match=r"--streaming reads parquet and webdataset \.tar shards .* json"):
        (tmp_path / "x.jsonl").write_text('{"image": "a.png"}')
        open_stream(train_file=str(tmp_path / "x.jsonl"))


def test_hub_style_dataset_streams_only_the_split_files(tmp_path):
    """Offline up to the URL resolution: a dataset folder resolves its split files the way a Hub id does; the
    shard names of hf:// URLs drop the repository prefix; opening one offline names the file."""
    from nasiam_hf.data.shards import open_binary
    from nasiam_hf.data.streaming import _shard_names

    data = tmp_path / "repo" / "data"
    _shards(data, [8, 8], 4)
    (data / "part-0.parquet").rename(data / "train-00000-of-00002.parquet")
    (data / "part-1.parquet").rename(data / "train-00001-of-00002.parquet")
    _shards(tmp_path / "eval", [5], 5)
    (tmp_path / "eval" / "part-0.parquet").rename(data / "test-00000-of-00001.parquet")  # the kNN queries: map-style
    (data / "extra-00000-of-00001.parquet").write_bytes(b"never read: not a split the run uses")
    splits = load_image_splits(dataset_name=str(tmp_path / "repo"), streaming=True, eval_split=None,
                               validation_file=None)
    assert splits.stream.num_rows == 16 and splits.stream.source.names == ["data/train-00000-of-00002.parquet",
                                                                           "data/train-00001-of-00002.parquet"]
    assert len(splits.eval) == 5 and splits.knn_sets().note.startswith("kNN monitor: the split 'test'")
    url = "hf://datasets/ILSVRC/imagenet-1k@0123abc/data/train-00000-of-00294.parquet"
    assert _shard_names([url], None) == ["data/train-00000-of-00294.parquet"]
    with pytest.raises(DataError, match=r"cannot be read: the Hugging Face Hub cannot be reached"):
        open_binary(url)


def test_streaming_an_uncached_hub_id_offline_says_what_to_pass(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "home" / "datasets")
    with pytest.raises(ValueError, match=r"--streaming 'uoft-cs/cifar10': .*offline mode is on .*--train_file with"):
        load_image_splits(dataset_name="cifar10", streaming=True, cache_dir=str(tmp_path / "cache"))


def test_shuffle_buffer_mixes_and_says_resume_is_inexact(even_shards):
    folder, keys = even_shards
    stream = open_stream(train_file=folder, shuffle_buffer_size=16)
    batches = _epoch(stream.loader(B, transform=TRANSFORM, seed=0), 0)
    assert sorted(i for b in batches for i in b["index"].tolist()) == sorted(key_index(k) for k in keys)
    plain = _epoch(open_stream(train_file=folder).loader(B, transform=TRANSFORM, seed=0), 0)
    assert [b["index"].tolist() for b in batches] != [b["index"].tolist() for b in plain]
    notes = stream.loader(B, transform=TRANSFORM).load_state_dict(stream.loader(B, transform=TRANSFORM).state_dict())
    assert any("order after the resume point differs" in note for note in notes)
