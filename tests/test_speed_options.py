"""Speed options give the same results: channels_last, bf16 autocast, fused heads and optimizers, torch.compile's
state dict, and views drawn on the accelerator (seeded per sample like the per-image path).

Tolerances, on one fixed batch with train-mode BatchNorm (batch statistics, so every variant sees the same
normalisation): channels_last |dL| <= 1e-5 * max(1, |L|) (only the convolution algorithm changes); bf16 autocast
|dL| <= 5e-2 * max(1, |L|) (8-bit mantissas in the convolutions and matmuls; losses and BatchNorm statistics stay fp32).
"""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from nasiam_hf import NASiamConfig
from nasiam_hf.data.augment import BatchAugmenter
from nasiam_hf.data import (
    ViewDataset, build_decode_transform, build_transform, collate_views, load_image_splits, make_loader,
    set_loader_epoch,
)
from nasiam_hf.heads import MixedLayer
from nasiam_hf.modeling_nasiam import NASiamForPreTraining
from nasiam_hf.optimization import model_inputs
from nasiam_hf.search_space import SEARCH_SPACES
from nasiam_hf.optimization import build_optimizer, fused_optimizer_supported
from nasiam_hf.trainer import DeviceSums, prepare_model_layout

CHANNELS_LAST_TOLERANCE = 1e-5
BF16_TOLERANCE = 5e-2


@pytest.fixture
def fresh_accelerator():
    """Accelerators of different mixed precision in one process (Accelerate keeps a singleton state)."""
    def make(mixed_precision: str) -> Accelerator:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return Accelerator(cpu=True, mixed_precision=mixed_precision)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("framework", ["simsiam", "simclr", "mocov2", "byol"])
def test_channels_last_and_bf16_losses_match_fp32(framework, fresh_accelerator, one_thread):
    model = NASiamForPreTraining(NASiamConfig(framework=framework, image_size=16)).train()
    g = torch.Generator().manual_seed(1)
    batch = {key: torch.randn(8, 3, 16, 16, generator=g) for key in ("pixel_values", "pixel_values_2")}
    losses = {}
    for name, precision, channels_last in (("fp32", "no", False), ("channels_last", "no", True),
                                           ("bf16", "bf16", False)):
        accelerator = fresh_accelerator(precision)
        prepared = prepare_model_layout(model, accelerator, channels_last)
        view_1, view_2 = model_inputs(prepared, batch)
        assert view_1.is_contiguous(memory_format=torch.channels_last) == channels_last
        with torch.no_grad(), accelerator.autocast():
            out = prepared(view_1, view_2)
        assert out.loss.dtype == torch.float32
        losses[name] = out.loss.item()
    scale = max(1.0, abs(losses["fp32"]))
    assert abs(losses["channels_last"] - losses["fp32"]) <= CHANNELS_LAST_TOLERANCE * scale, losses
    assert abs(losses["bf16"] - losses["fp32"]) <= BF16_TOLERANCE * scale, losses
    bn = model.nasiam.backbone.bn1
    assert bn.running_mean.dtype == torch.float32 and bn.weight.dtype == torch.float32


@pytest.mark.parametrize("d_in,d_out,output", [(12, 12, False), (16, 8, False), (8, 16, True), (12, 12, True)])
def test_fused_mixed_layer_equals_the_separate_ops(d_in, d_out, output):
    layer = MixedLayer(SEARCH_SPACES["S"], d_in, d_out, output)
    for module in layer.modules():
        if isinstance(module, nn.BatchNorm1d):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(10, d_in)
    weights = torch.softmax(torch.randn(7), dim=0)
    for training in (False, True):
        layer.train(training)
        separate = [layer.export_op(k) for k in range(7)]  # the modules build_op makes, holding the same values
        expected = sum(w * op(x) for w, op in zip(weights, separate))
        assert torch.allclose(layer(x, weights), expected, atol=1e-5)
        if training:  # running statistics moved exactly as the separate BatchNorms' did
            layer.eval()
            for k, op in enumerate(separate):
                assert torch.allclose(layer.export_op(k).eval()(x), op.eval()(x), atol=1e-5)


