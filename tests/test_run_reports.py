"""What the runs report is what they did, through the real commands on tiny data: a 2-update search, a 3-update
pretraining from its genotype, a linear evaluation and a 3-update fine-tuning of that model. Every figure printed,
recorded, plotted or carded is checked against an independent computation: the genotype's confidence from the op
weights by hand, the kNN and probe top-1 by brute-force loops over the saved model's features, the plots' line data
against the histories, the card's figures against what ran."""

import contextlib
import io
import json
import math
import re

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from nasiam_hf import NASiamConfig, NASiamModel
from nasiam_hf.budget import folder_size, format_bytes
from nasiam_hf.commands import finetune as finetune_command
from nasiam_hf.commands import linear_eval as linear_eval_command
from nasiam_hf.commands import pretrain as pretrain_command
from nasiam_hf.commands import search as search_command
from nasiam_hf.hub.plots import training_figures
from nasiam_hf.hub.search_plots import search_figures

TINY = ["--per_device_train_batch_size", "8", "--image_size", "8", "--seed", "1"]
LR = 0.06 * 8 / 256  # the cifar recipe's base rate at a global batch of 8


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def run(command, argv: list) -> str:
    """Run a console command in-process; its printed output (stdout and stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        command.main([str(a) for a in argv])
    return out.getvalue()


def refused(command, argv: list) -> str:
    """Run a command that must refuse; its one ``error:`` line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exit_info:
        command.main([str(a) for a in argv])
    assert exit_info.value.code == 2, out.getvalue()[-2000:]
    lines = [line for line in out.getvalue().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out.getvalue()[-2000:]
    return lines[0]


def by_hand(weights: list[float]) -> tuple[int, float, float]:
    """(argmax, margin over the runner-up, entropy / log K) of one layer's op weights, computed here."""
    order = sorted(range(len(weights)), key=lambda k: -weights[k])
    entropy = -sum(w * math.log(w) for w in weights if w > 0) / math.log(len(weights))
    return order[0], weights[order[0]] - weights[order[1]], entropy


@pytest.fixture(scope="module")
def searched(tiny_parquet, tmp_path_factory):
    train, _ = tiny_parquet
    out = tmp_path_factory.mktemp("reports") / "search"
    log = run(search_command, ["--train_file", train, "--output_dir", out, "--max_train_steps", "2",
                               "--checkpointing_steps", "no", "--hessian_every", "0", *TINY])
    return out, log


@pytest.fixture(scope="module")
def pretrained(searched, tiny_parquet):
    search_dir, _ = searched
    train, test = tiny_parquet
    out = search_dir.parent / "my-model"
    log = run(pretrain_command, ["--train_file", train, "--validation_file", test, "--genotype", search_dir,
                                 "--output_dir", out, "--max_train_steps", "3", "--knn_every", "2steps",
                                 "--knn_k", "10", "--checkpointing_steps", "2", *TINY])
    return out, log


@pytest.fixture(scope="module")
def evaluated(pretrained, tiny_parquet):
    folder, _ = pretrained
    train, test = tiny_parquet
    log = run(linear_eval_command, ["--model_name_or_path", folder, "--train_file", train, "--validation_file", test,
                                    "--num_train_epochs", "2", "--knn_k", "10"])
    return folder, log


def test_the_search_says_how_sure_its_genotype_is(searched):
    out, log = searched
    genotype = json.loads((out / "genotype.json").read_text())
    config = NASiamConfig.from_pretrained(out)
    assert genotype["projector"] == config.projector_genotype and genotype["predictor"] == config.predictor_genotype
    history = json.loads((out / "search_history.json").read_text())
    ops = history["ops"]
    final = history["epochs"][-1]["op_weights"]
    for cell in ("projector", "predictor"):
        assert len(genotype["confidence"][cell]) == len(final[cell])
        for row, weights in zip(genotype["confidence"][cell], final[cell]):
            best, margin, entropy = by_hand(weights)
            assert row["op"] == ops[best] == genotype[cell][row["layer"] - 1]
            assert row["margin"] == pytest.approx(margin, abs=2e-6)
            assert row["relative_entropy"] == pytest.approx(entropy, abs=2e-6)
            assert row["decided"] is (margin >= 0.05 and entropy <= 0.99)
            # one line per layer at the end of the search
            assert (f"{cell} layer {row['layer']}: {row['op']} weight {row['weight']:.4f}, margin "
                    f"{row['margin']:+.4f} over {row['runner_up']}") in log
    assert history["confidence"] == genotype["confidence"] and "confidence" in history["epochs"][-1]
    # two updates cannot move the alphas off uniform: every layer undecided, named, with what to do
    warning = next(line for line in log.splitlines() if line.startswith("warning: the genotype is undecided"))
    assert "in 10 of 10 layers (projector layer 1, " in warning and "predictor layer 4)" in warning
    assert "--num_train_epochs" in warning and "--genotype simsiam-baseline" in warning
    # the run's size before it starts (24 images in the weight half: 3 updates an epoch), then what it did
    assert ("search run size: 2 updates x global batch 8 = 16 training images (0.6667 epochs of 3 updates over 24 "
            "images)") in log
    assert "budget: " in log and "s per update" in log
    outcome = json.loads((out / "training_args.json").read_text())["outcome"]
    assert outcome == {**outcome, "updates": 2, "epochs": 0.6667, "global_batch": 8, "images_seen": 16,
                       "train_images": 24, "learning_rate": LR, "base_learning_rate": 0.06, "mixed_precision": "no"}


def test_the_search_plots_show_the_history_against_updates(searched):
    out, _ = searched
    history = json.loads((out / "search_history.json").read_text())
    steps = history["steps"]
    assert [s["step"] for s in steps] == [1, 2]  # a 2-update run logs every update
    figures = search_figures(history)
    assert sorted(figures) == ["alphas.png", "search_confidence.png", "search_diagnostics.png", "search_loss.png"]
    assert all((out / name).is_file() for name in figures)
    panel = figures["alphas.png"].axes[0]  # projector layer 1, one line per op, against updates
    assert panel.get_title() == "projector layer 1"
    assert {ax.get_xlabel() for ax in figures["alphas.png"].axes} == {"", "update"}
    for k, line in enumerate(panel.get_lines()[:len(history["ops"])]):
        assert line.get_xydata().tolist() == [[s["step"], s["op_weights"]["projector"][0][k]] for s in steps]
    loss_axes, lr_axes = figures["search_loss.png"].axes
    assert loss_axes.get_lines()[0].get_xydata().tolist() == [[s["step"], s["train_loss"]] for s in steps]
    assert lr_axes.get_lines()[0].get_ydata().tolist() == pytest.approx([LR, LR * 0.5 * (1 + math.cos(math.pi / 2))])
    margins = [row["margin"] for cell in ("projector", "predictor") for row in history["confidence"][cell]]
    bars = figures["search_confidence.png"].axes[0].patches
    assert [bar.get_height() for bar in bars] == pytest.approx(margins)


def test_pretraining_repeats_the_warning_and_shows_its_budget(pretrained, searched):
    out, log = pretrained
    search_dir, _ = searched
    assert f"warning: the genotype of {search_dir} is undecided in 10 of 10 layers" in log
    assert ("pretrain run size: 3 updates x global batch 8 = 24 training images (0.5 epochs of 6 updates over 48 "
            "images)") in log
    size = folder_size(out / "checkpoints" / "step-00000002")
    assert (f"checkpoint step-00000002: {format_bytes(size)}; this run writes 1 and keeps the last 1 "
            f"(--checkpoints_total_limit 2): about {format_bytes(size)} on disk") in log
    assert "warning: kNN monitor top-1: measured on 16 images only" in log and "--validation_file" in log
    history = json.loads((out / "training_history.json").read_text())
    step_knn = history["knn_steps"][0]
    assert step_knn["knn_num_queries"] == 16
    assert f"step 2: kNN top-1 {step_knn['knn_top1']:.2f}% ± {step_knn['knn_top1_stderr']:.2f}" in log
    p = step_knn["knn_top1"] / 100
    assert step_knn["knn_top1_stderr"] == pytest.approx(100 * math.sqrt(p * (1 - p) / 16))


def test_pretraining_plots_every_update_and_every_knn(pretrained):
    out, _ = pretrained
    history = json.loads((out / "training_history.json").read_text())
    assert [s["step"] for s in history["steps"]] == [1, 2, 3]
    figures = training_figures(history)
    assert sorted(figures) == ["collapse.png", "knn_accuracy.png", "loss.png"]
    loss_axes, lr_axes = figures["loss.png"].axes
    assert loss_axes.get_xlabel() == "update"
    assert loss_axes.get_lines()[0].get_xydata().tolist() == [[s["step"], s["loss"]] for s in history["steps"]]
    # each update's own rate: cosine over 3 updates, on the learning rate's own axis
    assert lr_axes.get_ylabel() == "learning rate"
    assert lr_axes.get_lines()[0].get_ydata().tolist() == pytest.approx(
        [LR * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)])
    knn = figures["knn_accuracy.png"].axes[0].get_lines()[0].get_xydata().tolist()
    assert knn == [[2, history["knn_steps"][0]["knn_top1"]], [3, history["epochs"][0]["knn_top1"]]]


