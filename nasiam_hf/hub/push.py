"""Uploading a folder to the Hugging Face Hub, with errors that say what to do when the Hub cannot be reached."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from ..checkpoints import STAGING_PREFIX
from ..errors import PushError
from ..fileio import publish_problem
from ..folders import RUN_LOCK_FILES
from ..network import connection_errors, offline_mode

# Training checkpoints (ours and the Trainer's), temporary files and folders (atomic writes, an unfinished save's
# ".nasiam-publish.tmp/") and the lock of the run that is pushing.
DEFAULT_IGNORE_PATTERNS = ("checkpoints/*", "checkpoint-*/*", "*.tmp", "*.tmp/*", *sorted(RUN_LOCK_FILES))


def _uses_proxy(scheme: str) -> bool:
    return any(os.environ.get(v) for v in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"))


def _check_reachable(endpoint: str, timeout: float) -> None:
    """Resolve and connect to the endpoint with a short timeout (the Hub client itself waits without a limit).

    Skipped when a proxy is configured, since the direct route may then be closed on purpose.
    """
    url = urlparse(endpoint)
    scheme = url.scheme or "https"
    if _uses_proxy(scheme) or not url.hostname:
        return
    port = url.port or (443 if scheme == "https" else 80)
    with socket.create_connection((url.hostname, port), timeout=timeout):
        pass


def _upload_hint(folder: Path, repo_id: str, ignore_patterns: Iterable[str]) -> str:
    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in ignore_patterns)
    where = shlex.quote(str(folder))
    return (
        f"The model is saved locally at {folder}. Push it later, with network access, using\n"
        f"    hf upload {repo_id} {where} . {excludes}".rstrip()
    )


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload NASiam model",
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    endpoint: str | None = None,
    connect_timeout: float = 5.0,
    revision: str | None = None,
    create_pr: bool = False,
    path_in_repo: str | None = None,
    run_as_future: bool = False,
):
    """Create ``repo_id`` on the Hub if needed and upload ``folder`` to it; return the commit URL (with
    ``run_as_future``, a ``concurrent.futures.Future`` of the upload, which runs in the background).

    ``revision`` names the branch (created from main when missing), ``create_pr`` opens a pull request instead of
    committing to it, ``path_in_repo`` puts the files under a folder of the repository (checkpoints).
    ``ignore_patterns`` (paths relative to ``folder``) keep training checkpoints and temporary files out.
    ``endpoint`` defaults to ``HF_ENDPOINT``. Without network (``HF_HUB_OFFLINE=1``, no DNS, refused connection) it
    fails at once with a ``RuntimeError`` naming the local folder and the command to push later; authentication
    errors (401/403) raise a ``RuntimeError`` that points to ``hf auth login`` / ``--hub_token``.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot push {folder}: no such folder")
    patterns = list(ignore_patterns or ())
    hint = _upload_hint(folder, repo_id, patterns)
    problem = publish_problem(folder)
    if problem:
        raise PushError(f"Cannot push {folder}: {problem}")
    if offline_mode():
        raise PushError(
            f"Cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1; unset it to push).\n{hint}"
        )
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    try:
        _check_reachable(endpoint, connect_timeout)
        api = HfApi(endpoint=endpoint, token=token)
        repo_url = api.create_repo(repo_id, exist_ok=True, private=private)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, ignore_patterns=list(patterns),
            revision=revision, create_pr=create_pr, path_in_repo=path_in_repo, run_as_future=run_as_future,
        )
        if run_as_future:
            return info
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise PushError(
                f"The Hub refused the push to {repo_id!r} (HTTP {status}): log in with `hf auth login` or pass a "
                f"token with write access (`--hub_token` in the training scripts, token= here).\n{hint}"
            ) from error
        raise PushError(f"Pushing to {repo_id!r} failed: {error}\n{hint}") from error
    except connection_errors() as error:
        raise PushError(
            f"Cannot reach the Hub at {endpoint} ({type(error).__name__}: {error}).\n{hint}"
        ) from error
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or repo_url)


