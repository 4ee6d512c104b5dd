"""``nasiam-finetune`` / ``accelerate launch training/finetune.py``: fine-tune a NASiam backbone for classification."""

from __future__ import annotations

import argparse

from ..data import add_data_args
from ..trainer import add_common_args, check_common_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune a NASiam backbone (a pretraining folder or Hub id) for image classification: the whole "
                    "network, or only a linear classifier with --freeze_backbone."
    )
    add_data_args(parser)
    # SGD, momentum 0.9, cosine; lr per 256 images (scaled by the global batch).
    add_common_args(parser, epochs=30, batch_size=128, learning_rate=0.05, weight_decay=5e-4)
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--model_name_or_path", type=str, required=True,
                   help="A NASiam model folder (pretraining, search-derived or a classifier) or a Hub id.")
    g.add_argument("--freeze_backbone", action="store_true",
                   help="Train only the linear classifier; the backbone (BatchNorm statistics included) stays fixed.")
    g.add_argument("--classifier_lr_multiplier", type=float, default=10.0,
                   help="The new classifier's learning rate is this many times the backbone's.")
    args = parser.parse_args(argv)
    check_common_args(args)
    if args.classifier_lr_multiplier <= 0:
        parser.error(f"--classifier_lr_multiplier must be positive, got {args.classifier_lr_multiplier}")
    return args


def main(argv: list[str] | None = None) -> None:
    from ..finetune import run_finetune
    from ..trainer import run_command

    run_command(run_finetune, parse_args, argv)


if __name__ == "__main__":
    main()
