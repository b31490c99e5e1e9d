"""Fused per-token log-probs and entropy from logits: Triton kernels and their launchers.

Rows are addressed through two leading strides (``outer``, ``inner``) so that the usual
non-contiguous view ``logits[:, :-1]`` of a ``(B, T, V)`` tensor is read in place, without the
N×V copy that ``.contiguous()`` would make. The vocabulary stride must be 1.

Forward, per row, one read of the logits with z = x / τ (online over vocabulary tiles):
    m = max z,   s = Σ e^{z−m},   u = Σ e^{z−m}·(z−m)
    lse = m + log s,   logp_k = z[y_k] − lse,   entropy = log s − u/s
Backward, per row, one read of the logits and one write of their gradient:
    ∂/∂z_j = Σ_k g_k·1[j = y_k] − p_j·Σ_k g_k − g_H·p_j·(log p_j + H),   then × 1/τ
"""

import torch
import triton
import triton.language as tl

from ._common import block_size, num_warps

# Finite start for the running max: keeps (m_old − m_new)·s and e·(z − m) free of inf − inf.
# A kernel may read a global only when it is a tl.constexpr (the interpreter forgives the rest).
_NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit(do_not_specialize=["ignore_index"])
def _token_logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    inv_temperature: tl.float64,
    ignore_index,
    V,
    K,
    ROWS_INNER,
    stride_outer,
    stride_inner,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # 1/τ arrives as fp64 (a plain Python float would be rounded to fp32 at the launch).
    inv_t = tl.full((), inv_temperature, ACC_DTYPE)
    logits_row = logits_ptr + (row // ROWS_INNER) * stride_outer + (row % ROWS_INNER) * stride_inner

    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    labels = tl.load(labels_ptr + row * K + offs_k, mask=in_k, other=ignore_index).to(tl.int64)
    counted = in_k & (labels != ignore_index)
    in_vocab = (labels >= 0) & (labels < V)
    # A row whose labels are all ignore_index is never read: padding costs no bandwidth.
    active = tl.sum(counted.to(tl.int32), axis=0) > 0
    v_stop = tl.where(active, V, 0)

    m = tl.full((), _NEG_BIG, ACC_DTYPE)
    s = tl.zeros((), ACC_DTYPE)
    u = tl.zeros((), ACC_DTYPE)
    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, v_stop, BLOCK_V):
        cols = v0 + offs_v
        x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf"))
        z = x.to(ACC_DTYPE) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = z - m_new
        e = tl.exp(shift)
        alpha = tl.exp(m - m_new)
        # u is kept relative to the running max: moving the max by (m − m_new) shifts it by that·s.
        # Clamping shift keeps −inf logits (e = 0) at 0·finite instead of 0·(−inf).
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * tl.maximum(shift, _NEG_BIG), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    s = tl.where(active, s, 1.0)  # an unread row has s = 0; it stores zeros
    log_s = tl.log(s)
    lse = tl.where(active, m + log_s, 0.0)
    entropy = tl.where(active, log_s - u / s, 0.0)

    x_y = tl.load(logits_row + labels, mask=counted & in_vocab, other=0.0)
    logp = x_y.to(ACC_DTYPE) * inv_t - lse
    # Out-of-vocabulary labels are never read; they give NaN (the Python layer rejects them first).
    logp = tl.where(counted, tl.where(in_vocab, logp, float("nan")), 0.0)

    tl.store(logp_ptr + row * K + offs_k, logp, mask=in_k)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["ignore_index"])
def _token_logprobs_bwd_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    inv_temperature: tl.float64,
    ignore_index,
    V,
    K,
    ROWS_INNER,
    stride_outer,
    stride_inner,
    stride_grad_outer,
    stride_grad_inner,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.full((), inv_temperature, ACC_DTYPE)
    row_outer = row // ROWS_INNER
    row_inner = row % ROWS_INNER
    logits_row = logits_ptr + row_outer * stride_outer + row_inner * stride_inner
    grad_row = grad_logits_ptr + row_outer * stride_grad_outer + row_inner * stride_grad_inner

    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    labels = tl.load(labels_ptr + row * K + offs_k, mask=in_k, other=ignore_index).to(tl.int64)
    counted = in_k & (labels != ignore_index)
    active = tl.sum(counted.to(tl.int32), axis=0) > 0
    if HAS_GRAD_LOGP:
        g_k = tl.load(grad_logp_ptr + row * K + offs_k, mask=counted, other=0.0).to(ACC_DTYPE)
    else:
        g_k = tl.zeros((BLOCK_K,), ACC_DTYPE)
    g_sum = tl.sum(g_k, axis=0)
    if HAS_GRAD_ENTROPY:
        g_h = tl.where(active, tl.load(grad_entropy_ptr + row).to(ACC_DTYPE), 0.0)
    else:
        g_h = tl.zeros((), ACC_DTYPE)
    lse = tl.load(lse_ptr + row).to(ACC_DTYPE)
    entropy = tl.load(entropy_ptr + row).to(ACC_DTYPE)
    # Inactive rows (all labels ignored) are not read; their gradient is written as zeros.
    v_stop = tl.where(active, V, 0)

    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs_v
        x = tl.load(logits_row + cols, mask=cols < v_stop, other=float("-inf"))
        # Clamped so that p = 0 (a −inf logit, or an unread row) gives 0·finite, never 0·inf.
        logp_j = tl.maximum(x.to(ACC_DTYPE) * inv_t - lse, _NEG_BIG)
        p = tl.exp(logp_j)
        coef = g_sum
        if HAS_GRAD_ENTROPY:
            coef += g_h * (logp_j + entropy)
        grad = -p * coef
        if HAS_GRAD_LOGP:
            # The one-hot term, one label at a time: repeated labels add up.
            for k in range(0, K):
                y = tl.load(labels_ptr + row * K + k).to(tl.int64)
                g = tl.load(grad_logp_ptr + row * K + k).to(ACC_DTYPE)
                grad += tl.where((cols == y) & (y != ignore_index), g, 0.0)
        tl.store(grad_row + cols, grad * inv_t, mask=cols < V)


