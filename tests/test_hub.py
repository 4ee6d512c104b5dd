"""Tests of nasiam_hf.hub: atomic writes, run metadata, plots, the model card and the push to a local Hub stand-in."""

import base64
import json
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
from huggingface_hub import ModelCard, constants
from PIL import Image

import nasiam_hf
from nasiam_hf import NASiamConfig
from nasiam_hf.fileio import atomic_write_json, atomic_write_text
from nasiam_hf.hub import (
    hub_dataset_id,
    plot_genotype,
    plot_search_history,
    plot_training_history,
    push_folder_to_hub,
    save_run_metadata,
    write_model_card,
)
from nasiam_hf.hub.plots import training_figures
from nasiam_hf.search_space import SEARCH_SPACES


# ----------------------------------------------------------------------------------------------------------------------
# Atomic writes and run metadata
# ----------------------------------------------------------------------------------------------------------------------
def test_atomic_write_json_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "eval_results.json"
    atomic_write_json(path, {"knn": {"top1": 50.0}})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"knn": {"top1": 51.0}, "bad": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json"]  # no temporary file left


def test_atomic_write_text_replaces_and_cleans_up_on_write_error(tmp_path, monkeypatch):
    path = tmp_path / "README.md"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("nasiam_hf.fileio.os.fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "half-written")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_save_run_metadata_records_args_versions_and_time(tmp_path):
    command = nasiam_hf.PretrainCommand.parse(["--dataset_name", "demo", "--output_dir", str(tmp_path),
                                               "--num_train_epochs", "2", "--hub_token", "hf_secret"])
    path = save_run_metadata(tmp_path, command, command=command.name, resolved={"optimization": {"base_lr": 0.06}})
    assert path == tmp_path / "training_args.json"
    data = json.loads(path.read_text())
    assert data["num_train_epochs"] == 2 and data["learning_rate"] is None and data["dataset_name"] == "demo"
    assert data["output_dir"] == str(tmp_path) and data["command"] == "nasiam-pretrain"
    assert data["resolved"] == {"optimization": {"base_lr": 0.06}}
    assert data["hub_token"] == "<redacted>" and "hf_secret" not in path.read_text()
    versions = data["package_versions"]
    for key in ("nasiam_hf", "torch", "torchvision", "transformers", "huggingface_hub", "accelerate", "datasets",
                "safetensors", "python"):
        assert key in versions
    assert versions["torch"] and versions["transformers"] and versions["python"].count(".") == 2
    assert data["timestamp_utc"].endswith("+00:00")
    save_run_metadata(tmp_path, {"seed": 1, "genotype": ("identity", "linear_relu")}, filename="search_args.json")
    saved = json.loads((tmp_path / "search_args.json").read_text())
    assert saved["seed"] == 1 and saved["genotype"] == ["identity", "linear_relu"]


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------
def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _search_history(epochs=3, projector_layers=2, predictor_layers=1):
    ops = list(SEARCH_SPACES["S"])
    rows = []
    for e in range(epochs):
        weights = {
            "projector": [_softmax([0.3 * e * (k == i) for k in range(len(ops))]) for i in range(projector_layers)],
        }
        if predictor_layers:
            weights["predictor"] = [_softmax([0.2 * e * (k == 1) for k in range(len(ops))])] * predictor_layers
        rows.append({"epoch": e, "train_loss": -0.5 - 0.1 * e, "val_loss": -0.45 - 0.1 * e, "collapse_std": 0.02,
                     "identity_share": 0.0, "op_weights": weights})
    return {"epochs": rows, "ops": ops, "genotype": {"projector": ops[:projector_layers], "predictor": None}}


def _assert_png(path):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def test_plot_search_history_writes_alphas_and_losses(tmp_path):
    written = plot_search_history(_search_history(), tmp_path)
    assert [p.name for p in written] == ["alphas.png", "search_loss.png", "search_confidence.png",
                                         "search_diagnostics.png"]
    for path in written:
        _assert_png(path)
    # A projector-only search (SimCLR, MoCo v2) and a single epoch plot too.
    written = plot_search_history(_search_history(epochs=1, predictor_layers=0), tmp_path / "simclr")
    for path in written:
        _assert_png(path)
    assert not list(tmp_path.rglob("*.tmp"))


def test_plot_training_history_writes_three_curves(tmp_path):
    history = {
        "collapse_reference": 1 / math.sqrt(2048),
        "epochs": [{"epoch": e, "loss": -0.2 * e, "collapse_std": 0.02, "lr": 0.06 * (1 - e / 4),
                    **({"knn_top1": 30.0 + e} if e % 2 else {})} for e in range(4)],
    }
    written = plot_training_history(history, tmp_path)
    assert [p.name for p in written] == ["loss.png", "knn_accuracy.png", "collapse.png"]
    for path in written:
        _assert_png(path)
    figures = training_figures(history)
    loss_axes, lr_axes = figures["loss.png"].axes  # the learning rate on an axis of its own
    assert loss_axes.get_lines()[0].get_xydata().tolist() == [[e + 1, -0.2 * e] for e in range(4)]
    assert lr_axes.get_ylabel() == "learning rate"
    assert lr_axes.get_lines()[0].get_ydata().tolist() == [0.06 * (1 - e / 4) for e in range(4)]
    assert figures["knn_accuracy.png"].axes[0].get_lines()[0].get_xydata().tolist() == [[2, 31.0], [4, 33.0]]
    # no kNN measured: no kNN plot at all (no placeholder)
    no_knn = {"epochs": [{"epoch": 0, "loss": 1.0, "collapse_std": 0.01, "lr": 0.1, "knn_top1": None}]}
    written = plot_training_history(no_knn, tmp_path / "no_knn")
    assert [p.name for p in written] == ["loss.png", "collapse.png"]
    with pytest.raises(ValueError, match="epochs"):
        plot_training_history({"epochs": []}, tmp_path)


@pytest.mark.parametrize("preset", ["simsiam-cifar10-resnet18", "mocov2-cifar10-resnet50"])
def test_plot_genotype(tmp_path, preset):
    import matplotlib

    backend = matplotlib.rcParams["backend"]
    path = plot_genotype(NASiamConfig.from_preset(preset), tmp_path / "genotype.png")
    _assert_png(path)
    assert matplotlib.rcParams["backend"] == backend  # drawn on an Agg canvas, the user's backend is untouched


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------
EVAL_RESULTS = {
    "linear_probe": {"top1": 91.37, "top5": 99.71, "dataset_name": "uoft-cs/cifar10", "split": "test", "epochs": 100},
    "knn": {"top1": 88.12, "k": 200, "temperature": 0.2, "dataset_name": "cifar10", "split": "test"},
}
TRAINING_ARGS = {"dataset_name": "uoft-cs/cifar10", "num_train_epochs": 800, "per_device_train_batch_size": 512,
                 "learning_rate": 0.06, "optimizer": "sgd", "weight_decay": 5e-4, "hub_token": "hf_secret"}


def _table_ops(text, heading):
    """Op names of the genotype table that follows ``heading``, in order (the fixed output row excluded)."""
    section = text.split(heading, 1)[1]
    ops = []
    for line in section.splitlines()[3:]:
        if not line.startswith("|"):
            if ops:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].isdigit():
            ops.append(cells[1].strip("`"))
    return ops


