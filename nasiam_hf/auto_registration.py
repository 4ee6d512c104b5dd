"""Register the NASiam classes with transformers' Auto classes without paying for them at ``import nasiam_hf``.

Registering needs the config and model classes, and importing them costs what ``from transformers import
PreTrainedModel`` costs (torch, torchvision, ``torch._dynamo``: seconds), which ``--help`` and the argument parser
do not need. So ``import nasiam_hf`` registers at once only what transformers has already loaded, and otherwise
puts a finder on ``sys.meta_path`` that registers right after the modules concerned finish executing:

* ``AutoConfig`` when ``transformers.models.auto.configuration_auto`` has loaded;
* ``AutoModel``, ``AutoModelForPreTraining``, ``AutoModelForImageClassification`` and ``AutoBackbone`` (with
  ``register_for_auto_class``, which the saved ``auto_map`` reads) when ``modeling_auto`` or our own
  ``modeling_nasiam`` has loaded.

Either way the first ``AutoConfig`` / ``AutoModel`` call sees NASiam, whatever the order of the imports. A
registration waits while one of the modules it needs is still executing (our modeling code imports transformers,
whose import may load the auto modules midway), and runs when the last of them finishes. The finder removes
itself once everything is registered. The registration lives here, not at the end of ``modeling_nasiam.py``,
because saved folders carry a copy of that file for ``trust_remote_code``, which must not register itself.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
MODELING_UTILS = "transformers.modeling_utils"
OUR_CONFIG = f"{__package__}.configuration_nasiam"
OUR_MODELING = f"{__package__}.modeling_nasiam"
WATCHED = frozenset({CONFIG_AUTO, MODELING_AUTO, MODELING_UTILS, OUR_CONFIG, OUR_MODELING})
MODEL_AUTO_CLASSES = {  # auto class -> our class registered with it
    "AutoModel": "NASiamModel",
    "AutoModelForPreTraining": "NASiamForPreTraining",
    "AutoModelForImageClassification": "NASiamForImageClassification",
    "AutoBackbone": "NASiamBackbone",
}

_executed: set[str] = set()  # watched modules whose code has run to the end (their spec still says initialising)
_registered = {"config": False, "models": False}
_lock = threading.RLock()


def _loaded(name: str) -> bool:
    """``name`` has been imported and its code has run to the end."""
    module = sys.modules.get(name)
    if module is None:
        return False
    return name in _executed or not getattr(getattr(module, "__spec__", None), "_initializing", False)


def _settled(name: str) -> bool:
    """``name`` is not executing right now (loaded, or not imported at all)."""
    return name not in sys.modules or _loaded(name)


def register_ready() -> None:
    """Register what can be registered now; a no-op for what is done or must wait."""
    with _lock:
        if not _registered["config"] and _loaded(CONFIG_AUTO) and _settled(OUR_CONFIG):
            _registered["config"] = True
            from transformers import AutoConfig

            from .configuration_nasiam import NASiamConfig

            AutoConfig.register("nasiam", NASiamConfig, exist_ok=True)
        wanted = _loaded(OUR_MODELING) or (_loaded(MODELING_AUTO) and _settled(MODELING_UTILS))
        if (not _registered["models"] and wanted and _settled(OUR_CONFIG) and _settled(OUR_MODELING)
                and _settled(MODELING_AUTO)):
            _registered["models"] = True
            import transformers

            from . import modeling_nasiam
            from .configuration_nasiam import NASiamConfig

            for auto_class, name in MODEL_AUTO_CLASSES.items():
                model_class = getattr(modeling_nasiam, name)
                getattr(transformers, auto_class).register(NASiamConfig, model_class, exist_ok=True)
                # saved folders name these classes in their auto_map, for trust_remote_code without the package
                model_class.register_for_auto_class(auto_class)
        if all(_registered.values()):
            sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterImport)]


class _Loader(importlib.abc.Loader):
    """The module's own loader, followed by :func:`register_ready`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        try:
            self.loader.exec_module(module)
        finally:  # the module keeps its own loader, as if this one had never been there
            module.__loader__ = self.loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.loader
        _executed.add(module.__name__)
        register_ready()

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... of the wrapped loader
        return getattr(self.loader, name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds the watched modules through the other finders and wraps their loader in :class:`_Loader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register what transformers has already loaded, and watch for the rest (see the module docstring)."""
    with _lock:
        if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
    register_ready()
