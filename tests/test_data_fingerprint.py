"""A run knows its data (issue 20): the output guard records a fingerprint of the run's data (names, sizes and
modification times of local files; a Hub dataset's revision) and refuses to resume over changed data, naming what
changed."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from nasiam_hf.arguments import DataArguments
from nasiam_hf.checkpoints import decide_output_dir
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.data import fingerprint as fingerprints
from nasiam_hf.data.fingerprint import fingerprint_data
from nasiam_hf.errors import OutputDirError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--genotype", "simclr-baseline", "--image_size", "8", "--per_device_train_batch_size", "8", "--seed", "0",
        "--knn_every", "0", "--dataloader_num_workers", "0", "--num_train_epochs", "1"]


def photo(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def photos(root, count=16):
    for i in range(count):
        photo(root / f"{'a' if i % 2 else 'b'}" / f"p{i:02d}.png", i)
    (root / "notes.txt").write_text("not an image: not part of the data")
    return root


def refusal(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        pretrain_command.main(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_resuming_over_changed_photos_is_refused_naming_the_files(tmp_path, capsys):
    data, out = photos(tmp_path / "photos"), tmp_path / "run"
    argv = ["--train_dir", str(data), "--output_dir", str(out), *TINY, "--max_train_steps", "1",
            "--checkpointing_steps", "1"]
    pretrain_command.main(argv)
    record = json.loads((out / "run_args.json").read_text())
    assert record["data_fingerprint"]["train_dir"]["files"] == 16  # images only: notes.txt is not read
    assert len(json.loads((out / "data_files.json").read_text())["train_dir"]["files"]) == 16
    (data / "notes.txt").write_text("edited")  # not data: no change
    (data / ".DS_Store").write_text("hidden")
    assert fingerprint_data(DataArguments(train_dir=str(data))).summary == record["data_fingerprint"]
    capsys.readouterr()

    for i in (20, 21, 22):
        photo(data / "a" / f"new{i}.png", i)
    photo(data / "b" / "p00.png", 99)  # same name, new content
    os.utime(data / "b" / "p00.png", ns=(1, 1))
    line = refusal([*argv, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"], capsys)
    assert re.search(rf"error: cannot resume the run in '{re.escape(str(out))}': train_dir '{re.escape(str(data))}':"
                     r" 3 files added, 1 file changed \(size or modification time\) since the run started: "
                     r"'a/new20.png' \(added\), 'a/new21.png' \(added\), 'a/new22.png' \(added\), 'b/p00.png' "
                     r"\(changed\), and these may not change on resume .*Resume with the original values and data",
                     line), line
    line = refusal(argv, capsys)  # without --resume_from_checkpoint: a different run
    assert "already holds a different run (train_dir" in line and "3 files added" in line


def test_a_parquet_file_rewritten_and_a_hub_revision(tmp_path, tiny_parquet, monkeypatch):
    import shutil

    data = tmp_path / "train.parquet"
    shutil.copy(tiny_parquet[0], data)
    out = tmp_path / "run"
    args = DataArguments(train_file=str(data))
    plan = decide_output_dir(out, {"seed": 0}, mutable_keys=set(), data=fingerprint_data(args))
    plan.write_record()
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)  # a run that has something to keep
    (out / "config.json").write_text("{}")
    assert decide_output_dir(out, {"seed": 0}, mutable_keys=set(), resume="latest",
                             data=fingerprint_data(args)).action == "resume"
    data.write_bytes(data.read_bytes() + b"x")
    with pytest.raises(OutputDirError, match=r"train_file '.*train.parquet': 1 file changed \(size or modification "
                                             r"time\) since the run started: 'train.parquet' \(changed\)"):
        decide_output_dir(out, {"seed": 0}, mutable_keys=set(), resume="latest", data=fingerprint_data(args))

    # a Hub dataset: its revision (offline: the one in the local cache); unknown revisions are not compared
    cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    ref = cache / "datasets--owner--photos" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("1111aaaa")
    hub = DataArguments(dataset_name="owner/photos")
    assert fingerprint_data(hub).summary == {"dataset_name": {"source": "owner/photos", "revision": "1111aaaa"}}
    other = tmp_path / "hub-run"
    decide_output_dir(other, {"seed": 0}, mutable_keys=set(), data=fingerprint_data(hub)).write_record()
    (other / "config.json").write_text("{}")
    ref.write_text("2222bbbb")
    with pytest.raises(OutputDirError, match=r"dataset_name 'owner/photos': the Hub dataset's revision changed since "
                                             r"the run started \(1111aaaa -> 2222bbbb\)"):
        decide_output_dir(other, {"seed": 0}, mutable_keys=set(), resume="latest", data=fingerprint_data(hub))
    ref.unlink()  # unknown now: not compared
    assert decide_output_dir(other, {"seed": 0}, mutable_keys=set(), resume="latest",
                             data=fingerprint_data(hub)).action == "resume"


def test_a_large_folder_names_the_folders_that_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprints, "LISTED_FILES", 10)  # as if the folder held more files than are listed
    data = photos(tmp_path / "photos", count=16)
    args = DataArguments(train_dir=str(data))
    before = fingerprint_data(args)
    assert set(before.listing["train_dir"]) == {"folders"}
    photo(data / "a" / "extra.png", 50)
    changes = fingerprint_data(args).changes_since(before.summary, before.listing)
    assert changes == [f"train_dir {str(data)!r}: files changed since the run started (16 files, "
                       f"{before.summary['train_dir']['bytes']} bytes -> 17 files, "
                       f"{before.summary['train_dir']['bytes'] + (data / 'a' / 'extra.png').stat().st_size} bytes) "
                       "in 1 of 2 folders: 'a' (8 -> 9 files)"]
