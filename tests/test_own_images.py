"""Your own unlabelled images through the real commands (issue 11): a nested folder of photos in mixed modes and a
parquet without a label column each go search -> pretraining (the search folder as ``--genotype``) -> a model folder
that loads; the kNN monitor is off with its one line without labels and on with a labelled ``--validation_file``;
the label-needing commands say which flag to pass. In-process command runs on tiny images from the CIFAR-10 subset."""

import json
import re
import sys

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel

from conftest import run_cli
from image_data import cifar_images, write_labelled_parquet, write_mixed_folder, write_parquet
from nasiam_hf import NASiamConfig, NASiamModel
from nasiam_hf.commands import linear_eval as linear_eval_command
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.commands import search as search_command

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training on two shared cores

TINY = ["--per_device_train_batch_size", "8", "--image_size", "8", "--num_train_epochs", "1",
        "--dataloader_num_workers", "0"]
SEARCH = ["--framework", "simclr", "--projector_layers", "2", *TINY]
KNN_OFF = ("kNN monitor off: no labelled data (the training data has no labels, and no labelled eval data; pass "
           "--validation_file or --validation_dir with labels)")


def run(command, argv, capsys) -> str:
    """Run a console command in-process; returns what it printed (stdout and stderr)."""
    assert command.main(argv) is None  # console scripts end with sys.exit(main()): an object there would exit 1
    captured = capsys.readouterr()
    return captured.out + captured.err


def exit_line(command, argv, capsys) -> tuple[int, list[str]]:
    """Run a command that must fail: its exit status and its ``error:`` lines."""
    with pytest.raises(SystemExit) as info:
        command.main(argv)
    err = capsys.readouterr().err
    return info.value.code, [line for line in err.splitlines() if line.startswith("error:")]


