"""Rewards: a function (prompts, responses) -> one float score per response."""

import importlib
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from fastppo.trainer import tiny
from fastppo.trainer.errors import UsageError


def load_reward(spec: str, tokenizer):
    """A function (prompts, responses) -> list of float scores: "echo" (the built-in task),
    "module:function", or a sequence-classification reward model (a folder or a Hugging Face id)."""
    if spec == "echo":
        return tiny.echo_reward
    if Path(spec).exists() or ":" not in spec:
        model = AutoModelForSequenceClassification.from_pretrained(spec, num_labels=1).eval()

        @torch.no_grad()
        def model_reward(prompts, responses):
            batch = tokenizer(
                [p + r for p, r in zip(prompts, responses, strict=True)], return_tensors="pt", padding=True
            )
            return model(**batch).logits[:, 0].float().tolist()

        return model_reward
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise UsageError(f"reward: cannot import module {module!r} ({exc})") from None
    except AttributeError:
        raise UsageError(f"reward: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise UsageError(f"reward: {spec} is not a function")
    return fn
