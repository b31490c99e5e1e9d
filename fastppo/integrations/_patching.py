"""Swap a peer trainer's functions for fastppo's, everywhere the peer looks them up, and back.

A peer binds a function in the module that defines it and, through ``from x import f``, in every
module that imports it. ``Patcher.patch()`` replaces the definition and each such binding in the
peer's already imported modules (modules imported later read the replaced definition), and
remembers every swap; ``unpatch()`` restores them in reverse order. A target is
``(module, attribute, replacement)``, where the attribute may be dotted (``"PolicyLoss.forward"``).
"""

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator

_INHERITED = object()


class Patcher:
    def __init__(self, package: str, targets: Callable[[], list[tuple[str, str, object]]]):
        self.package = package  # only modules of this package are rebound
        self.targets = targets  # imports the peer lazily: a list of (module, attribute, replacement)
        self._swaps: list[tuple[object, str, object]] = []
        self._replaced: dict[int, tuple[object, object]] = {}  # id(replacement) -> (it, the original)

    @property
    def active(self) -> bool:
        return bool(self._swaps)

    def patch(self) -> None:
        """Install fastppo's functions in the peer (a second call changes nothing)."""
        if self.active:
            return
        try:
            for module_name, attribute, replacement in self.targets():
                owner, name = _resolve(importlib.import_module(module_name), attribute)
                original = getattr(owner, name)
                self._swap(owner, name, replacement)
                if not isinstance(owner, type):  # a module-level function: rebind its imports too
                    self._replaced[id(replacement)] = (replacement, original)
                    for module in self._peer_modules():
                        for key, value in list(vars(module).items()):
                            if value is original:
                                self._swap(module, key, replacement)
        except BaseException:
            self.unpatch()
            raise

    def unpatch(self) -> None:
        """Restore every function ``patch`` replaced."""
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
    def patched(self) -> Iterator[None]:
        """``with patched(): ...`` runs the block with fastppo's functions installed."""
        was_active = self.active
        self.patch()
        try:
            yield
        finally:
            if not was_active:
                self.unpatch()

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
