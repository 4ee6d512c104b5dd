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
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cifar_subset():
    """Paths of the shared CIFAR-10 subset (10k train / 2k test parquet), skipping when it is absent."""
    train, test = SHARED_DATA / "train.parquet", SHARED_DATA / "test.parquet"
    if not train.exists():
        pytest.skip(f"shared CIFAR-10 subset not found at {SHARED_DATA}")
    return train, test