def test_model_card_with_eval_results(tmp_path):
    config = NASiamConfig.from_preset("simsiam-cifar10-resnet18")
    plot_genotype(config, tmp_path / "genotype.png")
    history = {"epochs": [{"epoch": 0, "loss": -0.1, "knn_top1": None}, {"epoch": 9, "loss": -0.8, "knn_top1": 47.25}]}
    path = write_model_card(tmp_path, config, training_args=TRAINING_ARGS, eval_results=EVAL_RESULTS, history=history,
                            repo_id="someone/nasiam-simsiam-r18")
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-feature-extraction"
    assert data.license == "apache-2.0" and data.metrics == ["accuracy"]
    assert data.datasets == ["uoft-cs/cifar10"]
    for tag in ("self-supervised-learning", "nasiam", "simsiam", "neural-architecture-search",
                "image-feature-extraction", "resnet18"):
        assert tag in data.tags
    top1 = {(r.metric_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert top1[("linear-probe", "accuracy")] == 91.37 and top1[("knn", "accuracy")] == 88.12
    assert top1[("linear-probe", "top-5-accuracy")] == 99.71
    model_index = data.to_dict()["model-index"]
    assert model_index[0]["name"] == "nasiam-simsiam-r18"
    values = [m["value"] for r in model_index[0]["results"] for m in r["metrics"]]
    assert 91.37 in values
    text = path.read_text(encoding="utf-8")
    assert _table_ops(text, "Projector") == config.projector_genotype
    assert _table_ops(text, "Predictor:") == config.predictor_genotype
    assert "![Genotype of the heads](genotype.png)" in text
    assert "91.37" in text and "88.12" in text and "47.25" in text  # measured numbers, and only those
    assert "training_args.json" in text and "| Epochs (planned) | 800 |" in text  # no outcome: said to be a plan
    assert "hf_secret" not in text
    assert "trust_remote_code=True" in text and "AutoModelForImageClassification" in text
    assert 'AutoModel.from_pretrained("someone/nasiam-simsiam-r18")' in text
    assert "@article{heuillet2023nasiam" in text and "arXiv:2302.00059" in text


def test_model_card_without_evaluation_invents_nothing(tmp_path):
    config = NASiamConfig(backbone="resnet18", framework="mocov2",
                          projector_genotype=["identity", "avg_pool_3x3", "avg_pool_3x3", "linear_elu"])
    path = write_model_card(tmp_path, config, dataset_name="/data/my_images/train.parquet")
    card = ModelCard.load(path)
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert card.data.datasets is None  # a local file is not a Hub dataset
    assert "mocov2" in card.data.tags and "resnet18" in card.data.tags
    text = path.read_text(encoding="utf-8")
    assert "model-index" not in text
    assert "No evaluation was run" in text
    assert "| Evaluation |" not in text and "Top-1" not in text
    assert _table_ops(text, "Projector") == config.projector_genotype
    assert "Predictor:" not in text and "genotype.png" not in text
    assert 'from_pretrained("path/to/this/folder"' in text


def test_model_card_history_knn_only_goes_to_body(tmp_path):
    config = NASiamConfig.from_preset("simclr-baseline", backbone="resnet18")
    history = {"epochs": [{"epoch": 1, "loss": 5.0, "knn_top1": 38.5}]}
    path = write_model_card(tmp_path, config, history=history, dataset_name="cifar10")
    card = ModelCard.load(path)
    assert card.data.eval_results is None and card.data.datasets == ["uoft-cs/cifar10"]
    text = path.read_text(encoding="utf-8")
    assert "38.50 % top-1" in text and "No evaluation was run" not in text
    assert "standard heads" in text


def test_hub_dataset_id():
    assert hub_dataset_id("cifar10") == "uoft-cs/cifar10"
    assert hub_dataset_id("uoft-cs/cifar100") == "uoft-cs/cifar100"
    assert hub_dataset_id("ILSVRC/imagenet-1k") == "ILSVRC/imagenet-1k"
    assert hub_dataset_id("data/train.parquet") is None
    assert hub_dataset_id("/abs/imagefolder") is None
    assert hub_dataset_id(None) is None


# ----------------------------------------------------------------------------------------------------------------------
# Push, against a local stand-in for the Hub API
# ----------------------------------------------------------------------------------------------------------------------
DENIED = "Invalid credentials in Authorization header"


class FakeHub:
    """Enough of the Hub HTTP API for ``create_repo`` + ``upload_folder`` with small regular files.

    Endpoints (as called by huggingface_hub 2.x): ``POST /api/validate-yaml`` (README metadata check),
    ``POST /api/repos/create``, ``POST /api/models/{repo}/preupload/{rev}`` and ``POST /api/models/{repo}/commit/{rev}``
    (NDJSON: a header line, then one ``file`` line per file with base64 content). The preupload answer says that
    every file is "regular", so even ``model.safetensors`` travels inline in the commit and no LFS/Xet transfer is
    needed. ``status_for_create`` simulates an authentication failure.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.status_for_create = 200
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                path = urlparse(self.path).path
                hub.requests.append(("GET", path))
                if path == "/api/agent-harnesses":
                    # Best-effort telemetry lookup made while building request headers: answer 404 so that
                    # huggingface_hub caches nothing from the stand-in.
                    return self._reply(404, {"error": "not served by the stand-in"})
                if hub.status_for_create != 200:  # repo_info after a refused create_repo(exist_ok=True)
                    return self._reply(hub.status_for_create, {"error": DENIED})
                hub.unexpected.append(("GET", path))
                self._reply(404, {"error": "not implemented by the stand-in"})

            def do_POST(self):
                path = urlparse(self.path).path
                body = self._body()
                hub.requests.append(("POST", path))
                hub.authorizations.add(self.headers.get("Authorization", ""))
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    if hub.status_for_create != 200:
                        return self._reply(hub.status_for_create, {"error": DENIED})
                    hub.created.append(payload)
                    repo = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                match = re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path)
                if match:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]})
                match = re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path)
                if match:
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    if lines[0]["key"] != "header" or any(line["key"] != "file" for line in lines[1:]):
                        return self._reply(400, {"error": f"stand-in only takes inline files, got {lines[1:]}"})
                    for line in lines[1:]:
                        assert line["value"]["encoding"] == "base64"
                        hub.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    oid = f"{len(hub.commits) + 1:040x}"
                    hub.commits.append(
                        {"repo": match.group(1), "revision": match.group(2), "header": lines[0]["value"]}
                    )
                    return self._reply(200, {"commitUrl": f"{hub.url}/{match.group(1)}/commit/{oid}",
                                             "commitOid": oid})
                hub.unexpected.append(("POST", path))
                self._reply(404, {"error": "not implemented by the stand-in"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_hub(monkeypatch):
    """A running stand-in, with HF_ENDPOINT pointing at it and offline mode off for this test only.

    huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, into ``constants.ENDPOINT`` and
    ``constants.HF_HUB_OFFLINE`` (``is_offline_mode()`` returns the latter): patch both the env and the constants.
    """
    with FakeHub() as hub:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        yield hub


def test_push_folder_to_local_hub(tmp_path, fake_hub):
    folder = tmp_path / "nasiam-simsiam"
    config = NASiamConfig.from_preset("simsiam-cifar10-resnet18")
    nasiam_hf.NASiamModel(config).save_pretrained(folder)
    plot_genotype(config, folder / "genotype.png")
    save_run_metadata(folder, {"num_train_epochs": 1, "hub_token": "hf_secret"})
    write_model_card(folder, config, training_args={"num_train_epochs": 1}, repo_id="someone/nasiam-simsiam")
    # What must stay local: training checkpoints and temporary files.
    (folder / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint_0" / "optimizer.bin").write_bytes(b"state")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    (folder / "config.json.tmp").write_text("partial")
    (folder / ".search.abc123.tmp").mkdir()  # an unfinished staging folder
    (folder / ".search.abc123.tmp" / "config.json").write_text("{}")

    start = time.monotonic()
    url = push_folder_to_hub(folder, "someone/nasiam-simsiam", token="hf_test_token")
    assert time.monotonic() - start < 60
    assert url.startswith(f"{fake_hub.url}/someone/nasiam-simsiam/commit/")
    assert [(c["organization"], c["name"]) for c in fake_hub.created] == [("someone", "nasiam-simsiam")]
    assert fake_hub.unexpected == []
    assert fake_hub.authorizations == {"Bearer hf_test_token"}
    assert [c["header"]["summary"] for c in fake_hub.commits] == ["Upload NASiam model"]

    code_files = {p.name for p in folder.glob("*.py")}
    assert {"configuration_nasiam.py", "modeling_nasiam.py"} <= code_files  # copied by save_pretrained
    expected = {"config.json", "model.safetensors", "README.md", "genotype.png", "training_args.json"} | code_files
    assert set(fake_hub.files) == expected
    for name in expected:
        assert fake_hub.files[name] == (folder / name).read_bytes(), name
    assert b"hf_secret" not in fake_hub.files["training_args.json"]


def test_push_auth_error_names_login(tmp_path, fake_hub):
    fake_hub.status_for_create = 401
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError) as info:
        push_folder_to_hub(tmp_path, "someone/denied", token="hf_bad")
    message = str(info.value)
    assert "hf auth login" in message and "--hub_token" in message and str(tmp_path.resolve()) in message
    assert fake_hub.files == {}


def test_push_offline_fails_fast_with_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "config.json").write_text("{}")
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        push_folder_to_hub(tmp_path, "someone/offline")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert str(tmp_path.resolve()) in message and "offline" in message.lower()
    assert "hf upload someone/offline" in message


def test_push_unreachable_endpoint_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "config.json").write_text("{}")
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        push_folder_to_hub(tmp_path, "someone/unreachable", endpoint=f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 5
    assert "Cannot reach the Hub" in str(info.value) and str(tmp_path.resolve()) in str(info.value)
