"""Command-line entry points (``nasiam-search``, ``nasiam-pretrain``, ...); ``training/*.py`` are thin wrappers."""
