"""Every error names its file, row or key, or flag (issue 20): bad data files, config files and weight files, and
names that are no local path and are then looked up on the Hub, each through the real command: one ``error:`` line,
exit status 2, nothing written, never torch's advice to unpickle a file."""

import base64
import json
import re

import pytest
import torch

from image_data import cifar_images, encode, write_tar
from nasiam_hf import NASiamConfig, NASiamModel
from nasiam_hf.commands import convert as convert_command
from nasiam_hf.commands import finetune as finetune_command
from nasiam_hf.commands import linear_eval as linear_eval_command
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.errors import without_unsafe_advice

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--genotype", "simclr-baseline", "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--image_size", "8", "--dataloader_num_workers", "0", "--knn_every", "0"]
UNSAFE_ADVICE = re.compile(r"weights_only\W+(set to\W+)?False")


@pytest.fixture(scope="module")
def images():
    return cifar_images(12, seed=11)[0]


def one_error(command, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        command.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(lines) == 1, err[-2000:]
    assert not UNSAFE_ADVICE.search(err)
    return lines[0]


# --------------------------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------------------------
def _tar_without_image(tmp_path, images):
    samples = [(f"s{i}", {"jpg": encode(image, "JPEG"), "cls": b"1"}) for i, image in enumerate(images)]
    samples[5] = ("s5", {"cls": b"0", "txt": b"a caption"})
    return ["--train_file", str(write_tar(tmp_path / "pairs.tar", samples))]


def _streamed_tar_without_image(tmp_path, images):
    return [*_tar_without_image(tmp_path, images), "--streaming", "--max_train_steps", "1"]


def _jsonl_broken_line(tmp_path, images):
    lines = [json.dumps({"image": base64.b64encode(encode(image)).decode()}) for image in images]
    lines[7] = '{"image": "x.png",'
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return ["--train_file", str(tmp_path / "rows.jsonl")]


def _jsonl_bad_base64(tmp_path, images):
    rows = [{"image": {"bytes": base64.b64encode(encode(image)).decode()}} for image in images]
    rows[4]["image"]["bytes"] = "not base64!"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--train_file", str(tmp_path / "rows.jsonl")]


def _damaged_arrow(tmp_path, images):
    folder = tmp_path / "arrows"
    folder.mkdir()
    (folder / "data-00000.arrow").write_bytes(b"ARROW1 but cut short" * 4)
    return ["--train_file", str(folder)]


def _missing_image_file(tmp_path, images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [f"pictures/{i}.png" for i in range(len(images))]
    pq.write_table(pa.table({"image": paths}), tmp_path / "paths.parquet")
    return ["--train_file", str(tmp_path / "paths.parquet")]


def _empty_image_cells(tmp_path, images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [{"data": encode(image)} for image in images]}), tmp_path / "cells.parquet")
    return ["--train_file", str(tmp_path / "cells.parquet")]


DATA = {
    "webdataset member": (_tar_without_image, r"error: train file '.*pairs\.tar': webdataset shard 'pairs\.tar', "
                                              r"sample 's5' has no 'jpg' member \(keys found: \['cls', 'txt'\]\): rerun "
                                              r"with --on_bad_image skip"),
    "streamed webdataset member": (_streamed_tar_without_image,
                                   r"error: train file '.*pairs\.tar': webdataset shard 'pairs\.tar', sample 's5': no "
                                   r"'jpg' member \(keys found: \['cls', 'txt'\]\)$"),
    "JSON-lines line": (_jsonl_broken_line, r"error: train file '.*rows\.jsonl': JSON-lines file 'rows\.jsonl' "
                                            r"cannot be read: line 8, column \d+: Expecting"),
    "base64 row": (_jsonl_bad_base64, r"error: train file '.*rows\.jsonl', row 4: the image's 'bytes' are not base64 "
                                      r"text"),
    "arrow file": (_damaged_arrow, r"error: train file '.*arrows': arrow file 'data-00000\.arrow' cannot be read: "
                                   r"ArrowInvalid"),
    "missing image file": (_missing_image_file, r"error: cannot decode the image of train file '.*paths\.parquet', "
                                                r"row \d+ \(file 'pictures/\d+\.png'\): no such file \(a relative "
                                                r"path is read from the folder the command runs in\)$"),
    "empty image cell": (_empty_image_cells, r"error: cannot decode the image of train file '.*cells\.parquet', row "
                                             r"\d+: the row holds no image \(neither 'bytes' nor 'path'\)$"),
}


@pytest.mark.parametrize("case", sorted(DATA))
def test_bad_data_files_are_named(case, images, tmp_path, capsys):
    make, message = DATA[case]
    out = tmp_path / "run"
    line = one_error(pretrain_command, [*make(tmp_path, images), "--output_dir", str(out), *TINY], capsys)
    assert re.match(message, line), line
    assert not out.exists()


