"""``nasiam-embed``: the rows are the model's own vectors of every image (parquet, folders, a dataset loaded whole),
written in shards that load with datasets; a rerun keeps the shards already written (also after a SIGKILL) and
gives the rows of an uninterrupted run; wrong models and folders are refused in one line; the README's
nearest-neighbour block runs."""

import io
import json
import shlex
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, cli_env, readme_blocks, write_image_parquet
from nasiam_hf import NASiamConfig, NASiamForImageClassification, NASiamModel
from nasiam_hf.commands.embed import main as embed_main
from nasiam_hf.processing import build_image_processor

STATS = ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def save_model(folder, image_size=16, classifier=False):
    torch.manual_seed(0)
    config = NASiamConfig(image_size=image_size, projector_hidden_size=32, projection_dim=24, zero_init_residual=False)
    model = NASiamForImageClassification(NASiamConfig(**{**config.to_diff_dict(), "num_labels": 2})) if classifier \
        else NASiamModel(config)
    model.save_pretrained(folder)
    build_image_processor(image_size, *STATS, "cifar").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("embed-model") / "model")


def load_rows(folder):
    table = datasets.load_dataset("parquet", data_files=str(folder / "*.parquet"), split="train")
    return table, table.with_format("torch")["embedding"][:]


def expected_vectors(folder, images, projector=False):
    """The model's own vectors: its saved processor, then the backbone (and the projector), in one batch."""
    from transformers import AutoImageProcessor

    model = NASiamModel.from_pretrained(folder).eval()
    with torch.no_grad():
        features = model(AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt")[
            "pixel_values"]).pooler_output
        return model.project(features) if projector else features


def error_lines(text):
    """The ``error:`` lines of a command's stderr (transformers' own progress bars go there too)."""
    return [line for line in text.splitlines() if line.startswith("error")]


def embed(*args, **paths):
    embed_main([str(a) for a in args] + [x for key, value in paths.items() for x in (f"--{key}", str(value))])


def test_parquet_rows_are_the_models_vectors_in_shards(model_folder, tiny_parquet, tmp_path, capsys):
    train, _ = tiny_parquet
    out = tmp_path / "out"
    embed("--shard_size", "20", "--per_device_eval_batch_size", "8", model_name_or_path=model_folder,
          train_file=train, output_dir=out)
    printed = capsys.readouterr().out
    assert "3 shards of 20, 0 already written" in printed and "48 embeddings of dimension 512 (float32)" in printed
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"embeddings-0000{i}-of-00003.parquet" for i in range(3)]
    table, vectors = load_rows(out)
    source = datasets.load_dataset("parquet", data_files=str(train), split="train")
    assert table["key"][:] == [f"train.parquet:{i}" for i in range(48)]
    assert table["label"][:] == source["label"][:]
    assert table.features["embedding"].length == 512 and vectors.dtype == torch.float32
    assert torch.allclose(vectors, expected_vectors(model_folder, source["img"][:]), rtol=0, atol=1e-4)
    info = json.loads((out / "embed_info.json").read_text())
    assert (info["complete"], info["rows"], info["bad_images"], info["dimension"]) == (True, 48, 0, 512)
    assert info["columns"] == ["key", "embedding", "label"] and info["class_names"] == [f"class_{c}" for c in range(4)]
    assert not (out / ".embed-staging").exists()


