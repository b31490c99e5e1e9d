"""How the fused losses walk their tokens, their deterministic second stage, and their backward.

Layout (``TokenLayout``): S sequences over N flat tokens, padded ``(B, T)`` (sequence b is
[b·T, b·T + T), S = B) or packed ``(N,)`` with ``cu_seqlens`` (S + 1,) (``sequence_bounds``, the
rule of ``gae``). Each sequence gets ``parts`` programs; program (s, p) takes the blocks p,
p + parts, p + 2·parts, … of the BLOCK-aligned blocks of the flat token range that overlap
sequence s, loads each whole block (unmasked unless it runs past N: 16-byte loads, since the
block's offset is a known multiple of BLOCK) and keeps ``start ≤ offs < end`` with ``tl.where``.
No padded copy, nothing read to the host: ``parts`` and BLOCK come from N, S (and T) only.

A loss kernel writes one row of partial sums per program (fixed order within it):
    partials[p, Stat.loss] = Σ m·l        (the loss numerator)
    partials[p, Stat.tokens] = Σ m        (token weight)
    partials[p, j] = Σ m·stat_j   for the other columns, or a max for the column ``max_col``
``_masked_agg_reduce_kernel`` (a single program, fixed order, no atomics) turns them into
    out[0] = the aggregated loss, out[1] = Σ m, out[j] = Σ m·stat_j / Σ m (or the max)
and ``row_scale[s]``, the weight of sequence s's tokens in the loss, so that the backward is
    grad[t] = stored[t] · g · row_scale[seq(t)]   (``_scale_rows_kernel``).

Aggregation of l with mask m (DESIGN §4); sequences with Σ_t m = 0 are left out of the seq modes
and an all-zero mask gives 0:
    token-mean           Σ m·l / Σ m                   row_scale = 1 / Σ m
    token-sum            Σ m·l                         row_scale = 1
    seq-mean-token-sum   Σ_s (Σ_t m·l) / R             row_scale = 1 / R
    seq-mean-token-mean  Σ_s (Σ_t m·l / Σ_t m) / R     row_scale = 1 / (R · Σ_t m)
"""

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import block_offsets, block_size, chunking, codes, load_block, num_warps, sequence_bounds

#: Rows (and partial rows) per step of the one-program reduction. Fixed, so that the launch
#: configurations are the aggregations × the ops' stat counts, all of which the tests launch.
_REDUCE_BLOCK = 256
#: Largest block of a loss program (tokens per step of its loop); ``chunking(T, MAX_BLOCK)`` is
#: the (block, parts) of a row of T tokens (``test_launch_configs`` walks its choices).
MAX_BLOCK = 2048

