"""The peers' own tests of the functions fastppo replaces, run with fastppo patched in.

``upstream/<peer>/`` holds the peer's test files at the pinned version, with its licence (see
EXPECTED.md for where each comes from). Every test there runs inside ``<adapter>.patched()``; the
test module's own ``from x import f`` bindings, made at import before any patch, are rebound too
(``Patcher.rebind``), so a test calls fastppo's function wherever it looks it up. ``EXPECTED``
lists the tests whose difference from the peer is deliberate, by test id, with the reason: they
are marked ``xfail(strict=True)``, so one that starts passing fails the run.
"""

import importlib
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# peer folder -> (fastppo's adapter module, its patcher in fastppo.integrations._patching)
ADAPTERS = {"verl": ("fastppo.integrations.verl", "VERL")}
# test id (relative to this folder) -> why fastppo's result differs from the peer's, deliberately.
EXPECTED: dict[str, str] = {}


def _peer(path: Path) -> str | None:
    try:
        return path.relative_to(HERE).parts[0]
    except ValueError:
        return None


def pytest_collection_modifyitems(config, items):
    ids = {item.nodeid.split("upstream/", 1)[-1]: item for item in items if _peer(item.path)}
    for test_id, reason in EXPECTED.items():
        if test_id in ids:
            ids[test_id].add_marker(pytest.mark.xfail(reason=reason, strict=True))
        elif test_id.split("::")[0] in {i.split("::")[0] for i in ids}:  # its file ran: a stale entry
            raise pytest.UsageError(f"tests/parity/upstream: EXPECTED names no existing test: {test_id}")


@pytest.fixture(autouse=True)
def _fastppo_patched(request):
    adapter_name, patcher_name = ADAPTERS[_peer(request.path)]
    adapter = importlib.import_module(adapter_name)
    patcher = getattr(importlib.import_module("fastppo.integrations._patching"), patcher_name)
    with adapter.patched():
        patcher.rebind(request.module)
        yield
