"""``nasiam-linear-eval`` / ``accelerate launch training/linear_eval.py``: linear probe on frozen features."""

from __future__ import annotations

import argparse

from ..data import add_data_args
from ..evaluation import FEATURE_NORMS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Linear evaluation (and kNN) of a saved NASiam model.")
    add_data_args(parser)
    parser.add_argument("--model_name_or_path", type=str, required=True, help="A saved model folder or a Hub id.")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="Where eval_results.json goes (default: the model folder, whose card is refreshed).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument("--per_device_train_batch_size", type=int, default=256)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="Default: 0.03 x batch/256 on batch-normalised features (30 with --feature_norm none).")
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--feature_norm", choices=FEATURE_NORMS, default="batchnorm")
    parser.add_argument("--knn_k", type=int, default=200)
    parser.add_argument("--knn_temperature", type=float, default=0.2)
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None)
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--with_tracking", action="store_true")
    parser.add_argument("--report_to", type=str, default="all")
    args = parser.parse_args(argv)
    for key in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "knn_k"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    return args


def main(argv: list[str] | None = None) -> None:
    from ..linear_eval import run_linear_eval
    from ..trainer import run_command

    run_command(run_linear_eval, parse_args, argv)


if __name__ == "__main__":
    main()
