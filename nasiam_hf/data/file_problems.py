"""Which local data file datasets could not read, and where: read alone, each file says what is wrong with it (the
line and column of a JSON-lines file, the reader's reason for a parquet or arrow file). Used on the error path only:
datasets' own messages name neither the file nor the line."""

from __future__ import annotations

from .images import DataError


def _first_bad_json(path: str) -> str | None:
    """Where a JSON-lines (or JSON) file stops being readable: ``line N: reason``, or None."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as error:
                    if number == 1 and line.lstrip().startswith("["):  # one JSON document, not JSON lines
                        break
                    return f"line {number}, column {error.colno}: {error.msg}"
            else:
                return None
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except UnicodeDecodeError as error:
        return f"it is not UTF-8 text (byte {error.object[error.start]:#04x} at position {error.start})"
    except json.JSONDecodeError as error:
        return f"line {error.lineno}, column {error.colno}: {error.msg}"
    return None


def _file_problem(path: str, format: str) -> str | None:
    """Why one data file cannot be read (found by reading it alone), or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if format == "json":
        return _first_bad_json(path)
    try:
        if format == "parquet":
            pq.read_table(path)
        elif format == "arrow":
            try:
                pa.ipc.open_stream(path).read_all()
            except pa.ArrowInvalid:
                pa.ipc.open_file(path).read_all()
    except Exception as error:  # noqa: BLE001 - the reader's own reason
        return " ".join(f"{type(error).__name__}: {error}".split())
    return None


def unreadable_file(files, where: str, error: BaseException) -> DataError:
    """The error for data files (a :class:`~nasiam_hf.data.sources.DataFiles`) that datasets could not load: the
    file (and line, for JSON) that fails when read alone, else the deepest cause of datasets' error."""
    names = {"json": "JSON-lines", "arrow": "arrow", "parquet": "parquet"}
    for path in files.files:
        problem = _file_problem(path, files.format)
        if problem:
            return DataError(f"{where}: {names.get(files.format, files.format)} file {files.name(path)!r} cannot be "
                             f"read: {problem}")
    while error.__cause__ is not None or (error.__context__ is not None and not str(error).strip()):
        error = error.__cause__ or error.__context__
    return DataError(f"{where} cannot be read: {' '.join(f'{type(error).__name__}: {error}'.split())}")


__all__ = ["unreadable_file"]
