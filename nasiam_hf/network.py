"""Is the Hugging Face Hub reachable? huggingface_hub's answers, shared by the data layer and the Hub code.

Kept apart from both so that neither imports the other for them (no import circle).
"""

from __future__ import annotations

import importlib
import os
import socket


def offline_mode() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE``, read when huggingface_hub is imported)."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def connection_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the Hub could not be reached": huggingface_hub's offline error (a
    ``ConnectionError``) and its error for a file neither cached nor reachable, the transport errors of the HTTP
    client huggingface_hub uses (``httpx`` in 1.x, ``httpx2`` in 2.x: the module of ``get_session()``), and the
    standard library's (DNS failures, refused connections, timeouts; datasets re-raises Hub failures as
    ``ConnectionError``)."""
    from huggingface_hub import get_session
    from huggingface_hub.errors import LocalEntryNotFoundError

    packages = (importlib.import_module(c.__module__.split(".")[0]) for c in type(get_session()).__mro__)
    transport = next((p.TransportError for p in packages if hasattr(p, "TransportError")), ConnectionError)
    return ConnectionError, TimeoutError, socket.gaierror, LocalEntryNotFoundError, transport


def is_connection_error(error: BaseException | None) -> bool:
    """True when any error in the chain (causes and contexts) says the Hub could not be reached, offline mode
    included."""
    kinds, seen = connection_errors(), set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds):
            return True
        error = error.__cause__ or error.__context__
    return False


def not_local_nor_cached(name: str, flag: str, filename: str = "config.json", cache_dir: str | None = None
                         ) -> str | None:
    """For a ``name`` that is no local path and would be fetched from the Hub: why it cannot be, when offline mode is
    on and the Hub cache does not hold it (saying both: no local path, no cached Hub repository); else None."""
    if os.path.exists(name) or not offline_mode():
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, filename, cache_dir=cache_dir), str)
    except ValueError:  # not a valid repository id either
        cached = False
    if cached:
        return None
    return (f"{flag} {name!r} is not a local path (no such file or folder here), and as a Hub repository id it is not "
            f"in the local cache ({cache_dir or constants.HF_HUB_CACHE}) while offline mode is on (HF_HUB_OFFLINE=1): "
            "check the path, or run once with the network on to download it")


__all__ = ["connection_errors", "is_connection_error", "not_local_nor_cached", "offline_mode"]