def test_the_pretraining_card_holds_what_ran(pretrained):
    out, _ = pretrained
    text = (out / "README.md").read_text()
    for row in ("| Optimizer updates done | 3 |", "| Epochs done | 0.5 (of 48 training images) |",
                "| Global batch | 8 |", f"| Learning rate (effective, peak of the schedule) | {LR:.4g} |",
                "| Base learning rate (per 256 images) | 0.06 |", "| Precision | fp32 (no mixed precision) |"):
        assert row in text, row
    assert "| Epochs |" not in text and "800" not in text  # nothing of the recipe the run did not do
    assert "| Layer | Operation | Width | Note | Op weight | Margin | Relative entropy | Decided |" in text
    assert "**10 of 10 layers are undecided**" in text
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert images == ["genotype.png", "loss.png", "knn_accuracy.png", "collapse.png"]
    assert all((out / image).is_file() for image in images)
    outcome = json.loads((out / "training_args.json").read_text())["outcome"]
    assert (outcome["updates"], outcome["epochs"], outcome["learning_rate"]) == (3, 0.5, LR)


def _features(model, images, processor):
    with torch.no_grad():
        return model(**processor(images, return_tensors="pt")).pooler_output


def _images(path):
    rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    return [image.convert("RGB") for image in rows["img"]], list(rows["label"])


