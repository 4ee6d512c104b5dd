"""The README's "Your own images" walk-through runs as written, offline: a folder made from the demo digits, a search
and a pretraining on it through the installed console scripts (shrunk with size flags appended: argparse keeps the
last value), then the features snippet against their outputs."""

import re
import shlex
import sys

import pytest

from conftest import readme_blocks, run_cli

SECTION = "## Your own images"
SHRINK = ["--max_train_samples", "48", "--image_size", "8", "--num_train_epochs", "1", "--per_device_train_batch_size",
          "8", "--hessian_every", "0"]


@pytest.mark.slow
def test_readme_own_images_walkthrough_runs(tmp_path):
    make_folder, commands, *_ = readme_blocks(SECTION, "bash")
    result = run_cli(["bash", "-c", make_folder.replace("python ", shlex.quote(sys.executable) + " ", 1)],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "photos").rglob("*.jpg"))) == 1497 and not list((tmp_path / "photos").glob("*.jpg"))
    lines = [line for line in commands.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == ["nasiam-search", "nasiam-pretrain"]
    for line in lines:
        flags = SHRINK if line.startswith("nasiam-search") else SHRINK[:-2]
        result = run_cli(["bash", "-c", f"{line} {shlex.join(flags)}"], cwd=tmp_path)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        if line.startswith("nasiam-pretrain"):
            assert "kNN monitor off: no labelled data" in result.stdout + result.stderr
    features, *_ = readme_blocks(SECTION, "python")
    namespace = {}
    exec(compile(features.replace('"runs/', f'"{tmp_path}/runs/').replace('"photos/', f'"{tmp_path}/photos/'),
                 "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert len(namespace["paths"]) == 1497 and tuple(namespace["features"].shape) == (8, 512)


def test_readme_features_snippet_finds_the_nested_photos(tmp_path, capsys, monkeypatch):
    """The section's folder is nested (year/month); its features snippet finds every image there and prints what
    its comment says. The folder is made by the README's own one-liner (its Python run in-process); the model is a
    fresh one saved as the pretraining would (weights + processor)."""
    import torch

    from nasiam_hf import NASiamConfig, NASiamModel
    from nasiam_hf.processing import build_image_processor

    make_folder, *_ = readme_blocks(SECTION, "bash")
    python, flag, code = shlex.split(make_folder.strip())
    assert (python, flag) == ("python", "-c")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own one-liner
    assert len(list((tmp_path / "photos").rglob("*.jpg"))) == 1497
    assert not list((tmp_path / "photos").glob("*.jpg"))  # every image is in a sub-folder
    torch.manual_seed(0)
    NASiamModel(NASiamConfig(image_size=32)).save_pretrained(tmp_path / "runs" / "photos-model")
    build_image_processor(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cifar").save_pretrained(
        tmp_path / "runs" / "photos-model")
    features, *_ = readme_blocks(SECTION, "python")
    stated = re.search(r"print\((.*)\)\s*#\s*(.*)", features).group(2)  # what the README says it prints
    namespace = {}
    exec(compile(features.replace('"runs/', f'"{tmp_path}/runs/').replace('"photos/', f'"{tmp_path}/photos/'),
                 "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert capsys.readouterr().out.strip() == stated == "1497 torch.Size([8, 512])"
    assert namespace["paths"][0].endswith("photos/2020/01/0000.jpg")
