"""Load OpenRLHF's real loss, utils and experience-maker modules on a machine without its GPU stack.

A real OpenRLHF install imports them normally; this CPU test machine lacks three things their
import chains reach, none of which the functions under test use:

- ``openrlhf/models/__init__.py`` imports ``actor.py`` → ``ring_attn_utils`` → ``flash_attn``
  (cannot be built without CUDA). A bare package module named ``openrlhf.models`` whose
  ``__path__`` is the real directory lets ``openrlhf.models.utils`` and ``openrlhf.models.loss``
  load from their real files under their real names without running that ``__init__``.
  ``flash_attn`` itself is never stubbed (transformers probes it with ``find_spec``); so
  ``log_probs_from_logits`` takes its ``ImportError`` branch here, the plain-PyTorch gather.
- ``openrlhf/utils/__init__.py`` imports ``math_utils`` → ``pylatexenc`` (not installed): the same
  bare-package trick for ``openrlhf.utils`` (the experience maker needs its ``logging_utils``,
  ``seqlen_balancing`` and ``utils`` submodules, which load from their real files).
- ``openrlhf/models/utils.py`` runs ``import deepspeed`` at the top, for ``set_z3_leaf_modules``
  only. Where deepspeed is not importable, a stub stands in whose every attribute access raises,
  so a function under test that did use deepspeed would fail loudly, not pass.
- ``experience_maker.py`` imports ``RayActorGroup`` from ``openrlhf.trainer.ray.launcher`` (whose
  package imports vLLM and DeepSpeed) for type annotations only: a stub module with a placeholder
  class. ``ray`` itself is installed and imported for real.

Every stub and bare package is in ``sys.modules`` only while the real modules load, then removed,
so later imports (and other test modules' availability checks) see the machine as it is. The real
modules loaded here stay in ``sys.modules``, so ``patch()`` finds and swaps them.
"""

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

MODULES = ("openrlhf.models.utils", "openrlhf.models.loss", "openrlhf.trainer.ppo_utils.experience_maker")


class _MissingModule(types.ModuleType):
    """Stands in for a package this machine lacks; using any of its attributes is an error."""

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        raise RuntimeError(f"{self.__name__} is a test stub (not installed here): {attribute} is unavailable")


def _bare_package(name: str, directory: Path) -> types.ModuleType:
    package = types.ModuleType(name, f"bare package for {directory} (its __init__ is not run)")
    package.__path__ = [str(directory)]
    package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    package.__spec__.submodule_search_locations = package.__path__
    return package


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _temporarily(stand_ins: dict[str, types.ModuleType]) -> Iterator[None]:
    added = [name for name in stand_ins if name not in sys.modules]
    for name in added:
        sys.modules[name] = stand_ins[name]
    try:
        yield
    finally:
        for name in added:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]


def load() -> dict[str, types.ModuleType]:
    """Import the three modules (idempotent) and return them by name."""
    if all(name in sys.modules for name in MODULES):
        return {name: sys.modules[name] for name in MODULES}
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("openrlhf is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    launcher = types.ModuleType("openrlhf.trainer.ray.launcher", "stub: annotations of experience_maker only")
    launcher.RayActorGroup = type("RayActorGroup", (), {"__doc__": "placeholder for annotations"})
    stand_ins = {
        "openrlhf.models": _bare_package("openrlhf.models", root / "models"),
        "openrlhf.utils": _bare_package("openrlhf.utils", root / "utils"),
        "openrlhf.trainer.ray.launcher": launcher,
    }
    if not _installed("deepspeed"):
        stand_ins["deepspeed"] = _MissingModule("deepspeed", "stub: deepspeed is not installed")
    with _temporarily(stand_ins):
        return {name: importlib.import_module(name) for name in MODULES}