def test_knn_and_probe_figures_match_a_brute_force_recomputation(evaluated, tiny_parquet):
    folder, log = evaluated
    train, test = tiny_parquet
    model, processor = NASiamModel.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)
    memory_images, memory_labels = _images(train)
    query_images, query_labels = _images(test)
    memory, queries = _features(model, memory_images, processor), _features(model, query_images, processor)

    knn_right = 0  # k 10, temperature 0.2: the 10 most cosine-similar memory images vote with exp(sim / 0.2)
    for q, label in zip(queries, query_labels):
        sims = [float(torch.dot(q, m) / (q.norm() * m.norm())) for m in memory]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:10]
        votes = {}
        for i in nearest:
            votes[memory_labels[i]] = votes.get(memory_labels[i], 0.0) + math.exp(sims[i] / 0.2)
        knn_right += max(votes, key=votes.get) == label
    probe = load_file(folder / "linear_probe.safetensors")  # BatchNorm1d(affine=False) then Linear
    mean, var, weight, bias = (probe[k] for k in ("0.running_mean", "0.running_var", "1.weight", "1.bias"))
    probe_right = 0
    for q, label in zip(queries, query_labels):
        z = [(float(q[j]) - float(mean[j])) / math.sqrt(float(var[j]) + 1e-5) for j in range(len(q))]
        logits = [sum(float(weight[c, j]) * z[j] for j in range(len(z))) + float(bias[c]) for c in range(len(bias))]
        probe_right += max(range(len(logits)), key=logits.__getitem__) == label

    results = json.loads((folder / "eval_results.json").read_text())
    card = ModelCard.load(folder / "README.md")
    carded = {r.metric_config: r.metric_value for r in card.data.eval_results if r.metric_type == "accuracy"}
    for key, config, right, printed in (("knn", "knn", knn_right, "kNN (k 10, temperature 0.2) top-1"),
                                        ("linear_probe", "linear-probe", probe_right, "linear probe top-1")):
        top1 = 100.0 * right / 16
        stderr = 100 * math.sqrt(top1 / 100 * (1 - top1 / 100) / 16)
        assert results[key]["top1"] == pytest.approx(top1) and results[key]["num_queries"] == 16
        assert results[key]["top1_stderr"] == pytest.approx(stderr)
        assert f"{printed} {top1:.2f}% ± {stderr:.2f}" in log
        assert carded[config] == pytest.approx(top1)
        assert f"| {top1:.2f} ± {stderr:.2f} | – | 16 |" in card.text
    assert card.data.model_name == "my-model"
    assert "linear evaluation data: 48 train images" in log and "16 eval images" in log and "4 classes" in log
    assert "warning: linear probe and kNN top-1: measured on 16 images only" in log


