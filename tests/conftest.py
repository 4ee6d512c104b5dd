"""Shared test setup: everything runs offline, on the CPU, with small threads counts."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    """(train, test) parquet files shaped like the CIFAR-10 subset (class-ordered rows, CIFAR-10's class names),
    generated: 200 and 40 images of 32x32 pixels."""
    from image_data import write_cifar_like_parquet

    folder = tmp_path_factory.mktemp("cifar-like")
    return (write_cifar_like_parquet(folder / "train.parquet", 200, "train"),
            write_cifar_like_parquet(folder / "test.parquet", 40, "test"))


def write_image_parquet(path, num_images: int, size: int = 16, num_classes: int = 4, seed: int = 0):
    """A small labelled image dataset as a real parquet file (PNG bytes + ClassLabel), like the Hub's CIFAR files.

    Each class has its own colour with per-image noise and a random square, so a little training can separate them.
    """
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 215, size=(num_classes, 3))
    images, labels = [], []
    for i in range(num_images):
        label = i % num_classes
        pixels = np.clip(palette[label] + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
        x, y = rng.integers(0, size // 2, size=2)
        pixels[y: y + size // 3, x: x + size // 3] = 255 - palette[label]
        images.append(Image.fromarray(pixels))
        labels.append(label)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(num_classes)])}
    )
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_parquet(tmp_path_factory):
    """(train, test) parquet files: 48 and 16 images of 16x16 pixels, 4 classes."""
    folder = tmp_path_factory.mktemp("tiny-data")
    return (write_image_parquet(folder / "train.parquet", 48, seed=0),
            write_image_parquet(folder / "test.parquet", 16, seed=1))


def readme_blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section whose heading is ``section`` (up to the next ``## ``)."""
    import re

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(section) + len(section)
    following = re.search(r"^## ", text[start:], flags=re.MULTILINE)
    body = text[start: start + following.start()] if following else text[start:]
    return re.findall(rf"^```{language}\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)


def cli_env(env=None) -> dict:
    """The environment of every command-line subprocess of the tests: offline, unbuffered and with a fixed thread
    count, so runs compared bit for bit compute the same way whatever the caller's OMP_NUM_THREADS."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "2", **(env or {})}


def run_cli(args, timeout=600, env=None, cwd=None):
    """Run a command line as a subprocess, offline, returning the CompletedProcess (stdout+stderr kept)."""
    import subprocess

    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=cli_env(env),
                          cwd=cwd or REPO_ROOT)


@pytest.fixture
def one_thread():
    """Two shared cores: several intra-op threads fighting other processes are ~10x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def convnext_folder(tmp_path_factory):
    """A tiny transformers ConvNeXt config folder (widths 8-16-24-32), as `--backbone path/to/folder` takes it."""
    from transformers import ConvNextConfig

    folder = tmp_path_factory.mktemp("convnext")
    ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], patch_size=2, image_size=32).save_pretrained(
        folder)
    return folder


BLOCK_PACKAGE = '''
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "nasiam_hf":
            raise ImportError("nasiam_hf must not be imported here")
sys.meta_path.insert(0, _Block())
'''


def run_without_package(script: str):
    """Run a Python script in a subprocess where importing nasiam_hf fails (as for a user without the package)."""
    import sys
    import textwrap

    return run_cli([sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(script)], env={"OMP_NUM_THREADS": "1"},
                   timeout=300)


def accelerate_launch(script: str, *args, num_processes: int = 1, env=None, timeout=600):
    """A real ``accelerate launch`` of a repository script (one CPU process, or several over gloo)."""
    import sys

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["--multi_gpu", "--main_process_port", str(port)]
        env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    else:
        launcher += ["--cpu"]
    return run_cli([*launcher, script, *map(str, args)], env=env, timeout=timeout)
