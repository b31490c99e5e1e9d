"""The patcher every adapter shares (``fastppo.integrations._patching``): the version gate of
``patch()``, ``force``, and an import graph without cycles among the adapter modules."""

import ast
import importlib
import warnings
from pathlib import Path

import pytest

from fastppo.integrations import _patching

INTEGRATIONS = Path(_patching.__file__).parent

# (adapter module, its patcher, a peer attribute patch() replaces, a version outside the range)
PEERS = {
    "trl": (
        "fastppo.integrations.trl",
        _patching.TRL,
        ("trl.trainer.utils", "selective_log_softmax"),
        "1.17.0",
    ),
    "verl": (
        "fastppo.integrations.verl",
        _patching.VERL,
        ("verl.trainer.ppo.core_algos", "agg_loss"),
        "0.10.0",
    ),
    "openrlhf": (
        "fastppo.integrations.openrlhf",
        _patching.OPENRLHF,
        ("openrlhf.models.utils", "compute_approx_kl"),
        "0.12.0",
    ),
}


def _load(peer: str):
    """The adapter module; OpenRLHF's modules through the test loader (no GPU stack here)."""
    pytest.importorskip(peer)
    if peer == "openrlhf":
        from . import openrlhf_loader

        openrlhf_loader.load()
    return importlib.import_module(PEERS[peer][0])


@pytest.fixture(params=list(PEERS))
def peer(request, monkeypatch):
    """(adapter, patcher, the peer's module, attribute name), unpatched before and after."""
    adapter = _load(request.param)
    _, patcher, (module_name, attribute), _ = PEERS[request.param]
    adapter.unpatch()
    monkeypatch.setattr(patcher, "_warned", False)
    yield adapter, patcher, importlib.import_module(module_name), attribute, request.param
    adapter.unpatch()


def test_installed_versions_are_in_the_tested_range(peer):
    adapter, patcher, module, attribute, _ = peer
    assert patcher.version_supported()
    original = getattr(module, attribute)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no version warning in range
        assert adapter.patch() is True
    assert getattr(module, attribute) is not original
    adapter.unpatch()
    assert getattr(module, attribute) is original


def test_outside_the_range_warns_once_and_keeps_the_peer(peer, monkeypatch):
    adapter, patcher, module, attribute, name = peer
    monkeypatch.setattr(_patching, "_installed_version", lambda dist: PEERS[name][3])
    original = getattr(module, attribute)
    with pytest.warns(RuntimeWarning, match=f"{patcher.distribution} {PEERS[name][3]} is outside"):
        assert adapter.patch() is False
    assert getattr(module, attribute) is original and not patcher.active
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second refusal is silent
        assert adapter.patch() is False
        with adapter.patched():
            assert getattr(module, attribute) is original
    assert adapter.patch(force=True) is True
    assert getattr(module, attribute) is not original
    adapter.unpatch()
    assert getattr(module, attribute) is original


@pytest.mark.parametrize("version", [None, "not-a-version", "1.16.0rc1", "1.17.0.dev0"])
def test_unknown_or_prerelease_versions_are_outside(version, monkeypatch):
    monkeypatch.setattr(_patching, "_installed_version", lambda dist: version)
    assert not _patching.TRL.version_supported()


@pytest.mark.parametrize(
    "version, inside", [("1.16.0", True), ("1.16.3", True), ("1.17.0", False), ("1.15.9", False)]
)
def test_the_range_takes_patch_releases(version, inside, monkeypatch):
    monkeypatch.setattr(_patching, "_installed_version", lambda dist: version)
    assert _patching.TRL.version_supported() is inside


def _imports_within(path: Path) -> set[str]:
    """The fastppo.integrations modules ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {n.rsplit(".", 1)[-1] for n in names if n.startswith("fastppo.integrations.")}
    return found & {p.stem for p in INTEGRATIONS.glob("*.py")}


def test_adapter_modules_import_no_cycle():
    """Every import between the integration modules, also the ones inside functions, points down
    to _patching/_peer_numerics: a depth-first walk finds no cycle."""
    graph = {p.stem: _imports_within(p) - {p.stem} for p in INTEGRATIONS.glob("*.py")}
    assert graph["trl_grpo"] == {"_patching"} and "trl" not in graph["trl_grpo"]
    assert "verl" not in graph["verl_policy_losses"]
    done, path = set(), []

    def visit(node):
        assert node not in path, f"import cycle: {' -> '.join(path + [node])}"
        if node in done:
            return
        path.append(node)
        for child in graph[node]:
            visit(child)
        path.pop()
        done.add(node)

    for node in graph:
        visit(node)
