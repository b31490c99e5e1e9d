"""Masked whitening, deterministic in three launches: per-block partials, one program that
combines them in a fixed order, and an elementwise apply.

Block b holds (n_b = Σ m, mean_b, M2_b = Σ m·(x − mean_b)²), computed from its values in
registers; the combine uses mean = Σ n_b·mean_b / n and M2 = Σ M2_b + n_b·(mean_b − mean)²,
so no sum of squares of raw values is ever formed.
"""

import torch
import triton
import triton.language as tl

from ._common import block_offsets, codes, load_block, num_warps

#: Columns of a block's partial row and of the combined statistics.
Part = codes("WhitenPart", ("n", "mean", "m2"))
Stat = codes("WhitenStat", ("mean", "var"))


@triton.jit
def _whiten_partials_kernel(x_ptr, mask_ptr, partials_ptr, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs, _, full = block_offsets(pid, 0, 0, N, N, BLOCK)
    m = load_block(mask_ptr, offs, N, full)  # 0 past N
    counted = m != 0
    x = tl.where(counted, load_block(x_ptr, offs, N, full), 0.0)
    n = tl.sum(m, axis=0)
    mean = tl.sum(m * x, axis=0) / tl.where(n != 0, n, 1.0)
    m2 = tl.sum(tl.where(counted, m * (x - mean) * (x - mean), 0.0), axis=0)
    part = partials_ptr + pid * len(Part)
    tl.store(part + Part.n, n)
    tl.store(part + Part.mean, mean)
    tl.store(part + Part.m2, m2)


@triton.jit
def _whiten_stats_kernel(partials_ptr, stats_ptr, n_parts, BLOCK_P: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    total = tl.zeros((), tl.float32)
    weighted = tl.zeros((), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + offs
        row = partials_ptr + p * len(Part)
        n_b = tl.load(row + Part.n, mask=p < n_parts, other=0.0)
        total += tl.sum(n_b, axis=0)
        weighted += tl.sum(n_b * tl.load(row + Part.mean, mask=p < n_parts, other=0.0), axis=0)
    mean = weighted / tl.where(total > 0, total, 1.0)
    m2 = tl.zeros((), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + offs
        row = partials_ptr + p * len(Part)
        n_b = tl.load(row + Part.n, mask=p < n_parts, other=0.0)
        d = tl.load(row + Part.mean, mask=p < n_parts, other=0.0) - mean
        m2 += tl.sum(tl.load(row + Part.m2, mask=p < n_parts, other=0.0) + n_b * d * d, axis=0)
    # Unbiased; Σ m ≤ 1 has no spread to estimate: var 0, never NaN.
    var = tl.where(total > 1, m2 / tl.where(total > 1, total - 1.0, 1.0), 0.0)
    tl.store(stats_ptr + Stat.mean, mean)
    tl.store(stats_ptr + Stat.var, var)


@triton.jit
def _whiten_apply_kernel(x_ptr, stats_ptr, out_ptr, N, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    offs, inside, full = block_offsets(tl.program_id(0), 0, 0, N, N, BLOCK)
    mean = tl.load(stats_ptr + Stat.mean)
    inv_std = 1.0 / tl.sqrt(tl.load(stats_ptr + Stat.var) + 1e-8)
    y = (load_block(x_ptr, offs, N, full) - mean) * inv_std
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, y, mask=inside)


#: Elements per program of the partials and apply kernels.
_BLOCK = 2048
#: Partials per step of the one-program combine; fixed, so there is one configuration to compile.
_STATS_BLOCK = 1024


def masked_whiten_fwd(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool) -> torch.Tensor:
    """Whiten flat contiguous ``x`` (N,) over ``mask`` (N,); fp32 out."""
    N = x.numel()
    out = torch.empty(N, dtype=torch.float32, device=x.device)
    n_parts = max(triton.cdiv(N, _BLOCK), 1)
    partials = torch.zeros((n_parts, len(Part)), dtype=torch.float32, device=x.device)
    stats = torch.empty(len(Stat), dtype=torch.float32, device=x.device)
    if N:
        _whiten_partials_kernel[(n_parts,)](x, mask, partials, N, BLOCK=_BLOCK, num_warps=num_warps(_BLOCK))
    _whiten_stats_kernel[(1,)](partials, stats, n_parts, BLOCK_P=_STATS_BLOCK)
    if N:
        _whiten_apply_kernel[(n_parts,)](
            x, stats, out, N, SHIFT_MEAN=shift_mean, BLOCK=_BLOCK, num_warps=num_warps(_BLOCK)
        )
    return out
