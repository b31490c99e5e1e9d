"""Swap a peer trainer's functions for fastppo's, everywhere the peer looks them up, and back.

The one patcher module: ``TRL``, ``VERL`` and ``OPENRLHF`` below are the patchers of the three
peers; each adapter module registers its replacements on its peer's patcher when it is imported
(``add`` / ``add_entry``) and reads the peer's own functions back through it (``original``). The
adapters import this module and never each other for it, so there is no import cycle.

A peer binds a function in the module that defines it and, through ``from x import f``, in every
module that imports it. ``Patcher.patch()`` replaces the definition and each such binding in the
peer's already imported modules (modules imported later read the replaced definition), sets the
registry entries added with ``add_entry``, and remembers every swap; ``unpatch()`` restores them
in reverse order. A target's attribute may be dotted (``"PolicyLoss.forward"``).

``patch()`` first checks the installed peer's version against the range fastppo was tested with
(``tested``, a PEP 440 specifier). Outside it, it warns once and keeps the peer's own functions;
``patch(force=True)`` installs fastppo's anyway.
"""

import contextlib
import importlib
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

_INHERITED = object()


@dataclass(frozen=True)
class Target:
    """``module.attribute`` (dotted for a class attribute) replaced by ``replacement``; with
    ``when``, only where ``when()`` is true at patch time."""

    module: str
    attribute: str
    replacement: object
    when: Callable[[], bool] | None = None


@dataclass(frozen=True)
class Entry:
    """``module.registry[key] = replacement`` (a dict registry); with ``only_over``, only while the
    entry still holds the peer's own ``module.only_over`` (a user's override stays theirs)."""

    module: str
    registry: str
    key: str
    replacement: object
    only_over: str | None = None


def _installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it has no metadata."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


