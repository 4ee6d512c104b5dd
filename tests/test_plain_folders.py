"""Model folders are plain, as transformers writes them: every output of every command holds regular files at their
documented paths (no links, nothing hidden left behind), so copies, uploads and other tools read them as they are;
a new model replaces every weight file of the old one (sharded or single)."""

import os
import shutil
import subprocess

import pytest
import torch
from PIL import Image
from test_hub import fake_hub  # noqa: F401 - the local stand-in for the Hub API

from nasiam_hf import NASiamConfig, NASiamModel
from nasiam_hf.fileio import STAGING_DIR, staged_files

TINY = ["--per_device_train_batch_size", "8", "--image_size", "8", "--seed", "0"]


def assert_plain(folder):
    """Every entry under ``folder`` is a regular file or a folder, none a link; no save left a staging folder or a
    temporary file. Returns the names at the top."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            assert not os.path.islink(path), path
            assert os.path.isdir(path) or os.path.isfile(path), path
            assert not name.endswith(".tmp") and name != STAGING_DIR, path
    return sorted(os.listdir(folder))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def saved_model(folder, **config):
    from nasiam_hf.processing import image_processor_for_config

    model = NASiamModel(NASiamConfig(image_size=8, **config)).eval()
    with staged_files(folder) as staged:
        model.save_pretrained(staged)
        image_processor_for_config(model.config).save_pretrained(staged)
        (staged / "README.md").write_text("card")
    return model


@pytest.mark.slow  # one tiny run of each command, in-process: about 40-60 s
def test_every_command_writes_plain_folders(tiny_parquet, tmp_path):
    from nasiam_hf.commands import convert, finetune, linear_eval, pretrain, search

    train, test = map(str, tiny_parquet)
    out = {name: tmp_path / name for name in ("search", "pretrain", "finetune", "exported")}
    search.main(["--train_file", train, "--output_dir", str(out["search"]), "--framework", "simsiam",
                 "--projector_layers", "2", "--predictor_layers", "2", "--num_train_epochs", "1", *TINY])
    pretrain.main(["--train_file", train, "--output_dir", str(out["pretrain"]), "--genotype", str(out["search"]),
                   "--num_train_epochs", "1", "--knn_every", "0", *TINY])
    linear_eval.main(["--model_name_or_path", str(out["pretrain"]), "--train_file", train, "--validation_file", test,
                      "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--knn_k", "4"])
    finetune.main(["--model_name_or_path", str(out["pretrain"]), "--train_file", train, "--validation_file", test,
                   "--output_dir", str(out["finetune"]), "--num_train_epochs", "1", "--checkpointing_steps", "no",
                   *TINY])
    checkpoint = sorted((out["pretrain"] / "checkpoints").glob("step-*"))[-1]
    convert.main(["checkpoint", str(checkpoint), str(out["exported"])])
    expected = {
        "search": {"config.json", "genotype.json", "search_history.json", "genotype.png", "alphas.png"},
        "pretrain": {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_nasiam.py",
                     "training_history.json", "training_args.json", "eval_results.json", "linear_probe.safetensors"},
        "finetune": {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                     "eval_results.json", "finetune_history.json"},
        "exported": {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_nasiam.py"},
    }
    for name, folder in out.items():
        names = assert_plain(folder)
        assert expected[name] <= set(names), (name, names)
        assert not [n for n in names if n.startswith(".")], (name, names)
    assert NASiamConfig.from_pretrained(out["pretrain"]).projector_genotype == \
        NASiamConfig.from_pretrained(out["search"]).projector_genotype
    assert same_weights(NASiamModel.from_pretrained(out["exported"]).state_dict(),
                        NASiamModel.from_pretrained(out["pretrain"]).state_dict())


def test_copies_and_other_tools_read_the_folder_as_it_is(tmp_path):
    from transformers import AutoImageProcessor, pipeline

    folder = tmp_path / "model"
    saved_model(folder)
    model = saved_model(folder, framework="byol")  # a second save: nothing of the first may show through
    assert assert_plain(folder) == sorted(os.listdir(folder))
    shutil.copytree(folder, tmp_path / "kept", symlinks=True)  # links copied as links: there are none
    subprocess.run(["cp", "-r", str(folder), str(tmp_path / "cp")], check=True)
    for copy in ("kept", "cp"):
        assert same_weights(NASiamModel.from_pretrained(tmp_path / copy).state_dict(), model.state_dict()), copy
        assert NASiamConfig.from_pretrained(tmp_path / copy).framework == "byol"
    assert AutoImageProcessor.from_pretrained(tmp_path / "kept").crop_size == {"height": 8, "width": 8}
    features = pipeline("image-feature-extraction", model=str(tmp_path / "kept"), pool=True)(Image.new("RGB", (8, 8)))
    assert len(features[0]) == model.config.hidden_size


def test_an_uploaded_folder_loads_back(tmp_path, fake_hub):  # noqa: F811 - the fixture imported above
    """``upload_folder`` (through push_folder_to_hub) to the local stand-in sends the files as they are; written out
    again they load into the same model. An unfinished save is refused before anything is sent."""
    from nasiam_hf.errors import PushError
    from nasiam_hf.fileio import MANIFEST
    from nasiam_hf.hub import push_folder_to_hub

    folder = tmp_path / "model"
    model = saved_model(folder)
    push_folder_to_hub(folder, "someone/plain", token="hf_test_token")
    assert set(fake_hub.files) == set(os.listdir(folder))
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name, data in fake_hub.files.items():
        (downloaded / name).write_bytes(data)
    assert same_weights(NASiamModel.from_pretrained(downloaded).state_dict(), model.state_dict())
    (folder / STAGING_DIR).mkdir()
    (folder / STAGING_DIR / MANIFEST).write_text('{"files": ["config.json"], "remove": []}')
    os.replace(folder / "config.json", folder / STAGING_DIR / "config.json")  # killed between steps 3 and 5
    with pytest.raises(PushError, match="a save into this folder did not finish"):
        push_folder_to_hub(folder, "someone/plain", token="hf_test_token")
    assert len(fake_hub.commits) == 1


def test_a_new_model_replaces_every_weight_file_of_the_old_one(tmp_path):
    sharded = NASiamModel(NASiamConfig(image_size=8))
    with staged_files(tmp_path) as staged:
        sharded.save_pretrained(staged, max_shard_size="16MB")
    shards = sorted(n for n in os.listdir(tmp_path) if n.startswith("model-"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    single = NASiamModel(NASiamConfig(image_size=8, framework="byol"))
    with staged_files(tmp_path) as staged:
        single.save_pretrained(staged)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("model-") or n.endswith(".index.json")]
    assert same_weights(NASiamModel.from_pretrained(tmp_path).state_dict(), single.state_dict())
    with staged_files(tmp_path) as staged:
        sharded.save_pretrained(staged, max_shard_size="16MB")
    assert not (tmp_path / "model.safetensors").exists()
    assert same_weights(NASiamModel.from_pretrained(tmp_path).state_dict(), sharded.state_dict())
    with staged_files(tmp_path) as staged:  # a save without weights (a search result) keeps the weights
        NASiamConfig(image_size=8).save_pretrained(staged)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("model-")) == shards


def test_a_run_start_settles_an_interrupted_save_before_it_decides(tmp_path, capsys):
    """Killed after publish.json: the guard finishes the save first, so it sees the saved model (a run there without
    --resume_from_checkpoint is refused for holding one) instead of a folder with "nothing to keep"."""
    from accelerate import Accelerator
    from test_folders import interrupted_save

    from nasiam_hf.checkpoints import decide_output_dir, guard_output_dir
    from nasiam_hf.errors import OutputDirError

    identity = {"learning_rate": 0.06, "seed": 0}
    out = tmp_path / "run"
    decide_output_dir(out, identity, mutable_keys=set()).write_record()
    interrupted_save(out)
    with pytest.raises(OutputDirError, match=r"already holds this run \(a saved model\)"):
        guard_output_dir(Accelerator(cpu=True), out, identity, mutable_keys=set())
    assert "the model save a kill interrupted was completed" in capsys.readouterr().out
    assert NASiamConfig.from_pretrained(out).framework == "byol" and assert_plain(out)
