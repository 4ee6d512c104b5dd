"""benchmarks/gpu_session.py, the one-command GPU session: its --cpu-smoke mode runs every stage for real (throughput
check, search, both pretraining arms, kNN) at toy sizes, with only the packages the GPU machine will have (the image's
and the carried wheels), and the wheel list covers every distribution that run imports beyond the image. The budget
arithmetic and the deadline stop are checked in-process."""

import functools
import importlib.util
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from importlib import metadata

import pytest

from conftest import REPO_ROOT, run_cli, write_image_parquet

BENCHMARKS = REPO_ROOT / "benchmarks"
# sitecustomize of every Python process of the smoke run (the driver, the probe, throughput.py, the commands): the
# installed packages are replaced by a folder of links to the GPU machine's ones, and the top-level modules the
# process imported are written down at its exit.
SESSION_HOOK = '''
import atexit, json, os, sys

if os.environ.get("GPU_SESSION_IMAGE_SITE"):
    sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    sys.path.append(os.environ["GPU_SESSION_IMAGE_SITE"])

def _record_imports():  # top-level module -> the file it was loaded from (None: built in or made at run time)
    top = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items()) if "." not in name}
    with open(os.path.join(os.environ["GPU_SESSION_IMPORT_LOG"], f"{os.getpid()}.json"), "w") as out:
        json.dump(top, out)

if os.environ.get("GPU_SESSION_IMPORT_LOG"):
    atexit.register(_record_imports)
'''
OWN_MODULES = {"nasiam_hf", "gpu_session", "gpu_wheels", "search_value", "throughput", "sitecustomize", "__main__",
               "__mp_main__"}


@functools.cache
def packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distribution_of(module: str, file: str | None) -> list[str] | None:
    """The distributions a recorded top-level module comes from: [] for the standard library, this repository and
    modules made at run time, None when unknown. By its name, else by the top-level entry of the packages folder
    its file was loaded from (extension modules that register under a bare name, such as scipy's)."""
    if module in sys.stdlib_module_names or module in sys.builtin_module_names or module in OWN_MODULES:
        return []
    owners = packages_distributions()
    if module in owners:
        return owners[module]
    if file is None:
        return []  # made at run time by a package already counted (Cython's runtime modules, torch's stubs)
    path = pathlib.Path(file)
    if module.startswith("__editable__") or path.is_relative_to(REPO_ROOT):
        return []  # this checkout, or its editable install's finder
    if path.is_relative_to(pathlib.Path(sysconfig.get_paths()["stdlib"])) and "-packages" not in file:
        return []  # the interpreter's own (its sysconfig data)
    folder = next((parent for parent in path.parents if parent.name.endswith("-packages")
                   or parent.name == "image-site"), None)
    if folder is None:
        return None
    return owners.get(path.relative_to(folder).parts[0].split(".")[0])


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def session():
    return load("gpu_session")


@pytest.fixture(scope="module")
def wheels():
    return load("gpu_wheels")


def installed(wheels) -> dict:
    """Normalised name -> the distribution installed here (the first one on the path)."""
    found = {}
    for distribution in metadata.distributions():
        if distribution.metadata["Name"]:
            found.setdefault(wheels.normalise(distribution.metadata["Name"]), distribution)
    return found


def needed_by_image_packages_here(wheels, local) -> dict[str, str]:
    """What the versions installed HERE of the image's packages require (transitively) beyond the image list ->
    the image package that needs it. The image's own versions need none of it (the image is whole): these are the
    difference between this machine's newer releases and the image's (huggingface_hub 2.x's httpx2, say)."""
    from packaging.requirements import Requirement

    image = wheels.read_image_packages()
    todo = [name for name in image if name in local]
    seen, extra = set(todo), {}
    while todo:
        owner = todo.pop()
        for line in local[owner].requires or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": "", "python_version": "3.12"}):
                continue
            name = wheels.normalise(requirement.name)
            if name in local and name not in seen:
                seen.add(name)
                todo.append(name)
                if name not in image:
                    extra[name] = owner
    return extra


