"""Rewards: what scores each response.

A reward function is called as TRL calls its reward functions::

    fn(prompts, completions, **columns) -> one score per response (a float, or None)

``prompts`` and ``completions`` are lists of B strings, one per response (a prompt repeated for
each member of its group); ``columns`` holds every other column of the data rows as a list of B
values aligned with them, and ``completion_ids``, each response's token ids (up to and including
its EOS). A function that takes only two positional parameters, ``(prompts, responses)``, is
called with those alone; one that names some columns, without ``**kwargs``, gets those (told
apart by its signature, never by trying).

What it returns is checked (``checked_scores``): B numbers, where None or NaN scores 0 and is
counted; anything else, or a function that raises, stops the run with one line naming the reward.

Several rewards (``--reward math,format --reward_weights 1,0.2``) are a ``Rewards``: each response's
score is the weighted sum of theirs, and each one's scores are kept apart (``RewardBreakdown``) for
the metrics (``reward/<name>/mean``). The built-ins ``math``, ``exact`` and ``format`` are in
``verifiable.py``.
"""

import difflib
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastppo.trainer import tiny, verifiable
from fastppo.trainer.config import DEFAULT_FORMAT_REGEX
from fastppo.trainer.errors import UsageError
from fastppo.trainer.hub import check_model


class RewardError(UsageError):
    """A reward function that raised, or returned something other than one score per response."""


@dataclass
class Scores:
    """One batch's scores: ``values`` (B,), and how many of them the function left None or NaN
    (scored 0)."""

    values: list[float]
    invalid: int


@dataclass
class Reward:
    """A reward function and how to call it."""

    name: str  # as --reward gave it
    fn: Callable
    columns: tuple[str, ...] | None  # the columns it takes by name; None: every column (**kwargs)
    positional_only: bool = False  # (prompts, responses) and nothing else

    @classmethod
    def of(cls, fn: Callable, name: str | None = None) -> "Reward":
        """``fn`` with its calling convention read off its signature."""
        name = name or getattr(fn, "__qualname__", repr(fn))
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: the plain pair
            return cls(name, fn, (), positional_only=True)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return cls(name, fn, None)
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        leading = [p for p in params if p.kind is not p.KEYWORD_ONLY][:2]
        extra = tuple(p.name for p in named if p not in leading)
        return cls(name, fn, extra, positional_only=not extra)

    def check_columns(self, columns: Iterable[str]) -> None:
        """A ``RewardError`` naming the reward and the first column it takes that ``columns`` lack."""
        missing = [c for c in self.columns or () if c not in columns]
        if missing:
            raise RewardError(
                f"reward {self.name} takes the column {missing[0]!r}, which the data rows lack "
                f"(they have {sorted(columns)})"
            )

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list]) -> Scores:
        """Score B responses; ``columns`` (each a list of B values) includes ``completion_ids``."""
        if self.positional_only:
            kwargs = {}
        elif self.columns is None:
            kwargs = columns
        else:
            self.check_columns(columns)
            kwargs = {c: columns[c] for c in self.columns}
        try:
            out = self.fn(prompts, completions, **kwargs)
        except Exception as exc:
            raise RewardError(f"reward {self.name} raised {type(exc).__name__}: {exc}") from exc
        return checked_scores(self.name, out, len(completions))


def checked_scores(name: str, out, n: int) -> Scores:
    """``out`` as ``n`` float scores, None and NaN (and ±inf) as 0 and counted; a
    ``RewardError`` for anything else, naming the reward and what it returned."""
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().reshape(-1).tolist() if out.dim() <= 1 else out
    try:
        values = list(out)
    except TypeError:
        raise RewardError(f"reward {name} returned {type(out).__name__}, not a list of {n} scores") from None
    if len(values) != n:
        raise RewardError(f"reward {name} returned {len(values)} scores for {n} responses")
    scores, invalid = [], 0
    for i, value in enumerate(values):
        if value is None:
            scores.append(0.0)
            invalid += 1
            continue
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise RewardError(f"reward {name} returned {value!r} for response {i}, not a number") from None
        if not math.isfinite(x):
            x, invalid = 0.0, invalid + 1
        scores.append(x)
    return Scores(scores, invalid)


