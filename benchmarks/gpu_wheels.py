"""What the lent GPU machine needs beyond its image, for ``benchmarks/gpu_session.py``.

``gpu-wheels.txt`` lists the wheels to carry (pinned, with the ``pip download`` line) and ``gpu-image-packages.txt``
the image's own distributions (with their source). The session installs the list from the carried folder when one of
them is missing and reports every requirement of a carried wheel that the machine's packages leave unmet; the tests
check the list against the imports of a real ``--cpu-smoke`` run and the image's recorded versions.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
WHEEL_LIST = BENCHMARKS / "gpu-wheels.txt"
IMAGE_PACKAGES = BENCHMARKS / "gpu-image-packages.txt"


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path = WHEEL_LIST) -> list[str]:
    """The requirement lines of a pip requirements file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def unmet_requirements(needs: dict[str, list[str]], versions: dict[str, str | None],
                       environment: dict | None = None) -> list[str]:
    """Every requirement of ``needs`` (distribution -> its Requires-Dist lines) that ``versions`` (normalised name ->
    version, or None when the version is not known) does not meet; extras are left out, markers are evaluated in
    ``environment`` (default: this interpreter's)."""
    from packaging.requirements import Requirement

    unmet = []
    for owner, lines in needs.items():
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({**(environment or {}), "extra": ""}):
                continue
            name = normalise(requirement.name)
            if name not in versions:
                unmet.append(f"{owner} needs {requirement}: not installed")
            elif versions[name] is not None and not requirement.specifier.contains(versions[name], prereleases=True):
                unmet.append(f"{owner} needs {requirement}: found {versions[name]}")
    return unmet


def install_wheels(wheels: str, site: Path, env: dict, wheel_list: Path = WHEEL_LIST) -> dict:
    """Install the whole wheel list from ``wheels`` into ``site`` when one of its distributions is missing here, put
    that folder first on the path of this process and of the commands (``env``), and check the carried wheels'
    requirements against what is installed."""
    from importlib import metadata

    from packaging.requirements import Requirement

    requirements = read_requirements(wheel_list)
    missing = []
    for line in requirements:
        try:
            metadata.version(Requirement(line).name)
        except metadata.PackageNotFoundError:
            missing.append(line)
    info = {"wheel_list": requirements, "missing_before": missing}
    if missing and not any(Path(wheels).glob("*.whl")):
        info["install_error"] = (f"{' '.join(missing)} not installed here, and {wheels} holds no wheels: download them "
                                 f"with the pip line in {wheel_list.name} and carry the folder")
        return info
    if missing:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site), "--find-links", wheels,
                   "-r", str(wheel_list)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            info["install_error"] = (f"{' '.join(missing)} not installed, and installing {wheel_list.name} from "
                                     f"{wheels} failed (download the wheels with the line in that file): "
                                     + done.stderr[-800:])
            return info
        env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
        info["installed_into"] = str(site)
    versions = {}
    for distribution in metadata.distributions():  # the first one on the path wins, as for imports
        if distribution.metadata["Name"]:
            versions.setdefault(normalise(distribution.metadata["Name"]), distribution.version)
    needs = {Requirement(line).name: metadata.requires(Requirement(line).name) or [] for line in requirements
             if normalise(Requirement(line).name) in versions}
    info["carried_versions"] = {name: versions[normalise(name)] for name in needs}
    info["unmet_requirements"] = unmet_requirements(needs, versions)
    return info


PROBE = """
import json, sys
from importlib import metadata
out = {"python": sys.version.split()[0]}
for name in ("torch", "torchvision", "transformers", "accelerate", "huggingface_hub", "datasets", "pyarrow", "fsspec",
             "safetensors", "numpy", "timm"):
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
try:
    import torch
    out["cuda_available"] = torch.cuda.is_available()
    out["cuda"] = torch.version.cuda
    out["device"] = torch.cuda.get_device_name(0) if out["cuda_available"] else "cpu"
    import datasets, nasiam_hf.data  # the data layer imports with what is installed
except Exception as error:
    out["import_error"] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
"""


def probe(env: dict, timeout: float) -> dict:
    """Versions, device and whether the data layer imports, as the commands will see them (a subprocess)."""
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"import_error": f"the environment probe did not finish in {timeout:.0f} s"}
    if done.returncode != 0 or not done.stdout.strip():
        return {"import_error": f"the environment probe failed (exit {done.returncode}): {done.stderr[-800:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_image_packages(path: Path = IMAGE_PACKAGES) -> dict[str, str | None]:
    """The image's distributions: normalised name -> version (None where the source gives none)."""
    packages = {}
    for line in read_requirements(path):
        name, _, version = line.partition("==")
        packages[normalise(name)] = version or None
    return packages
