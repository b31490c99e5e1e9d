"""Fused clipped value loss: Triton kernel and launchers.

One program per (row, chunk of T) reads values, old_values, returns and mask once and writes
∂l/∂v (masked, fp32) and a row of partial sums for ``masked_reduce``. Per token:
    v_c = old_v + clip(v − old_v, −clip, clip)
    l = ½ · max((v − R)², (v_c − R)²)          (l = ½ (v − R)² when clip is None)
"""

import torch
import triton
import triton.language as tl

from .masked_reduce import chunk_of_row, chunking, masked_agg_reduce, scale_rows

#: Columns of the partial sums and of the reduced ``out`` vector.
STATS = ("loss", "tokens", "clipfrac")


@triton.jit
def _value_loss_fwd_kernel(
    values_ptr,
    old_values_ptr,
    returns_ptr,
    mask_ptr,
    dvalues_ptr,
    partials_ptr,
    clip,
    T,
    n_chunks,
    BLOCK_T: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    N_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    _, idx, inside = chunk_of_row(pid, T, n_chunks, BLOCK_T)

    m = tl.load(mask_ptr + idx, mask=inside, other=0).to(tl.float32)
    counted = m != 0
    v = tl.load(values_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    ret = tl.load(returns_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    err = v - ret
    loss = 0.5 * err * err
    dloss = err
    if HAS_CLIP:
        old_v = tl.load(old_values_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        delta = v - old_v
        err_clipped = old_v + tl.minimum(tl.maximum(delta, -clip), clip) - ret
        loss_clipped = 0.5 * err_clipped * err_clipped
        clipped = loss_clipped > loss
        loss = tl.maximum(loss, loss_clipped)
        # The clipped term moves with v only inside the clip (old_v + (v − old_v) may round away
        # from v, so "clipped is larger" does not imply "outside the clip").
        dloss = tl.where(clipped, tl.where(tl.abs(delta) <= clip, err_clipped, 0.0), dloss)
    else:
        clipped = tl.zeros((BLOCK_T,), tl.int1)

    if STORE_GRAD:
        tl.store(dvalues_ptr + idx, tl.where(counted, m * dloss, 0.0), mask=inside)
    part = partials_ptr + pid.to(tl.int64) * N_STATS
    tl.store(part + 0, tl.sum(tl.where(counted, m * loss, 0.0), axis=0))
    tl.store(part + 1, tl.sum(m, axis=0))
    tl.store(part + 2, tl.sum(tl.where(counted & clipped, m, 0.0), axis=0))


def value_loss_fwd(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None,
    agg: str,
    store_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """All inputs (B, T) contiguous. Returns the loss (0-d), ``out`` (len(STATS),) fp32, the
    stored ∂l/∂v (B, T) fp32 (or None) and ``row_scale`` (B,)."""
    B, T = values.shape
    block_t, n_chunks = chunking(max(T, 1))
    partials = torch.empty((B * n_chunks, len(STATS)), dtype=torch.float32, device=values.device)
    dvalues = torch.empty((B, T), dtype=torch.float32, device=values.device) if store_grad else None
    if B * T:
        _value_loss_fwd_kernel[(B * n_chunks,)](
            values, old_values, returns, mask,
            dvalues if store_grad else values, partials,
            0.0 if clip is None else clip,
            T, n_chunks,
            BLOCK_T=block_t, HAS_CLIP=clip is not None, STORE_GRAD=store_grad, N_STATS=len(STATS),
            num_warps=4 if block_t <= 1024 else 8,
        )  # fmt: skip
    else:
        partials.zero_()
    loss, out, row_scale = masked_agg_reduce(partials, B, n_chunks, agg=agg)
    return loss, out, dvalues, row_scale


def value_loss_bwd(
    grad_loss: torch.Tensor, dvalues: torch.Tensor, row_scale: torch.Tensor, *, values_dtype: torch.dtype
) -> torch.Tensor:
    """Gradient w.r.t. values (B, T): the stored derivative scaled by the upstream gradient and
    each row's weight in the loss."""
    return scale_rows(dvalues, grad_loss, row_scale, factor=1.0, out_dtype=values_dtype)