def test_folders_and_whole_datasets_with_the_projector_in_float16(model_folder, tiny_parquet, tmp_path):
    source = datasets.load_dataset("parquet", data_files=str(tiny_parquet[0]), split="train").select(range(10))
    photos = tmp_path / "photos"
    paths = [f"a/{i}.png" if i % 2 else f"b/c/{i}.png" for i in range(7)] + ["top.jpg", "x/y/z/deep.webp", "d.png"]
    for path, image in zip(paths, source["img"]):
        (photos / path).parent.mkdir(parents=True, exist_ok=True)
        image.save(photos / path)
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "folder-out"
    embed("--embed", "projector", "--dtype", "float16", "--shard_size", "4", model_name_or_path=model_folder,
          train_dir=photos, output_dir=out)
    table, vectors = load_rows(out)
    assert table["key"][:] == sorted(paths) and "label" not in table.column_names  # nested: no labels
    assert table.features["embedding"].feature.dtype == "float16" and vectors.shape == (10, 24)
    images = [Image.open(photos / key).convert("RGB") for key in table["key"][:]]
    expected = expected_vectors(model_folder, images, projector=True).half().float()
    assert torch.allclose(vectors, expected, rtol=2e-3, atol=2e-3)

    saved = tmp_path / "saved"  # a dataset folder (arrow files): loaded whole, keyed by row number
    source.save_to_disk(saved)
    embed(model_name_or_path=model_folder, train_file=saved, output_dir=tmp_path / "arrow-out")
    table, vectors = load_rows(tmp_path / "arrow-out")
    assert table["key"][:] == [str(i) for i in range(10)] and table["label"][:] == source["label"][:]
    assert torch.allclose(vectors, expected_vectors(model_folder, source["img"][:]), rtol=0, atol=1e-4)


def test_a_rerun_keeps_the_shards_written_and_refuses_other_settings(model_folder, tiny_parquet, tmp_path, capsys):
    train, _ = tiny_parquet
    out = tmp_path / "out"
    common = ["--shard_size", "16", "--per_device_eval_batch_size", "8"]
    embed(*common, model_name_or_path=model_folder, train_file=train, output_dir=out)
    _, first = load_rows(out)
    shards = sorted(out.glob("*.parquet"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if the run had been killed before its second shard was renamed into place
    (out / ".embed-staging").mkdir()
    (out / ".embed-staging" / f"{shards[1].name}.0.123").write_bytes(b"PAR1 half a shard")
    capsys.readouterr()
    embed(*common, model_name_or_path=model_folder, train_file=train, output_dir=out)
    printed = capsys.readouterr().out
    assert "same settings, resuming" in printed and "3 shards of 16, 2 already written" in printed
    assert "1 shards computed" in printed
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("*.parquet")) if p != shards[1]} == {
        name: stamp for name, stamp in stamps.items() if name != shards[1].name}
    _, again = load_rows(out)
    assert torch.equal(first, again) and not (out / ".embed-staging").exists()
    embed(*common, model_name_or_path=model_folder, train_file=train, output_dir=out)
    assert "every shard was already written" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        embed("--shard_size", "10", model_name_or_path=model_folder, train_file=train, output_dir=out)
    assert exit_info.value.code == 2 and error_lines(capsys.readouterr().err) == [
        f"error: --output_dir {str(out)!r} holds an embedding with other settings (shard_size differ): pass "
        "--overwrite_output_dir to replace it, or choose another folder"]
    embed("--shard_size", "10", "--overwrite_output_dir", model_name_or_path=model_folder, train_file=train,
          output_dir=out)
    assert len(list(out.glob("*.parquet"))) == 5 and torch.equal(load_rows(out)[1], first)


@pytest.mark.parametrize("case", ["empty", "other files", "config only", "classifier projector", "output", "data"])
def test_refusals_are_one_line(case, model_folder, tiny_parquet, tmp_path, capsys):
    train, _ = tiny_parquet
    model, out, extra = model_folder, tmp_path / "out", []
    if case == "empty":
        (model := tmp_path / "empty").mkdir()
    elif case == "other files":
        (model := tmp_path / "other").mkdir()
        (model / "weights.bin").write_bytes(b"x")
    elif case == "config only":
        NASiamConfig().save_pretrained(model := tmp_path / "search")
    elif case == "classifier projector":
        model, extra = save_model(tmp_path / "classifier", classifier=True), ["--embed", "projector"]
    elif case == "output":
        out.mkdir()
        (out / "mine.parquet").write_bytes(b"x")
    args = ["--model_name_or_path", str(model), "--output_dir", str(out), *extra]
    args += [] if case == "data" else ["--train_file", str(train)]
    with pytest.raises(SystemExit) as exit_info:
        embed_main(args)
    (err,) = error_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2
    expected = {
        "empty": f"--model_name_or_path {str(model)!r}",
        "other files": f"--model_name_or_path {str(model)!r}",
        "config only": f"--model_name_or_path {str(model)!r}",
        "classifier projector": "has no projector weights",
        "output": "holds other files (e.g. 'mine.parquet')",
        "data": "pass exactly one of --dataset_name, --train_file, --train_dir",
    }[case]
    assert expected in err, err
    assert case == "output" or not (out / "embed_info.json").exists()


