"""Per-token rewards from sequence scores and a per-token KL: Triton kernel and launcher.

One program per sequence: a first pass over its mask finds the last counted token, a second
writes ``−kl_coef·kl`` at counted tokens plus the score at that last one (0 elsewhere).
"""

import torch
import triton
import triton.language as tl

from ._common import block_offsets, block_size, load_block, num_warps, sequence_bounds

#: Largest block of the one program per sequence (tokens per step).
MAX_BLOCK = 2048


@triton.jit
def _shape_rewards_kernel(
    scores_ptr,
    mask_ptr,
    kl_ptr,
    cu_seqlens_ptr,
    rewards_ptr,
    kl_coef,
    T,
    N,
    BLOCK_T: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_KL: tl.constexpr,
):
    seq = tl.program_id(0)
    start, end = sequence_bounds(seq, cu_seqlens_ptr, T, PACKED)
    # The BLOCK_T-aligned blocks of the flat tensor that overlap [start, end): 16-byte loads.
    first = start // BLOCK_T
    n_blocks = tl.where(end > start, (end + BLOCK_T - 1) // BLOCK_T - first, 0)
    last = tl.full((), -1, tl.int64)
    for k in range(0, n_blocks):
        offs, inside, full = block_offsets(first, k, start, end, N, BLOCK_T)
        counted = inside & (load_block(mask_ptr, offs, N, full) != 0)
        last = tl.maximum(last, tl.max(tl.where(counted, offs, -1), axis=0))
    score = tl.load(scores_ptr + seq).to(tl.float32)
    for k in range(0, n_blocks):
        offs, inside, full = block_offsets(first, k, start, end, N, BLOCK_T)
        reward = tl.where(offs == last, score, 0.0)
        if HAS_KL:
            counted = inside & (load_block(mask_ptr, offs, N, full) != 0)
            # where, not a product: a masked token's kl may be inf or NaN.
            reward += tl.where(counted, -kl_coef * load_block(kl_ptr, offs, N, full), 0.0)
        tl.store(rewards_ptr + offs, reward, mask=inside)


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
        block_t = block_size(longest, MAX_BLOCK)
        _shape_rewards_kernel[(scores.numel(),)](
            scores, mask, kl if kl is not None else rewards, cu_seqlens if cu_seqlens is not None else scores,
            rewards, kl_coef, mask.shape[-1] if cu_seqlens is None else 0, mask.numel(),
            BLOCK_T=block_t, PACKED=cu_seqlens is not None, HAS_KL=kl is not None,
            num_warps=num_warps(block_t),
        )  # fmt: skip
    return rewards
