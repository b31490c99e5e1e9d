"""The rollout: sample responses through the run's sampler, score them, and read from the models
what the update needs, all through one layout of the batch.

    samples = sampling.sample(sampler, ...)     any engine (sampling/: hf, vllm, vllm-server)
    scores = reward(prompts, texts, columns)    rewards.py: each response's row columns too
    tokens = samples.tokens(padding_free)       layout.py: one TokenBatch for every pass
    old_logp, ref_logp, values                  passes.py: policy, reference, critic

Shapes: B sequences of P prompt positions (left-padded) and R response positions (right-padded);
n response tokens over the batch, listed row by row.
"""

import contextlib
from dataclasses import dataclass, field, fields

import torch

from fastppo.trainer import runtime
from fastppo.trainer.layout import TokenBatch, response_tokens, to_padded
from fastppo.trainer.passes import token_logprobs_of, values_of
from fastppo.trainer.rewards import Rewards
from fastppo.trainer.sampling.base import Sampler, SamplingSettings, sample


@dataclass
class Rollout:
    """One batch of sampled responses and everything the update reads from it."""

    sequences: torch.Tensor  # (B, P + R) int64
    attention_mask: torch.Tensor  # (B, P + R) bool
    response_mask: torch.Tensor  # (B, R) bool
    truncated: torch.Tensor  # (B,) bool, cut at the token limit
    group_ids: torch.Tensor  # (B,) int64, which prompt each response answers
    scores: torch.Tensor  # (B,) fp32
    old_logp: torch.Tensor  # (B, R) fp32, the sampling policy's log-probs; 0 after each response
    ref_logp: torch.Tensor  # (B, R) fp32, the reference's
    values: torch.Tensor | None  # (B, R) fp32, the critic's; None without one
    rollout_logp: torch.Tensor | None = None  # (B, R) fp32, the sampler's own (rollout correction, metrics)
    advantages: torch.Tensor | None = None  # (B, R), set by the advantage estimator
    returns: torch.Tensor | None = None  # (B, R), the critic's targets (estimators with a critic)
    invalid_scores: int = 0  # scores that a reward gave as None or NaN (scored 0), all rewards together
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # each reward's (B,) fp32, by name
    invalid_parts: dict[str, int] = field(default_factory=dict)  # each reward's None or NaN scores

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The sequences ``idx`` (a 1-D index or bool tensor over B)."""
        kept = {f.name: getattr(self, f.name) for f in fields(self)}
        pick = lambda v: v[idx] if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Rollout(**{k: {n: pick(x) for n, x in v.items()} if isinstance(v, dict) else pick(v)
                          for k, v in kept.items()})  # fmt: skip

    def tokens(self, padding_free: bool) -> TokenBatch:
        return response_tokens(
            self.sequences, self.attention_mask, self.response_mask, padding_free=padding_free
        )

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) the response tokens of a (B, R) tensor, row by row."""
        return x[self.response_mask]


def _untimed(name: str):
    return contextlib.nullcontext()


@torch.no_grad()
def collect(
    policy,
    reference,
    critic,
    sampler: Sampler,
    tokenizer,
    prompts: list[str],
    reward,
    device,
    *,
    group_size: int,
    settings: SamplingSettings,
    padding_free: bool,
    fused: bool = True,
    phases=_untimed,
    columns: dict[str, list] | None = None,
) -> Rollout:
    """Draw ``group_size`` responses per prompt through ``sampler``, score them, and read the
    policy's and the reference's log-probs (at the sampling temperature; ``fused``: see
    ``passes.token_logprobs_of``) and the critic's values, all through one layout of the batch.
    ``settings.logprobs``: keep the log-probs the sampler drew the tokens with
    (``Rollout.rollout_logp``). ``phases``: a ``timing.Phases`` to charge generate, score, logprobs.
    ``reward``: a ``rewards.Rewards`` (or one ``Reward``, or a function of (prompts, responses)),
    given each response's row ``columns`` (each a list aligned with ``prompts``) and its token ids;
    ``scores`` is their weighted sum, ``reward_parts`` each one's."""
    repeated = [p for p in prompts for _ in range(group_size)]
    reward = Rewards.of(reward)
    policy.eval()
    if critic is not None:
        critic.eval()
    with phases("generate"):
        samples = sample(sampler, tokenizer, repeated, settings, device)
    with phases("score"):
        per_response = {k: [x for x in v for _ in range(group_size)] for k, v in (columns or {}).items()}
        scored = reward(repeated, samples.texts, per_response | {"completion_ids": samples.response_ids()})
        scores = torch.tensor(scored.values, dtype=torch.float32, device=device)
        parts = {
            n: torch.tensor(p.values, dtype=torch.float32, device=device) for n, p in scored.parts.items()
        }
    with phases("logprobs"):
        tokens = samples.tokens(padding_free)
        with runtime.autocast(device):
            old_logp, _ = token_logprobs_of(policy, tokens, temperature=settings.temperature, fused=fused)
            ref_logp, _ = token_logprobs_of(reference, tokens, temperature=settings.temperature, fused=fused)
            values = values_of(critic, tokens) if critic is not None else None
    mask = samples.response_mask
    return Rollout(
        sequences=samples.sequences, attention_mask=samples.attention_mask, response_mask=mask,
        truncated=samples.truncated, group_ids=torch.arange(len(repeated), device=device) // group_size,
        scores=scores, old_logp=to_padded(old_logp, mask), ref_logp=to_padded(ref_logp, mask),
        values=to_padded(values, mask) if values is not None else None, rollout_logp=samples.sampler_logp,
        invalid_scores=scored.invalid, reward_parts=parts,
        invalid_parts={n: p.invalid for n, p in scored.parts.items()},
    )  # fmt: skip
