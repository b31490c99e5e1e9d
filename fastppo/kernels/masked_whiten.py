"""Masked whitening, deterministic in three launches: per-block partials, one program that
combines them in a fixed order, and an elementwise apply.

Block b holds (n_b = Σ m, mean_b, M2_b = Σ m·(x − mean_b)²), computed from its values in
registers; the combine uses mean = Σ n_b·mean_b / n and M2 = Σ M2_b + n_b·(mean_b − mean)²,
so no sum of squares of raw values is ever formed.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _whiten_partials_kernel(x_ptr, mask_ptr, partials_ptr, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    m = tl.load(mask_ptr + offs, mask=inside, other=0).to(tl.float32)
    counted = m != 0
    x = tl.where(counted, tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32), 0.0)
    n = tl.sum(m, axis=0)
    mean = tl.sum(m * x, axis=0) / tl.where(n != 0, n, 1.0)
    m2 = tl.sum(tl.where(counted, m * (x - mean) * (x - mean), 0.0), axis=0)
    tl.store(partials_ptr + pid * 3 + 0, n)
    tl.store(partials_ptr + pid * 3 + 1, mean)
    tl.store(partials_ptr + pid * 3 + 2, m2)


@triton.jit
def _whiten_stats_kernel(partials_ptr, stats_ptr, n_parts, BLOCK_P: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    total = tl.zeros((), tl.float32)
    weighted = tl.zeros((), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + offs
        n_b = tl.load(partials_ptr + p * 3, mask=p < n_parts, other=0.0)
        total += tl.sum(n_b, axis=0)
        weighted += tl.sum(n_b * tl.load(partials_ptr + p * 3 + 1, mask=p < n_parts, other=0.0), axis=0)
    mean = weighted / tl.where(total > 0, total, 1.0)
    m2 = tl.zeros((), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + offs
        n_b = tl.load(partials_ptr + p * 3, mask=p < n_parts, other=0.0)
        d = tl.load(partials_ptr + p * 3 + 1, mask=p < n_parts, other=0.0) - mean
        m2 += tl.sum(tl.load(partials_ptr + p * 3 + 2, mask=p < n_parts, other=0.0) + n_b * d * d, axis=0)
    # Unbiased; Σ m ≤ 1 has no spread to estimate: var 0, never NaN.
    var = tl.where(total > 1, m2 / tl.where(total > 1, total - 1.0, 1.0), 0.0)
    tl.store(stats_ptr + 0, mean)
    tl.store(stats_ptr + 1, var)


@triton.jit
def _whiten_apply_kernel(x_ptr, stats_ptr, out_ptr, N, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    mean = tl.load(stats_ptr + 0)
    inv_std = 1.0 / tl.sqrt(tl.load(stats_ptr + 1) + 1e-8)
    y = (tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32) - mean) * inv_std
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, y, mask=inside)


_BLOCK = 2048
#: Partials per step of the one-program combine; fixed, so there is one configuration to compile.
_STATS_BLOCK = 1024


def masked_whiten_fwd(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool) -> torch.Tensor:
    """Whiten flat contiguous ``x`` (N,) over ``mask`` (N,); fp32 out."""
    N = x.numel()
    out = torch.empty(N, dtype=torch.float32, device=x.device)
    n_parts = max(triton.cdiv(N, _BLOCK), 1)
    partials = torch.zeros((n_parts, 3), dtype=torch.float32, device=x.device)
    stats = torch.empty(2, dtype=torch.float32, device=x.device)
    if N:
        _whiten_partials_kernel[(n_parts,)](x, mask, partials, N, BLOCK=_BLOCK, num_warps=8)
    _whiten_stats_kernel[(1,)](partials, stats, n_parts, BLOCK_P=_STATS_BLOCK)
    if N:
        _whiten_apply_kernel[(n_parts,)](x, stats, out, N, SHIFT_MEAN=shift_mean, BLOCK=_BLOCK, num_warps=8)
    return out
