"""Bad training data through the real commands (issue 11): each gives one ``error:`` line naming the file, shard, row
or flag, with exit status 2 and no output folder when found before the first step, exit status 1 with the last
checkpoint kept when found during training; ``--on_bad_image skip`` completes and counts. In-process runs."""

import json
import re

import pytest

from image_data import cifar_images, encode, write_parquet, write_parquet_shards, write_tar
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.commands import search as search_command
from nasiam_hf.data import NORMALIZATION, BadImageError, build_transform, key_index, load_image_splits, open_stream

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training on two shared cores

TINY = ["--per_device_train_batch_size", "8", "--image_size", "8", "--dataloader_num_workers", "0", "--seed", "3"]
PRETRAIN = ["--genotype", "simclr-baseline", "--num_train_epochs", "1", *TINY]
SEARCH = ["--framework", "simclr", "--projector_layers", "2", "--num_train_epochs", "1", *TINY]
GARBAGE = b"scraped bytes that are no image"
CIFAR = NORMALIZATION["cifar10"]
SHARDS = [32] * 3  # the streamed case: 96 rows in 3 parquet shards of 4 row groups


def failing(command, argv, capsys) -> tuple[int, str, str]:
    """Run a command that must fail: (exit status, its one ``error:`` line, everything it printed)."""
    with pytest.raises(SystemExit) as info:
        command.main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err[-2000:]
    return info.value.code, lines[0], captured.out + captured.err


@pytest.fixture(scope="module")
def images():
    return cifar_images(96, seed=4)[0]


@pytest.mark.parametrize("command,flags", [(pretrain_command, PRETRAIN), (search_command, SEARCH)],
                         ids=["pretrain", "search"])
def test_an_undecodable_image_found_before_the_first_step(images, tmp_path, capsys, command, flags):
    data = write_parquet(tmp_path / "scraped.parquet", images[:20], broken={7: GARBAGE})
    out = tmp_path / "run"
    code, line, _ = failing(command, ["--train_file", str(data), "--output_dir", str(out), *flags], capsys)
    assert code == 2 and not out.exists()  # the load-time sample decodes every image of so small a file
    assert line == f"error: cannot decode the image of train file '{data}', row 7: not a file format PIL can read"


