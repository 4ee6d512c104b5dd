"""benchmarks/throughput.py still runs against the package (it imports the engines' step functions and builders): a
tiny run of its step, optimizer and kNN parts with a timm backbone, in-process. Numbers are not checked, only
that every part ran and reported rates and memory."""

import importlib.util
import sys

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


@pytest.mark.parametrize("argv, zeroed", [([], None), (["--backbone", "resnet18", "--zero_init_residual", "no"], False),
                                          (["--full"], True)])
def test_search_value_stages_take_flags_the_commands_accept(argv, zeroed, tmp_path, monkeypatch, cifar_subset):
    """Every arm's search and pretraining get the same common flags, which the real commands parse: the CPU protocol's
    timm ResNet-18 (ImageNet stem, residual BatchNorms at 1 through its own kwargs), a torchvision ResNet with the
    norms at 1, and --full with the reference's zeroed norms."""
    from nasiam_hf import PretrainCommand, SearchCommand

    spec = importlib.util.spec_from_file_location("search_value", REPO_ROOT / "benchmarks" / "search_value.py")
    search_value = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "search_value", search_value)  # its dataclasses look their module up
    spec.loader.exec_module(search_value)
    shared = tmp_path / "data"  # the benchmark's default files, as ../shared/data holds them: generated ones
    for name, source in (("cifar10/train.parquet", cifar_subset[0]), ("cifar10/test.parquet", cifar_subset[1]),
                         ("cifar10-full/train.parquet", cifar_subset[0])):
        (shared / name).parent.mkdir(parents=True, exist_ok=True)
        (shared / name).symlink_to(source)
    monkeypatch.setattr(search_value, "SHARED", shared)
    protocol = search_value.protocol_from_args(search_value.build_parser().parse_args(argv))
    common = search_value.common_flags(protocol, seed=1)
    assert protocol.zero_init_residual is zeroed and ("--no_zero_init_residual" in common) is (zeroed is False)
    search = SearchCommand.parse([*search_value.data_flags(protocol, with_eval=False), "--framework",
                                  protocol.framework, "--output_dir", str(tmp_path / "s"), *common])
    pretrain = PretrainCommand.parse([*search_value.data_flags(protocol, with_eval=True), "--genotype",
                                      f"{protocol.framework}-baseline", "--output_dir", str(tmp_path / "p"), *common])
    for command in (search, pretrain):
        assert command.model.no_zero_init_residual is (zeroed is False)
        assert command.model.backbone == protocol.backbone
        assert (command.run.seed, command.optimization.per_device_train_batch_size) == (1, protocol.batch_size)