class Patcher:
    def __init__(self, package: str, *, distribution: str, tested: str):
        self.package = package  # only modules of this package are rebound
        self.distribution = distribution  # the name the peer is installed under
        self.tested = SpecifierSet(tested)  # the versions fastppo's parity tests ran against
        self._targets: dict[tuple[str, str], Target] = {}
        self._entries: dict[tuple[str, str, str], Entry] = {}
        self._swaps: list[tuple[object, str, object]] = []
        self._entry_swaps: list[tuple[dict, str, bool, object]] = []  # (registry, key, had key, old)
        self._replaced: dict[int, tuple[object, object]] = {}  # id(replacement) -> (it, the original)
        self._warned = False

    # --- registration (by the adapter modules, at import) ---------------------------------------

    def add(self, module: str, attribute: str, replacement, when: Callable[[], bool] | None = None) -> None:
        """Replace ``module.attribute`` by ``replacement`` on ``patch()`` (a second ``add`` of the
        same attribute, e.g. on reloading the adapter, replaces the first)."""
        self._targets[(module, attribute)] = Target(module, attribute, replacement, when)

    def add_entry(self, module: str, registry: str, key: str, replacement, only_over: str | None = None):
        """Set ``module.registry[key] = replacement`` on ``patch()`` (see ``Entry``)."""
        self._entries[(module, registry, key)] = Entry(module, registry, key, replacement, only_over)

    # --- patching ---------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return bool(self._swaps or self._entry_swaps)

    def version_supported(self) -> bool:
        """Whether the installed peer's version lies in the tested range."""
        installed = _installed_version(self.distribution)
        try:
            return installed is not None and self.tested.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            return False

    def patch(self, force: bool = False) -> bool:
        """Install fastppo's functions in the peer (a second call changes nothing). Returns whether
        they are installed: False when the peer's version is outside the tested range and not
        ``force`` (warned once)."""
        if self.active:
            return True
        if not force and not self.version_supported():
            self._warn_version()
            return False
        try:
            self._install_functions()
            self._install_entries()
        except BaseException:
            self.unpatch()
            raise
        return True

    def unpatch(self) -> None:
        """Restore every function and registry entry ``patch`` replaced."""
        while self._entry_swaps:
            registry, key, had_key, old_value = self._entry_swaps.pop()
            if had_key:
                registry[key] = old_value
            else:
                registry.pop(key, None)
        while self._swaps:
            owner, name, original = self._swaps.pop()
            if original is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        # A peer module first imported while patched bound a replacement through `from x import f`,
        # and no swap recorded it: point it back at the peer's function too.
        for module in self._peer_modules():
            for key, value in list(vars(module).items()):
                replaced = self._replaced.get(id(value))
                if replaced is not None and replaced[0] is value:
                    setattr(module, key, replaced[1])
        self._replaced = {}

    def rebind(self, module) -> None:
        """While patched, also swap ``module``'s own bindings of the replaced functions (a module
        outside the peer, e.g. a test module, that imported them by name before ``patch``);
        ``unpatch`` restores them."""
        for replacement, original in list(self._replaced.values()):
            for key, value in list(vars(module).items()):
                if value is original:
                    self._swap(module, key, replacement)

    def original(self, module_name: str, attribute: str):
        """The peer's own ``module_name.attribute`` (a class's own entry for a dotted name), also
        while a replacement is patched in: what a replacement falls back to."""
        owner, name = _resolve(importlib.import_module(module_name), attribute)
        for swapped_owner, swapped_name, saved in self._swaps:  # the first swap holds the peer's own
            if swapped_owner is owner and swapped_name == name:
                if saved is _INHERITED:
                    return next(vars(base)[name] for base in owner.__mro__[1:] if name in vars(base))
                return saved
        return vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)

    @contextlib.contextmanager
    def patched(self, force: bool = False) -> Iterator[None]:
        """``with patched(): ...`` runs the block with fastppo's functions installed (see ``patch``)."""
        was_active = self.active
        self.patch(force)
        try:
            yield
        finally:
            if not was_active:
                self.unpatch()

    def _warn_version(self) -> None:
        if self._warned:
            return
        self._warned = True
        installed = _installed_version(self.distribution) or "of unknown version"
        warnings.warn(
            f"fastppo.integrations: {self.distribution} {installed} is outside the tested range "
            f"{self.tested}; keeping {self.package}'s own functions (patch(force=True) installs "
            "fastppo's anyway)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _install_functions(self) -> None:
        for target in list(self._targets.values()):
            if target.when is not None and not target.when():
                continue
            owner, name = _resolve(importlib.import_module(target.module), target.attribute)
            original = getattr(owner, name)
            self._swap(owner, name, target.replacement)
            if not isinstance(owner, type):  # a module-level function: rebind its imports too
                self._replaced[id(target.replacement)] = (target.replacement, original)
                for module in self._peer_modules():
                    for key, value in list(vars(module).items()):
                        if value is original:
                            self._swap(module, key, target.replacement)

    def _install_entries(self) -> None:
        for entry in list(self._entries.values()):
            registry = getattr(importlib.import_module(entry.module), entry.registry)
            if entry.only_over is not None:
                if registry.get(entry.key) is not self.original(entry.module, entry.only_over):
                    continue
            self._entry_swaps.append((registry, entry.key, entry.key in registry, registry.get(entry.key)))
            registry[entry.key] = entry.replacement

    def _swap(self, owner, name: str, replacement) -> None:
        # A class's own entry (a staticmethod stays one); _INHERITED when the class only inherits it.
        saved = vars(owner).get(name, _INHERITED) if isinstance(owner, type) else getattr(owner, name)
        self._swaps.append((owner, name, saved))
        setattr(owner, name, replacement)

    def _peer_modules(self):
        prefix = self.package + "."
        modules = list(sys.modules.items())
        return [m for n, m in modules if m is not None and (n == self.package or n.startswith(prefix))]


def _resolve(module, dotted: str) -> tuple[object, str]:
    *path, name = dotted.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    if not hasattr(owner, name):
        raise AttributeError(f"{module.__name__}.{dotted} does not exist: is this a supported version?")
    return owner, name


# The peers' patchers, with the versions fastppo's parity tests (tests/parity) ran against.
TRL = Patcher("trl", distribution="trl", tested="~=1.16.0")
VERL = Patcher("verl", distribution="verl", tested="~=0.9.1")
OPENRLHF = Patcher("openrlhf", distribution="openrlhf", tested="~=0.11.2")