@dataclass
class RewardBreakdown(Scores):
    """Several rewards' scores of one batch: ``values`` (B,) their weighted sum, ``invalid`` the
    None/NaN scores of all of them together, ``parts`` each one's ``Scores`` (B,) by its name."""

    parts: dict[str, Scores] = field(default_factory=dict)


@dataclass
class Rewards:
    """What ``--reward`` names, one or several, with their weights (``load_rewards``)."""

    rewards: list[Reward]
    weights: list[float]
    names: list[str]  # unique, for the metrics (``RewardSpec.name``)

    @classmethod
    def of(cls, reward) -> "Rewards":
        """``reward`` as a ``Rewards``: itself, or one ``Reward`` (or function) of weight 1."""
        if isinstance(reward, Rewards):
            return reward
        reward = reward if isinstance(reward, Reward) else Reward.of(reward)
        return cls([reward], [1.0], [reward.name])

    def check_columns(self, columns: Iterable[str]) -> None:
        """A ``RewardError`` naming the first reward that takes a column ``columns`` lack (the data
        rows' columns; ``completion_ids`` is always given)."""
        for reward in self.rewards:
            reward.check_columns([*columns, "completion_ids"])

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list]) -> RewardBreakdown:
        """Score B responses with every reward (see ``Reward.__call__``): their weighted sum (B,)
        and each one's scores."""
        parts = {name: reward(prompts, completions, columns)
                 for name, reward in zip(self.names, self.rewards, strict=True)}  # fmt: skip
        total = [0.0] * len(completions)
        for weight, part in zip(self.weights, parts.values(), strict=True):
            total = [t + weight * v for t, v in zip(total, part.values, strict=True)]
        return RewardBreakdown(total, sum(p.invalid for p in parts.values()), parts)


# --------------------------------------------------------------------------------------------
# --reward NAME[,NAME...] --reward_weights W[,W...]

#: The rewards ``--reward`` knows by name.
BUILTIN_REWARDS = ("echo", "math", "exact", "format")


@dataclass(frozen=True)
class RewardSpec:
    """One entry of ``--reward``."""

    spec: str  # as given
    name: str  # in the metrics: the spec, a file or folder by its last component, "#2" on a repeat
    weight: float


def is_function_spec(spec: str) -> bool:
    """``module:function`` or ``file.py:function`` (not a model folder whose path has a colon)."""
    return ":" in spec and not Path(spec).exists()


def metric_name(spec: str) -> str:
    """``spec`` as the metrics name it: a reward file or a model folder by its last component."""
    if is_function_spec(spec):
        module, _, function = spec.rpartition(":")
        return f"{Path(module).name}:{function}" if module.endswith(".py") or "/" in module else spec
    return Path(spec).name if Path(spec).exists() else spec


def parse_reward_specs(reward: str, weights: str | None) -> list[RewardSpec]:
    """``--reward`` (comma-separated) with ``--reward_weights`` (as many comma-separated finite
    numbers; default 1 each); a ``UsageError`` naming the field for an empty entry, a weight that
    is not a finite number, or another count of weights."""
    specs = [s.strip() for s in reward.split(",")]
    if not all(specs):
        raise UsageError(f"reward: an empty entry in {reward!r}; comma-separated rewards expected")
    values = [1.0] * len(specs) if weights is None else [_weight(w, weights) for w in weights.split(",")]
    if len(values) != len(specs):
        raise UsageError(f"reward_weights: {len(values)} weights ({weights}) for {len(specs)} rewards "
                         f"({', '.join(specs)}); give one per reward")  # fmt: skip
    names, seen = [], {}
    for spec in specs:
        name = metric_name(spec)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return [RewardSpec(s, n, w) for s, n, w in zip(specs, names, values, strict=True)]


