"""What a regular (non-editable) install ships: every subpackage of nasiam_hf is listed in pyproject.toml."""

import pytest

from conftest import REPO_ROOT


def test_every_subpackage_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO_ROOT).parts) for p in (REPO_ROOT / "nasiam_hf").rglob("__init__.py")}
    assert {"nasiam_hf", "nasiam_hf.data", "nasiam_hf.hub"} <= found
    assert found <= listed, f"not in pyproject's packages (a pip install would miss them): {sorted(found - listed)}"
