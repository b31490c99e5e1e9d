"""Fused policy loss (PPO clip, GSPO, CISPO, SAPO, rollout correction): Triton kernels and launchers.

One program per (row, chunk of T) reads logp, old_logp, advantages and mask once (plus ref_logp,
entropy, weights and rollout_logp when given) and writes the per-token derivative ∂l/∂logp
(masked, fp32) and a row of partial sums; ``masked_reduce`` then aggregates them in a fixed order.
The math is ``fastppo.reference.policy_loss``'s docstring. Every per-token derivative is local
(GSPO's token form has the sequence ratio as a constant value and ∂r/∂logpₜ = r), so the backward
is the stored derivative scaled per row.

Sequence-level quantities (GSPO's mean log-ratio, the sequence rollout weight) need per-row sums
before the per-token pass: a row held in one chunk sums its own tile; longer rows get them from
``_row_sums_kernel`` (one partial per chunk, added in chunk order by each program of the row).
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
    "is_weight_mean",
    "is_filtered",
    "rollout_kl",
    "rollout_kl_k3",
)
_RATIO_MAX = STATS.index("ratio_max")

#: Codes the kernels switch on (constexprs: one compiled variant each).
LOSSES = {"clip": 0, "cispo": 1, "sapo": 2, "geo_mean": 3}
ROLLOUT_LEVELS = {"token": 1, "sequence": 2, "geometric": 3}
#: Per-row sums: Σ m·x (x the log-ratio, or GMPO's clipped one), Σ m, Σ m·(old_logp −
#: rollout_logp), Σ m·A.
_ROW_COLUMNS = 4


@triton.jit
def _geo_log_ratio(log_ratio, adv, clip_low, clip_high):
    """GMPO's per-token log-ratio, clipped on the side the advantage's sign makes optimistic (0 for
    A = 0), and whether it follows logp (a bound is not reached on that side)."""
    up = adv > 0
    down = adv < 0
    x = tl.where(up, tl.minimum(log_ratio, clip_high), tl.where(down, tl.maximum(log_ratio, -clip_low), 0.0))
    follows = (up & (log_ratio <= clip_high)) | (down & (log_ratio >= -clip_low))
    return x, follows


@triton.jit
def _row_sum_terms(m, counted, x, trainer_over_sampler, adv):
    """This tile's contribution to the per-row sums (masked; padding may hold inf or NaN)."""
    s_x = tl.sum(tl.where(counted, m * x, 0.0), axis=0)
    s_d = tl.sum(tl.where(counted, m * trainer_over_sampler, 0.0), axis=0)
    s_a = tl.sum(tl.where(counted, m * adv, 0.0), axis=0)
    return s_x, tl.sum(m, axis=0), s_d, s_a


