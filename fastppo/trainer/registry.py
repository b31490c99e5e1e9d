"""The registries of advantage estimators and policy losses, and the hyperparameters they declare.

An entry is registered with a decorator on its compute function (``register_advantage``,
``register_policy_loss``) and declares its own hyperparameters (``Hyperparameter``: name, type,
default, help, range). From the registries come the ``fastppo train`` flags of those
hyperparameters (fields of ``config.PPOConfig``), the choices of ``--advantage`` and
``--policy_loss``, their ``--help`` and their validation; the trainer hands each entry the values
of its hyperparameters as keyword arguments (``bound``). The built-in entries are registered in
``algorithms.py``; a new one is one more decorated function there (or in a module imported before
the config is parsed) plus its test.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

# --------------------------------------------------------------------------------------------
# Hyperparameters.


@dataclass(frozen=True)
class Above:
    """A range check: value > ``bound``, and finite unless ``finite`` is False."""

    bound: float
    finite: bool = True

    def __call__(self, value) -> str | None:
        ok = value > self.bound and (not self.finite or math.isfinite(value))
        return None if ok else f"must be > {self.bound:g}"


@dataclass(frozen=True)
class Within:
    """A range check: ``low`` <= value <= ``high``."""

    low: float
    high: float

    def __call__(self, value) -> str | None:
        return None if self.low <= value <= self.high else f"must lie in [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of an estimator or a loss: the flag ``--name`` of ``fastppo train``, a
    field of ``PPOConfig`` and a keyword argument of the entry's compute function. Entries that
    share one (clip_low) share its declaration."""

    name: str
    type: type  # float, int, str or bool
    default: object  # the real default; None means off or "as another option", which help says
    help: str  # what it does, without the default (--help adds it)
    check: Callable[[object], str | None] | None = None  # a bad value's complaint, e.g. Above(0)

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"hyperparameter name {self.name!r} is not an identifier")
        if self.type not in (float, int, str, bool):
            raise ValueError(f"hyperparameter {self.name}: type must be float, int, str or bool")
        if self.default is not None:
            self.complaint(self.default, strict=True)

    def complaint(self, value, *, strict: bool = False) -> str | None:
        """What is wrong with ``value`` as this hyperparameter ("clip_low must be > 0, got 0.0"),
        or None. ``strict``: raise ValueError instead (a bad declaration)."""
        numeric = self.type is float and isinstance(value, int) and not isinstance(value, bool)
        if value is None:
            why = None
        elif not (isinstance(value, self.type) or numeric) or (self.type is int and isinstance(value, bool)):
            why = f"must be a {self.type.__name__}"
        else:
            why = self.check(value) if self.check is not None else None
        message = f"{self.name} {why}, got {value!r}" if why else None
        if message and strict:
            raise ValueError(f"hyperparameter default: {message}")
        return message


def values(params: tuple[Hyperparameter, ...], cfg) -> dict:
    """{name: value} of ``params`` read from ``cfg`` (any object with those attributes)."""
    return {p.name: getattr(cfg, p.name) for p in params}


# --------------------------------------------------------------------------------------------
# Entries.


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    summary: str
    # (inputs: algorithms.AdvantageInputs, **hyperparameters) -> (advantages, returns or None: the
    # critic's targets), per token
    compute: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    needs_critic: bool = False
    needs_groups: bool = False
    token_rewards: bool = True  # built from per-token rewards, so the KL can be shaped into them
    kl_in: str = "reward"  # where the KL penalty goes by default: "reward" or "loss"
    always_whiten: bool = False  # whitened over the batch's tokens whatever whiten_advantages says
    params: tuple[Hyperparameter, ...] = ()  # its own: keyword arguments of compute
    reads: tuple[str, ...] = ()  # trainer options it reads from its inputs (PPOConfig fields: gamma)

    def bound(self, cfg) -> "AdvantageEstimator":
        """This entry with its hyperparameters' values from ``cfg`` given to compute: ``compute(x)``."""
        return replace(self, compute=functools.partial(self.compute, **values(self.params, cfg)))


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    summary: str
    # (inputs: algorithms.PolicyLossInputs, **hyperparameters) -> (Σ weight·loss over the tokens
    # (0-d), stats: dict of 0-d tensors)
    compute: Callable[..., tuple[torch.Tensor, dict]]
    params: tuple[Hyperparameter, ...] = ()  # keyword arguments of compute
    reads: tuple[str, ...] = ()  # unused by the built-ins: trainer options read from its inputs

    def bound(self, cfg) -> "PolicyLoss":
        """This entry with its hyperparameters' values from ``cfg`` given to compute: ``compute(x)``."""
        return replace(self, compute=functools.partial(self.compute, **values(self.params, cfg)))


#: name -> entry, in registration order (``--help`` lists them so).
ADVANTAGES: dict[str, AdvantageEstimator] = {}
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def hyperparameters() -> dict[str, Hyperparameter]:
    """Every registered entry's hyperparameters by name, estimators' first, in registration order."""
    out: dict[str, Hyperparameter] = {}
    for entry in (*ADVANTAGES.values(), *POLICY_LOSSES.values()):
        out.update((p.name, p) for p in entry.params)
    return out


def _add(registry: dict, entry, kind: str) -> None:
    if entry.name in registry:
        raise ValueError(f"{kind} {entry.name!r} is already registered")
    declared = hyperparameters()
    for p in entry.params:
        if p.name in declared and declared[p.name] != p:  # one flag, one meaning
            raise ValueError(f"{kind} {entry.name}: hyperparameter {p.name} is declared otherwise elsewhere")
    registry[entry.name] = entry


def register_advantage(name: str, summary: str, **options) -> Callable:
    """Decorator: register ``compute(x: AdvantageInputs, **hyperparameters)`` as the advantage
    estimator ``name``; ``options`` are ``AdvantageEstimator``'s (needs_critic, params, ...)."""

    def decorator(compute):
        _add(ADVANTAGES, AdvantageEstimator(name, summary, compute, **options), "advantage estimator")
        return compute

    return decorator


def register_policy_loss(name: str, summary: str, **options) -> Callable:
    """Decorator: register ``compute(x: PolicyLossInputs, **hyperparameters)`` as the policy loss
    ``name``; ``options`` are ``PolicyLoss``'s (params)."""

    def decorator(compute):
        _add(POLICY_LOSSES, PolicyLoss(name, summary, compute, **options), "policy loss")
        return compute

    return decorator