def test_finetuning_reports_its_data_its_accuracy_and_its_real_length(pretrained, tiny_parquet):
    folder, _ = pretrained
    train, test = tiny_parquet
    out = folder.parent / "my-classifier"
    log = run(finetune_command, ["--model_name_or_path", folder, "--train_file", train, "--validation_file", test,
                                 "--output_dir", out, "--max_train_steps", "3", "--checkpointing_steps", "no",
                                 "--per_device_train_batch_size", "8", "--seed", "0"])
    assert "finetune data: 48 train images" in log and "16 eval images" in log and "4 classes" in log
    assert ("finetune run size: 3 updates x global batch 8 = 24 training images (0.5 epochs of 6 updates over 48 "
            "images)") in log
    # its accuracy, recomputed from the saved classifier
    classifier = AutoModelForImageClassification.from_pretrained(out).eval()
    images, labels = _images(test)
    with torch.no_grad():
        logits = classifier(**AutoImageProcessor.from_pretrained(out)(images, return_tensors="pt")).logits
    top1 = 100.0 * sum(int(p) == y for p, y in zip(logits.argmax(1), labels)) / 16
    stderr = 100 * math.sqrt(top1 / 100 * (1 - top1 / 100) / 16)
    assert (f"fine-tuning accuracy on the validation split after 3 updates (0.5 epochs): top-1 {top1:.2f}% ± "
            f"{stderr:.2f}") in log
    result = json.loads((out / "eval_results.json").read_text())["fine_tuning"]
    assert (result["top1"], result["epochs"], result["updates"], result["num_queries"]) == (top1, 0.5, 3, 16)
    card = ModelCard.load(out / "README.md")
    assert card.data.model_name == "my-classifier" and card.data.pipeline_tag == "image-classification"
    text = card.text
    assert text.index("## Training") < text.index("## Results") < text.index("## Fine-tuning") < text.index(
        "## Citation")
    assert "| Epochs done | 0.5 (of 48 training images) |" in text and "| Optimizer updates done | 3 |" in text
    assert f"| {top1:.2f} ± {stderr:.2f} | – | 16 | 0.5 epochs, 3 updates, backbone trained |" in text
    assert ".tmp" not in (out / "README.md").read_text()