def _row_outside_the_load_time_sample(tmp_path, images, seed: int, streaming: bool = False) -> int:
    """A row whose breakage the load-time image sample does not see (64 of the 96 rows of a file; 4 of the 12 units
    of a stream), found with the real loader, so that the bad image is met only during training. A stream's
    candidates are tried from the middle of its first epoch's order out (two lanes, batches of 8): after the first
    checkpoints, and before the lanes' last batches (rows a lane cannot fill a batch with are not trained)."""
    candidates = list(range(len(images) - 1, -1, -1))
    if streaming:
        shards, keys = write_parquet_shards(tmp_path / "order", images, SHARDS, row_group_size=8)
        loader = open_stream(train_file=str(shards)).loader(8, transform=build_transform("eval", "cifar", 8, *CIFAR),
                                                            seed=seed, num_workers=2)
        order = [i for batch in loader for i in batch["index"].tolist()]
        position = {index: p for p, index in enumerate(order)}
        candidates.sort(key=lambda row: abs(position[key_index(keys[row])] - len(order) // 2))
    for row in candidates:
        data = tmp_path / f"probe-{row}"
        if streaming:
            write_parquet_shards(data, images, SHARDS, row_group_size=8, broken={row: GARBAGE})
        else:
            write_parquet(data / "train.parquet", images, broken={row: GARBAGE})
        try:
            load_image_splits(train_file=str(data), seed=seed, cache_dir=str(tmp_path / "cache"), streaming=streaming)
        except BadImageError:
            continue
        return row
    raise AssertionError("every row is in the load-time sample")  # pragma: no cover


def test_an_undecodable_image_found_during_training_then_skipped(images, tmp_path, capsys):
    row = _row_outside_the_load_time_sample(tmp_path, images, seed=3)
    data = write_parquet(tmp_path / "scraped.parquet", images, broken={row: GARBAGE})
    out = tmp_path / "run"
    argv = ["--train_file", str(data), "--output_dir", str(out), *PRETRAIN, "--num_train_epochs", "2",
            "--checkpointing_steps", "1"]
    code, line, _ = failing(pretrain_command, argv, capsys)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert code == 1 and checkpoints  # stopped with exit status 1, keeping what it had saved
    assert line == (f"error: cannot decode the image of train file '{data}', row {row}: not a file format PIL can "
                    f"read; the run stopped (the last checkpoint is {out / 'checkpoints' / checkpoints[-1]}): rerun "
                    "with --on_bad_image skip --resume_from_checkpoint latest")
    assert not (out / "model.safetensors").exists()

    # what the message says to do: the run continues from that checkpoint, skips the image and counts it per epoch
    pretrain_command.main([*argv, "--on_bad_image", "skip", "--resume_from_checkpoint", "latest",
                           "--checkpointing_steps", "no"])
    log = capsys.readouterr()
    log = log.out + log.err
    assert f"resumed from {out / 'checkpoints' / checkpoints[-1]}" in log
    for epoch in (0, 1):  # the bad row sits in every epoch (12 full batches of 96 rows)
        assert f"epoch {epoch}: skipped 1 undecodable image (--on_bad_image skip)" in log
    history = json.loads((out / "training_history.json").read_text())
    assert [e["bad_images_skipped"] for e in history["epochs"]] == [1, 1]
    assert (out / "model.safetensors").exists()


def test_a_streamed_run_stops_at_a_bad_image_met_in_a_worker_then_skips_it(images, tmp_path, capsys):
    """Two DataLoader workers: the error raised in one ends the run (no hang), naming the shard and row."""
    row = _row_outside_the_load_time_sample(tmp_path, images, seed=3, streaming=True)
    shards, _ = write_parquet_shards(tmp_path / "shards", images, SHARDS, row_group_size=8, broken={row: GARBAGE})
    out = tmp_path / "run"
    argv = ["--train_file", str(shards), "--streaming", "--output_dir", str(out), *PRETRAIN,
            "--dataloader_num_workers", "2", "--checkpointing_steps", "2"]
    code, line, _ = failing(pretrain_command, argv, capsys)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert code == 1 and checkpoints, line
    assert line == (f"error: cannot decode the image of train file '{shards}': parquet shard 'part-{row // 32}.parquet'"
                    f", row {row % 32}: not a file format PIL can read; the run stopped (the last checkpoint is "
                    f"{out / 'checkpoints' / checkpoints[-1]}): rerun with --on_bad_image skip "
                    "--resume_from_checkpoint latest")
    pretrain_command.main([*argv, "--on_bad_image", "skip", "--resume_from_checkpoint", "latest",
                           "--checkpointing_steps", "no"])
    log = capsys.readouterr()
    assert "epoch 0: skipped 1 undecodable image (--on_bad_image skip)" in log.out + log.err
    history = json.loads((out / "training_history.json").read_text())
    assert [e["bad_images_skipped"] for e in history["epochs"]] == [1]


def _empty_parquet(tmp_path, images):
    return ["--train_file", str(write_parquet(tmp_path / "empty.parquet", []))]


def _folder_without_images(tmp_path, images):
    folder = tmp_path / "documents"
    (folder / "2024").mkdir(parents=True)
    (folder / "2024" / "report.txt").write_text("no images here")
    (folder / "scan.gif").write_bytes(encode(images[0], "GIF"))
    return ["--train_dir", str(folder)]


def _shard_without_image_key(tmp_path, images):
    path = write_tar(tmp_path / "captions.tar", [("sample0", {"txt": b"a cat", "json": b"{}"})])
    return ["--train_file", str(path)]


def _damaged_shard(tmp_path, images):
    shards, _ = write_parquet_shards(tmp_path / "shards", images[:16], [8, 8], row_group_size=4)
    (shards / "part-2.parquet").write_bytes(b"PAR1 cut short")
    return ["--train_file", str(shards), "--streaming"]


def _uncounted_stream(tmp_path, images):
    for shard in range(2):
        write_tar(tmp_path / "shards" / f"shard-{shard}.tar",
                  [(f"s{shard}{i}", {"jpg": encode(images[8 * shard + i], "JPEG")}) for i in range(8)])
    return ["--train_file", str(tmp_path / "shards"), "--streaming"]


@pytest.mark.parametrize("make,message", [
    (_empty_parquet, r"error: The train file '.*empty\.parquet' is empty \(0 rows\)\.$"),
    (_folder_without_images, r"error: train_dir '.*documents' has no images: looked for \.bmp, \.jpeg, \.jpg, \.png, "
                             r"\.webp files \(any letter case, any depth\); skipped 2 other files such as "),
    (_shard_without_image_key, r"error: webdataset shard 'captions\.tar' has no image key: sample 'sample0' has the "
                               r"keys \['json', 'txt'\], none of \['jpg', 'jpeg', 'png', 'webp', 'bmp'\]"),
    (_damaged_shard, r"error: parquet shard 'part-2\.parquet' cannot be read: ArrowInvalid"),
    (_uncounted_stream, r"error: the length of the streamed training data is unknown \(its shards are not counted\): "
                        r"pass --max_train_steps"),
], ids=["no-rows", "no-images", "no-image-key", "damaged-shard", "unknown-length"])
def test_bad_training_data_is_one_line_before_anything_is_written(images, tmp_path, capsys, make, message):
    out = tmp_path / "run"
    code, line, _ = failing(pretrain_command, [*make(tmp_path, images), "--output_dir", str(out), *PRETRAIN], capsys)
    assert code == 2 and not out.exists()
    assert re.match(message, line), line


def test_an_uncounted_stream_runs_with_max_train_steps_and_steps_checkpoints(images, tmp_path, capsys):
    """The way out the unknown-length message names: --max_train_steps, with checkpoints counted in steps."""
    out = tmp_path / "run"
    pretrain_command.main([*_uncounted_stream(tmp_path, images), "--output_dir", str(out), *PRETRAIN,
                           "--per_device_train_batch_size", "4", "--max_train_steps", "5",
                           "--checkpointing_steps", "2steps", "--checkpoints_total_limit", "5"])
    log = capsys.readouterr()
    assert "length unknown until read (webdataset shards are not counted)" in log.out + log.err
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (out / "model.safetensors").exists()
