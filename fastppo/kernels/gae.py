"""Generalised advantage estimation (and plain discounted returns) as a chunked reverse scan.

Walking a sequence from its last token to its first, GAE keeps a state (next_value, last) and
every token applies an affine map to it (DESIGN §4):
    counted token:  next_value ← V_t,   last ← (r_t − V_t) + γ·next_value + γλ·last,   A_t = last
    carried token:  the identity (carry_masked=True: a masked token stores the carried last)
With carry_masked=False rewards and values are multiplied by the mask first and every token is
a counted one (OpenRLHF). Affine maps compose associatively, so each program (one sequence)
walks the BLOCK_T-aligned blocks over it latest first, loads each in ascending order (16-byte
loads), flips it in registers (``tl.flip``) and runs a forward ``tl.associative_scan`` over the
maps (not ``reverse=True``, which gives wrong results for non-commutative maps, triton#4362),
then carries the composed map of the block into the next block. A map is five numbers (p, q, x, y, z):
    next_value' = p·next_value + q,   last' = x·next_value + y·last + z
Discounted returns are the same scan with V = 0 and λ = 1.
"""

import torch
import triton
import triton.language as tl

from ._common import block_offsets, block_size, load_block, num_warps, sequence_bounds

#: Largest block of the scan: 5 fp32 map components per lane, composed across the whole block.
MAX_BLOCK = 1024


@triton.jit
def _compose(p_a, q_a, x_a, y_a, z_a, p_b, q_b, x_b, y_b, z_b):
    """The map "a, then b" (a is the later token in time: it is applied first)."""
    return (
        p_b * p_a,
        p_b * q_a + q_b,
        x_b * p_a + y_b * x_a,
        y_b * y_a,
        x_b * q_a + y_b * z_a + z_b,
    )


@triton.jit
def _last_lane(v, is_last):
    return tl.sum(tl.where(is_last, v, 0.0), axis=0)


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr,
    values_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    advantages_ptr,
    returns_ptr,
    gamma,
    gamma_lam,
    T,
    N,
    BLOCK_T: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_VALUES: tl.constexpr,
    CARRY_MASKED: tl.constexpr,
):
    seq = tl.program_id(0)
    start, end = sequence_bounds(seq, cu_seqlens_ptr, T, PACKED)
    next_value = tl.zeros((), tl.float32)
    last = tl.zeros((), tl.float32)
    lanes = tl.arange(0, BLOCK_T)
    is_last = lanes == BLOCK_T - 1
    # The BLOCK_T-aligned blocks of the flat tensor that overlap [start, end), latest first: each
    # is loaded in ascending order (16-byte loads) and flipped, so that lane 0 is its latest token.
    first = start // BLOCK_T
    n_blocks = tl.where(end > start, (end + BLOCK_T - 1) // BLOCK_T - first, 0)
    for i in range(0, n_blocks):
        k = n_blocks - 1 - i
        offs, _, full = block_offsets(first, k, start, end, N, BLOCK_T)
        pos = (first + k) * BLOCK_T + (BLOCK_T - 1 - lanes)  # offs flipped
        inside = (pos >= start) & (pos < end)
        # dim given: Triton 3.6's flip fails to compile with its default dim=None.
        m = tl.flip(load_block(mask_ptr, offs, N, full), 0)
        r = tl.flip(load_block(rewards_ptr, offs, N, full), 0)
        if HAS_VALUES:
            v = tl.flip(load_block(values_ptr, offs, N, full), 0)
        else:
            v = tl.zeros((BLOCK_T,), tl.float32)
        if CARRY_MASKED:
            counted = inside & (m != 0)
            v_in = v
        else:
            counted = inside
            # where, not only a product: padding may hold inf or NaN.
            r = tl.where(m != 0, r * m, 0.0)
            v = tl.where(m != 0, v * m, 0.0)
            v_in = v
        p = tl.where(counted, 0.0, 1.0)
        q = tl.where(counted, v_in, 0.0)
        x = tl.where(counted, gamma, 0.0)
        y = tl.where(counted, gamma_lam, 1.0)
        z = tl.where(counted, r - v_in, 0.0)
        P, Q, X, Y, Z = tl.associative_scan((p, q, x, y, z), 0, _compose)
        advantage = X * next_value + Y * last + Z
        tl.store(advantages_ptr + pos, advantage, mask=inside)
        if HAS_VALUES:
            tl.store(returns_ptr + pos, advantage + v, mask=inside)
        # Lanes outside the sequence are identity maps: the last lane composes the block.
        next_value, last = (
            _last_lane(P, is_last) * next_value + _last_lane(Q, is_last),
            _last_lane(X, is_last) * next_value + _last_lane(Y, is_last) * last + _last_lane(Z, is_last),
        )


def gae_fwd(
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    *,
    gamma: float,
    lam: float,
    carry_masked: bool,
    longest: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the scan over contiguous inputs: padded ``(B, T)`` (``cu_seqlens`` None) or packed
    ``(N,)`` with ``cu_seqlens`` (B+1,) int32. ``values`` None gives discounted returns (V = 0,
    no returns output). ``longest`` is the longest sequence (sets the block size).
    Returns fp32 ``advantages`` and ``returns`` shaped like ``rewards``."""
    advantages = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages) if values is not None else None
    n_seqs = cu_seqlens.numel() - 1 if cu_seqlens is not None else rewards.shape[0]
    T = rewards.shape[-1] if cu_seqlens is None else 0
    if n_seqs > 0 and rewards.numel() > 0:
        block_t = block_size(longest, MAX_BLOCK)
        _gae_fwd_kernel[(n_seqs,)](
            rewards, values if values is not None else rewards, mask,
            cu_seqlens if cu_seqlens is not None else mask,
            advantages, returns if returns is not None else advantages,
            gamma, gamma * lam,
            T, rewards.numel(),
            BLOCK_T=block_t, PACKED=cu_seqlens is not None, HAS_VALUES=values is not None,
            CARRY_MASKED=carry_masked, num_warps=num_warps(block_t, per_thread=4),
        )  # fmt: skip
    return advantages, returns
