"""Gradient accumulation and clipping, end to end: k accumulated micro-batches make the update one batch of k times
their size would make (where BatchNorm is out of the way), and everything that counts updates (the step counter,
the scheduler, BYOL's EMA, the search's alpha updates, the MoCo queue) counts updates, not micro-batches.

Through the package's own step functions with real Accelerators, and through real tiny runs of the commands'
``main`` (what ``nasiam-pretrain`` / ``nasiam-search`` run), in-process to save the start-up of a new Python."""

import json
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from nasiam_hf import NASiamConfig, NASiamForArchitectureSearch, NASiamForPreTraining, NASiamModel
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.commands import search as search_command
from nasiam_hf.objectives import cosine_momentum
from nasiam_hf.optimization import build_cosine_schedule, build_sgd, predictor_param_groups, weight_step
from nasiam_hf.search import alpha_step, build_arch_optimizer

SMALL_HEADS = dict(projection_dim=32, projector_hidden_size=32, predictor_hidden_size=16, projector_layers=2,
                   predictor_layers=2)
# float32 sums of 32 vs 64 per-sample terms: well below 1e-5 of the change an update makes
TOLERANCE = 1e-5
# 4 images per micro-batch, 2 micro-batches per update
TINY_RUN = ["--per_device_train_batch_size", "4", "--image_size", "8", "--seed", "1", "--gradient_accumulation_steps",
            "2"]
NO_KNN = ["--knn_every", "0"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture
def accelerator_with():
    """A fresh CPU Accelerator accumulating ``k`` micro-batches (Accelerate keeps its state in singletons)."""
    def make(k: int) -> Accelerator:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return Accelerator(cpu=True, gradient_accumulation_steps=k)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def two_views(n: int = 64, size: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(n, 3, size, size, generator=g) for key in ("pixel_values", "pixel_values_2")}


def halves(batch: dict) -> list[dict]:
    n = batch["pixel_values"].shape[0] // 2
    return [{k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}]


def copy_of(model):
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def pretraining_update(model, batches, accelerator, momentum=None, total_steps=2):
    """One update through the engines' weight step: SGD with the fixed predictor lr group and the cosine schedule."""
    groups, fixed = predictor_param_groups(model.parameters(), model.nasiam.predictor, True)
    optimizer = build_sgd(groups, lr=0.5, weight_decay=5e-4)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    scheduler = accelerator.prepare(build_cosine_schedule(optimizer, accelerator, 0, None, total_steps, fixed))
    outputs = weight_step(prepared, batches, optimizer, scheduler, accelerator, momentum)
    return accelerator.unwrap_model(prepared), scheduler, outputs


# ---------------------------------------------------------------------------------------------------------------------
# The step functions: k x B accumulated == 1 x kB
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", ["simsiam", "byol"])
def test_two_accumulated_micro_batches_equal_one_batch_of_both(framework, accelerator_with):
    # BatchNorm in eval mode normalises each image alone, so the loss is a mean of per-image terms
    start = NASiamForPreTraining(NASiamConfig(framework=framework, image_size=8, **SMALL_HEADS)).eval()
    if framework == "byol":  # a target away from the online weights, so that an extra EMA step would show
        with torch.no_grad():
            for _, target in start.momentum_pairs():
                target.add_(0.01 * torch.randn_like(target))
    batch = two_views()
    before = {k: v.clone() for k, v in start.state_dict().items()}
    whole, _, _ = pretraining_update(copy_of(start), [batch], accelerator_with(1), momentum=0.9)
    accumulated, scheduler, outputs = pretraining_update(copy_of(start), halves(batch), accelerator_with(2),
                                                         momentum=0.9)
    assert len(outputs) == 2
    one, two = whole.state_dict(), accumulated.state_dict()
    moved = largest_difference(one, before)
    assert moved > 1e-2  # the update is not a no-op...
    assert largest_difference(one, two) <= TOLERANCE * moved  # ...and is the same update
    # the schedule took one step (of two): the cosine is halfway
    assert scheduler.scheduler.last_epoch == 1
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5 * 0.5)
    if framework == "byol":  # one EMA step per update: target = 0.9 target + 0.1 online
        for (online, target), (_, target_before) in zip(accumulated.momentum_pairs(), start.momentum_pairs()):
            torch.testing.assert_close(target, torch.lerp(target_before, online, 0.1), rtol=0, atol=1e-6)

    # in train mode BatchNorm normalises each micro-batch with its own statistics: not the same update any more
    start.train()
    whole, _, _ = pretraining_update(copy_of(start), [batch], accelerator_with(1), momentum=0.9)
    accumulated, _, _ = pretraining_update(copy_of(start), halves(batch), accelerator_with(2), momentum=0.9)
    assert largest_difference(whole.state_dict(), accumulated.state_dict()) > 100 * TOLERANCE * moved