#: Aggregation codes the kernels switch on (``Agg.token_mean`` …).
Agg = codes("Agg", ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean"))
#: The two columns every loss's partial sums start with.
LOSS_COL: tl.constexpr = tl.constexpr(0)
TOKENS_COL: tl.constexpr = tl.constexpr(1)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the sequences of a loss's flat token tensors lie, and how programs split them.

    Attributes:
        n_tokens: N, the flat token count.
        n_seqs: S, sequences (rows of a padded input).
        row_len: T of a padded (B, T) input; 0 when packed.
        cu_seqlens: (S + 1,) int32 boundaries when packed, else None.
        block: tokens per step of a program (a power of two).
        parts: programs per sequence.
    """

    n_tokens: int
    n_seqs: int
    row_len: int
    cu_seqlens: torch.Tensor | None
    block: int
    parts: int

    @property
    def programs(self) -> int:
        return self.n_seqs * self.parts

    def cu_seqlens_or(self, fallback: torch.Tensor) -> torch.Tensor:
        """The pointer the kernels take for ``cu_seqlens`` (any tensor when padded: not read)."""
        return self.cu_seqlens if self.cu_seqlens is not None else fallback

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(T, N, parts), the runtime sizes every loss kernel takes after its scalars."""
        return self.row_len, self.n_tokens, self.parts

    @property
    def constexprs(self) -> dict:
        return dict(BLOCK=self.block, PACKED=self.cu_seqlens is not None, num_warps=num_warps(self.block))


def token_layout(shape: torch.Size, cu_seqlens: torch.Tensor | None) -> TokenLayout:
    """The layout of per-token tensors of ``shape``: (B, T) padded, (N,) packed with ``cu_seqlens``
    (already checked: int32, (S + 1,)), or (N,) alone as one sequence. Sizes only: no host read.
    Packed sequences get the block and part count of their mean length (a sequence longer than
    ``parts`` blocks loops over more blocks)."""
    if cu_seqlens is None:
        rows, row_len = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        block, parts = chunking(row_len, MAX_BLOCK)
        return TokenLayout(rows * row_len, rows, row_len, None, block, max(parts, 1))
    n, seqs = shape[0], cu_seqlens.numel() - 1
    mean = triton.cdiv(n, max(seqs, 1))
    block = block_size(mean, MAX_BLOCK)
    return TokenLayout(n, seqs, 0, cu_seqlens, block, max(triton.cdiv(mean, block), 1))


@triton.jit
def program_blocks(pid, cu_seqlens_ptr, T, N, parts, BLOCK: tl.constexpr, PACKED: tl.constexpr):
    """Program ``pid`` of a (sequence, part) grid: its sequence, part, [start, end) (int64, kept
    inside [0, N) so that a bad ``cu_seqlens`` cannot move a store out of bounds), the first
    BLOCK-aligned block overlapping the sequence and how many overlap it (int32)."""
    seq = pid // parts
    start, end = sequence_bounds(seq, cu_seqlens_ptr, T, PACKED)
    start = tl.minimum(tl.maximum(start, 0), N)
    end = tl.minimum(tl.maximum(end, start), N)
    first = start // BLOCK
    n_blocks = tl.where(end > start, (end + BLOCK - 1) // BLOCK - first, 0).to(tl.int32)
    return seq, pid % parts, start, end, first, n_blocks


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
    # Per row: Σ over its C parts of the loss numerator and the token weight.
    tot_l = tl.zeros((), tl.float32)
    tot_m = tl.zeros((), tl.float32)
    rows_with_tokens = tl.zeros((), tl.float32)
    sum_row_means = tl.zeros((), tl.float32)
    offs_b = tl.arange(0, BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs_b
        row_l = tl.zeros((BLOCK_B,), tl.float32)
        row_m = tl.zeros((BLOCK_B,), tl.float32)
        # Parts one at a time, a vector of rows each: a (rows, parts) tile reduced inside this
        # loop crashes Triton 3.6's thread-locality pass (OptimizeThreadLocality, hasOneUse).
        for c in range(0, C):
            base = (rows.to(tl.int64) * C + c) * S
            row_l += tl.load(partials_ptr + base + LOSS_COL, mask=rows < B, other=0.0)
            row_m += tl.load(partials_ptr + base + TOKENS_COL, mask=rows < B, other=0.0)
        has = row_m > 0
        tot_l += tl.sum(row_l, axis=0)
        tot_m += tl.sum(row_m, axis=0)
        rows_with_tokens += tl.sum(has.to(tl.float32), axis=0)
        sum_row_means += tl.sum(tl.where(has, row_l / tl.where(has, row_m, 1.0), 0.0), axis=0)
        tl.store(row_scale_ptr + rows, row_m, mask=rows < B)  # kept for the second loop

    safe_m = tl.where(tot_m > 0, tot_m, 1.0)
    n_rows = tl.maximum(rows_with_tokens, 1.0)
    if AGG == Agg.token_mean:
        loss = tot_l / safe_m
    elif AGG == Agg.token_sum:
        loss = tot_l
    elif AGG == Agg.seq_mean_token_sum:
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
    stats = tl.where(offs_s == TOKENS_COL, tot_m, stats)
    stats = tl.where(offs_s == LOSS_COL, loss, stats)
    tl.store(out_ptr + offs_s, stats, mask=offs_s < S)
    tl.store(loss_ptr, loss)

    # Weight of each row's tokens in the loss.
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs_b
        row_m = tl.load(row_scale_ptr + rows, mask=rows < B, other=0.0)
        if AGG == Agg.token_mean:
            scale = tl.where(tot_m > 0, 1.0 / safe_m, 0.0) + tl.zeros((BLOCK_B,), tl.float32)
        elif AGG == Agg.token_sum:
            scale = tl.full((BLOCK_B,), 1.0, tl.float32)
        elif AGG == Agg.seq_mean_token_sum:
            scale = tl.zeros((BLOCK_B,), tl.float32) + 1.0 / n_rows
        else:
            scale = tl.where(row_m > 0, 1.0 / (tl.where(row_m > 0, row_m, 1.0) * n_rows), 0.0)
        tl.store(row_scale_ptr + rows, scale, mask=rows < B)


@triton.jit
def _scale_rows_kernel(
    src_ptr,
    grad_out_ptr,
    row_scale_ptr,
    cu_seqlens_ptr,
    dst_ptr,
    factor,
    T,
    N,
    parts,
    BLOCK: tl.constexpr,
    PACKED: tl.constexpr,
):
    """dst[t] = factor · src[t] · g · row_scale[seq(t)], g the 0-d upstream gradient."""
    seq, part, start, end, first, n_blocks = program_blocks(
        tl.program_id(0), cu_seqlens_ptr, T, N, parts, BLOCK, PACKED
    )
    scale = factor * tl.load(grad_out_ptr).to(tl.float32) * tl.load(row_scale_ptr + seq)
    for k in range(part, n_blocks, parts):
        offs, inside, full = block_offsets(first, k, start, end, N, BLOCK)
        src = load_block(src_ptr, offs, N, full)
        tl.store(dst_ptr + offs, src * scale, mask=inside)


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
        AGG=Agg.of(agg, "agg"),
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
    layout: TokenLayout,
    *,
    factor: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """factor · src · grad_out · row_scale[seq] for ``src`` contiguous (N tokens, any shape:
    the result has its shape); ``grad_out`` 0-d, ``row_scale`` (S,)."""
    dst = torch.empty(src.shape, dtype=out_dtype, device=src.device)
    if src.numel() and layout.programs:
        _scale_rows_kernel[(layout.programs,)](
            src, grad_out, row_scale, layout.cu_seqlens_or(row_scale), dst, factor, *layout.sizes,
            **layout.constexprs,
        )  # fmt: skip
    return dst