def test_optimizer_implementations():
    params = [nn.Parameter(torch.randn(3, 3))]
    auto = build_optimizer(torch.optim.SGD, params, "auto", lr=0.1, momentum=0.9)
    assert auto.defaults.get("fused") is (True if fused_optimizer_supported("cpu") else None)
    assert build_optimizer(torch.optim.AdamW, params, "foreach", lr=0.1).defaults["foreach"] is True
    assert build_optimizer(torch.optim.SGD, params, "for_loop", lr=0.1).defaults["foreach"] is False
    with pytest.raises(ValueError, match="implementation"):
        build_optimizer(torch.optim.SGD, params, "fastest", lr=0.1)
    # fused and for-loop SGD take the same step
    results = []
    for implementation in ("fused", "for_loop"):
        p = nn.Parameter(torch.ones(4))
        opt = build_optimizer(torch.optim.SGD, [p], implementation, lr=0.5, momentum=0.9, weight_decay=0.1)
        for _ in range(3):
            p.grad = torch.arange(4.0)
            opt.step()
        results.append(p.detach().clone())
    assert torch.allclose(*results, atol=1e-6)


def test_torch_compile_keeps_state_dict_keys(fresh_accelerator):
    config = NASiamConfig(framework="byol", image_size=16)
    keys = list(NASiamForPreTraining(config).state_dict())
    compiled = prepare_model_layout(NASiamForPreTraining(config), fresh_accelerator("no"), False, torch_compile=True)
    assert list(compiled.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    assert compiled.nasiam.backbone._compiled_call_impl is not None
    assert compiled.momentum_backbone._compiled_call_impl is not None


def test_device_sums_fold_without_a_sync_per_step():
    sums = DeviceSums(2)
    assert sums.drain() == ([0.0, 0.0], 0)
    for value in (1.0, 2.0, 4.0):
        sums.add(torch.tensor(value), torch.tensor(-value))
    assert sums.drain() == ([7.0, -7.0], 3) and sums.drain() == ([0.0, 0.0], 0)

    running = [10.0, 1.0, 5]  # two sums, then the number of steps they cover
    assert sums.fold_into(running) is None and running == [10.0, 1.0, 5]
    sums.add(torch.tensor(2.0), torch.tensor(3.0))
    sums.add(torch.tensor(4.0), torch.tensor(5.0))
    assert sums.fold_into(running) == [3.0, 4.0]
    assert running == [16.0, 9.0, 7] and sums.drain() == ([0.0, 0.0], 0)


# ---------------------------------------------------------------------------------------------------------------------
# Views drawn on the accelerator
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_splits(tiny_parquet):
    train, _ = tiny_parquet
    return load_image_splits(train_file=str(train), image_size=16)


def decoded_batch(splits, keys):
    dataset = ViewDataset(splits.train, "decode", build_decode_transform(splits.policy, splits.image_size), seed=5)
    return collate_views(dataset.__getitems__(keys))


def test_accelerator_views_have_the_shape_dtype_and_statistics_of_the_per_image_views(tiny_splits):
    keys = list(range(48))
    batch = decoded_batch(tiny_splits, keys)
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (48, 3, 16, 16)
    assert batch["epoch"].tolist() == [0] * 48
    views = tiny_splits.batch_augmenter("ssl", seed=5)(batch)
    per_image = collate_views(ViewDataset(tiny_splits.train, "two_view", tiny_splits.transform("ssl"),
                                          seed=5).__getitems__(keys))
    for key in ("pixel_values", "pixel_values_2"):
        ours, theirs = views[key], per_image[key]
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (48, 3, 16, 16)
        assert torch.allclose(ours.mean(dim=(0, 2, 3)), theirs.mean(dim=(0, 2, 3)), atol=0.15)
        assert torch.allclose(ours.std(dim=(0, 2, 3)), theirs.std(dim=(0, 2, 3)), rtol=0.2)
    assert views["labels"].tolist() == batch["labels"].tolist()
    # no augmentation: the normalised decoded image, the same for both views
    plain_views = tiny_splits.batch_augmenter("eval", seed=5)(batch)
    plain = plain_views["pixel_values"]
    assert torch.equal(plain, plain_views["pixel_values_2"])
    expected = collate_views(ViewDataset(tiny_splits.train, "single", tiny_splits.transform("eval"))
                             .__getitems__(keys))["pixel_values"]
    assert torch.allclose(plain, expected, atol=1e-5)


def test_accelerator_views_are_seeded_per_sample_epoch_and_view(tiny_splits):
    augment = tiny_splits.batch_augmenter("ssl", seed=5)
    size = len(tiny_splits.train)
    first = augment(decoded_batch(tiny_splits, [3, 5, 7]))
    again = augment(decoded_batch(tiny_splits, [3, 5, 7]))
    other_batch = augment(decoded_batch(tiny_splits, [40, 5, 11, 2]))
    next_epoch = augment(decoded_batch(tiny_splits, [size + 3, size + 5, size + 7]))
    for key in ("pixel_values", "pixel_values_2"):
        assert torch.equal(first[key], again[key])
        assert torch.equal(first[key][1], other_batch[key][1])  # sample 5, whatever batch it is in
        assert not torch.equal(first[key][0], next_epoch[key][0])
    assert not torch.equal(first["pixel_values"], first["pixel_values_2"])
    assert not torch.equal(first["pixel_values"], BatchAugmenter(
        "ssl", tiny_splits.policy, 16, tiny_splits.mean, tiny_splits.std, seed=6)(
        decoded_batch(tiny_splits, [3, 5, 7]))["pixel_values"])


def test_decode_loader_carries_the_epoch(tiny_splits):
    dataset = ViewDataset(tiny_splits.train, "decode", build_decode_transform("cifar", 16), seed=0)
    loader = make_loader(dataset, 16, shuffle=True, seed=0, num_workers=0)
    set_loader_epoch(loader, 2)
    batch = next(iter(loader))
    assert batch["epoch"].tolist() == [2] * 16 and batch["pixel_values"].dtype == torch.uint8
    with pytest.raises(ValueError, match="decode"):
        tiny_splits.batch_augmenter("ssl")({"pixel_values": torch.zeros(1, 3, 16, 16), "index": torch.zeros(1)})
    assert build_transform("eval", "cifar", 16, (0.5,) * 3, (0.5,) * 3) is not None


# ---------------------------------------------------------------------------------------------------------------------
# The commands with every speed flag
# ---------------------------------------------------------------------------------------------------------------------

SPEED_FLAGS = ["--augmentation_device", "accelerator", "--channels_last", "--mixed_precision", "bf16",
               "--optimizer_implementation", "fused", "--logging_steps", "1"]


def _alphas(folder):
    history = json.loads((folder / "search_history.json").read_text())
    return torch.tensor([w for layers in history["epochs"][-1]["op_weights"].values() for w in layers])


def test_search_with_speed_flags_resumes_exactly(tiny_parquet, tmp_path, fresh_accelerator, one_thread):
    from nasiam_hf.commands import search as search_command

    train, _ = tiny_parquet
    common = ["--train_file", str(train), "--per_device_train_batch_size", "8", "--image_size", "8", "--seed", "3",
              "--max_train_steps", "4", "--checkpointing_steps", "2", "--projector_layers", "2",
              "--predictor_layers", "2", *SPEED_FLAGS]
    fresh_accelerator("bf16")
    search_command.main([*common, "--output_dir", str(tmp_path / "straight")])
    fresh_accelerator("bf16")
    resumed = tmp_path / "resumed"
    search_command.main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint",
                         str(tmp_path / "straight" / "checkpoints" / "step-00000002")])
    assert sorted(p.name for p in (resumed / "checkpoints").glob("step-*")) == ["step-00000004"]  # it did resume
    assert torch.allclose(_alphas(resumed), _alphas(tmp_path / "straight"), atol=1e-6, rtol=0)
    history = json.loads((resumed / "search_history.json").read_text())
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in history["epochs"])


def test_pretraining_with_speed_flags(tiny_parquet, tmp_path, fresh_accelerator, one_thread):
    from nasiam_hf import NASiamModel
    from nasiam_hf.commands import pretrain as pretrain_command

    train, test = tiny_parquet
    out = tmp_path / "run"
    fresh_accelerator("bf16")
    pretrain_command.main(["--train_file", str(train), "--validation_file", str(test), "--genotype",
                           "simsiam-baseline", "--output_dir", str(out), "--num_train_epochs", "1",
                           "--per_device_train_batch_size", "8", "--image_size", "8", "--knn_every", "1",
                           "--checkpointing_steps", "no", *SPEED_FLAGS])
    history = json.loads((out / "training_history.json").read_text())
    assert len(history["epochs"]) == 1 and "knn_top1" in history["epochs"][0]
    assert torch.isfinite(torch.tensor(history["epochs"][0]["loss"]))
    NASiamModel.from_pretrained(out)  # channels_last weights save and load
