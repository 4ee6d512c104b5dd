"""The README's demo pipeline (search -> pretrain -> linear eval -> features) runs as written, offline.

The commands of the "## The whole pipeline on the demo data" section are run through bash, from the repository
root, with their output folders (``runs/...``) moved to a temporary folder and size flags appended (argparse keeps
the last value), so they finish in seconds; the section's Python block then runs against their outputs. The
launcher prefix ``accelerate launch --cpu`` (one process) is replaced by the interpreter: each script already has
its one real ``accelerate launch`` test, and the suite's budget allows no more.
"""

import json
import re
import shlex
import sys

import pytest

from conftest import readme_blocks, run_cli

SECTION = "## The whole pipeline on the demo data"
LAUNCHER = "accelerate launch --cpu "
SHRINK = ["--max_train_samples", "48", "--max_eval_samples", "24", "--image_size", "8", "--num_train_epochs", "1",
          "--per_device_train_batch_size", "8"]


def commands() -> list[str]:
    script = "\n".join(block for block in readme_blocks(SECTION, "bash"))
    joined = script.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("accelerate launch")]


@pytest.mark.slow  # the README's demo commands, each a subprocess (about 3.5 minutes here)
def test_readme_demo_pipeline_runs(tmp_path):
    lines = commands()
    assert [re.search(r"training/(\w+)\.py", line).group(1) for line in lines] == ["search", "pretrain", "linear_eval"]
    for line in lines:
        assert line.startswith(LAUNCHER), line
        line = shlex.quote(sys.executable) + " " + line.removeprefix(LAUNCHER).replace("runs/", f"{tmp_path}/runs/")
        result = run_cli(["bash", "-c", f"{line} {shlex.join(SHRINK)}"])
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    model = tmp_path / "runs" / "demo-model"
    assert json.loads((tmp_path / "runs" / "demo-search" / "genotype.json").read_text())["projector"]
    assert "linear_probe" in json.loads((model / "eval_results.json").read_text())

    (python,) = readme_blocks(SECTION, "python")
    namespace = {}
    code = python.replace('"runs/', f'"{tmp_path}/runs/')
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert tuple(namespace["features"].shape) == (4, 512)
