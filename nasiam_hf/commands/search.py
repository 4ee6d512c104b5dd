"""``nasiam-search`` / ``accelerate launch training/search.py``: NASiam's differentiable head search."""

from __future__ import annotations

import argparse

from ..backbones import BACKBONES
from ..configuration_nasiam import FRAMEWORKS
from ..data import add_data_args
from ..search_space import resolve_search_space
from ..trainer import add_common_args, check_common_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Search the projector/predictor heads of a siamese learner (NASiam).")
    add_data_args(parser)
    add_common_args(parser, epochs=100, batch_size=512, learning_rate=0.06, weight_decay=5e-4)
    g = parser.add_argument_group("search")
    g.add_argument("--framework", choices=FRAMEWORKS, default="simsiam")
    g.add_argument("--backbone", choices=sorted(BACKBONES), default="resnet18")
    g.add_argument("--search_space", type=str, default="S",
                   help="'S' (7 ops), 'S_no_pool' (the paper's S'), or a comma list of spaces/ops, "
                        "e.g. 'S,linear_mish'.")
    g.add_argument("--projector_layers", type=int, default=None, help="Default: 6 (MoCo v2: 4).")
    g.add_argument("--predictor_layers", type=int, default=None, help="Default: 4 (SimSiam and BYOL only).")
    g.add_argument("--train_portion", type=float, default=0.5,
                   help="Share of the train split used for weights; the rest drives the alphas.")
    g.add_argument("--arch_learning_rate", type=float, default=None,
                   help="Default: 1e-3 (AdamW), 3e-4 (Adam) for MoCo v2, as in the paper's code.")
    g.add_argument("--arch_weight_decay", type=float, default=1e-3)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--queue_size", type=int, default=None)
    g.add_argument("--momentum", type=float, default=None, help="MoCo v2 / BYOL (base) momentum.")
    args = parser.parse_args(argv)
    check_common_args(args)
    resolve_search_space(args.search_space)  # fails before any data is loaded
    if not 0.0 < args.train_portion < 1.0:
        parser.error(f"--train_portion must be strictly between 0 and 1, got {args.train_portion}")
    return args


def main(argv: list[str] | None = None) -> None:
    from ..search import run_search
    from ..trainer import run_command

    run_command(run_search, parse_args, argv)


if __name__ == "__main__":
    main()
