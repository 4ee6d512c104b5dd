"""``nasiam-pretrain`` / ``accelerate launch training/pretrain.py``: self-supervised pretraining from a genotype."""

from __future__ import annotations

import argparse

from ..backbones import BACKBONES
from ..data import add_data_args
from ..presets import RECIPES
from ..trainer import add_common_args, check_common_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretrain a NASiam model (SimSiam, SimCLR, MoCo v2 or BYOL).")
    add_data_args(parser)
    # None: filled from --recipe (CIFAR: 800 epochs, batch 512, lr 0.06, wd 5e-4; ImageNet: 100, 512, 0.05, 1e-4).
    add_common_args(parser, epochs=None, batch_size=None, learning_rate=None, weight_decay=None)
    g = parser.add_argument_group("pretraining")
    g.add_argument("--genotype", type=str, default="simsiam-cifar10-resnet18",
                   help="A search output folder, a paper preset (e.g. simsiam-cifar10-resnet18) or "
                        "'<framework>-baseline' for the framework's standard heads.")
    g.add_argument("--backbone", choices=sorted(BACKBONES), default=None,
                   help="Override the genotype's backbone (the paper transfers CIFAR genotypes to ImageNet).")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="Default: from the dataset's size.")
    g.add_argument("--no_fix_predictor_lr", action="store_true",
                   help="Decay SimSiam's predictor lr too (by default it stays fixed, as in SimSiam).")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--queue_size", type=int, default=None)
    g.add_argument("--momentum", type=float, default=None, help="MoCo v2 / BYOL (base) momentum.")
    g.add_argument("--knn_every", type=int, default=1, help="kNN monitor every N epochs (0: off).")
    g.add_argument("--knn_k", type=int, default=200)
    g.add_argument("--knn_temperature", type=float, default=0.2)
    g.add_argument("--collapse_threshold", type=float, default=0.1,
                   help="Warn when the collapse std stays below this fraction of 1/sqrt(dim)...")
    g.add_argument("--collapse_patience", type=int, default=3, help="...for this many epochs in a row.")
    args = parser.parse_args(argv)
    check_common_args(args)
    return args


def main(argv: list[str] | None = None) -> None:
    from ..pretrain import run_pretrain
    from ..trainer import run_command

    run_command(run_pretrain, parse_args, argv)


if __name__ == "__main__":
    main()
