"""``nasiam-pretrain`` / ``accelerate launch training/pretrain.py``: self-supervised pretraining from a genotype."""

from ..arguments import PretrainCommand
from .runner import run_command


def main(argv: list[str] | None = None) -> None:
    run_command(PretrainCommand, "nasiam_hf.pretrain:run_pretrain", argv)


if __name__ == "__main__":
    main()
