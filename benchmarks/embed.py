"""Embedding benchmark: ``nasiam-embed``'s throughput, and a kNN from its parquet output against the kNN monitor.

1. ``nasiam-embed`` (the real command, in this process) over the train file: images/s of the embedding itself, as
   the command measures it (model and data loading excluded), and the wall time of the whole command.
2. The same for the test file.
3. The kNN top-1 (k 200, temperature 0.2, cosine similarity) computed from the two parquet outputs alone: memory =
   the train rows' vectors and labels, queries = the test rows', through ``nasiam_hf.evaluation.knn_accuracy``.
4. The kNN monitor of ``nasiam-pretrain`` for the same model and data: ``evaluation.evaluate_knn`` on the backbone,
   with the monitor's own data path (``ImageSplits.knn_sets``, the "eval" transform, ``make_loader``).

The two top-1 figures must be equal (``"equal": true``); they differ only if the model's saved image processor and
the data layer's eval transform prepared an image differently enough to change a neighbour. Prints one JSON object.

    python benchmarks/embed.py --model runs/simclr-2ep --output_dir runs/embed-bench > embed.json
    python benchmarks/embed.py --max_train_samples 1000 --output_dir runs/embed-quick   # a random-init model

Without ``--model`` a randomly initialised CIFAR ResNet-18 (seed 0) is saved with the data's image processor, as
the pretraining would save it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="A NASiam model folder (default: a random-init ResNet-18).")
    parser.add_argument("--train_file", default=str(SHARED / "train.parquet"))
    parser.add_argument("--test_file", default=str(SHARED / "test.parquet"))
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="Embed N train rows spread over the file (a quick check: a kNN memory of N images).")
    parser.add_argument("--max_test_samples", type=int, default=None, help="N test rows spread over the file.")
    parser.add_argument("--output_dir", required=True, help="Where the embeddings (and a default model) go.")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the command's).")
    parser.add_argument("--knn_k", type=int, default=200)
    parser.add_argument("--knn_temperature", type=float, default=0.2)
    return parser.parse_args(argv)


def default_model(folder: Path, train_file: str, test_file: str) -> Path:
    """A random-init CIFAR ResNet-18 saved with the image processor of the data (as a pretraining saves it); its
    residual norms start at 1 (zeroed, the features of a random network barely depend on the image)."""
    import torch

    from nasiam_hf import NASiamConfig, NASiamModel
    from nasiam_hf.data import load_image_splits
    from nasiam_hf.processing import image_processor_for_splits

    splits = load_image_splits(train_file=train_file, validation_file=test_file, with_eval=False)
    torch.manual_seed(0)
    NASiamModel(NASiamConfig(image_size=splits.image_size, zero_init_residual=False)).save_pretrained(folder)
    image_processor_for_splits(splits).save_pretrained(folder)
    return folder


def subset_file(data_file: str, count: int | None, path: Path) -> str:
    """``count`` rows of ``data_file`` spread evenly over it (the shared CIFAR-10 files are ordered by class), as a
    parquet file of its own; the file itself when ``count`` is None."""
    if count is None:
        return data_file
    import pyarrow.parquet as pq

    table = pq.read_table(data_file)
    step = max(1, table.num_rows // count)
    pq.write_table(table.take(list(range(0, table.num_rows, step))[:count]), path)
    return str(path)


def embed(model: Path, data_file: str, out: Path, args: argparse.Namespace) -> dict:
    from nasiam_hf.commands.embed import main

    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the final JSON
        main(["--model_name_or_path", str(model), "--train_file", data_file, "--output_dir", str(out),
              "--overwrite_output_dir", "--per_device_eval_batch_size", str(args.batch_size)]
             + (["--dataloader_num_workers", str(args.workers)] if args.workers is not None else []))
    info = json.loads((out / "embed_info.json").read_text())
    return {"rows": info["rows"], "images_per_second": info["images_per_second_last_run"],
            "command_seconds": time.perf_counter() - started}


def parquet_knn(train_out: Path, test_out: Path, num_classes: int, args: argparse.Namespace) -> dict:
    """kNN from the embedded parquet alone."""
    import datasets

    from nasiam_hf.evaluation import knn_accuracy

    def load(folder):
        table = datasets.load_dataset("parquet", data_files=str(folder / "*.parquet"), split="train")
        table = table.with_format("torch")
        return table["embedding"][:], table["label"][:]

    memory, memory_labels = load(train_out)
    queries, query_labels = load(test_out)
    return knn_accuracy(memory, memory_labels, queries, query_labels, num_classes, args.knn_k,
                        args.knn_temperature, warn=False)


def monitor_knn(model: Path, train_file: str, test_file: str, args: argparse.Namespace) -> tuple[dict, int]:
    """The pretraining's kNN monitor for the same model and data (its own data path); returns it and the number of
    classes."""
    import torch
    from accelerate import Accelerator

    from nasiam_hf import NASiamModel
    from nasiam_hf.data import load_image_splits, make_loader
    from nasiam_hf.evaluation import evaluate_knn

    splits = load_image_splits(train_file=train_file, validation_file=test_file)
    sets = splits.knn_sets(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    memory, queries = (make_loader(views, args.batch_size, shuffle=False) for views in sets.view_datasets(splits))
    backbone = NASiamModel.from_pretrained(model).backbone.to(accelerator.device)
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate_knn(backbone, memory, queries, accelerator, splits.num_labels, args.knn_k,
                              args.knn_temperature)
    return result, splits.num_labels


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        model = Path(args.model) if args.model else default_model(out / "model", args.train_file, args.test_file)
    train_file = subset_file(args.train_file, args.max_train_samples, out / "train-subset.parquet")
    test_file = subset_file(args.test_file, args.max_test_samples, out / "test-subset.parquet")
    train = embed(model, train_file, out / "train", args)
    test = embed(model, test_file, out / "test", args)
    monitor, num_classes = monitor_knn(model, train_file, test_file, args)
    from_parquet = parquet_knn(out / "train", out / "test", num_classes, args)
    import torch

    result = {
        "benchmark": "embed", "model": str(model), "train_file": train_file, "test_file": test_file,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "embed_train": train, "embed_test": test,
        "knn": {"k": from_parquet["k"], "temperature": args.knn_temperature,
                "top1_from_parquet": from_parquet["top1"], "top1_monitor": monitor["top1"],
                "equal": from_parquet["top1"] == monitor["top1"]},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