def image_site(folder, names, local) -> pathlib.Path:
    """A folder of links to the top-level entries (packages, modules, metadata) of the distributions ``names``."""
    site = folder / "image-site"
    site.mkdir()
    for name in names:
        for file in local[name].files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__") or (site / top).exists():
                continue
            target = pathlib.Path(local[name].locate_file(top))
            if target.exists():
                (site / top).symlink_to(target)
    return site


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, wheels):
    """One real --cpu-smoke session on generated 16-px images (128 train, 32 test), with the GPU machine's packages
    only, every process's imports recorded."""
    folder = tmp_path_factory.mktemp("gpu-session")
    train = write_image_parquet(folder / "train.parquet", 128, size=16, seed=0)
    test = write_image_parquet(folder / "test.parquet", 64, size=16, seed=1)
    local = installed(wheels)
    version_gaps = needed_by_image_packages_here(wheels, local)
    carried = {wheels.normalise(line.split("==")[0]) for line in wheels.read_requirements()}
    assert not carried & set(version_gaps), "an image package here needs a carried wheel: the check would be blind"
    machine = (set(wheels.read_image_packages()) | set(version_gaps) | carried) & set(local)
    site = image_site(folder, sorted(machine), local)
    hook, imports = folder / "hook", folder / "imports"
    hook.mkdir()
    imports.mkdir()
    (hook / "sitecustomize.py").write_text(SESSION_HOOK)
    out = folder / "out"
    started = time.perf_counter()
    result = run_cli([sys.executable, str(BENCHMARKS / "gpu_session.py"), "--cpu-smoke", "--output_dir", str(out),
                      "--train_file", str(train), "--test_file", str(test), "--logs_archive",
                      str(folder / "logs.tar.gz")],
                     env={"PYTHONPATH": os.pathsep.join([str(hook), str(REPO_ROOT)]), "OMP_NUM_THREADS": "1",
                          "GPU_SESSION_IMAGE_SITE": str(site), "GPU_SESSION_IMPORT_LOG": str(imports)}, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return {"report": json.loads(result.stdout), "out": out, "imports": imports, "archive": folder / "logs.tar.gz",
            "version_gaps": version_gaps, "carried": carried, "seconds": time.perf_counter() - started}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 100 s on 2 quiet cores; six processes importing torch take far longer on busy ones
def test_cpu_smoke_runs_both_arms_and_reports_the_paired_knn(smoke_run):
    report, out = smoke_run["report"], smoke_run["out"]
    assert report["mode"] == "cpu-smoke" and report["complete"] is True and "error" not in report
    assert {name: stage["status"] for name, stage in report["stages"].items()} == {
        "throughput": "ok", "search": "ok", "pretrain_baseline": "ok", "pretrain_searched": "ok"}
    assert all(rate > 0 for rate in report["throughput"]["images_per_second"].values())
    plan = report["plan"]
    assert plan["from"] == "throughput check" and plan["search_epochs"] == plan["pretrain_epochs"] == 1
    assert plan["train_images"] == 128 and plan["test_images"] == 32
    assert report["search"]["epochs_done"] == 1 and len(report["search"]["genotype"]["projector"]) == len(
        report["search"]["confidence"]["projector"])
    arms = report["arms"]
    assert arms["baseline"]["genotype"] == "simclr-baseline" and arms["searched"]["genotype"] == str(out / "search")
    for arm in arms.values():
        assert arm["status"] == "ok" and arm["epochs_done"] == 1 and 0 <= arm["knn_top1"] <= 100
        p = arm["knn_top1"] / 100
        assert arm["knn_standard_error"] == pytest.approx(100 * math.sqrt(p * (1 - p) / 32), abs=0.01)
    paired = report["paired_knn"]
    assert paired["test_images"] == 32
    assert paired["searched_minus_baseline"] == pytest.approx(
        arms["searched"]["knn_top1"] - arms["baseline"]["knn_top1"], abs=0.01)
    assert paired["standard_error"] == pytest.approx(
        math.hypot(arms["baseline"]["knn_standard_error"], arms["searched"]["knn_standard_error"]), abs=0.02)
    # the two arms differ in their heads only: same seed, data, epochs, batch and resolved optimisation
    baseline, searched = (json.loads((out / arm / "training_args.json").read_text()) for arm in ("baseline",
                                                                                                  "searched"))
    differing = {key for key in baseline.keys() | searched.keys() if baseline.get(key) != searched.get(key)}
    assert differing == {"genotype", "genotype_source", "output_dir", "resolved", "timestamp_utc"}
    assert searched["genotype_source"]["kind"] == "search" and "genotype_source" not in baseline  # a preset has none
    assert baseline["resolved"]["optimization"] == searched["resolved"]["optimization"]
    assert baseline["learning_rate"] is None  # the recipe's rate: no learning-rate flag is passed
    # the JSON is also in the output folder, and the archive holds the logs and histories
    assert json.loads((out / "gpu_session.json").read_text()) == report
    with tarfile.open(smoke_run["archive"]) as tar:
        names = set(tar.getnames())
    assert {"gpu_session.json", "throughput.json", "logs/search.log", "logs/baseline.log", "logs/searched.log",
            "search/search_history.json", "baseline/training_history.json"} <= names
    print(f"gpu_session --cpu-smoke: {smoke_run['seconds']:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_wheel_list_covers_every_import_of_the_session_beyond_the_gpu_image(smoke_run, wheels):
    """The smoke run above ran on the image's packages and the carried wheels alone; here every top-level module any
    of its processes imported is mapped to its distribution: what the image does not have must be in
    gpu-wheels.txt (or be what this machine's newer release of an image package needs, which the image's own
    release does not)."""
    recorded = [json.loads(path.read_text()) for path in smoke_run["imports"].glob("*.json")]
    assert len(recorded) >= 6  # the driver, the probe, throughput.py, the search and two pretrainings
    modules = {name: file for process in recorded for name, file in process.items()}
    distributions, unmapped = set(), set()
    for module, file in modules.items():
        owners = distribution_of(module, file)
        if owners is None:
            unmapped.add(f"{module} ({file})")
        distributions.update(wheels.normalise(name) for name in owners or ())
    assert not unmapped, f"modules imported by the session whose distribution is unknown: {sorted(unmapped)}"
    assert {"torch", "transformers", "accelerate", "datasets"} <= distributions  # the recording saw the commands
    beyond_image = distributions - set(wheels.read_image_packages()) - set(smoke_run["version_gaps"])
    missing = sorted(beyond_image - smoke_run["carried"])
    assert not missing, f"imported by the session, not in the GPU image, not in gpu-wheels.txt: {missing}"
    assert {"datasets", "dill", "multiprocess"} <= beyond_image  # what the list is for is really imported


def test_wheel_list_is_pinned_to_the_tested_versions_and_fits_the_image(wheels):
    """Each carried wheel is pinned to the version the tests run here, and its requirements are met by the image's
    recorded versions (Python 3.12 there) and the other carried wheels."""
    requirements = wheels.read_requirements()
    assert requirements, "gpu-wheels.txt lists no wheel"
    pins = {}
    for line in requirements:
        name, _, version = line.partition("==")
        assert version, f"{line!r} in gpu-wheels.txt is not pinned (name==version)"
        assert metadata.version(name) == version, f"{name} is {metadata.version(name)} here, {version} in the list"
        pins[wheels.normalise(name)] = version
    image = wheels.read_image_packages()
    assert image["torch"] == "2.11.0" and image["transformers"] == "5.17.0" and "datasets" not in image
    needs = {name: metadata.requires(name) or [] for name in pins}
    assert wheels.unmet_requirements(needs, {**image, **pins}, environment={"python_version": "3.12"}) == []
    # and the check does catch a mismatch
    assert wheels.unmet_requirements({"datasets": ["huggingface-hub>=1.31.0"]}, {"huggingface-hub": "1.30.0"}) == [
        "datasets needs huggingface-hub>=1.31.0: found 1.30.0"]
    assert wheels.unmet_requirements({"datasets": ["dill<0.4.2"]}, {}) == ["datasets needs dill<0.4.2: not installed"]
    text = (BENCHMARKS / "gpu-wheels.txt").read_text()
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in text
    assert "-d .whl -r benchmarks/gpu-wheels.txt" in text


def test_plan_fits_the_budget_and_replans_from_the_search(session):
    rates = session.Rates(pretrain=10_000, search_weight=8_000, alpha=25_000, knn_features=20_000)
    search_epoch, pretrain_epoch = rates.search_epoch(50_000), rates.pretrain_epoch(50_000)
    assert search_epoch == pytest.approx(25_000 / 8_000 + 25_000 / 25_000) and pretrain_epoch == 5.0
    epochs = session.plan_epochs(400, 30, search_epoch, pretrain_epoch, cap=200, efficiency=0.6)
    used = 3 * 30 + epochs * (search_epoch + 2 * pretrain_epoch) / 0.6
    assert used <= 400 < 3 * 30 + (epochs + 1) * (search_epoch + 2 * pretrain_epoch) / 0.6
    assert session.plan_epochs(400, 30, search_epoch, pretrain_epoch, cap=3) == 3
    assert session.plan_epochs(50, 30, search_epoch, pretrain_epoch, cap=200) == 1  # never below one epoch
    # the search's epoch ends (seconds from its start) give its real epoch time and the fixed cost of a command
    search = session.StageResult("search", status="ok", seconds=70.0, epoch_ends=[22.0, 30.0, 38.0, 46.0, 54.0],
                                 epochs_done=5)
    calibration = session.calibrate(search, synthetic_epoch=4.0)
    assert calibration == {"search_seconds_per_epoch": 8.0, "command_overhead_seconds": 30.0, "efficiency": 0.5,
                           "epochs_timed": 5}
    # the last epoch ended just before the exit, between two looks at the history: it still counts as an epoch
    untimed = session.StageResult("search", status="ok", seconds=70.0, epoch_ends=[22.0, 30.0, 38.0, 46.0],
                                  epochs_done=5)
    assert session.calibrate(untimed, synthetic_epoch=4.0)["command_overhead_seconds"] == 30.0
    assert session.calibrate(session.StageResult("search", seconds=40.0, epoch_ends=[35.0]), 4.0) is None
    assert session.calibrate(search, synthetic_epoch=20.0)["efficiency"] == 1.0  # never planned above the synthetic
    pretrain = session.replan_pretrain_epochs(300, 30, pretrain_epoch / 0.5, cap=200, margin=0.9)
    assert 2 * 30 + 2 * pretrain * 10.0 <= 300 * 0.9 < 2 * 30 + 2 * (pretrain + 1) * 10.0


def test_paired_knn_error_is_that_of_the_two_figures(session):
    assert session.knn_standard_error(50.0, 2000) == pytest.approx(100 * math.sqrt(0.25 / 2000))
    paired = session.paired_knn(60.0, 62.5, 2000)
    error = math.hypot(session.knn_standard_error(60.0, 2000), session.knn_standard_error(62.5, 2000))
    assert paired["searched_minus_baseline"] == 2.5 and paired["standard_error"] == round(error, 2)
    assert paired["z"] == round(2.5 / error, 2) and paired["test_images"] == 2000


def test_a_stage_past_the_deadline_is_stopped_with_its_workers(session, tmp_path):
    """The command and the process it started are both stopped at the deadline; the result says so, with the log."""
    child = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(child)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    started = time.monotonic()
    result = session.run_stage(session.StageResult("sleeper"), [sys.executable, "-c", script], tmp_path / "s.log",
                               dict(os.environ), deadline=time.monotonic() + 4)
    assert result.status == "timed_out" and time.monotonic() - started < 15
    assert "stopped at the deadline" in result.error and "started" in result.error
    assert gone(int(child.read_text())), "the command's own child outlived the deadline"
    failed = session.run_stage(session.StageResult("fails"), [sys.executable, "-c", "import sys; sys.exit('no data')"],
                               tmp_path / "f.log", dict(os.environ), deadline=time.monotonic() + 60)
    assert failed.status == "failed" and failed.error.startswith("exit 1") and "no data" in failed.error


def test_missing_data_and_bad_epochs_are_one_line_errors(session, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: --train_file .*nowhere.parquet is not a file \(on the GPU machine"):
        session.main(["--cpu-smoke", "--train_file", str(tmp_path / "nowhere.parquet"), "--output_dir",
                      str(tmp_path / "out")])
    test = tmp_path / "test.parquet"
    test.write_bytes(b"")  # only its existence is checked before the epochs
    with pytest.raises(SystemExit, match=r"^error: --pretrain_epochs must be at least 1, got 0$"):
        session.main(["--cpu-smoke", "--train_file", str(test), "--test_file", str(test), "--pretrain_epochs", "0"])
    assert not (tmp_path / "out").exists()  # nothing is written before the settings are sound


def write_wheel(folder, name, version, requires):
    """A minimal pure-Python wheel, as pip builds them (module, METADATA, WHEEL, RECORD with hashes)."""
    import base64
    import hashlib
    import zipfile

    module, info = name.replace("-", "_"), f"{name.replace('-', '_')}-{version}.dist-info"
    files = {f"{module}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {line}\n" for line in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip('=')},"
              f"{len(text.encode())}" for path, text in files.items()] + [f"{info}/RECORD,,"]
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for file, text in files.items():
            wheel.writestr(file, text)
        wheel.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def test_missing_wheels_are_installed_into_a_private_folder_first_on_the_path(wheels, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the install puts its folder first; undone after the test
    carried = tmp_path / "whl"
    carried.mkdir()
    write_wheel(carried, "gpu-session-fixture", "0.3", ["nowhere-dist>=1", "packaging>=1"])
    wheel_list = tmp_path / "wheels.txt"
    wheel_list.write_text("# carried\ngpu-session-fixture==0.3\n")
    # no wheel in the folder: one message naming the missing distribution and the list to download
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = wheels.install_wheels(str(empty), tmp_path / "site0", {"PYTHONPATH": ""}, wheel_list=wheel_list)
    assert failed["install_error"] == (f"gpu-session-fixture==0.3 not installed here, and {empty} holds no wheels: "
                                       "download them with the pip line in wheels.txt and carry the folder")
    env = {"PYTHONPATH": str(REPO_ROOT)}
    info = wheels.install_wheels(str(carried), tmp_path / "site", env, wheel_list=wheel_list)
    assert info["missing_before"] == ["gpu-session-fixture==0.3"] and "install_error" not in info
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path / "site"), str(REPO_ROOT)])
    assert (tmp_path / "site" / "gpu_session_fixture" / "__init__.py").is_file()
    assert info["carried_versions"] == {"gpu-session-fixture": "0.3"}
    assert info["unmet_requirements"] == ["gpu-session-fixture needs nowhere-dist>=1: not installed"]


SESSION_STOPPED = """
import json, os, pathlib, signal, sys, time
sys.path.insert(0, sys.argv[1])
import gpu_session
signal.signal(signal.SIGTERM, gpu_session.on_sigterm)
child = ("import os, pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(120)")
stage = gpu_session.StageResult("sleeper")
try:
    gpu_session.run_stage(stage, [sys.executable, "-c", child, sys.argv[2]], pathlib.Path(sys.argv[3]),
                          dict(os.environ), deadline=time.monotonic() + 120)
except gpu_session.Interrupted as error:
    print(json.dumps({"status": stage.status, "error": str(error)}), flush=True)
"""


def gone(pid: int) -> bool:
    """The process has ended (gone, or a zombie waiting to be reaped), within 5 s."""
    status = pathlib.Path(f"/proc/{pid}/status")
    for _ in range(50):
        if not status.exists() or "\nState:\tZ" in status.read_text():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_session_takes_its_running_stage_along(sig, tmp_path):
    """SIGTERM (a wall-clock limit around the session): the stage is stopped and marked interrupted, and the session
    goes on to write its JSON. SIGKILL: the stage still gets SIGTERM from the kernel as its parent dies."""
    pid_file = tmp_path / "stage.pid"
    session = subprocess.Popen([sys.executable, "-c", SESSION_STOPPED, str(BENCHMARKS), str(pid_file),
                                str(tmp_path / "stage.log")], stdout=subprocess.PIPE, text=True)
    for _ in range(300):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    stage = int(pid_file.read_text())
    session.send_signal(sig)
    out, _ = session.communicate(timeout=60)
    assert gone(stage), "the stage outlived its session"
    if sig == signal.SIGTERM:
        assert json.loads(out) == {"status": "interrupted", "error": f"stopped by signal {int(signal.SIGTERM)}"}
