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
"""

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from fastppo.trainer import tiny
from fastppo.trainer.errors import UsageError


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

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list]) -> Scores:
        """Score B responses; ``columns`` (each a list of B values) includes ``completion_ids``."""
        if self.positional_only:
            kwargs = {}
        elif self.columns is None:
            kwargs = columns
        else:
            missing = [c for c in self.columns if c not in columns]
            if missing:
                raise RewardError(
                    f"reward {self.name} takes the column {missing[0]!r}, which the data rows lack "
                    f"(they have {sorted(columns)})"
                )
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


# --------------------------------------------------------------------------------------------
# --reward NAME


def load_reward(spec: str, tokenizer) -> Reward:
    """The reward ``spec`` names: "echo" (the built-in task), "module:function" (a module
    importable from here or from the current folder, or a file: "rewards.py:score"), or a
    sequence-classification reward model (a folder or a Hugging Face id)."""
    if spec == "echo":
        return Reward.of(tiny.echo_reward, "echo")
    if Path(spec).exists() or ":" not in spec:
        return Reward.of(model_reward(spec, tokenizer), spec)
    module, _, name = spec.rpartition(":")
    fn = getattr(import_reward_module(module), name, None)
    if fn is None:
        raise UsageError(f"reward: module {module!r} has no {name!r}")
    if not callable(fn):
        raise UsageError(f"reward: {spec} is not a function")
    return Reward.of(fn, spec)


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


def model_reward(spec: str, tokenizer) -> Callable:
    model = AutoModelForSequenceClassification.from_pretrained(spec, num_labels=1).eval()

    @torch.no_grad()
    def score(prompts, responses):
        batch = tokenizer(
            [p + r for p, r in zip(prompts, responses, strict=True)], return_tensors="pt", padding=True
        )
        return model(**batch).logits[:, 0].float().tolist()

    return score