class CheckpointPusher:
    """``--push_checkpoints``: each checkpoint is uploaded in the background as it is written, under
    ``checkpoints/<name>`` of the repository, so a preempted run is on the Hub up to its last checkpoint.

    The upload reads a hard-linked snapshot of the checkpoint (:func:`snapshot_checkpoint`), since the run may delete
    the checkpoint itself (``--checkpoints_total_limit``) before a slow upload has read it. A failed upload does not
    stop the training: it is reported when the next checkpoint is submitted and at :meth:`wait` (the end of the run),
    which lets the uploads still running finish.
    """

    def __init__(self, repo_id: str, *, token: str | None = None, private: bool = False, revision: str | None = None):
        self.repo_id, self.token, self.private, self.revision = repo_id, token, private, revision
        self.pending: list[tuple[str, object, Path]] = []
        self.errors: list[str] = []

    def submit(self, checkpoint: str | os.PathLike) -> None:
        self._collect(block=False)
        name = Path(checkpoint).name
        snapshot = snapshot_checkpoint(checkpoint)
        try:
            future = push_folder_to_hub(snapshot, self.repo_id, token=self.token, private=self.private,
                                        revision=self.revision, path_in_repo=f"checkpoints/{name}",
                                        commit_message=f"Checkpoint {name}", ignore_patterns=("*.tmp", "*.tmp/*"),
                                        run_as_future=True)
        except RuntimeError as error:  # offline, unreachable, refused: keep training, say it once per checkpoint
            shutil.rmtree(snapshot, ignore_errors=True)
            self.errors.append(f"{name}: {str(error).splitlines()[0]}")
            print(f"warning: checkpoint {name} was not pushed: {str(error).splitlines()[0]}")
            return
        self.pending.append((name, future, snapshot))

    def _collect(self, block: bool) -> None:
        still = []
        for name, future, snapshot in self.pending:
            if not block and not future.done():
                still.append((name, future, snapshot))
                continue
            try:
                future.result()
            except Exception as error:  # the upload thread's error, reported here
                self.errors.append(f"{name}: {error}")
                print(f"warning: checkpoint {name} was not pushed: {' '.join(str(error).split())[:300]}")
            shutil.rmtree(snapshot, ignore_errors=True)
        self.pending = still

    def wait(self) -> list[str]:
        """Wait for the uploads still running; returns the errors of all failed ones."""
        self._collect(block=True)
        return list(self.errors)


def snapshot_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """A copy of ``checkpoint`` made of hard links (plain copies where the file system has none), beside it under
    ``checkpoints/`` with the staging prefix: a run killed during an upload leaves a folder its next start removes."""
    checkpoint = Path(checkpoint)
    snapshot = Path(tempfile.mkdtemp(dir=checkpoint.parent, prefix=f"{STAGING_PREFIX}push-{checkpoint.name}."))
    shutil.copytree(checkpoint, snapshot, copy_function=_link_or_copy, dirs_exist_ok=True)
    return snapshot


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def checkpoint_pusher(hub) -> CheckpointPusher | None:
    """The background checkpoint uploads of ``--push_checkpoints`` (``hub``: the run's HubArguments), or None."""
    if not hub.push_checkpoints:
        return None
    return CheckpointPusher(hub.hub_model_id, token=hub.hub_token, private=hub.hub_private_repo,
                            revision=hub.hub_revision)


def push_run_folder(hub, folder: str | os.PathLike, commit_message: str = "Upload NASiam model") -> str | None:
    """``--push_to_hub``: upload a run's output folder with the run's Hub options; None when not asked to."""
    if not hub.push_to_hub:
        return None
    return push_folder_to_hub(folder, hub.hub_model_id, token=hub.hub_token, private=hub.hub_private_repo,
                              revision=hub.hub_revision, create_pr=hub.hub_create_pr, commit_message=commit_message)
