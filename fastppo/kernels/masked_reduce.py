"""Deterministic second stage of the fused losses, and their backward.

A loss kernel runs one program per (row, chunk of T) and writes one row of partial sums:
    partials[p, 0] = Σ m·l        (the loss numerator)
    partials[p, 1] = Σ m          (token weight)
    partials[p, j] = Σ m·stat_j   for j ≥ 2, or a max for the column ``max_col``
``_masked_agg_reduce_kernel`` (a single program, fixed order, no atomics) turns them into
    out[0] = the aggregated loss, out[1] = Σ m, out[j] = Σ m·stat_j / Σ m (or the max)
and ``row_scale[b]``, the weight of row b's tokens in the loss, so that the backward is
    grad[b, t] = stored[b, t] · g · row_scale[b]   (``_scale_rows_kernel``).

Aggregation of l with mask m (DESIGN §4); rows with Σ_t m = 0 are left out of the seq modes and
an all-zero mask gives 0:
    token-mean           Σ m·l / Σ m                   row_scale = 1 / Σ m
    token-sum            Σ m·l                         row_scale = 1
    seq-mean-token-sum   Σ_b (Σ_t m·l) / R             row_scale = 1 / R
    seq-mean-token-mean  Σ_b (Σ_t m·l / Σ_t m) / R     row_scale = 1 / (R · Σ_t m)
"""

import torch
import triton
import triton.language as tl

#: Rows (and partial rows) per step of the one-program reduction. Fixed, so that the launch
#: configurations are the aggregations × the ops' stat counts, all of which the tests launch.
_REDUCE_BLOCK = 256

#: Aggregation name → the code the kernels switch on.
AGGREGATIONS = {"token-mean": 0, "token-sum": 1, "seq-mean-token-sum": 2, "seq-mean-token-mean": 3}


@triton.jit
def chunk_of_row(pid, T, n_chunks, BLOCK_T: tl.constexpr):
    """Program ``pid`` of a (row, chunk of T) grid over a contiguous (B, T) tensor: its row, the
    flat int64 indices of its tokens, and which of them lie inside the row."""
    row = pid // n_chunks
    offs = (pid % n_chunks) * BLOCK_T + tl.arange(0, BLOCK_T)
    return row, row.to(tl.int64) * T + offs, offs < T


