"""The Hub options of the training commands against a local stand-in of the Hub HTTP API: ``--hub_revision`` (the
branch is created and committed to), ``--hub_create_pr`` (a pull request is opened), ``--push_checkpoints`` (each
checkpoint uploaded in the background while the run goes on; a failed upload is reported and training continues),
the TensorBoard event files of ``--with_tracking --report_to tensorboard`` in the uploaded folder, and a rerun from
``training_args.json`` that never pushes with the redacted token."""

import base64
import json
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from huggingface_hub import constants

from conftest import run_cli, write_image_parquet
from test_hub import FakeHub

REPO = "someone/nasiam-tiny"
# MoCo v2's standard head on a tiny transformers ResNet: a checkpoint of some 200 kB, quick to upload inline
TINY = ["--genotype", "mocov2-baseline", "--queue_size", "16", "--image_size", "8", "--per_device_train_batch_size",
        "8", "--seed", "0", "--knn_every", "0", "--max_train_steps", "3", "--dataloader_num_workers", "0"]


class HubStandIn(FakeHub):
    """:class:`test_hub.FakeHub` plus what the Hub options need: branches (``POST .../branch/{name}``; a commit to a
    branch that was never created is refused, as the Hub does), pull requests (opened with ``POST .../discussions``
    and committed to ``refs/pr/N``, as huggingface_hub does with hf_xet, or with ``create_pr=1`` on a commit, as it
    does without), one file tree per revision, commits that fail on request, and an upload held back until a
    condition holds (its preupload answer waits: the client reads the files' content only after it, for the
    commit)."""

    def __init__(self):
        super().__init__()
        self.branches = {"main"}
        self.trees: dict[str, dict[str, bytes]] = {}
        self.pulls: list[dict] = []
        self.fail_paths: tuple[str, ...] = ()  # commits adding a file under one of these prefixes fail (HTTP 500)
        self.failed: list[str] = []
        self.hold_prefix: str | None = None  # the first upload under this prefix waits for hold_until() ...
        self.hold_until = None
        self.held: list[bool] = []  # ... and records whether it came true while the upload waited
        self.lock = threading.Lock()
        hub, base = self, self.server.RequestHandlerClass

        class Handler(base):
            def do_GET(self):
                url = urlparse(self.path)
                match = re.fullmatch(r"/api/models/(.+)/discussions/(\d+)", url.path)
                if match is None:
                    return super().do_GET()
                hub.requests.append(("GET", url.path))
                pull = hub.pulls[int(match.group(2)) - 1]
                return self._reply(200, {
                    "num": pull["number"], "title": pull["title"], "author": {"name": "someone"},
                    "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft", "isPullRequest": True, "events": [],
                    "repo": {"name": pull["repo"], "type": "model"}, "filesWithConflicts": [],
                    "changes": {"base": "refs/heads/main"}})

            def open_pull(self, repo: str, title: str) -> int:
                with hub.lock:
                    number = len(hub.pulls) + 1
                    hub.pulls.append({"repo": repo, "number": number, "title": title})
                    hub.branches.add(f"refs/pr/{number}")
                return number

            def do_POST(self):
                url = urlparse(self.path)
                for kind in ("branch", "preupload", "commit", "discussions"):
                    match = re.fullmatch(rf"/api/models/(.+)/{kind}(?:/([^/]+))?", url.path)
                    if match:
                        break
                else:
                    return super().do_POST()
                body = self._body()
                hub.requests.append(("POST", url.path))
                hub.authorizations.add(self.headers.get("Authorization", ""))
                repo, revision = match.group(1), unquote(match.group(2) or "")
                if kind == "discussions":
                    request = json.loads(body)
                    assert request["pullRequest"] is True, request
                    number = self.open_pull(repo, request["title"])
                    return self._reply(200, {"num": number, "url": f"{hub.url}/{repo}/discussions/{number}"})
                if kind == "branch":
                    with hub.lock:
                        if revision in hub.branches:
                            return self._reply(409, {"error": f"branch {revision} already exists"})
                        hub.branches.add(revision)
                    return self._reply(200, {})
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    if hub.hold_prefix and not hub.held and any(f["path"].startswith(hub.hold_prefix) for f in files):
                        deadline = time.monotonic() + 60
                        while not hub.hold_until() and time.monotonic() < deadline:
                            time.sleep(0.05)
                        hub.held.append(bool(hub.hold_until()))
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
                if revision not in hub.branches:
                    return self._reply(404, {"error": f"Invalid rev id: {revision}"})
                if any(path.startswith(hub.fail_paths) for path in files):
                    hub.failed.append(sorted(files)[0])
                    return self._reply(500, {"error": "the stand-in refuses this commit on purpose"})
                create_pr = parse_qs(url.query).get("create_pr") == ["1"]
                oid = f"{len(hub.commits) + 1:040x}"
                payload = {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid}
                target = revision
                if create_pr:
                    number = self.open_pull(repo, lines[0]["value"]["summary"])
                    target = f"refs/pr/{number}"
                    payload["pullRequestUrl"] = f"{hub.url}/{repo}/discussions/{number}"
                with hub.lock:
                    hub.trees.setdefault(target, {}).update(files)
                    hub.files.update(files)
                    hub.commits.append({"repo": repo, "revision": revision, "create_pr": create_pr,
                                        "header": lines[0]["value"], "paths": sorted(files)})
                return self._reply(200, payload)

        self.server.RequestHandlerClass = Handler