def _row_addressing(logits: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows_inner, stride_outer, stride_inner) such that row r starts at
    (r // rows_inner)·stride_outer + (r % rows_inner)·stride_inner, or None when the leading
    dimensions of ``logits`` need more than two strides."""
    dims = [(n, st) for n, st in zip(logits.shape[:-1], logits.stride()[:-1], strict=True) if n != 1]
    merged: list[list[int]] = []
    for n, st in dims:
        if merged and merged[-1][1] == st * n:
            merged[-1] = [merged[-1][0] * n, st]
        else:
            merged.append([n, st])
    if not merged:
        return 1, 0, 0
    if len(merged) == 1:
        return 1, merged[0][1], 0
    if len(merged) == 2:
        return merged[1][0], merged[0][1], merged[1][1]
    return None


def can_address(logits: torch.Tensor) -> bool:
    """Whether the kernels can read ``logits`` in place (unit vocabulary stride and leading
    dimensions that collapse to at most two strides)."""
    unit_vocab = logits.shape[-1] == 1 or logits.stride(-1) == 1
    return unit_vocab and _row_addressing(logits) is not None


def _launch_config(V: int, K: int, dtype: torch.dtype) -> dict:
    # 16-bit logits: 8192-wide tiles keep 16 KiB in flight per pass; fp32/fp64 use 4096.
    block_v = block_size(V, 8192 if dtype.itemsize == 2 else 4096)
    return {
        "BLOCK_V": block_v,
        "BLOCK_K": triton.next_power_of_2(K),
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
        # 16 logits per thread: one or two 16-byte loads of each tile, few threads per reduction.
        "num_warps": num_warps(block_v, per_thread=16),
    }


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        logits: ``(..., V)`` bf16/fp16/fp32/fp64 with unit vocabulary stride (see ``can_address``).
        labels: ``(N, K)`` contiguous integer labels, N = logits.numel() // V.
    Returns:
        ``logp`` (N, K), ``entropy`` (N,), ``lse`` (N,) in fp32 (fp64 for fp64 logits).
    """
    V = logits.shape[-1]
    N, K = labels.shape
    assert can_address(logits) and labels.is_contiguous() and N * V == logits.numel()
    out_dtype = _out_dtype(logits.dtype)
    logp = torch.empty((N, K), dtype=out_dtype, device=logits.device)
    entropy = torch.empty((N,), dtype=out_dtype, device=logits.device)
    lse = torch.empty((N,), dtype=out_dtype, device=logits.device)
    if N == 0:
        return logp, entropy, lse
    rows_inner, stride_outer, stride_inner = _row_addressing(logits)
    _token_logprobs_fwd_kernel[(N,)](
        logits, labels, logp, entropy, lse,
        1.0 / temperature, ignore_index,
        V, K, rows_inner,
        stride_outer, stride_inner,
        **_launch_config(V, K, logits.dtype),
    )  # fmt: skip
    return logp, entropy, lse


def token_logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    inplace: bool = False,
) -> torch.Tensor:
    """Launch the backward kernel; returns the gradient of the logits.

    ``grad_logp`` is ``(N, K)`` and ``grad_entropy`` ``(N,)``; either may be None (zero). With
    ``inplace=True`` the gradient overwrites ``logits`` and ``logits`` itself is returned, so
    forward + backward allocate nothing of size N×V.
    """
    V = logits.shape[-1]
    N, K = labels.shape
    grad_logits = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad_logits
    rows_inner, stride_outer, stride_inner = _row_addressing(logits)
    # In place the gradient shares the logits' strides; otherwise it is dense (N, V).
    stride_grad_outer, stride_grad_inner = (stride_outer, stride_inner) if inplace else (rows_inner * V, V)
    dummy = lse  # never read when the matching HAS_GRAD_* switch is off
    _token_logprobs_bwd_kernel[(N,)](
        logits, labels, lse, entropy,
        grad_logp.contiguous() if grad_logp is not None else dummy,
        grad_entropy.contiguous() if grad_entropy is not None else dummy,
        grad_logits,
        1.0 / temperature, ignore_index,
        V, K, rows_inner,
        stride_outer, stride_inner,
        stride_grad_outer, stride_grad_inner,
        HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        **_launch_config(V, K, logits.dtype),
    )  # fmt: skip
    return grad_logits
