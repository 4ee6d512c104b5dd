"""The lazy package (issue 21): ``import nasiam_hf`` loads neither torch nor transformers, every public name still
resolves, and the NASiam classes are registered with transformers' Auto classes whichever comes first, the package
or transformers' Auto machinery (each order in a fresh process, where nothing else registers them)."""

import json
import sys
import textwrap

import pytest

import nasiam_hf
from conftest import run_cli


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from nasiam_hf import NASiamConfig, NASiamForPreTraining

    folder = tmp_path_factory.mktemp("lazy") / "model"
    NASiamForPreTraining(NASiamConfig(image_size=16)).nasiam.save_pretrained(folder)
    return folder


def run_python(*parts: str) -> dict:
    script = "\n".join(textwrap.dedent(part) for part in parts)
    result = run_cli([sys.executable, "-c", script], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LOAD_EVERY_AUTO_CLASS = """
    from transformers import (AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification,
                              AutoModelForPreTraining)
    folder = {folder!r}
    config = AutoConfig.from_pretrained(folder)
    loaded = {{
        "AutoConfig": type(config).__name__,
        "AutoModel": type(AutoModel.from_pretrained(folder)).__name__,
        "AutoModelForPreTraining": type(AutoModelForPreTraining.from_pretrained(folder)).__name__,
        "AutoModelForImageClassification": type(AutoModelForImageClassification.from_pretrained(
            folder, num_labels=3)).__name__,
        "AutoBackbone": type(AutoBackbone.from_config(config)).__name__,
    }}
"""
EXPECTED = {"AutoConfig": "NASiamConfig", "AutoModel": "NASiamModel", "AutoModelForPreTraining": "NASiamForPreTraining",
            "AutoModelForImageClassification": "NASiamForImageClassification", "AutoBackbone": "NASiamBackbone"}


def test_import_nasiam_hf_is_light_and_registers_when_transformers_loads_its_auto_classes(model_folder):
    result = run_python("""
        import json, sys
        import nasiam_hf
        light = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "transformers",
                                                                     "datasets", "accelerate"))
        """, LOAD_EVERY_AUTO_CLASS.format(folder=str(model_folder)), """
        print(json.dumps({"light": light, "loaded": loaded}))
        """)
    assert result["light"] == []
    assert result["loaded"] == EXPECTED


def test_the_classes_register_when_transformers_came_first(model_folder):
    result = run_python("""
        import json
        from transformers import AutoConfig, AutoModel  # the Auto machinery before the package
        import nasiam_hf
        """, LOAD_EVERY_AUTO_CLASS.format(folder=str(model_folder)), """
        print(json.dumps({"loaded": loaded}))
        """)
    assert result["loaded"] == EXPECTED


def test_every_public_name_resolves_and_a_saved_folder_names_its_auto_classes(model_folder):
    for name in nasiam_hf.__all__:
        assert getattr(nasiam_hf, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'NASiamModle'"):
        nasiam_hf.NASiamModle  # noqa: B018
    config = json.loads((model_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_nasiam.NASiamModel"  # trust_remote_code without the package
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_nasiam.NASiamForImageClassification"
