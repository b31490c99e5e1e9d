"""The rollout: sample responses through the run's sampler, score them, and read from the models
what the update needs, all through one layout of the batch.

    samples = sampling.sample(sampler, ...)     any engine (sampling/: hf, vllm, vllm-server)
    scores = reward(prompts, texts, columns)    rewards.py: each response's row columns too
    tokens = response_tokens(...)               layout.py: one TokenBatch for every pass
    old_logp, ref_logp, values                  passes.py: policy, reference, critic

Shapes: B sequences of P prompt positions (left-padded) and R response positions (right-padded);
n response tokens over the batch, listed row by row. Every per-token tensor is packed (n,) as the
model passes produce it, with the sequences' bounds ``cu_seqlens`` (B + 1,), from the log-prob
pass to the loss; the host keeps the attention mask (read once) to lay out any subset of rows.
"""

import contextlib
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from fastppo.trainer import runtime
from fastppo.trainer.layout import TokenBatch, response_tokens, to_device
from fastppo.trainer.passes import token_logprobs_of, values_of
from fastppo.trainer.rewards import Rewards
from fastppo.trainer.sampling.base import Sampler, SamplingSettings, sample

#: The per-token fields of a Rollout: packed (n,), response tokens row by row.
TOKEN_FIELDS = ("old_logp", "ref_logp", "values", "rollout_logp", "advantages", "returns")


@dataclass
class Rollout:
    """One batch of sampled responses and everything the update reads from it."""

    sequences: torch.Tensor  # (B, P + R) int64
    attention_mask: torch.Tensor  # (B, P + R) bool
    response_mask: torch.Tensor  # (B, R) bool
    truncated: torch.Tensor  # (B,) bool, cut at the token limit
    group_ids: torch.Tensor  # (B,) int64 in [0, B), which prompt each response answers
    scores: torch.Tensor  # (B,) fp32
    host_attention: np.ndarray  # (B, P + R) bool: attention_mask on the host (its last R columns: responses)
    cu_seqlens: torch.Tensor  # (B + 1,) int32, bounds of each response's tokens in the (n,) tensors
    old_logp: torch.Tensor  # (n,) fp32, the sampling policy's log-probs
    ref_logp: torch.Tensor  # (n,) fp32, the reference's
    values: torch.Tensor | None  # (n,) fp32, the critic's; None without one
    rollout_logp: torch.Tensor | None = None  # (n,) fp32, the sampler's own (rollout correction, metrics)
    advantages: torch.Tensor | None = None  # (n,), set by the advantage estimator
    returns: torch.Tensor | None = None  # (n,), the critic's targets (estimators with a critic)
    invalid_scores: int = 0  # scores that a reward gave as None or NaN (scored 0), all rewards together
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # each reward's (B,) fp32, by name
    invalid_parts: dict[str, int] = field(default_factory=dict)  # each reward's None or NaN scores

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_lengths(self) -> np.ndarray:
        """(B,) int64 on the host: each response's tokens."""
        return self.host_attention[:, self.sequences.shape[1] - self.response_mask.shape[1] :].sum(1)

    @property
    def n_tokens(self) -> int:
        """n, the response tokens of the batch (known on the host)."""
        return int(self.response_lengths.sum())

    def select(self, idx) -> "Rollout":
        """The sequences ``idx``: host indices (list or numpy, int or bool over B), or a device
        tensor (read to the host once). Their index tensors are built on the host and copied to
        the device together: nothing else is read back."""
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        rows = np.asarray(idx)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64).reshape(-1)
        lengths = self.response_lengths
        starts = np.cumsum(lengths) - lengths
        kept = lengths[rows]
        cu = np.concatenate([[0], np.cumsum(kept)])
        tokens = np.repeat(starts[rows] - cu[:-1], kept) + np.arange(cu[-1])  # (m,) into the (n,) tensors
        rows_d, tokens_d, cu_d = to_device(self.sequences.device, rows, tokens, cu)
        picked = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "host_attention":
                picked[f.name] = v[rows]
            elif f.name == "cu_seqlens":
                picked[f.name] = cu_d.to(torch.int32)
            elif isinstance(v, torch.Tensor):
                picked[f.name] = v[tokens_d if f.name in TOKEN_FIELDS else rows_d]
            elif isinstance(v, dict):
                picked[f.name] = {k: x[rows_d] if isinstance(x, torch.Tensor) else x for k, x in v.items()}
            else:
                picked[f.name] = v
        return Rollout(**picked)

    def tokens(self, padding_free: bool) -> TokenBatch:
        """The layout of these rows for the model passes (nothing read from the device)."""
        return response_tokens(
            self.sequences, self.attention_mask, self.response_mask, padding_free=padding_free,
            host_attention=self.host_attention,
        )  # fmt: skip


def packed_responses(x: torch.Tensor, host_response: np.ndarray) -> torch.Tensor:
    """(n,) the response tokens of a (B, R) tensor, row by row, with ``host_response`` (B, R) its
    mask on the host (an index copied to the device: no read)."""
    (at,) = to_device(x.device, np.flatnonzero(host_response))
    return x.reshape(-1)[at]


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
        host = samples.attention_mask.cpu().numpy()  # the one read of the layout
        tokens = response_tokens(
            samples.sequences, samples.attention_mask, samples.response_mask, padding_free=padding_free,
            host_attention=host,
        )  # fmt: skip
        with runtime.autocast(device):
            old_logp, _ = token_logprobs_of(policy, tokens, temperature=settings.temperature, fused=fused)
            ref_logp, _ = token_logprobs_of(reference, tokens, temperature=settings.temperature, fused=fused)
            values = values_of(critic, tokens) if critic is not None else None
    host_response = host[:, samples.prompt_mask.shape[1] :]
    cu = np.concatenate([[0], np.cumsum(host_response.sum(1))])
    (cu_seqlens,) = to_device(device, cu)
    sampler_logp = samples.sampler_logp
    return Rollout(
        sequences=samples.sequences, attention_mask=samples.attention_mask,
        response_mask=samples.response_mask, truncated=samples.truncated,
        group_ids=torch.arange(len(repeated), device=device) // group_size, scores=scores,
        host_attention=host, cu_seqlens=cu_seqlens.to(torch.int32), old_logp=old_logp, ref_logp=ref_logp,
        values=values,
        rollout_logp=packed_responses(sampler_logp, host_response) if sampler_logp is not None else None,
        invalid_scores=scored.invalid, reward_parts=parts,
        invalid_parts={n: p.invalid for n, p in scored.parts.items()},
    )  # fmt: skip