@pytest.fixture
def hub(monkeypatch):
    """A running stand-in; in this process HF_ENDPOINT points at it and offline mode is off for this test only."""
    with HubStandIn() as stand_in:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        monkeypatch.setattr(constants, "ENDPOINT", stand_in.url)
        yield stand_in


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The flags of a tiny pretraining on 32 images (its training file and backbone folder made here)."""
    from transformers import ResNetConfig

    folder = tmp_path_factory.mktemp("hub-data")
    ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic").save_pretrained(
        folder / "backbone")
    train = write_image_parquet(folder / "train.parquet", 32, size=16)
    return ["--train_file", str(train), "--backbone", str(folder / "backbone"), *TINY]


def online_env(hub: HubStandIn) -> dict:
    """A subprocess environment where the Hub is the stand-in: offline mode off, no proxy for it, a token in
    HF_TOKEN (what a run without --hub_token pushes with)."""
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_from_env", "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def pretrain_cli(*args, env):
    return run_cli([sys.executable, "-m", "nasiam_hf.commands.pretrain", *map(str, args)], env=env, timeout=600)


def local_files(folder: Path, under: str = "") -> dict[str, bytes]:
    """{path: bytes} of the files under ``folder``, as an upload sees them."""
    root = folder / under if under else folder
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow  # two tiny pretraining subprocesses (each imports torch and the package): about 30-60 s
def test_pretrain_pushes_a_branch_checkpoints_in_the_background_and_tensorboard_events(tmp_path, tiny, hub):
    out = tmp_path / "run"
    hub.fail_paths = ("checkpoints/step-00000002/",)
    hub.hold_prefix, hub.hold_until = "checkpoints/step-00000001/", (out / "model.safetensors").exists
    result = pretrain_cli(
        *tiny, "--output_dir", out, "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "1", "--with_tracking", "--report_to", "tensorboard",
        "--push_to_hub", "--hub_model_id", REPO, "--hub_revision", "dev", "--push_checkpoints",
        "--hub_token", "hf_secret", env=online_env(hub))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert hub.unexpected == []

    # --hub_revision: the branch was created and every commit went to it, none to main
    assert "dev" in hub.branches and {c["revision"] for c in hub.commits} == {"dev"} and "main" not in hub.trees
    tree = hub.trees["dev"]
    # --push_checkpoints: each checkpoint under checkpoints/<name>, byte for byte what was written, uploaded while the
    # run went on (the first upload was held back until the final model existed: a run waiting for it never would
    # have got there), and whole although --checkpoints_total_limit 1 had deleted it locally by then
    assert hub.held == [True]
    uploaded = sorted({path.split("/")[1] for path in tree if path.startswith("checkpoints/")})
    assert uploaded == ["step-00000001", "step-00000003"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]  # nothing else left there
    for path, data in local_files(out, "checkpoints").items():
        assert tree[path] == data, path
    for name in ("model.safetensors", "trainer_state.json", "config.json"):
        assert f"checkpoints/step-00000001/{name}" in tree
    # the failed upload is reported, training did not stop
    assert hub.failed and hub.failed[0].startswith("checkpoints/step-00000002/")
    assert "warning: checkpoint step-00000002 was not pushed" in log
    # the final folder, TensorBoard events included, as the run left it; checkpoints only from their own uploads
    events = [p for p in local_files(out) if p.startswith("runs/") and "tfevents" in p]
    assert events, sorted(local_files(out))
    final = {p: d for p, d in local_files(out).items() if not p.startswith("checkpoints/")}
    for path, data in final.items():
        assert tree.get(path) == data, path
    assert {"model.safetensors", "config.json", "README.md", "training_args.json"} <= set(tree)
    record = json.loads((out / "training_args.json").read_text())
    assert record["hub_token"] == "<redacted>" and b"hf_secret" not in b"".join(tree.values())
    assert hub.authorizations - {""} == {"Bearer hf_secret"}

    # training_args.json reruns the run: same resolved plan, and the redacted token is dropped (the token of the
    # environment is used), so nothing is ever pushed with "<redacted>"
    hub.authorizations.clear()
    hub.fail_paths, hub.hold_prefix = (), None
    again = tmp_path / "rerun"
    result = pretrain_cli("--config", out / "training_args.json", "--output_dir", again, env=online_env(hub))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rerun = json.loads((again / "training_args.json").read_text())
    assert rerun["resolved"] == record["resolved"]
    assert rerun["hub_token"] is None  # recorded as given: none, since the redacted one was dropped
    skip = {"output_dir", "timestamp_utc", "hub_token"}
    assert {k: v for k, v in rerun.items() if k not in skip} == {k: v for k, v in record.items() if k not in skip}
    assert hub.authorizations - {""} == {"Bearer hf_from_env"}


def test_hub_create_pr_opens_a_pull_request_and_leaves_main_alone(tmp_path, tiny, hub, one_thread):
    from nasiam_hf import PretrainCommand, run_pretrain

    out = tmp_path / "run"
    command = PretrainCommand.parse([*tiny, "--output_dir", str(out),
                                     "--checkpointing_steps", "no", "--push_to_hub", "--hub_model_id", REPO,
                                     "--hub_create_pr", "--hub_token", "hf_pr"])
    run_pretrain(command)
    assert [p["number"] for p in hub.pulls] == [1] and len(hub.commits) == 1
    assert set(hub.trees) == {"refs/pr/1"}  # the files went to the pull request, none to main
    pulled = hub.trees["refs/pr/1"]
    assert pulled["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert not any(path.startswith("checkpoints/") for path in pulled)
    assert hub.branches == {"main", "refs/pr/1"} and hub.unexpected == []


@pytest.mark.parametrize("flags, message", [
    (["--hub_revision", "dev", "--hub_create_pr"],
     "--hub_create_pr opens a pull request against main: drop --hub_revision"),
    (["--push_checkpoints", "--hub_create_pr"],
     "--push_checkpoints commits each checkpoint to the branch"),
    (["--hub_revision", "dev"], "--hub_revision applies to --push_to_hub and --push_checkpoints only"),
    (["--hub_create_pr"], "--hub_create_pr applies to --push_to_hub only"),
])
def test_hub_flags_that_cannot_work_are_refused_before_the_run(tmp_path, capsys, flags, message):
    from nasiam_hf.commands import pretrain

    pushing = [] if flags in (["--hub_revision", "dev"], ["--hub_create_pr"]) else ["--push_to_hub"]
    with pytest.raises(SystemExit) as info:
        pretrain.main(["--train_file", str(tmp_path / "missing.parquet"), "--output_dir", str(tmp_path / "out"),
                       "--hub_model_id", REPO, *pushing, *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()
