"""``nasiam-finetune`` / ``accelerate launch training/finetune.py``: fine-tune a NASiam backbone for classification."""

from ..arguments import FinetuneCommand
from .runner import run_command


def main(argv: list[str] | None = None) -> None:
    run_command(FinetuneCommand, "nasiam_hf.finetune:run_finetune", argv)


if __name__ == "__main__":
    main()
