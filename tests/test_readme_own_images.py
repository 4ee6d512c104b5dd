"""The README's "Your own images" walk-through runs as written, offline: a folder made from the demo digits, a search
and a pretraining on it through the installed console scripts (shrunk with size flags appended: argparse keeps the
last value), then the features snippet against their outputs."""

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
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == 1497
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
    assert tuple(namespace["features"].shape) == (8, 512)
