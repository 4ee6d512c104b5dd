"""benchmarks/throughput.py still runs against the package (it imports the engines' step functions and builders): a
tiny run of its step, optimizer and kNN parts with a timm backbone, in-process. Numbers are not checked, only
that every part ran and reported rates and memory."""

import importlib.util

import pytest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", REPO_ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_runs_on_a_timm_backbone(throughput, one_thread, capsys):
    result = throughput.main(["--device", "cpu", "--backbone", "timm/resnet18", "--image_size", "16",
                              "--batch_size", "2", "--repeats", "1", "--warmup", "0", "--variants", "fp32",
                              "--skip", "data", "--knn_images", "4", "--eval_batch_size", "2"])
    capsys.readouterr()  # the JSON on stdout
    assert result["config"]["backbone"] == "timm/resnet18"
    steps = result["steps"]["fp32"]
    for part in ("alpha_step", "search_weight_step", "pretrain_step"):
        assert steps[part]["images_per_second"] > 0 and steps[part]["peak_memory_mb"] > 0
    assert all("ms_per_step" in result["optimizer"][kind] for kind in ("for_loop", "foreach"))
    assert result["knn"]["fp32"]["extract_features"]["images_per_second"] > 0