@triton.jit
def _masked_agg_reduce_kernel(
    partials_ptr,
    loss_ptr,
    out_ptr,
    row_scale_ptr,
    B,
    C,
    S,
    max_col,
    AGG: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Per row: Σ over its C chunks of the loss numerator and the token weight.
    tot_l = tl.zeros((), tl.float32)
    tot_m = tl.zeros((), tl.float32)
    rows_with_tokens = tl.zeros((), tl.float32)
    sum_row_means = tl.zeros((), tl.float32)
    offs_b = tl.arange(0, BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs_b
        row_l = tl.zeros((BLOCK_B,), tl.float32)
        row_m = tl.zeros((BLOCK_B,), tl.float32)
        # Chunks one at a time, a vector of rows each: a (rows, chunks) tile reduced inside this
        # loop crashes Triton 3.6's thread-locality pass (OptimizeThreadLocality, hasOneUse).
        for c in range(0, C):
            base = (rows.to(tl.int64) * C + c) * S
            row_l += tl.load(partials_ptr + base, mask=rows < B, other=0.0)
            row_m += tl.load(partials_ptr + base + 1, mask=rows < B, other=0.0)
        has = row_m > 0
        tot_l += tl.sum(row_l, axis=0)
        tot_m += tl.sum(row_m, axis=0)
        rows_with_tokens += tl.sum(has.to(tl.float32), axis=0)
        sum_row_means += tl.sum(tl.where(has, row_l / tl.where(has, row_m, 1.0), 0.0), axis=0)
        tl.store(row_scale_ptr + rows, row_m, mask=rows < B)  # kept for the second loop

    safe_m = tl.where(tot_m > 0, tot_m, 1.0)
    n_rows = tl.maximum(rows_with_tokens, 1.0)
    if AGG == 0:
        loss = tot_l / safe_m
    elif AGG == 1:
        loss = tot_l
    elif AGG == 2:
        loss = tot_l / n_rows
    else:
        loss = sum_row_means / n_rows

    # Statistics: every column summed over all programs (the max column maxed), fixed order.
    offs_n = tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    col_sum = tl.zeros((BLOCK_S,), tl.float32)
    col_max = tl.zeros((BLOCK_S,), tl.float32)
    for n0 in range(0, B * C, BLOCK_N):
        n = n0 + offs_n
        inside = (n[:, None] < B * C) & (offs_s[None, :] < S)
        tile = tl.load(partials_ptr + n[:, None].to(tl.int64) * S + offs_s[None, :], mask=inside, other=0.0)
        col_sum += tl.sum(tile, axis=0)
        col_max = tl.maximum(col_max, tl.max(tile, axis=0))
    stats = tl.where(offs_s == max_col, col_max, col_sum / safe_m)
    stats = tl.where(offs_s == 1, tot_m, stats)
    stats = tl.where(offs_s == 0, loss, stats)
    tl.store(out_ptr + offs_s, stats, mask=offs_s < S)
    tl.store(loss_ptr, loss)

    # Weight of each row's tokens in the loss.
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs_b
        row_m = tl.load(row_scale_ptr + rows, mask=rows < B, other=0.0)
        if AGG == 0:
            scale = tl.where(tot_m > 0, 1.0 / safe_m, 0.0) + tl.zeros((BLOCK_B,), tl.float32)
        elif AGG == 1:
            scale = tl.full((BLOCK_B,), 1.0, tl.float32)
        elif AGG == 2:
            scale = tl.zeros((BLOCK_B,), tl.float32) + 1.0 / n_rows
        else:
            scale = tl.where(row_m > 0, 1.0 / (tl.where(row_m > 0, row_m, 1.0) * n_rows), 0.0)
        tl.store(row_scale_ptr + rows, scale, mask=rows < B)


@triton.jit
def _scale_rows_kernel(
    src_ptr,
    grad_out_ptr,
    row_scale_ptr,
    dst_ptr,
    factor,
    T,
    n_chunks,
    BLOCK_T: tl.constexpr,
):
    """dst[b, t] = factor · src[b, t] · g · row_scale[b], g the 0-d upstream gradient."""
    pid = tl.program_id(0)
    row, idx, inside = chunk_of_row(pid, T, n_chunks, BLOCK_T)
    scale = factor * tl.load(grad_out_ptr).to(tl.float32) * tl.load(row_scale_ptr + row)
    src = tl.load(src_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    tl.store(dst_ptr + idx, src * scale, mask=inside)


def chunking(T: int) -> tuple[int, int]:
    """(BLOCK_T, chunks per row) for a row of T tokens: one program per chunk."""
    block_t = min(max(triton.next_power_of_2(T), 16), 2048)
    return block_t, triton.cdiv(T, block_t)


def masked_agg_reduce(
    partials: torch.Tensor, B: int, C: int, *, agg: str, max_col: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduce ``partials`` (B·C, S) fp32 (values of ``max_col`` must be ≥ 0). Returns the loss
    (0-d), ``out`` (S,) and ``row_scale`` (B,), all fp32."""
    S = partials.shape[1]
    loss = torch.empty((), dtype=torch.float32, device=partials.device)
    out = torch.empty(S, dtype=torch.float32, device=partials.device)
    row_scale = torch.empty(B, dtype=torch.float32, device=partials.device)
    _masked_agg_reduce_kernel[(1,)](
        partials, loss, out, row_scale,
        B, C, S, max_col,
        AGG=AGGREGATIONS[agg],
        BLOCK_B=_REDUCE_BLOCK,
        BLOCK_N=_REDUCE_BLOCK,
        BLOCK_S=triton.next_power_of_2(S),
        num_warps=8,
    )  # fmt: skip
    return loss, out, row_scale


def scale_rows(
    src: torch.Tensor,
    grad_out: torch.Tensor,
    row_scale: torch.Tensor,
    *,
    factor: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """factor · src · grad_out · row_scale[row] for ``src`` (B, T) contiguous; ``grad_out`` 0-d."""
    B, T = src.shape
    dst = torch.empty((B, T), dtype=out_dtype, device=src.device)
    if src.numel():
        block_t, n_chunks = chunking(T)
        _scale_rows_kernel[(B * n_chunks,)](
            src, grad_out, row_scale, dst, factor, T, n_chunks, BLOCK_T=block_t, num_warps=4
        )  # fmt: skip
    return dst
