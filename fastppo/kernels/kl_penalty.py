"""Per-token KL estimators between the policy and a reference: Triton kernels and launchers.

With d = logp − ref_logp: k1 = d, abs = |d|, k2 = d²/2, k3 = exp(−d) − 1 + d with −d clamped
to [−20, 20] before the exp. For |d| < 1/2, k3 = Σ_{n≥2} (−d)ⁿ/n! by Horner (``_k3_and_expm1``):
k3 ≈ d²/2 is the small difference of numbers near 1, and the exp form would round it at the
scale of 1 (an absolute 1e-7, a relative 0.1 at d = 1e-3); the series keeps a few ulp of k3.
"k1+" and "k3+" take the value of k1/k3 and the gradient of k2 (verl's straight-through
estimators). An optional ``clamp`` c bounds the value to [−c, c] (gradient 0 outside, except for
the straight-through ones).

``kl_estimate`` is also called by the PPO policy-loss kernel for its KL term.

The op is elementwise over the flat tokens (any layout, packed included: nothing about sequences
is read). Each program takes one BLOCK-aligned block and loads it unmasked unless it runs past N,
so the loads are 16-byte vectors.
"""

import torch
import triton
import triton.language as tl

from ._common import codes, load_block, num_warps

#: Estimator codes the kernels switch on (a constexpr: one compiled variant each); the public
#: names in the same order ("k1+"/"k3+" are the straight-through ``k1_st``/``k3_st``).
Estimator = codes("Estimator", ("k1", "k2", "k3", "abs", "k1_st", "k3_st"))
#: Public estimator name → its code.
ESTIMATORS = dict(zip(("k1", "k2", "k3", "abs", "k1+", "k3+"), range(len(Estimator)), strict=True))


@triton.jit
def _k3_and_expm1(x):
    """(eˣ − 1 − x, eˣ − 1) elementwise, each to a few ulp of itself. |x| < 1/2: the series
    x²·Σ_{n≥0} xⁿ/(n+2)! through x¹⁶/16! (truncation below 1e-19 relative: fp64-exact too);
    otherwise eˣ − 1 − x, whose two subtractions are exact or small against the result."""
    # Horner in 1/n!, n = 16 … 2 (a literal keeps full precision in fp64 arithmetic).
    series = 4.779477332387385e-14 * x + 7.647163731819816e-13
    series = series * x + 1.1470745597729725e-11
    series = series * x + 1.6059043836821613e-10
    series = series * x + 2.08767569878681e-09
    series = series * x + 2.505210838544172e-08
    series = series * x + 2.755731922398589e-07
    series = series * x + 2.7557319223985893e-06
    series = series * x + 2.48015873015873e-05
    series = series * x + 0.0001984126984126984
    series = series * x + 0.001388888888888889
    series = series * x + 0.008333333333333333
    series = series * x + 0.041666666666666664
    series = series * x + 0.16666666666666666
    series = series * x + 0.5
    series = series * x * x
    small = tl.abs(x) < 0.5
    em1 = tl.where(small, x + series, tl.exp(x) - 1.0)
    return tl.where(small, series, em1 - x), em1


@triton.jit
def kl_estimate(d, clamp, ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """(value, ∂value/∂d) of the estimator at d = logp − ref_logp, elementwise."""
    if ESTIMATOR == Estimator.k1 or ESTIMATOR == Estimator.k1_st:
        value = d
        grad = tl.full(d.shape, 1.0, d.dtype)
    elif ESTIMATOR == Estimator.k2:
        value = 0.5 * d * d
        grad = d
    elif ESTIMATOR == Estimator.k3 or ESTIMATOR == Estimator.k3_st:
        x = tl.minimum(tl.maximum(-d, -20.0), 20.0)
        k3, em1 = _k3_and_expm1(x)
        value = k3 + (x + d)  # x + d = 0 inside the clamp; beyond it k3 goes on linearly in d
        grad = tl.where(tl.abs(d) <= 20.0, -em1, 1.0)
    else:  # abs
        value = tl.abs(d)
        grad = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)
    if HAS_CLAMP:
        grad = tl.where(tl.abs(value) <= clamp, grad, 0.0)
        value = tl.minimum(tl.maximum(value, -clamp), clamp)
    if ESTIMATOR == Estimator.k1_st or ESTIMATOR == Estimator.k3_st:  # the gradient of k2
        grad = d
    return value, grad


@triton.jit
def _block(N, BLOCK: tl.constexpr):
    """This program's block of the flat tokens: offsets (from a multiple of BLOCK) and whether all
    of them lie inside the N tokens."""
    base = tl.multiple_of(tl.program_id(0).to(tl.int64) * BLOCK, BLOCK)
    offs = base + tl.arange(0, BLOCK)
    return offs, base + BLOCK <= N


