"""Per-token rewards from sequence scores and a per-token KL: Triton kernel and launcher.

One program per sequence: a first pass over its mask finds the last counted token, a second
writes ``−kl_coef·kl`` at counted tokens plus the score at that last one (0 elsewhere).
"""

import torch
import triton
import triton.language as tl

from .gae import sequence_bounds


@triton.jit
def _shape_rewards_kernel(
    scores_ptr,
    mask_ptr,
    kl_ptr,
    cu_seqlens_ptr,
    rewards_ptr,
    kl_coef,
    T,
    BLOCK_T: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_KL: tl.constexpr,
):
    seq = tl.program_id(0)
    start, end = sequence_bounds(seq, cu_seqlens_ptr, T, PACKED)
    offs = tl.arange(0, BLOCK_T)
    n_blocks = tl.cdiv(end - start, BLOCK_T)
    last = tl.full((), -1, tl.int64)
    for i in range(0, n_blocks):
        pos = start + i * BLOCK_T + offs
        m = tl.load(mask_ptr + pos, mask=pos < end, other=0)
        last = tl.maximum(last, tl.max(tl.where(m != 0, pos, -1), axis=0))
    score = tl.load(scores_ptr + seq).to(tl.float32)
    for i in range(0, n_blocks):
        pos = start + i * BLOCK_T + offs
        inside = pos < end
        m = tl.load(mask_ptr + pos, mask=inside, other=0)
        reward = tl.where(pos == last, score, 0.0)
        if HAS_KL:
            kl = tl.load(kl_ptr + pos, mask=inside, other=0.0).to(tl.float32)
            reward += tl.where(m != 0, -kl_coef * kl, 0.0)
        tl.store(rewards_ptr + pos, reward, mask=inside)


def _block_t(longest: int) -> int:
    """Tokens per step of the one program per sequence, from the longest sequence."""
    return min(max(triton.next_power_of_2(max(longest, 1)), 16), 2048)


def shape_rewards_fwd(
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    *,
    kl_coef: float,
    longest: int,
) -> torch.Tensor:
    """Contiguous ``mask``/``kl`` (B, T), or (N,) with ``cu_seqlens``; ``scores`` (B,). fp32 out."""
    rewards = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    if scores.numel() and mask.numel():
        block_t = _block_t(longest)
        _shape_rewards_kernel[(scores.numel(),)](
            scores, mask, kl if kl is not None else rewards, cu_seqlens if cu_seqlens is not None else scores,
            rewards, kl_coef, mask.shape[-1] if cu_seqlens is None else 0,
            BLOCK_T=block_t, PACKED=cu_seqlens is not None, HAS_KL=kl is not None,
        )  # fmt: skip
    return rewards
