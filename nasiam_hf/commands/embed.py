"""``nasiam-embed`` / ``accelerate launch training/embed.py``: embed every image of a folder, file or dataset."""

from ..arguments.embed import EmbedCommand
from .runner import run_command


def main(argv: list[str] | None = None) -> None:
    run_command(EmbedCommand, "nasiam_hf.embed:run_embed", argv)


if __name__ == "__main__":
    main()
