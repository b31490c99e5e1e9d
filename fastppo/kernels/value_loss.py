"""Fused clipped value loss: Triton kernel and launchers.

The tokens are padded (B, T) or packed (N,) with ``cu_seqlens``; programs walk the BLOCK-aligned
blocks of their sequence (``masked_reduce``'s layout), read values, old_values, returns and mask
once and write ∂l/∂v (masked, fp32) and a row of partial sums for ``masked_reduce``. Per token:
    v_c = old_v + clip(v − old_v, −clip, clip)
    l = ½ · max((v − R)², (v_c − R)²)          (l = ½ (v − R)² when clip is None)
"""

import torch
import triton
import triton.language as tl

from ._common import block_offsets, codes, load_block
from .masked_reduce import (
    TokenLayout,
    masked_agg_reduce,
    program_blocks,
    scale_rows,
)

#: Columns of the partial sums and of the reduced ``out`` vector.
STATS = ("loss", "tokens", "clipfrac")
Stat = codes("Stat", STATS)


@triton.jit
def _value_loss_fwd_kernel(
    values_ptr,
    old_values_ptr,
    returns_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    dvalues_ptr,
    partials_ptr,
    clip,
    T,
    N,
    parts,
    BLOCK: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    N_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    _, part, start, end, first, n_blocks = program_blocks(pid, cu_seqlens_ptr, T, N, parts, BLOCK, PACKED)
    s_loss = tl.zeros((), tl.float32)
    s_m = tl.zeros((), tl.float32)
    s_clipped = tl.zeros((), tl.float32)
    for k in range(part, n_blocks, parts):
        offs, inside, full = block_offsets(first, k, start, end, N, BLOCK)
        m = tl.where(inside, load_block(mask_ptr, offs, N, full), 0.0)
        counted = m != 0
        v = load_block(values_ptr, offs, N, full)
        ret = load_block(returns_ptr, offs, N, full)
        err = v - ret
        loss = 0.5 * err * err
        dloss = err
        clipped = tl.zeros((BLOCK,), tl.int1)
        if HAS_CLIP:
            old_v = load_block(old_values_ptr, offs, N, full)
            delta = v - old_v
            err_clipped = old_v + tl.minimum(tl.maximum(delta, -clip), clip) - ret
            loss_clipped = 0.5 * err_clipped * err_clipped
            clipped = loss_clipped > loss
            loss = tl.maximum(loss, loss_clipped)
            # The clipped term moves with v only inside the clip (old_v + (v − old_v) may round
            # away from v, so "clipped is larger" does not imply "outside the clip").
            dloss = tl.where(clipped, tl.where(tl.abs(delta) <= clip, err_clipped, 0.0), dloss)
        if STORE_GRAD:
            tl.store(dvalues_ptr + offs, tl.where(counted, m * dloss, 0.0), mask=inside)
        # where, not a product: tokens outside the sequence may hold inf or NaN, and 0·inf is NaN.
        s_loss += tl.sum(tl.where(counted, m * loss, 0.0), axis=0)
        s_m += tl.sum(m, axis=0)
        s_clipped += tl.sum(tl.where(counted & clipped, m, 0.0), axis=0)
    out = partials_ptr + pid.to(tl.int64) * N_STATS
    tl.store(out + Stat.loss, s_loss)
    tl.store(out + Stat.tokens, s_m)
    tl.store(out + Stat.clipfrac, s_clipped)


def value_loss_fwd(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    layout: TokenLayout,
    *,
    clip: float | None,
    agg: str,
    store_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """All inputs contiguous, N tokens in ``layout``. Returns the loss (0-d), ``out`` (len(STATS),)
    fp32, the stored ∂l/∂v (values' shape) fp32 (or None) and ``row_scale`` (S,)."""
    partials = torch.zeros((layout.programs, len(STATS)), dtype=torch.float32, device=values.device)
    dvalues = torch.empty(values.shape, dtype=torch.float32, device=values.device) if store_grad else None
    if layout.n_tokens and layout.programs:
        _value_loss_fwd_kernel[(layout.programs,)](
            values, old_values, returns, mask, layout.cu_seqlens_or(values),
            dvalues if store_grad else values, partials,
            0.0 if clip is None else clip, *layout.sizes,
            HAS_CLIP=clip is not None, STORE_GRAD=store_grad, N_STATS=len(STATS), **layout.constexprs,
        )  # fmt: skip
    loss, out, row_scale = masked_agg_reduce(partials, layout.n_seqs, layout.parts, agg=agg)
    return loss, out, dvalues, row_scale


def value_loss_bwd(
    grad_loss: torch.Tensor,
    dvalues: torch.Tensor,
    row_scale: torch.Tensor,
    layout: TokenLayout,
    *,
    values_dtype: torch.dtype,
) -> torch.Tensor:
    """Gradient w.r.t. values (their shape): the stored derivative scaled by the upstream
    gradient and each sequence's weight in the loss."""
    return scale_rows(dvalues, grad_loss, row_scale, layout, factor=1.0, out_dtype=values_dtype)