def test_search_makes_one_alpha_update_from_all_validation_micro_batches(accelerator_with):
    start = NASiamForArchitectureSearch(NASiamConfig(framework="simsiam", image_size=8, **SMALL_HEADS)).eval()
    train, val = two_views(seed=1), two_views(seed=2)
    results = {}
    for k, train_batches, val_batches in ((1, [train], [val]), (2, halves(train), halves(val))):
        accelerator = accelerator_with(k)
        model = copy_of(start)
        weights = build_sgd(model.weight_parameters(), lr=0.5, weight_decay=5e-4)
        arch = build_arch_optimizer(model)  # the recipes' AdamW over the alphas
        prepared, weights, arch = accelerator.prepare(model, weights, arch)
        supernet = accelerator.unwrap_model(prepared)
        alpha_outputs = alpha_step(supernet, val_batches, arch, accelerator)
        weight_step(prepared, train_batches, weights, None, accelerator)
        assert len(alpha_outputs) == k
        assert {int(s["step"]) for s in arch.optimizer.state.values()} == {1}  # one alpha update, whatever k
        results[k] = {n: p.detach().clone() for n, p in supernet.named_parameters()}
    before = dict(start.named_parameters())
    alphas = [n for n, p in start.named_parameters() if any(p is a for a in start.arch_parameters())]
    for name in alphas:  # AdamW's first step moves each alpha by about its lr, 1e-3
        assert (results[1][name] - before[name]).abs().min() > 1e-4
        torch.testing.assert_close(results[2][name], results[1][name], rtol=0, atol=1e-7)
    moved = largest_difference(results[1], {n: p.detach() for n, p in before.items()})
    assert largest_difference(results[1], results[2]) <= TOLERANCE * moved


def test_moco_queue_receives_the_keys_of_every_micro_batch(accelerator_with):
    heads = {k: v for k, v in SMALL_HEADS.items() if not k.startswith("predictor")}
    config = NASiamConfig(framework="mocov2", image_size=8, queue_size=64, **heads)
    model = NASiamForPreTraining(config).eval()
    initial = model.queue.keys.clone()  # random unit keys until real ones arrive
    model, _, outputs = pretraining_update(model, halves(two_views(n=16)), accelerator_with(2))
    keys = torch.cat([out.momentum_keys for out in outputs])  # 2 micro-batches x 2 views x 8 images
    assert keys.shape[0] == 32 and int(model.queue.ptr) == 32
    torch.testing.assert_close(model.queue.keys[:32], torch.nn.functional.normalize(keys, dim=1))
    assert torch.equal(model.queue.keys[32:], initial[32:])


# ---------------------------------------------------------------------------------------------------------------------
# Through the commands
# ---------------------------------------------------------------------------------------------------------------------
def read_checkpoint(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    scheduler = torch.load(folder / "scheduler.bin", weights_only=True)
    return state, scheduler, load_file(folder / "model.safetensors")


def test_byol_pretraining_counts_updates_not_micro_batches(tiny_parquet, tmp_path, capsys):
    train, _ = tiny_parquet
    out, total = tmp_path / "byol", 4
    pretrain_command.main(["--train_file", str(train), "--genotype", "byol-baseline", "--output_dir", str(out),
                           *TINY_RUN, *NO_KNN, "--max_train_steps", str(total), "--momentum", "0.5",
                           "--base_learning_rate", "2.0", "--num_warmup_epochs", "0", "--checkpointing_steps", "1",
                           "--checkpoints_total_limit", "10"])
    assert "global batch 8 (= 4 per device x 1 processes x 2 accumulated)" in capsys.readouterr().out
    args = json.loads((out / "training_args.json").read_text())
    lr = args["resolved"]["optimization"]["lr"]
    assert lr == pytest.approx(2.0 * 8 / 256)
    config = NASiamConfig.from_pretrained(out)
    model = NASiamForPreTraining(config)
    names = [(f"nasiam.{part}.{n}", f"momentum_{part}.{n}") for part in ("backbone", "projector")
             for n, _ in getattr(model.nasiam, part).named_parameters()]
    folders = sorted((out / "checkpoints").glob("step-*"))
    assert [f.name for f in folders] == [f"step-{s:08d}" for s in range(1, total + 1)]
    previous = None
    for step, folder in enumerate(folders, start=1):
        state, scheduler, weights = read_checkpoint(folder)
        assert state["global_step"] == step
        assert state["step_in_epoch"] == (step if step < total else 0)  # the last update ends the run's epoch
        assert scheduler["last_epoch"] == step
        assert scheduler["_last_lr"][0] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * step / total)))
        if previous is not None:  # target_t = m_{t-1} target_{t-1} + (1 - m_{t-1}) online_t, once per update
            m = cosine_momentum(0.5, (step - 1) / total)
            once = max((weights[t] - torch.lerp(previous[t], weights[o], 1 - m)).abs().max().item()
                       for o, t in names)
            twice = max((weights[t] - torch.lerp(torch.lerp(previous[t], weights[o], 1 - m), weights[o], 1 - m))
                        .abs().max().item() for o, t in names)
            assert once <= 1e-6 < twice / 100
        previous = weights