def _weight(text: str, weights: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"reward_weights: {text.strip()!r} in {weights!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"reward_weights: {text.strip()!r} in {weights!r} is not a finite number")
    return value


def check_reward_fields(cfg) -> None:
    """The reward fields of a config (``config.RewardFields``), checked when it is built: each
    ``--reward`` entry a built-in, ``module:function`` or a model (``hub.check_model``), the
    weights, ``reward_batch_size`` > 0 and ``format_regex`` a valid regular expression."""
    for spec in parse_reward_specs(cfg.reward, cfg.reward_weights):
        check_reward_spec(spec.spec)
    if cfg.reward_batch_size <= 0:
        raise UsageError(f"reward_batch_size must be > 0, got {cfg.reward_batch_size}")
    try:
        re.compile(cfg.format_regex, re.DOTALL)
    except re.error as exc:
        raise UsageError(
            f"format_regex: {cfg.format_regex!r} is not a valid regular expression ({exc})"
        ) from None


def check_reward_spec(spec: str) -> None:
    """One ``--reward`` entry, without importing or loading it (``load_reward`` does)."""
    if spec in BUILTIN_REWARDS:
        return
    if is_function_spec(spec):
        module, _, function = spec.rpartition(":")
        if not module or not function.isidentifier():
            raise UsageError(f"reward: {spec!r} is not module:function (or file.py:function)")
        return
    try:
        check_model(spec, "reward")
    except UsageError as exc:
        if "/" in spec:
            raise
        close = difflib.get_close_matches(spec, BUILTIN_REWARDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"{exc}; the built-in rewards are {', '.join(BUILTIN_REWARDS)}{hint}") from None


def load_rewards(cfg, tokenizer, device: torch.device | None = None) -> Rewards:
    """What the reward fields of ``cfg`` (``config.RewardFields``: reward, reward_weights,
    reward_batch_size, format_regex) name, loaded; a reward model on ``device`` and takes the
    policy's ``tokenizer``."""
    specs = parse_reward_specs(cfg.reward, cfg.reward_weights)
    loaded = [load_reward(s.spec, tokenizer, device=device, batch_size=cfg.reward_batch_size,
                          format_regex=cfg.format_regex) for s in specs]  # fmt: skip
    return Rewards(loaded, [s.weight for s in specs], [s.name for s in specs])


def load_reward(
    spec: str,
    tokenizer,
    *,
    device: torch.device | None = None,
    batch_size: int = 32,
    format_regex: str = DEFAULT_FORMAT_REGEX,
) -> Reward:
    """The reward ``spec`` names: a built-in ("echo", the synthetic task; "math", "exact", "format":
    ``verifiable.py``), "module:function" (a module importable from here or from the current
    folder, or a file: "rewards.py:score"), or a sequence-classification reward model (a folder or
    a Hugging Face id; ``batch_size`` responses per forward pass on ``device``)."""
    builtin = {"echo": lambda: tiny.echo_reward, "math": lambda: verifiable.math_reward,
               "exact": lambda: verifiable.exact_reward,
               "format": lambda: verifiable.format_reward(format_regex)}  # fmt: skip
    if spec in builtin:
        return Reward.of(builtin[spec](), spec)
    if not is_function_spec(spec):
        return Reward.of(load_model_reward(spec, tokenizer, device, batch_size), spec)
    module, _, name = spec.rpartition(":")
    fn = getattr(import_reward_module(module), name, None)
    if fn is None:
        raise UsageError(f"reward: module {module!r} has no {name!r}")
    if not callable(fn):
        raise UsageError(f"reward: {spec} is not a function")
    return Reward.of(fn, spec)


def load_model_reward(spec: str, tokenizer, device: torch.device | None, batch_size: int) -> Callable:
    """A sequence-classification reward model as a function of (prompts, completions): its own
    tokenizer and chat template (``tokenizer``, the policy's, when it ships none), on ``device``
    (default CPU), ``batch_size`` responses per forward (``reward_model.RewardModel``)."""
    from fastppo.trainer.reward_model import RewardModel

    return RewardModel.load(spec, tokenizer, device or torch.device("cpu"), batch_size)


def import_reward_module(module: str):
    """``module`` by name, found as ``python script.py`` would find it (the current folder too), or
    by path when it names a file."""
    if module.endswith(".py") or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise UsageError(f"reward: no such file: {module}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        loaded = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(loaded)
        except Exception as exc:
            raise UsageError(f"reward: {module} does not import ({type(exc).__name__}: {exc})") from None
        return loaded
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # after the installed packages: a local file never shadows one
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"reward: cannot import module {module!r} ({exc})") from None