def test_a_hand_edited_genotype_json_is_refused_naming_both_files(searched, tmp_path, tiny_parquet):
    import shutil

    search_dir, _ = searched
    edited = tmp_path / "edited"
    shutil.copytree(search_dir, edited)
    genotype = json.loads((edited / "genotype.json").read_text())
    flags = ["--train_file", tiny_parquet[0], "--genotype", edited, "--output_dir", tmp_path / "out", *TINY]
    genotype["projector"][0] = "linear_foo"
    (edited / "genotype.json").write_text(json.dumps(genotype))
    line = refused(pretrain_command, flags)
    assert f"--genotype '{edited}': its genotype.json does not fit its config.json: unknown op 'linear_foo'" in line
    other = next(op for op in ("identity", "linear_relu") if op != genotype["predictor"][0])
    genotype["projector"][0] = genotype["projector"][1]
    genotype["predictor"][0] = other
    (edited / "genotype.json").write_text(json.dumps(genotype))
    line = refused(pretrain_command, flags)
    assert "its genotype.json says predictor [" in line and "but its config.json says" in line
    assert not (tmp_path / "out").exists()


def test_a_genotype_file_of_its_own_is_checked_like_a_preset(tmp_path, tiny_parquet):
    path = tmp_path / "my_genotype.json"
    flags = ["--train_file", tiny_parquet[0], "--genotype", path, "--output_dir", tmp_path / "out", *TINY]
    path.write_text(json.dumps({"projector": ["idnetity", "linear_relu"], "framework": "simclr"}))
    assert "unknown op 'idnetity'" in refused(pretrain_command, flags)
    path.write_text(json.dumps({"projector": ["identity", "linear_relu"]}))
    assert "has no predictor and names no framework" in refused(pretrain_command, flags)
    path.write_text(json.dumps({"projector": ["identity", "linear_relu"], "framework": "simclr"}))
    log = run(pretrain_command, [*flags, "--max_train_steps", "1", "--checkpointing_steps", "no", "--knn_every", "no"])
    config = NASiamConfig.from_pretrained(tmp_path / "out")
    assert config.framework == "simclr" and config.projector_genotype == ["identity", "linear_relu"]
    assert "undecided" not in log and "kNN" not in log  # no search behind it, no kNN asked for
    # no kNN measured: no kNN plot, and the card embeds only the plots the folder holds
    assert not (tmp_path / "out" / "knn_accuracy.png").exists()
    text = (tmp_path / "out" / "README.md").read_text()
    assert re.findall(r"!\[[^]]*\]\(([^)]+)\)", text) == ["genotype.png", "loss.png", "collapse.png"]
    assert "| Optimizer updates done | 1 |" in text and "Genotype origin:** `" + str(path) in text


def test_a_search_checkpoint_exports_its_genotype_with_its_confidence(tmp_path, capsys):
    from test_folders import make_run_checkpoint

    from nasiam_hf.commands import convert
    from nasiam_hf.plans import genotype_source_record, genotype_values

    checkpoint, supernet = make_run_checkpoint(tmp_path / "search", step=2, preset="simsiam-baseline", search=True)
    convert.main(["checkpoint", str(checkpoint), str(tmp_path / "genotype")])
    exported = json.loads((tmp_path / "genotype" / "genotype.json").read_text())
    weights = supernet.op_weights()
    for cell, rows in exported["confidence"].items():
        for row, layer in zip(rows, weights[cell]):
            best, margin, entropy = by_hand(layer)
            assert (row["op"], row["margin"]) == (supernet.config.search_ops[best], pytest.approx(margin, abs=2e-6))
    assert genotype_values(str(tmp_path / "genotype"))["projector_genotype"] == exported["projector"]  # they agree
    assert genotype_source_record(str(tmp_path / "genotype"))["confidence"] == exported["confidence"]