def test_search_makes_one_alpha_update_per_weight_update_through_the_command(tiny_parquet, tmp_path):
    train, _ = tiny_parquet
    out = tmp_path / "search"
    search_command.main(["--train_file", str(train), "--output_dir", str(out), *TINY_RUN, "--num_train_epochs",
                         "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "5", "--projector_layers",
                         "2", "--predictor_layers", "2", "--hessian_every", "0"])
    folders = sorted((out / "checkpoints").glob("step-*"))
    assert len(folders) == 3  # 24 training images = 6 micro-batches of 4 = 3 updates
    for step, folder in enumerate(folders, start=1):
        state, scheduler, _ = read_checkpoint(folder)
        arch = torch.load(folder / "optimizer_1.bin", weights_only=True)  # the alpha optimizer (AdamW)
        assert state["global_step"] == step and scheduler["last_epoch"] == step
        assert {int(s["step"]) for s in arch["state"].values()} == {step}
        assert state["val_step"] == 2 * step  # each alpha update read 2 validation micro-batches


def pretrain_once(train, out, *extra) -> dict[str, torch.Tensor]:
    """A SimSiam pretraining of one update (2 x 4 images), no weight decay; its saved parameters."""
    pretrain_command.main(["--train_file", str(train), "--genotype", "simsiam-baseline", "--output_dir", str(out),
                           *TINY_RUN, *NO_KNN, "--max_train_steps", "1", "--weight_decay", "0",
                           "--num_warmup_epochs", "0", "--checkpointing_steps", "no", *extra])
    model = NASiamModel.from_pretrained(out)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_max_grad_norm_clips_the_update(tiny_parquet, tmp_path):
    """The first SGD step moves the weights by -lr x gradient; two clipped runs that differ only in lr (L, 2L) differ
    by -L x the clipped gradient, whose norm is --max_grad_norm; an unclipped run shows the gradient is far larger."""
    train, _ = tiny_parquet
    clip, base_lr = 0.05, 0.4
    lr = base_lr * 8 / 256
    clipped = pretrain_once(train, tmp_path / "clipped", "--base_learning_rate", str(base_lr),
                            "--max_grad_norm", str(clip))
    clipped_2x = pretrain_once(train, tmp_path / "clipped-2x", "--base_learning_rate", str(2 * base_lr),
                               "--max_grad_norm", str(clip))
    free = pretrain_once(train, tmp_path / "free", "--base_learning_rate", str(base_lr))

    def norm(a, b):
        return math.sqrt(sum(((a[n].double() - b[n].double()) ** 2).sum().item() for n in a))

    clipped_norm = norm(clipped, clipped_2x) / lr
    assert clipped_norm == pytest.approx(clip, rel=1e-3)
    gradient_norm = norm(free, clipped) / lr + clip  # free - clipped = -lr (g - g_clipped), g_clipped parallel to g
    assert gradient_norm > 20 * clip  # without clipping the first assertion would have failed


def test_moco_queue_pointer_after_one_update_of_two_micro_batches(tiny_parquet, tmp_path):
    train, _ = tiny_parquet
    out = tmp_path / "moco"
    pretrain_command.main(["--train_file", str(train), "--genotype", "mocov2-baseline", "--output_dir", str(out),
                           *TINY_RUN, *NO_KNN, "--max_train_steps", "1", "--queue_size", "64",
                           "--checkpointing_steps", "1"])
    weights = load_file(out / "checkpoints" / "step-00000001" / "model.safetensors")
    assert int(weights["queue.ptr"]) == 16  # 2 micro-batches x 2 views x 4 images
