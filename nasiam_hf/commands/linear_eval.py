"""``nasiam-linear-eval`` / ``accelerate launch training/linear_eval.py``: linear probe on frozen features."""

from ..arguments import LinearEvalCommand
from .runner import run_command


def main(argv: list[str] | None = None) -> None:
    run_command(LinearEvalCommand, "nasiam_hf.linear_eval:run_linear_eval", argv)


if __name__ == "__main__":
    main()
