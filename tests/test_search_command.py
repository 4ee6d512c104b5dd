"""The search end to end: a real ``accelerate launch training/search.py`` and an interrupted-then-resumed search."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO_ROOT, accelerate_launch, cli_env, run_cli
from nasiam_hf import NASiamConfig, NASiamModel
from nasiam_hf.search_space import SEARCH_SPACES

SEARCH_ARGS = ["--per_device_train_batch_size", "8", "--seed", "3", "--image_size", "8"]


@pytest.fixture(scope="module")
def search_run(tiny_parquet, tmp_path_factory):
    train, _ = tiny_parquet
    out = tmp_path_factory.mktemp("search") / "run"
    result = accelerate_launch("training/search.py", "--train_file", train, "--output_dir", out,
                               "--num_train_epochs", "2", *SEARCH_ARGS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.mark.slow  # an accelerate launch of a 2-epoch search (about 4 minutes on a loaded 2-core machine)
def test_search_writes_every_output(search_run):
    out, result = search_run
    assert "effective lr 0.001875 (= base 0.06 x 8/256)" in result.stdout + result.stderr
    config = NASiamConfig.from_pretrained(out)
    genotype = json.loads((out / "genotype.json").read_text())
    assert genotype == {"projector": config.projector_genotype, "predictor": config.predictor_genotype}
    assert len(config.projector_genotype) == 6 and len(config.predictor_genotype) == 4
    NASiamModel(config)  # usable directly to build the discrete model for pretraining

    history = json.loads((out / "search_history.json").read_text())
    assert history["ops"] == list(SEARCH_SPACES["S"])
    assert [e["epoch"] for e in history["epochs"]] == [0, 1]
    for record in history["epochs"]:
        for key in ("train_loss", "val_loss", "collapse_std", "identity_share"):
            assert isinstance(record[key], float)
        assert -1.0 <= record["train_loss"] <= 1.0 and 0.0 <= record["identity_share"] <= 1.0
        for cell, layers in record["op_weights"].items():
            assert len(layers) == {"projector": 6, "predictor": 4}[cell]
            for weights in layers:
                assert len(weights) == 7 and abs(sum(weights) - 1.0) < 1e-5
    # the genotype follows the final alphas
    final = history["epochs"][-1]["op_weights"]
    for cell, layers in final.items():
        expected = [history["ops"][max(range(7), key=w.__getitem__)] for w in layers]
        assert genotype[cell] == expected
    assert history["genotype"] == genotype
    for name in ("alphas.png", "search_loss.png", "genotype.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 200
    args = json.loads((out / "training_args.json").read_text())
    assert args["framework"] == "simsiam" and "torch" in args["package_versions"]
    assert not list(out.glob(".*.tmp"))  # no staging leftovers


def _final_alphas(folder):
    history = json.loads((folder / "search_history.json").read_text())
    return torch.tensor([w for layers in history["epochs"][-1]["op_weights"].values() for w in layers])


@pytest.mark.slow  # three search subprocesses, one stopped with SIGTERM and resumed
def test_interrupted_search_resumes_to_the_same_alphas(tiny_parquet, tmp_path):
    train, _ = tiny_parquet
    common = [sys.executable, "training/search.py", "--train_file", str(train), "--num_train_epochs", "4",
              "--checkpointing_steps", "1", "--framework", "mocov2", "--queue_size", "16", *SEARCH_ARGS]
    straight = tmp_path / "straight"
    result = run_cli([*common, "--output_dir", str(straight)])
    assert result.returncode == 0, result.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([*common, "--output_dir", str(interrupted)], cwd=REPO_ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((interrupted / "checkpoints").glob("step-*")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "stop requested: checkpoint saved" in output
    assert not (interrupted / "genotype.json").exists()  # it stopped before the end
    steps = sorted(int(p.name.split("-")[1]) for p in (interrupted / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < 12

    result = run_cli([*common, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {interrupted / 'checkpoints'}" in result.stdout + result.stderr
    assert torch.allclose(_final_alphas(interrupted), _final_alphas(straight), atol=1e-6, rtol=0)
    genotype = json.loads((straight / "genotype.json").read_text())
    assert json.loads((interrupted / "genotype.json").read_text()) == genotype
    # the last checkpoints hold the same supernet (weights, alphas, momentum encoder, queue)
    a = load_file(straight / "checkpoints" / "step-00000012" / "model.safetensors")
    b = load_file(interrupted / "checkpoints" / "step-00000012" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, rtol=0), key
