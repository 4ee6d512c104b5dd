"""One run per output folder: the lock a training run holds on its ``--output_dir`` for its whole life.

The main process takes an exclusive ``filelock.FileLock`` (``flock`` on POSIX) on ``output_dir/.nasiam-run.lock``
before the output guard reads the folder, so a second run cannot decide on the folder between that decision and the
lock; the other processes of the run learn the outcome by one broadcast and stop with the same message. The holder
writes who it is (pid, host, command, start time) to ``.nasiam-run.holder.json`` beside the lock file, which
filelock owns and keeps empty. The OS drops the lock when the process dies (filelock also closes it in forked
children such as DataLoader workers), so a lock left by a killed run never blocks: the next run takes it and
rewrites the holder file.

A run releases the lock when it ends (:func:`releases_output_dir` around the engines' run functions), removing both
files, and the folders it created to hold them when the run left nothing else there: a run that fails before it has
anything to keep leaves the path as it found it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputDirError
from .fileio import atomic_write_json
from .folders import RUN_HOLDER_FILE, RUN_LOCK_FILE

# Tries before a lock that is held by nobody we can name is reported: a holder that has just taken it (its holder
# file not written yet) or one that has just died (on this host), for about two seconds in all.
_TRIES, _PAUSE = 10, 0.2
_held: list[RunLock] = []  # locks taken in this process, released by releases_output_dir


def check_output_path(out: Path) -> None:
    """Refuse an ``--output_dir`` that is a file or lies below one (before anything is created)."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--output_dir {str(out)!r} is a file: pass a folder (a new path, or a run folder)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputDirError(f"--output_dir {str(out)!r} cannot be created: {str(parent)!r} is a file")
            return


@dataclass
class RunLock:
    """A held lock on ``folder``; ``created``: the folders made to hold it, deepest first."""

    folder: Path
    lock: object  # filelock.FileLock
    created: tuple[Path, ...] = ()

    def release(self) -> None:
        """Remove the holder and lock files (and the folders made for them when nothing else is there), then
        unlock. A run that opened the lock file just before it was removed finds it unlinked and tries again."""
        if not self.lock.is_locked:
            return
        try:
            for name in (RUN_HOLDER_FILE, RUN_LOCK_FILE):
                (self.folder / name).unlink(missing_ok=True)
            for folder in self.created:
                try:
                    folder.rmdir()  # only when empty: a run that wrote something keeps its folder
                except OSError:
                    break
        finally:
            self.lock.release()


def _holder(folder: Path) -> dict | None:
    try:
        holder = json.loads((folder / RUN_HOLDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict) -> bool:
    """False only for a holder on this host whose process is gone (its lock is being released)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def describe_holder(holder: dict | None) -> str:
    if holder is None:
        return "another run (it has not said who it is yet)"
    who = f"{holder.get('command') or 'a run'}, pid {holder.get('pid')} on host {holder.get('host')!r}"
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        who += " (this Python process: an earlier run in it has not released the folder)"
    return f"{who}, started {holder.get('started', 'at an unknown time')}"


def _in_use(folder: Path, holder: dict | None, overwrite: bool) -> OutputDirError:
    what = f"--output_dir {str(folder)!r} is in use by {describe_holder(holder)}"
    if overwrite:
        return OutputDirError(f"{what}: --overwrite_output_dir cannot replace a run that is still going. Wait for it "
                              "to end or stop it first, or choose another --output_dir")
    return OutputDirError(f"{what}: two runs must not write one folder. Wait for it to end (or stop it), or choose "
                          "another --output_dir")


def _make_folders(folder: Path) -> tuple[Path, ...]:
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return tuple(missing)


def lock_output_dir(folder: str | os.PathLike, command: str = "", overwrite: bool = False) -> RunLock:
    """Take the lock of ``folder`` in this process (creating the folder), or raise :class:`OutputDirError` naming
    the run that holds it. ``overwrite``: the run was given ``--overwrite_output_dir`` (said in the refusal)."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    check_output_path(folder)
    holder = None
    for attempt in range(_TRIES):
        created = _make_folders(folder)
        lock = FileLock(folder / RUN_LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = _holder(folder)
            if holder is not None and _alive(holder):
                break
            time.sleep(_PAUSE)  # just taken (holder file not written yet) or just released by a dead run
            continue
        except FileNotFoundError:  # the folder was removed by a run that ended: make it again
            continue
        try:
            started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            atomic_write_json(folder / RUN_HOLDER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                                         "command": command, "started": started})
        except BaseException:
            RunLock(folder, lock, created).release()
            raise
        held = RunLock(folder, lock, created)
        _held.append(held)
        return held
    raise _in_use(folder, holder, overwrite)


def hold_output_dir(accelerator, folder: str | os.PathLike, command: str = "", overwrite: bool = False) -> None:
    """The main process takes the lock of ``folder`` (:func:`lock_output_dir`); every process then learns the outcome
    (one broadcast) and all raise the same error when it failed, before any of them reads the folder."""
    error = None
    if accelerator.is_main_process:
        try:
            lock_output_dir(folder, command, overwrite)
        except Exception as caught:  # noqa: BLE001 - the other ranks must hear of any failure, not only a refusal
            error = caught
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([None if error is None else " ".join(str(error).split())])[0]
        if error is None and message is not None:
            raise OutputDirError(message)
    if error is not None:
        raise error


def releases_output_dir(run):
    """Decorate a run function: the output-folder locks taken while it runs are released when it returns or
    raises (a ``SystemExit`` of a stop request included), so one Python process can run one command after
    another into the same folder."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        depth = len(_held)
        try:
            return run(*args, **kwargs)
        finally:
            while len(_held) > depth:
                _held.pop().release()

    return wrapper


__all__ = ["RunLock", "check_output_path", "describe_holder", "hold_output_dir", "lock_output_dir",
           "releases_output_dir"]