@triton.jit
def _load(ptr, offs, N, full, ACC_DTYPE: tl.constexpr):
    if ACC_DTYPE == tl.float64:  # load_block widens to fp32 only
        if full:
            x = tl.load(ptr + offs).to(tl.float64)
        else:
            x = tl.load(ptr + offs, mask=offs < N, other=0.0).to(tl.float64)
    else:
        x = load_block(ptr, offs, N, full)
    return x


@triton.jit
def _store(ptr, offs, value, N, full):
    if full:
        tl.store(ptr + offs, value)
    else:
        tl.store(ptr + offs, value, mask=offs < N)


@triton.jit
def _kl_penalty_fwd_kernel(
    logp_ptr,
    ref_logp_ptr,
    kl_ptr,
    clamp: tl.float64,
    N,
    BLOCK: tl.constexpr,
    ESTIMATOR: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    offs, full = _block(N, BLOCK)
    logp = _load(logp_ptr, offs, N, full, ACC_DTYPE)
    ref = _load(ref_logp_ptr, offs, N, full, ACC_DTYPE)
    # The bound arrives as fp64 (a Python float would reach the kernel rounded to fp32).
    value, _ = kl_estimate(logp - ref, tl.full((), clamp, ACC_DTYPE), ESTIMATOR, HAS_CLAMP)
    _store(kl_ptr, offs, value, N, full)


@triton.jit
def _kl_penalty_bwd_kernel(
    logp_ptr,
    ref_logp_ptr,
    grad_kl_ptr,
    grad_logp_ptr,
    grad_ref_logp_ptr,
    clamp: tl.float64,
    N,
    BLOCK: tl.constexpr,
    ESTIMATOR: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_REF: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    offs, full = _block(N, BLOCK)
    logp = _load(logp_ptr, offs, N, full, ACC_DTYPE)
    ref = _load(ref_logp_ptr, offs, N, full, ACC_DTYPE)
    g = _load(grad_kl_ptr, offs, N, full, ACC_DTYPE)
    _, dkl = kl_estimate(logp - ref, tl.full((), clamp, ACC_DTYPE), ESTIMATOR, HAS_CLAMP)
    if HAS_GRAD_LOGP:
        _store(grad_logp_ptr, offs, g * dkl, N, full)
    if HAS_GRAD_REF:  # d = logp − ref: the reference gets the opposite gradient
        _store(grad_ref_logp_ptr, offs, -g * dkl, N, full)


_BLOCK = 1024


def _acc_dtype(*tensors: torch.Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def kl_penalty_fwd(
    logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str, clamp: float | None
) -> torch.Tensor:
    """Per-token KL of flat contiguous ``logp`` and ``ref_logp`` (N,); fp32 (fp64 for fp64 input)."""
    N = logp.numel()
    out_dtype = torch.float64 if _acc_dtype(logp, ref_logp) == tl.float64 else torch.float32
    kl = torch.empty(N, dtype=out_dtype, device=logp.device)
    if N:
        _kl_penalty_fwd_kernel[(triton.cdiv(N, _BLOCK),)](
            logp, ref_logp, kl,
            0.0 if clamp is None else clamp,
            N,
            BLOCK=_BLOCK, ESTIMATOR=ESTIMATORS[estimator], HAS_CLAMP=clamp is not None,
            ACC_DTYPE=_acc_dtype(logp, ref_logp), num_warps=num_warps(_BLOCK),
        )  # fmt: skip
    return kl


def kl_penalty_bwd(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    grad_kl: torch.Tensor,
    *,
    estimator: str,
    clamp: float | None,
    need_logp: bool,
    need_ref: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the per-token KL w.r.t. ``logp`` and ``ref_logp`` (in their dtypes)."""
    N = logp.numel()
    grad_logp = torch.empty_like(logp) if need_logp else None
    grad_ref = torch.empty_like(ref_logp) if need_ref else None
    if N and (need_logp or need_ref):
        _kl_penalty_bwd_kernel[(triton.cdiv(N, _BLOCK),)](
            logp, ref_logp, grad_kl.contiguous(),
            grad_logp if need_logp else logp, grad_ref if need_ref else ref_logp,
            0.0 if clamp is None else clamp,
            N,
            BLOCK=_BLOCK, ESTIMATOR=ESTIMATORS[estimator], HAS_CLAMP=clamp is not None,
            HAS_GRAD_LOGP=need_logp, HAS_GRAD_REF=need_ref, ACC_DTYPE=_acc_dtype(logp, ref_logp),
            num_warps=num_warps(_BLOCK),
        )  # fmt: skip
    return grad_logp, grad_ref
