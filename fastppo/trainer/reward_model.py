"""A sequence-classification reward model (``--reward <folder or model id>``), run as users run one.

The model (``AutoModelForSequenceClassification``, one label) is frozen, in eval mode, on the
training device: on a GPU its weights are bf16 and its forward runs under bf16 autocast; the
scores come back as fp32 floats. It reads text through its OWN tokenizer and chat template:

    with a chat template:  apply_chat_template(prompt messages + [assistant: response]), then
                           tokenized without adding special tokens (the template has them)
    without one:           BOS + prompt + response + EOS (each special token when the tokenizer
                           has it): the layout ``fastppo train rm`` trains on (``data.encode``)

A string prompt is one user message. Only a folder that ships no tokenizer is read with the
policy's tokenizer (said once, as a warning). Responses go through the model ``batch_size`` at a
time, longest first, right-padded: the classifier reads each row's last non-pad token (the
model's ``pad_token_id`` is the tokenizer's), so a score does not depend on its batch.

    fn = RewardModel.load("run/checkpoint-400/reward_model", policy_tokenizer, device, 32)
    fn(prompts, completions) -> B floats
"""

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from fastppo import packing
from fastppo.trainer import data, hub, loading, lora, runtime
from fastppo.trainer.errors import UsageError

#: Files one of which a folder holding a tokenizer has.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def ships_tokenizer(spec: str) -> bool:
    """Whether the folder ``spec`` holds a tokenizer; a model id is assumed to."""
    path = Path(spec).expanduser()
    return not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(spec: str, policy_tokenizer):
    """The reward model's own tokenizer, with a pad token (its EOS when it has none); the
    policy's (a copy) when ``spec`` ships none, with a warning saying so."""
    if ships_tokenizer(spec):
        try:
            tokenizer = hub.load_tokenizer(spec)
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"reward {spec}: its tokenizer does not load ({_first_line(exc)})") from None
    else:
        if policy_tokenizer is None:
            raise UsageError(f"reward {spec}: the folder holds no tokenizer, and there is no policy's to use")
        warnings.warn(f"reward {spec}: the folder holds no tokenizer; reading it with the policy's",
                      stacklevel=3)  # fmt: skip
        tokenizer = copy.deepcopy(policy_tokenizer)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"reward {spec}: its tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(spec: str, device: torch.device) -> torch.nn.Module:
    """The one-label classifier in ``spec`` (a LoRA adapter folder: merged into its base), frozen,
    in eval mode, on ``device`` (bf16 weights on a GPU). A folder that does not load, or whose
    checkpoint lacks the score head (a plain LM: the head would be random), is a ``UsageError``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        if lora.is_adapter_folder(spec):
            from peft import PeftModel

            base = AutoModelForSequenceClassification.from_pretrained(lora.adapter_base(spec), num_labels=1)
            with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                model, missing = PeftModel.from_pretrained(base, spec).merge_and_unload(), []
        else:
            with loading.no_load_report():  # a missing head is our one line below, not its table
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    spec, num_labels=1, output_loading_info=True
                )
            missing = info["missing_keys"]
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise UsageError(f"reward {spec}: not a sequence-classification model that loads "
                         f"({_first_line(exc)})") from None  # fmt: skip
    if missing:
        head = sorted(missing)[0]
        raise UsageError(f"reward {spec}: the checkpoint has no trained score head (missing {head}); "
                         "a reward model is a one-label sequence classifier")  # fmt: skip
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def as_messages(prompt, name: str) -> list[dict]:
    """A prompt as chat messages: a string is one user message; a list of ``{"role", "content"}``
    dicts is taken as it is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if data.is_messages(prompt):  # the rule the data reader checked every row's prompt with
        return list(prompt)
    raise UsageError(f"reward {name}: a prompt is a string or a list of {{'role', 'content'}} messages, "
                     f"got {str(prompt)[:80]}")  # fmt: skip


@dataclass(eq=False)
class RewardModel:
    """A reward model as a reward function: ``fn(prompts, completions) -> list[float]`` (B,)."""

    name: str  # as --reward gave it
    model: torch.nn.Module  # one-label sequence classifier on ``device``
    tokenizer: object  # its own (or the policy's when it ships none), with a pad token
    device: torch.device
    batch_size: int  # responses per forward
    _warned: set = field(default_factory=set, repr=False)

    @classmethod
    def load(cls, spec: str, policy_tokenizer, device: torch.device, batch_size: int) -> "RewardModel":
        """The reward model in ``spec`` (a folder or a Hugging Face id) on ``device``."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise UsageError(f"reward_batch_size must be an integer > 0, got {batch_size}")
        if not Path(spec).expanduser().exists() and not hub.looks_like_model_id(spec):
            raise UsageError(f"reward {spec}: no such folder, nor a Hugging Face model id")
        model = load_classifier(spec, device)
        tokenizer = load_tokenizer(spec, policy_tokenizer)
        if len(tokenizer) > model.config.vocab_size:
            raise UsageError(f"reward {spec}: its tokenizer has {len(tokenizer)} tokens, more than the "
                             f"model's vocabulary of {model.config.vocab_size}")  # fmt: skip
        model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last non-pad token
        return cls(spec, model, tokenizer, device, batch_size)

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt, completion: str) -> str:
        """The text the model reads: the chat template over the prompt's messages and the response
        as the assistant's turn; without a template, the prompt's text then the response."""
        messages = as_messages(prompt, self.name)
        if self.chat:
            turn = {"role": "assistant", "content": completion}
            return self.tokenizer.apply_chat_template(messages + [turn], tokenize=False)
        if not isinstance(prompt, str) and "no template" not in self._warned:
            self._warned.add("no template")
            warnings.warn(f"reward {self.name}: chat prompts, and its tokenizer has no chat template: "
                          "it reads the messages' contents, a blank line apart", stacklevel=3)  # fmt: skip
        text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in messages)
        return text + completion

    def encode(self, prompt, completion: str) -> list[int]:
        """The token ids of ``render``: the template's own special tokens, or BOS ... EOS."""
        ids = self.tokenizer(self.render(prompt, completion), add_special_tokens=False).input_ids
        if self.chat:
            return ids
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        return ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])

    @torch.no_grad()
    def forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Scores (b,) of one micro-batch of token sequences, on ``device``, fp32."""
        batch = packing.collate(sequences, self.tokenizer.pad_token_id, side="right")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with runtime.autocast(self.device):
            logits = self.model(**batch).logits  # (b, 1)
        return logits[:, 0].float()

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        """One score per response (B,), in the order given; ``batch_size`` per forward, the longest
        sequences together (less padding)."""
        if len(prompts) != len(completions):
            raise UsageError(f"reward {self.name}: {len(prompts)} prompts for {len(completions)} responses")
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        chunks = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        values = torch.cat([self.forward([sequences[i] for i in chunk]) for chunk in chunks]).tolist()
        scores = [0.0] * len(sequences)
        for i, value in zip(order, values, strict=True):  # one read from the device per call
            scores[i] = value
        return scores