def assert_search_then_pretrain_load(search_dir, model_dir, search_log, pretrain_log):
    """The search folder is a genotype the pretraining used; the model folder loads both ways, with equal features."""
    genotype = json.loads((search_dir / "genotype.json").read_text())
    assert NASiamConfig.from_pretrained(search_dir).projector_genotype == genotype["projector"]
    assert "search outputs written to" in search_log
    config = NASiamConfig.from_pretrained(model_dir)
    assert config.framework == "simclr" and config.projector_genotype == genotype["projector"]
    assert f"projector {genotype['projector']}" in pretrain_log
    processor = AutoImageProcessor.from_pretrained(model_dir)
    images, _ = cifar_images(3, split="test")
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 8, 8)
    with torch.no_grad():
        features = NASiamModel.from_pretrained(model_dir).eval()(pixels).pooler_output
        auto = AutoModel.from_pretrained(model_dir).eval()(pixels).pooler_output
    assert features.shape == (3, config.hidden_size) and torch.isfinite(features).all()
    assert torch.equal(features, auto)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 unlabelled photos in nested folders, in RGB / L / CMYK JPEG and RGBA / P / 16-bit PNG, and a notes file."""
    images, _ = cifar_images(48, seed=1)
    return write_mixed_folder(tmp_path_factory.mktemp("own") / "photos", images)


def test_unlabelled_photo_folder_search_pretrain_and_load(photos, tmp_path, capsys):
    search_dir, model_dir = tmp_path / "search", tmp_path / "model"
    search_log = run(search_command, ["--train_dir", str(photos), "--output_dir", str(search_dir), *SEARCH], capsys)
    assert "skipped 1 non-image file (e.g. '2021/notes.txt')" in search_log
    assert "48 images in nested folders: no labels" in search_log and "24 train + 24 val images" in search_log
    pretrain_log = run(pretrain_command, ["--train_dir", str(photos), "--genotype", str(search_dir),
                                          "--output_dir", str(model_dir), *TINY], capsys)
    assert pretrain_log.count("kNN monitor") == 1 and KNN_OFF in pretrain_log  # off, with its one line
    assert "; 48 images," in pretrain_log
    history = json.loads((model_dir / "training_history.json").read_text())
    assert len(history["epochs"]) == 1 and not any(k.startswith("knn") for k in history["epochs"][0])
    assert_search_then_pretrain_load(search_dir, model_dir, search_log, pretrain_log)

    # the commands that train on labels refuse the folder and name the flag that gives it labels
    code, lines = exit_line(linear_eval_command, ["--model_name_or_path", str(model_dir), "--train_dir", str(photos)],
                            capsys)
    assert code == 2 and len(lines) == 1 and "has no labels" in lines[0] and "--folder_labels yes" in lines[0]


def test_parquet_without_labels_search_pretrain_with_a_labelled_validation_file(tmp_path, capsys):
    images, _ = cifar_images(48, seed=2)
    train = write_parquet(tmp_path / "photos.parquet", images, caption=[f"photo {i}" for i in range(48)])
    queries, labels = cifar_images(40, split="test", seed=3)
    validation = write_labelled_parquet(tmp_path / "labelled.parquet", queries, labels)
    search_dir, model_dir = tmp_path / "search", tmp_path / "model"
    search_log = run(search_command, ["--train_file", str(train), "--output_dir", str(search_dir), *SEARCH], capsys)
    assert "24 train + 24 val images" in search_log
    pretrain_log = run(pretrain_command, ["--train_file", str(train), "--validation_file", str(validation),
                                          "--genotype", str(search_dir), "--output_dir", str(model_dir),
                                          "--knn_k", "10", *TINY], capsys)
    # the validation file is the only labelled set: a seeded split of it into memory and queries, sizes printed
    assert ("kNN monitor: the validation file " in pretrain_log
            and "is the only labelled set: split with seed 42 into memory 36 and queries 4 images" in pretrain_log)
    history = json.loads((model_dir / "training_history.json").read_text())
    assert 0.0 <= history["epochs"][0]["knn_top1"] <= 100.0
    assert f"kNN top-1 {history['epochs'][0]['knn_top1']:.2f}%" in pretrain_log
    assert_search_then_pretrain_load(search_dir, model_dir, search_log, pretrain_log)


@pytest.mark.slow  # about 20 s: one training subprocess
def test_a_console_script_exits_0_after_its_run(photos, tmp_path):
    """What the installed ``nasiam-pretrain`` runs: ``sys.exit(main())``; a finished run exits 0, printing no model."""
    script = "import sys; from nasiam_hf.commands.pretrain import main; sys.exit(main())"
    result = run_cli([sys.executable, "-c", script, "--train_dir", str(photos), "--genotype", "simclr-baseline",
                      "--output_dir", str(tmp_path / "model"), *TINY, "--max_train_steps", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NASiamForPreTraining(" not in result.stderr and (tmp_path / "model" / "model.safetensors").exists()


def test_commands_read_no_eval_split_they_do_not_use(tmp_path, capsys):
    """A dataset folder laid out like a Hub repository, whose test split is damaged: the search and a pretraining
    without the kNN monitor never read it (for a Hub id: never download it); a pretraining with the monitor does."""
    images, _ = cifar_images(16, seed=9)
    repo = tmp_path / "repo"
    write_parquet(repo / "data" / "train-00000-of-00001.parquet", images)
    (repo / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1 damaged: reading this split fails")
    common = ["--dataset_name", str(repo), *TINY, "--max_train_steps", "1"]
    run(search_command, [*common, "--output_dir", str(tmp_path / "search"), *SEARCH[:4]], capsys)
    log = run(pretrain_command, [*common, "--output_dir", str(tmp_path / "model"), "--genotype", "simclr-baseline",
                                 "--knn_every", "0"], capsys)
    assert "kNN monitor" not in log and (tmp_path / "model" / "model.safetensors").exists()
    code, lines = exit_line(pretrain_command, [*common, "--output_dir", str(tmp_path / "monitored"),
                                               "--genotype", "simclr-baseline"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert re.match(rf"error: split 'test' of '{re.escape(str(repo))}' \('.*test-00000-of-00001\.parquet'\) cannot be "
                    "read: ArrowInvalid: Parquet magic bytes not found", lines[0]), lines
