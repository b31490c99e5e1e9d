"""The sampler seam: what every rollout engine offers the loops, and the one function that turns
prompts into ``Samples`` through any of them.

A sampler takes prompt token ids (ragged, one list per response to draw) and ``SamplingSettings``
and returns ``Generated``: per response its token ids, whether it ended at EOS or was cut at the
token limit, and, when asked, the log-prob the sampler drew each token with, from the
distribution actually sampled (after temperature and top-p). After every update the loop calls
``sync(policy)`` so that the engine samples from the new weights; ``sleep()``/``wake()`` bracket
the update where an engine can free its memory meanwhile.

    samples = sample(sampler, tokenizer, prompts, settings, device)   # encode, generate, decode

Shapes: B responses, P prompt positions (left-padded), R response positions (right-padded, the
longest response of the batch).
"""

from dataclasses import dataclass

import torch

from fastppo import packing
from fastppo.trainer.data import apply_template
from fastppo.trainer.layout import TokenBatch, response_tokens


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are drawn; every engine maps these one to one."""

    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float = 1.0
    logprobs: bool = False  # also return the log-prob each token was drawn with


@dataclass
class Generated:
    """What a sampler returns for B prompts."""

    responses: torch.Tensor  # (B, R) int64, right-padded with the pad id after each response
    response_mask: torch.Tensor  # (B, R) bool, the response tokens, up to and including EOS
    truncated: torch.Tensor  # (B,) bool, cut at max_new_tokens without an EOS
    logprobs: torch.Tensor | None = None  # (B, R) fp32, the sampler's own; 0 after each response


@dataclass
class SyncReport:
    """What one ``sync`` did: seconds, tensors pushed, and whether the fingerprint was checked."""

    seconds: float
    tensors: int
    verified: bool


class Sampler:
    """A rollout engine. ``is_policy``: it samples from the trained policy's own weights in this
    process (nothing to sync; its log-probs differ from the trainer's only by numerics)."""

    name = "sampler"
    is_policy = False

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, device) -> Generated:
        raise NotImplementedError

    def sync(self, policy) -> SyncReport | None:
        """Make the engine sample from ``policy``'s current weights (once per iteration)."""
        return None

    def sleep(self) -> None:
        """Free what the engine can during the update (its KV cache, its weights)."""

    def wake(self) -> None:
        """Undo ``sleep`` before the next ``generate``."""

    def close(self) -> None:
        """Release the engine."""


def ends_at_eos(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """A response ends at its first EOS (included); what follows it is padding."""
    eos = (responses == eos_token_id).long()
    return (eos.cumsum(1) - eos) == 0


def from_token_lists(
    outputs: list[list[int]], logprobs: list[list[float]] | None, finished: list[bool], pad_id: int, device
) -> Generated:
    """``Generated`` from an engine's per-response lists (token ids, log-probs, ended at EOS)."""
    R = max((len(t) for t in outputs), default=0)
    responses = torch.full((len(outputs), R), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(outputs), R), dtype=torch.bool)
    lp = torch.zeros((len(outputs), R), dtype=torch.float32) if logprobs is not None else None
    for i, tokens in enumerate(outputs):
        responses[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        mask[i, : len(tokens)] = True
        if lp is not None:
            lp[i, : len(tokens)] = torch.tensor(logprobs[i], dtype=torch.float32)
    truncated = ~torch.tensor(finished, dtype=torch.bool)
    return Generated(
        responses.to(device), mask.to(device), truncated.to(device), lp.to(device) if lp is not None else None
    )


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Prompt token ids, with BOS when the tokenizer has one and its chat template when it has one;
    a prompt is text or a list of chat messages (``data.apply_template``)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [
        bos + tokenizer(apply_template(tokenizer, p), add_special_tokens=False).input_ids for p in prompts
    ]


@dataclass
class Samples:
    """Generated responses of one batch of prompts, laid out for the model passes."""

    prompts: list[str]  # (B,) the prompt of each response
    texts: list[str]  # (B,) the responses, decoded up to their EOS
    sequences: torch.Tensor  # (B, P + R) int64, left-padded prompt then response
    prompt_mask: torch.Tensor  # (B, P) bool
    response_mask: torch.Tensor  # (B, R) bool, response tokens up to and including EOS
    truncated: torch.Tensor  # (B,) bool, no EOS within the token limit
    sampler_logp: torch.Tensor | None = None  # (B, R) fp32, what the sampler gave each token

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], 1)

    @property
    def responses(self) -> torch.Tensor:
        """(B, R) int64 response ids, the pad id after each response."""
        return self.sequences[:, self.prompt_mask.shape[1] :]

    def response_ids(self) -> list[list[int]]:
        """(B,) each response's token ids, up to and including its EOS (two host reads)."""
        lengths = self.response_mask.sum(1).tolist()
        return [row[:n] for row, n in zip(self.responses.tolist(), lengths, strict=True)]

    def tokens(self, padding_free: bool) -> TokenBatch:
        return response_tokens(
            self.sequences, self.attention_mask, self.response_mask, padding_free=padding_free
        )


def sample(sampler: Sampler, tokenizer, prompts: list[str], settings: SamplingSettings, device) -> Samples:
    """One response per prompt (repeat a prompt for several) through ``sampler``."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    out = sampler.generate(prompt_ids, settings, device)
    batch = packing.collate(prompt_ids, tokenizer.pad_token_id, side="left")
    prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
    texts = tokenizer.batch_decode(
        torch.where(out.response_mask, out.responses, tokenizer.pad_token_id).tolist(),
        skip_special_tokens=True,
    )
    sampler_logp = torch.where(out.response_mask, out.logprobs, 0.0) if out.logprobs is not None else None
    sequences = torch.cat([prompt_ids, out.responses], 1)
    return Samples(prompts, texts, sequences, prompt_mask, out.response_mask, out.truncated, sampler_logp)
