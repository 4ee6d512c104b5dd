"""Is the Hugging Face Hub reachable? Two small answers shared by the data layer and the Hub code.

Kept apart from both so that neither imports the other for them (no import circle).
"""

from __future__ import annotations

import os

# Names of the exception classes (anywhere in an error's chain) that mean "the Hub could not be reached".
CONNECTION_ERROR_NAMES = frozenset({
    "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ConnectionError", "Timeout",
})


def offline_mode(*env_vars: str) -> bool:
    """Whether Hugging Face offline mode is on: huggingface_hub's ``HF_HUB_OFFLINE``, or ``HF_HUB_OFFLINE`` and
    ``env_vars`` in the environment now (the libraries read them only when imported)."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").strip().upper() for name in ("HF_HUB_OFFLINE", *env_vars))
    return bool(constants.HF_HUB_OFFLINE) or any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags)


def is_connection_error(error: BaseException | None) -> bool:
    """True when any error in the chain (causes and contexts) says the Hub could not be reached, offline mode
    included."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        names = {cls.__name__ for cls in type(error).__mro__}
        if isinstance(error, ConnectionError) or names & CONNECTION_ERROR_NAMES:
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


__all__ = ["CONNECTION_ERROR_NAMES", "is_connection_error", "not_local_nor_cached", "offline_mode"]