def test_the_readme_nearest_neighbour_search_runs(model_folder, tiny_parquet, tmp_path, monkeypatch):
    (command,) = [line for block in readme_blocks("## Embeddings", "bash") for line in block.splitlines()
                  if line.startswith("nasiam-embed")]
    (snippet,) = readme_blocks("## Embeddings", "python")
    monkeypatch.chdir(tmp_path)
    save_model(tmp_path / "runs" / "photos-model")
    source = datasets.load_dataset("parquet", data_files=str(tiny_parquet[0]), split="train")
    (tmp_path / "photos").mkdir()
    for i in range(12):
        source[i]["img"].save(tmp_path / "photos" / f"{i:02d}.png")
    embed_main(shlex.split(command)[1:])
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(snippet, "README.md embeddings snippet", "exec"), {"__name__": "readme_embeddings"})
    lines = printed.getvalue().splitlines()
    assert len(lines) == 5 and lines[0] == "1.000 00.png"
    scores = [float(line.split()[0]) for line in lines]
    assert scores == sorted(scores, reverse=True) and len({line.split()[1] for line in lines}) == 5


@pytest.mark.slow  # three embedding subprocesses, one of them killed (about a minute here)
def test_a_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path):
    train = write_image_parquet(tmp_path / "train.parquet", 48, seed=3)
    model = save_model(tmp_path / "model")
    env = cli_env({"OMP_NUM_THREADS": "1"})  # the same computation in every run, and no fight for the 2 cores

    def command(out):
        return [sys.executable, "-m", "nasiam_hf.commands.embed", "--model_name_or_path", str(model),
                "--train_file", str(train), "--output_dir", str(out), "--shard_size", "4",
                "--per_device_eval_batch_size", "2", "--dataloader_num_workers", "0"]

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(killed.glob("embeddings-*.parquet")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(killed.glob("embeddings-*.parquet")))
    assert process.returncode == -signal.SIGKILL and 1 <= written < 12, (process.returncode, written)
    resumed = subprocess.run(command(killed), env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"12 shards of 4, {written} already written" in resumed.stdout
    whole = subprocess.run(command(tmp_path / "whole"), env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (a, va), (b, vb) = load_rows(killed), load_rows(tmp_path / "whole")
    assert a["key"][:] == b["key"][:] == [f"train.parquet:{i}" for i in range(48)]
    assert a["label"][:] == b["label"][:] and torch.equal(va, vb)
    assert np.isfinite(va.numpy()).all()


@pytest.mark.slow  # the benchmark end to end on tiny files (three model passes over 64 images and the monitor)
def test_the_benchmark_compares_the_parquet_knn_with_the_monitor(tiny_parquet, tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import embed as benchmark
    finally:
        sys.path.pop(0)
    train, test = tiny_parquet
    result = benchmark.main(["--train_file", str(train), "--test_file", str(test), "--output_dir", str(tmp_path),
                             "--batch_size", "16", "--knn_k", "10"])
    assert json.loads(capsys.readouterr().out) == result
    assert result["embed_train"]["rows"] == 48 and result["embed_test"]["rows"] == 16
    assert result["embed_train"]["images_per_second"] > 0
    knn = result["knn"]
    assert knn["equal"] and knn["top1_from_parquet"] == knn["top1_monitor"] and 0 <= knn["top1_monitor"] <= 100


@pytest.mark.slow  # a real 2-process accelerate launch (gloo)
def test_two_processes_share_the_shards(model_folder, tiny_parquet, tmp_path):
    from conftest import accelerate_launch

    train, _ = tiny_parquet
    out = tmp_path / "two"
    result = accelerate_launch("training/embed.py", "--model_name_or_path", model_folder, "--train_file", train,
                               "--output_dir", out, "--shard_size", "8", "--per_device_eval_batch_size", "4",
                               num_processes=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "6 shards of 8, 0 already written, 2 processes" in result.stdout
    table, vectors = load_rows(out)
    source = datasets.load_dataset("parquet", data_files=str(train), split="train")
    assert table["key"][:] == [f"train.parquet:{i}" for i in range(48)]
    assert torch.allclose(vectors, expected_vectors(model_folder, source["img"][:]), rtol=0, atol=1e-4)
    assert json.loads((out / "embed_info.json").read_text())["rows"] == 48


def test_a_dataset_by_name_whole_or_streamed(model_folder, tiny_parquet, tmp_path):
    """A dataset folder laid out as on the Hub: downloaded whole (keyed by row) or read file by file (--streaming,
    keyed by file and row); the same vectors either way."""
    source = datasets.load_dataset("parquet", data_files=str(tiny_parquet[0]), split="train").select(range(12))
    (tmp_path / "hubset" / "data").mkdir(parents=True)
    source.to_parquet(str(tmp_path / "hubset" / "data" / "train-00000-of-00001.parquet"))
    name = str(tmp_path / "hubset")
    embed(model_name_or_path=model_folder, dataset_name=name, output_dir=tmp_path / "whole")
    embed("--streaming", model_name_or_path=model_folder, dataset_name=name, output_dir=tmp_path / "streamed")
    (whole, a), (streamed, b) = load_rows(tmp_path / "whole"), load_rows(tmp_path / "streamed")
    assert whole["key"][:] == [str(i) for i in range(12)]
    assert streamed["key"][:] == [f"data/train-00000-of-00001.parquet:{i}" for i in range(12)]
    assert whole["label"][:] == streamed["label"][:] == source["label"][:]
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_webdataset_shards_and_bad_images(model_folder, tiny_parquet, tmp_path, capsys):
    from image_data import encode, write_tar

    source = datasets.load_dataset("parquet", data_files=str(tiny_parquet[0]), split="train").select(range(6))
    samples = [(f"s{i}", {"png": encode(image), "cls": str(label).encode()})
               for i, (image, label) in enumerate(zip(source["img"], source["label"]))]
    samples[2] = ("s2", {"png": b"not an image", "cls": b"0"})
    shards = tmp_path / "shards"
    write_tar(shards / "a.tar", samples[:4])
    write_tar(shards / "b.tar", samples[4:])
    with pytest.raises(SystemExit) as exit_info:
        embed(model_name_or_path=model_folder, train_file=shards, output_dir=tmp_path / "strict")
    (err,) = error_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2 and "webdataset shard 'a.tar', sample 's2'" in err, err
    embed("--on_bad_image", "skip", "--shard_size", "4", model_name_or_path=model_folder, train_file=shards,
          output_dir=tmp_path / "skip")
    table, vectors = load_rows(tmp_path / "skip")
    kept = [0, 1, 3, 4, 5]
    assert table["key"][:] == ["a.tar/s0", "a.tar/s1", "a.tar/s3", "b.tar/s4", "b.tar/s5"]
    assert table["label"][:] == [source["label"][i] for i in kept]
    assert torch.allclose(vectors, expected_vectors(model_folder, [source["img"][i] for i in kept]), rtol=0,
                          atol=1e-4)
    info = json.loads((tmp_path / "skip" / "embed_info.json").read_text())
    assert (info["rows"], info["bad_images"]) == (5, 1)
    assert "1 undecodable images left out" in capsys.readouterr().out