def test_a_webdataset_sample_without_its_image_is_skipped_when_asked(images, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain_command.main([*_tar_without_image(tmp_path, images), "--output_dir", str(out), *TINY,
                           "--on_bad_image", "skip", "--max_train_steps", "1"])
    log = capsys.readouterr()
    # the load-time sample decodes every image of so small a file: the sample without its image is counted there
    assert "1 of 12 sampled training images cannot be decoded (--on_bad_image skip" in log.out + log.err
    assert (out / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------------------------------
CONFIGS = {
    "png": (lambda p, images: p.with_suffix(".yaml").write_bytes(encode(images[0])),
            r"is not YAML or JSON text: it is not UTF-8 \(byte 0x89 at position 0\); pass a text file"),
    "utf-16": (lambda p, images: p.with_suffix(".yaml").write_bytes("seed: 1\n".encode("utf-16")),
               r"is not YAML or JSON text: it is not UTF-8 \(byte 0xff at position 0\)"),
    "nul bytes": (lambda p, images: p.with_suffix(".yaml").write_bytes(b"seed: 1\n\x00\x00"),
                  r"is not YAML or JSON text \(it holds NUL bytes\)"),
    "yaml syntax": (lambda p, images: p.with_suffix(".yaml").write_text("learning_rate: 0.1\n  seed: [1\n"),
                    r"is not valid YAML: line 2, column 7: mapping values are not allowed here$"),
    "json syntax": (lambda p, images: p.with_suffix(".json").write_text('{"learning_rate": 0.1,}'),
                    r"is not valid JSON: line 1, column 23: Expecting property name enclosed in double quotes$"),
    "key twice": (lambda p, images: p.with_suffix(".yaml").write_text("seed: 1\nlearning_rate: 0.1\nseed: 2\n"),
                  r": 'seed' is given twice \(lines 1 and 3\): keep one$"),
    "folder": (lambda p, images: p.with_suffix(".yaml").mkdir(), r"is a folder: pass a YAML or JSON file"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_files_are_named(case, images, tmp_path, capsys):
    make, message = CONFIGS[case]
    make(tmp_path / "run_config", images)
    config = next(tmp_path.glob("run_config.*"))
    line = one_error(pretrain_command, ["--config", str(config), "--dataset_name", "demo", "--output_dir",
                                        str(tmp_path / "run")], capsys)
    assert re.match(rf"error: --config '{re.escape(str(config))}'{message}", line) or re.match(
        rf"error: --config '{re.escape(str(config))}' {message}", line), line


# --------------------------------------------------------------------------------------------------------------------
# Weight files and Hub lookups
# --------------------------------------------------------------------------------------------------------------------
def test_bad_weight_files_and_names_that_are_no_path(tiny_parquet, tmp_path, capsys, monkeypatch):
    train = ["--train_file", str(tiny_parquet[0]), "--output_dir", str(tmp_path / "run"), *TINY]
    (tmp_path / "text.safetensors").write_text("these are not weights")
    line = one_error(pretrain_command, [*train, "--backbone_weights", str(tmp_path / "text.safetensors")], capsys)
    assert re.match(r"error: backbone weights '.*text\.safetensors': '.*text\.safetensors' cannot be read, it is not "
                    r"a whole safetensors file \(.*\); save or download it again$", line), line
    model = tmp_path / "model"
    NASiamModel(NASiamConfig(image_size=8)).save_pretrained(model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 2])
    line = one_error(pretrain_command, [*train, "--backbone_weights", str(model)], capsys)
    assert re.match(r"error: backbone weights '.*model': '.*model/model\.safetensors' cannot be read", line), line
    line = one_error(pretrain_command, [*train, "--backbone_weights", "someone/weights"], capsys)
    assert line.startswith("error: backbone weights 'someone/weights' are neither a local file or folder (no such "
                           "path) nor torchvision weights of resnet18; valid names: ['DEFAULT', 'IMAGENET1K_V1']")

    # no local path, and offline not in the Hub cache: the message says both
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    for command, flags in ((finetune_command, ["--output_dir", str(tmp_path / "ft")]),
                           (linear_eval_command, [])):
        line = one_error(command, ["--model_name_or_path", "runs/my-model", "--train_file", str(tiny_parquet[0]),
                                   *flags], capsys)
        assert line.startswith("error: --model_name_or_path 'runs/my-model' is not a local path (no such file or "
                               "folder here), and as a Hub repository id it is not in the local cache (")
    line = one_error(pretrain_command, ["--dataset_name", "data/my_images", "--output_dir", str(tmp_path / "run"),
                                        *TINY], capsys)
    assert line.startswith("error: --dataset_name 'data/my_images': not a local folder (no such path here), and as "
                           "a Hub dataset id: it is not in the local cache and offline mode is on")
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()


def test_a_damaged_official_checkpoint_is_named_without_torchs_advice(tmp_path, capsys):
    genotype = tmp_path / "genotype.txt"
    genotype.write_text("['linear_relu', 'linear_relu']")
    for name, data in (("cut.pth.tar", b"PK\x03\x04 cut short"), ("code.pth.tar", b"\x80\x02c__main__\nC\nq\x00)")):
        (tmp_path / name).write_bytes(data)
        line = one_error(convert_command, ["official", str(tmp_path / name), str(tmp_path / "out"), "--genotype",
                                           str(genotype)], capsys)
        assert re.match(rf"error: '.*{re.escape(name)}' cannot be read as a checkpoint of the official code \(.*\): "
                        r"it is damaged, or not a PyTorch checkpoint$", line), line


class Unknown:
    """A class torch's weights_only loader does not allow."""


def test_torchs_unsafe_advice_is_dropped_from_every_message(tmp_path):
    import pickle

    for protocol in (2, 4):
        with open(tmp_path / "code.pt", "wb") as f:
            pickle.dump({"x": Unknown()}, f, protocol=protocol)
        with pytest.raises(Exception) as info:
            torch.load(tmp_path / "code.pt", weights_only=True)
        assert UNSAFE_ADVICE.search(str(info.value))  # torch's own message carries it
        text = without_unsafe_advice(f"checkpoint 'x' cannot be loaded (UnpicklingError: {info.value}): damaged")
        assert not UNSAFE_ADVICE.search(text) and "trusted source" not in text, text
        assert text.startswith("checkpoint 'x' cannot be loaded (UnpicklingError: not a file of tensors that loads "
                               "without running pickled code (") and text.endswith(")): damaged"), text