@triton.jit
def _row_sums_kernel(
    logp_ptr,
    old_logp_ptr,
    advantages_ptr,
    rollout_logp_ptr,
    mask_ptr,
    row_sums_ptr,
    clip_low,
    clip_high,
    T,
    n_chunks,
    BLOCK_T: tl.constexpr,
    SUM_LOG_RATIO: tl.constexpr,
    SUM_ROLLOUT: tl.constexpr,
):
    """SUM_LOG_RATIO: 0 none, 1 the log-ratio, 2 GMPO's clipped log-ratio and the advantages."""
    pid = tl.program_id(0)
    _, idx, inside = chunk_of_row(pid, T, n_chunks, BLOCK_T)
    m = tl.load(mask_ptr + idx, mask=inside, other=0).to(tl.float32)
    old_logp = tl.load(old_logp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    x = tl.zeros((BLOCK_T,), tl.float32)
    adv = tl.zeros((BLOCK_T,), tl.float32)
    if SUM_LOG_RATIO > 0:
        x = tl.load(logp_ptr + idx, mask=inside, other=0.0).to(tl.float32) - old_logp
    if SUM_LOG_RATIO == 2:
        adv = tl.load(advantages_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        x, _ = _geo_log_ratio(x, adv, clip_low, clip_high)
    d = tl.zeros((BLOCK_T,), tl.float32)
    if SUM_ROLLOUT:
        d = old_logp - tl.load(rollout_logp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    s_x, s_m, s_d, s_a = _row_sum_terms(m, m != 0, x, d, adv)
    out = row_sums_ptr + pid.to(tl.int64) * 4
    tl.store(out + 0, s_x)
    tl.store(out + 1, s_m)
    tl.store(out + 2, s_d)
    tl.store(out + 3, s_a)


@triton.jit
def _rollout_weight(d, s_d, s_m, low, high, LEVEL: tl.constexpr, MASK: tl.constexpr):
    """(weight, filtered) of the rollout correction from d = old_logp − rollout_logp per token
    and the row sums Σ m·d, Σ m."""
    if LEVEL == 1:
        rho = tl.exp(tl.minimum(tl.maximum(d, -20.0), 20.0))
    elif LEVEL == 2:
        rho = tl.exp(tl.minimum(tl.maximum(s_d, -20.0), 20.0)) + tl.zeros_like(d)
    else:
        rho = tl.exp(s_d / tl.maximum(s_m, 1.0)) + tl.zeros_like(d)
    if MASK:
        keep = (rho >= low) & (rho <= high)
        return tl.where(keep, rho, 0.0), ~keep
    w = tl.minimum(tl.maximum(rho, low), high)
    return w, w != rho


@triton.jit
def _surrogate(logp, ratio, grad_ok, adv, clip_low, clip_high, dual_clip, tau_pos, tau_neg,
               LOSS: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr):  # fmt: skip
    """(l, ∂l/∂logp, clipped, lower) per token; ``grad_ok`` is False where a clamp holds the ratio."""
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    lower = tl.zeros(ratio.shape, tl.int1)
    if LOSS == 1:  # cispo: the clipped ratio is a constant weight on logp
        loss = -clipped_ratio * adv * logp
        dloss = -clipped_ratio * adv
        clipped = clipped_ratio != ratio
    elif LOSS == 2:  # sapo: a sigmoid gate in place of the clip
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        loss = -adv * gate * 4.0 / tau
        dloss = tl.where(grad_ok, -adv * 4.0 * gate * (1.0 - gate) * ratio, 0.0)
        clipped = lower
    else:
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * clipped_ratio
        clipped = pg_clipped > pg_unclipped
        loss = tl.maximum(pg_unclipped, pg_clipped)
        # The clipped branch, when strictly larger, is constant in logp; so is a clamped ratio.
        dloss = tl.where(clipped | ~grad_ok, 0.0, pg_unclipped)
        if HAS_DUAL_CLIP:
            floor = -adv * dual_clip
            lower = (adv < 0) & (loss > floor)
            loss = tl.where(lower, floor, loss)
            dloss = tl.where(lower, 0.0, dloss)
    return loss, dloss, clipped, lower


@triton.jit
def _ppo_policy_loss_fwd_kernel(
    logp_ptr,
    old_logp_ptr,
    advantages_ptr,
    mask_ptr,
    ref_logp_ptr,
    entropy_ptr,
    weights_ptr,
    rollout_logp_ptr,
    row_sums_ptr,
    dlogp_ptr,
    partials_ptr,
    clip_low,
    clip_high,
    dual_clip,
    kl_coef,
    entropy_coef,
    tau_pos,
    tau_neg,
    rollout_low,
    rollout_high,
    T,
    n_chunks,
    BLOCK_T: tl.constexpr,
    LOSS: tl.constexpr,
    SEQ_RATIO: tl.constexpr,
    ROW_SUMS: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ROLLOUT: tl.constexpr,
    ROLLOUT_MASK: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    N_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    row, idx, inside = chunk_of_row(pid, T, n_chunks, BLOCK_T)

    m = tl.load(mask_ptr + idx, mask=inside, other=0).to(tl.float32)
    counted = m != 0
    logp = tl.load(logp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    old_logp = tl.load(old_logp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    adv = tl.load(advantages_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    log_ratio = logp - old_logp
    d = tl.zeros((BLOCK_T,), tl.float32)  # old_logp − rollout_logp
    rollout_logp = old_logp
    if ROLLOUT > 0:
        rollout_logp = tl.load(rollout_logp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        d = old_logp - rollout_logp

    x = log_ratio  # what the row sums add up: the log-ratio, or GMPO's clipped one
    follows = log_ratio == log_ratio  # all True where it counts (NaN only in padding)
    if LOSS == 3:
        x, follows = _geo_log_ratio(log_ratio, adv, clip_low, clip_high)

    # Per-row sums (ROW_SUMS: 0 none, 1 this tile is the whole row, 2 from _row_sums_kernel).
    s_x = tl.zeros((), tl.float32)
    s_m = tl.zeros((), tl.float32)
    s_d = tl.zeros((), tl.float32)
    s_a = tl.zeros((), tl.float32)
    if ROW_SUMS == 1:
        s_x, s_m, s_d, s_a = _row_sum_terms(m, counted, x, d, adv)
    elif ROW_SUMS == 2:
        for c in range(0, n_chunks):
            part = row_sums_ptr + (row.to(tl.int64) * n_chunks + c) * 4
            s_x += tl.load(part + 0)
            s_m += tl.load(part + 1)
            s_d += tl.load(part + 2)
            s_a += tl.load(part + 3)

    if SEQ_RATIO or LOSS == 3:
        seq_log_ratio = s_x / tl.maximum(s_m, 1.0) + tl.zeros((BLOCK_T,), tl.float32)  # one per token
        bound = 10.0 if SEQ_RATIO else 20.0
        ratio = tl.exp(tl.minimum(seq_log_ratio, bound))
        grad_ok = seq_log_ratio <= bound
    else:
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
        grad_ok = tl.abs(log_ratio) <= 20.0
    if LOSS == 3:  # GMPO-token: each token carries its row's −Ā·ρ, with ∂ρ/∂logpₜ = ρ where xₜ follows logp
        mean_adv = s_a / tl.maximum(s_m, 1.0)
        loss = -mean_adv * ratio
        dloss = tl.where(grad_ok & follows, loss, 0.0)
        outside = (log_ratio > clip_high) | (log_ratio < -clip_low)
        clipped = outside & (adv > 0)
        lower = outside & (adv < 0)
    else:
        loss, dloss, clipped, lower = _surrogate(
            logp, ratio, grad_ok, adv, clip_low, clip_high, dual_clip, tau_pos, tau_neg, LOSS, HAS_DUAL_CLIP
        )

    weight = tl.full((BLOCK_T,), 1.0, tl.float32)
    if HAS_WEIGHTS:
        weight = tl.load(weights_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    is_weight = weight
    filtered = tl.zeros((BLOCK_T,), tl.int1)
    if ROLLOUT > 0:
        is_weight, filtered = _rollout_weight(d, s_d, s_m, rollout_low, rollout_high, ROLLOUT, ROLLOUT_MASK)
        weight *= is_weight
    if HAS_WEIGHTS or ROLLOUT > 0:
        loss *= weight
        dloss *= weight

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
    if ROLLOUT > 0:
        k3, _ = kl_estimate(-d, 0.0, 2, False)  # k3 of the sampler against the trainer
        tl.store(part + 9, tl.sum(tl.where(counted, m * is_weight, 0.0), axis=0))
        tl.store(part + 10, tl.sum(tl.where(counted & filtered, m, 0.0), axis=0))
        tl.store(part + 11, tl.sum(tl.where(counted, -m * d, 0.0), axis=0))
        tl.store(part + 12, tl.sum(tl.where(counted, m * k3, 0.0), axis=0))
    else:
        for j in tl.static_range(9, N_STATS):
            tl.store(part + j, 0.0)


def _row_sums(
    logp, old_logp, advantages, rollout_logp, mask, clips, block_t, n_chunks, *, log_ratio, rollout
):
    """Per-(row, chunk) sums for rows longer than one chunk (``_ROW_COLUMNS`` each), or None.
    ``log_ratio``: 0 none, 1 the log-ratio, 2 GMPO's clipped log-ratio (and the advantages)."""
    B, T = logp.shape
    if not (log_ratio or rollout) or n_chunks == 1:
        return None
    row_sums = torch.empty((B * n_chunks, _ROW_COLUMNS), dtype=torch.float32, device=logp.device)
    _row_sums_kernel[(B * n_chunks,)](
        logp, old_logp, advantages, rollout_logp if rollout else old_logp, mask, row_sums,
        *clips, T, n_chunks,
        BLOCK_T=block_t, SUM_LOG_RATIO=log_ratio, SUM_ROLLOUT=rollout, num_warps=4 if block_t <= 1024 else 8,
    )  # fmt: skip
    return row_sums


def ppo_policy_loss_fwd(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    weights: torch.Tensor | None,
    rollout_logp: torch.Tensor | None,
    *,
    loss: str,
    ratio_level: str,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    sapo_tau: tuple[float, float],
    rollout_level: str | None,
    rollout_mask: bool,
    rollout_bounds: tuple[float, float],
    agg: str,
    store_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """All inputs (B, T) contiguous, mask any numeric dtype. Returns the loss (0-d), ``out``
    (len(STATS),) fp32, the stored ∂l/∂logp (B, T) fp32 (or None) and ``row_scale`` (B,)."""
    B, T = logp.shape
    block_t, n_chunks = chunking(max(T, 1))
    partials = torch.empty((B * n_chunks, len(STATS)), dtype=torch.float32, device=logp.device)
    dlogp = torch.empty((B, T), dtype=torch.float32, device=logp.device) if store_grad else None
    seq_ratio = ratio_level == "sequence"
    row_log_ratio = 2 if loss == "geo_mean" else int(seq_ratio)
    seq_rollout = rollout_level in ("sequence", "geometric")
    if B * T:
        row_sums = _row_sums(
            logp, old_logp, advantages, rollout_logp, mask, (clip_low, clip_high), block_t, n_chunks,
            log_ratio=row_log_ratio, rollout=seq_rollout,
        )  # fmt: skip
        row_mode = 0 if not (row_log_ratio or seq_rollout) else (1 if row_sums is None else 2)
        _ppo_policy_loss_fwd_kernel[(B * n_chunks,)](
            logp, old_logp, advantages, mask,
            ref_logp if ref_logp is not None else logp,
            entropy if entropy is not None else logp,
            weights if weights is not None else logp,
            rollout_logp if rollout_logp is not None else logp,
            row_sums if row_sums is not None else partials,
            dlogp if store_grad else logp,
            partials,
            clip_low, clip_high, 0.0 if dual_clip is None else dual_clip, kl_coef, entropy_coef,
            sapo_tau[0], sapo_tau[1], rollout_bounds[0], rollout_bounds[1],
            T, n_chunks,
            BLOCK_T=block_t, LOSS=LOSSES[loss], SEQ_RATIO=seq_ratio, ROW_SUMS=row_mode,
            HAS_DUAL_CLIP=dual_clip is not None, HAS_KL=ref_logp is not None,
            KL_ESTIMATOR=ESTIMATORS[kl_estimator], HAS_ENTROPY=entropy is not None,
            HAS_WEIGHTS=weights is not None, ROLLOUT=ROLLOUT_LEVELS.get(rollout_level, 0),
            ROLLOUT_MASK=rollout_mask, STORE_GRAD=store_grad,
            N_STATS=len(STATS), num_warps=4 if block_t <= 1024 else 8,
        )  # fmt: skip
    else:
        partials.zero_()
    loss_value, out, row_scale = masked_agg_reduce(partials, B, n_chunks, agg=agg, max_col=_RATIO_MAX)
    return loss_value, out, dlogp, row_scale


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
