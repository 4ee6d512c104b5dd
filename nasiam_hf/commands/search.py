"""``nasiam-search`` / ``accelerate launch training/search.py``: NASiam's differentiable head search."""

from ..arguments import SearchCommand
from .runner import run_command


def main(argv: list[str] | None = None) -> None:
    run_command(SearchCommand, "nasiam_hf.search:run_search", argv)


if __name__ == "__main__":
    main()
