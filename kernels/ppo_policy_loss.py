"""Fused PPO clipped policy loss: Triton kernel and launchers.

One program per (row, chunk of T) reads logp, old_logp, advantages and mask once (plus ref_logp
and entropy when given) and writes the per-token derivative ∂l/∂logp (masked, fp32) and a row of
partial sums; ``masked_reduce`` then aggregates them in a fixed order. Per token, with
r = exp(clamp(logp − old_logp, −20, 20)):
    l = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))
    l = min(l, −A·c)                 when dual clip c is set and A < 0
    l += kl_coef · kl(logp, ref_logp) − entropy_coef · entropy
"""

import torch
import triton
import triton.language as tl

from .kl_penalty import ESTIMATORS, kl_estimate
from .masked_reduce import chunk_of_row, chunking, masked_agg_reduce, scale_rows

#: Columns of the partial sums and of the reduced ``out`` vector.
STATS = (
    "loss",
    "tokens",
    "clipfrac",
    "clipfrac_lower",
    "approx_kl",
    "ratio_mean",
    "ratio_max",
    "kl",
    "entropy",
)
_RATIO_MAX = STATS.index("ratio_max")


@triton.jit
def _ppo_policy_loss_fwd_kernel(
    logp_ptr,
    old_logp_ptr,
    advantages_ptr,
    mask_ptr,
    ref_logp_ptr,
    entropy_ptr,
    dlogp_ptr,
    partials_ptr,
    clip_low,
    clip_high,
    dual_clip,
    kl_coef,
    entropy_coef,
    T,
    n_chunks,
    BLOCK_T: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    N_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    _, idx, inside = chunk_of_row(pid, T, n_chunks, BLOCK_T)

    m = tl.load(mask_ptr + idx, mask=inside, other=0).to(tl.float32)
    counted = m != 0
    logp = tl.load(logp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    old_logp = tl.load(old_logp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    adv = tl.load(advantages_ptr + idx, mask=inside, other=0.0).to(tl.float32)

    log_ratio = logp - old_logp
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = pg_clipped > pg_unclipped
    loss = tl.maximum(pg_unclipped, pg_clipped)
    # The clipped branch, when strictly larger, is constant in logp; so is the clamped log-ratio.
    dloss = tl.where(clipped | (tl.abs(log_ratio) > 20.0), 0.0, pg_unclipped)
    if HAS_DUAL_CLIP:
        floor = -adv * dual_clip
        lower = (adv < 0) & (loss > floor)
        loss = tl.where(lower, floor, loss)
        dloss = tl.where(lower, 0.0, dloss)
    else:
        lower = tl.zeros((BLOCK_T,), tl.int1)
    if HAS_KL:
        ref_logp = tl.load(ref_logp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        kl, dkl = kl_estimate(logp - ref_logp, 0.0, KL_ESTIMATOR, False)
        loss += kl_coef * kl
        dloss += kl_coef * dkl
    else:
        kl = tl.zeros((BLOCK_T,), tl.float32)
    if HAS_ENTROPY:
        entropy = tl.load(entropy_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        loss -= entropy_coef * entropy
    else:
        entropy = tl.zeros((BLOCK_T,), tl.float32)

    # where, not a product: padding may hold inf or NaN, and 0·inf is NaN.
    if STORE_GRAD:
        tl.store(dlogp_ptr + idx, tl.where(counted, m * dloss, 0.0), mask=inside)
    part = partials_ptr + pid.to(tl.int64) * N_STATS
    tl.store(part + 0, tl.sum(tl.where(counted, m * loss, 0.0), axis=0))
    tl.store(part + 1, tl.sum(m, axis=0))
    tl.store(part + 2, tl.sum(tl.where(counted & clipped, m, 0.0), axis=0))
    tl.store(part + 3, tl.sum(tl.where(counted & lower, m, 0.0), axis=0))
    tl.store(part + 4, tl.sum(tl.where(counted, -m * log_ratio, 0.0), axis=0))
    tl.store(part + 5, tl.sum(tl.where(counted, m * ratio, 0.0), axis=0))
    tl.store(part + 6, tl.max(tl.where(counted, ratio, 0.0), axis=0))
    tl.store(part + 7, tl.sum(tl.where(counted, m * kl, 0.0), axis=0))
    tl.store(part + 8, tl.sum(tl.where(counted, m * entropy, 0.0), axis=0))


def ppo_policy_loss_fwd(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    agg: str,
    store_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """All inputs (B, T) contiguous, mask any numeric dtype. Returns the loss (0-d), ``out``
    (len(STATS),) fp32, the stored ∂l/∂logp (B, T) fp32 (or None) and ``row_scale`` (B,)."""
    B, T = logp.shape
    block_t, n_chunks = chunking(max(T, 1))
    partials = torch.empty((B * n_chunks, len(STATS)), dtype=torch.float32, device=logp.device)
    dlogp = torch.empty((B, T), dtype=torch.float32, device=logp.device) if store_grad else None
    if B * T:
        _ppo_policy_loss_fwd_kernel[(B * n_chunks,)](
            logp, old_logp, advantages, mask,
            ref_logp if ref_logp is not None else logp,
            entropy if entropy is not None else logp,
            dlogp if store_grad else logp,
            partials,
            clip_low, clip_high, 0.0 if dual_clip is None else dual_clip, kl_coef, entropy_coef,
            T, n_chunks,
            BLOCK_T=block_t, HAS_DUAL_CLIP=dual_clip is not None, HAS_KL=ref_logp is not None,
            KL_ESTIMATOR=ESTIMATORS[kl_estimator], HAS_ENTROPY=entropy is not None, STORE_GRAD=store_grad,
            N_STATS=len(STATS), num_warps=4 if block_t <= 1024 else 8,
        )  # fmt: skip
    else:
        partials.zero_()
    loss, out, row_scale = masked_agg_reduce(partials, B, n_chunks, agg=agg, max_col=_RATIO_MAX)
    return loss, out, dlogp, row_scale


def ppo_policy_loss_bwd(
    grad_loss: torch.Tensor,
    dlogp: torch.Tensor | None,
    row_scale: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy_coef: float,
    logp_dtype: torch.dtype,
    entropy_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. logp (B, T) and entropy (B, T): the stored derivative (resp. −entropy_coef·m)
    scaled by the upstream gradient and each row's weight in the loss."""
    grad_logp = (
        scale_rows(dlogp, grad_loss, row_scale, factor=1.0, out_dtype=logp_dtype)
        if dlogp is not None
        else None
    )
    grad_entropy = None
    if entropy_dtype is not None:
        grad_entropy = scale_rows(mask, grad_loss, row_scale, factor=-entropy_coef, out_dtype=entropy_dtype)
    return grad_logp, grad_entropy
