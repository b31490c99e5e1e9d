"""Fused policy loss (PPO clip, GSPO, CISPO, SAPO, GMPO, rollout correction): Triton kernels and
launchers.

The tokens are padded (B, T) or packed (N,) with ``cu_seqlens``, read in place (``masked_reduce``'s
layout: each sequence's programs walk the BLOCK-aligned blocks that overlap it, with 16-byte
loads, and keep its own tokens). Each block's logp, old_logp, advantages and mask (plus ref_logp,
entropy, weights and rollout_logp when given) are read once; the kernel writes the per-token
derivative ∂l/∂logp (masked, fp32) and one row of partial sums per program, which
``masked_reduce`` aggregates in a fixed order. The math is ``fastppo.reference.policy_loss``'s
docstring. Every per-token derivative is local (GSPO's and GMPO's token forms have the sequence
ratio as a constant value and ∂r/∂logpₜ = r), so the backward is the stored derivative scaled per
sequence.

Sequence-level quantities (GSPO's mean log-ratio, GMPO's clipped one and mean advantage, the
sequence rollout weight) need per-sequence sums before the per-token pass: with one program per
sequence it sums them in a first loop over its blocks (``RowSums.in_program``); with several,
``_row_sums_kernel`` writes one partial per program and each program adds its sequence's in
part order (``RowSums.partials``). Both orders are fixed: the results are deterministic.
"""

import torch
import triton
import triton.language as tl

from ._common import block_offsets, codes, load_block
from .kl_penalty import ESTIMATORS, Estimator, kl_estimate
from .masked_reduce import (
    TokenLayout,
    masked_agg_reduce,
    program_blocks,
    scale_rows,
)

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
Stat = codes("Stat", STATS)

#: Codes the kernels switch on (constexprs: one compiled variant each).
Loss = codes("Loss", ("clip", "cispo", "sapo", "geo_mean"))
Rollout = codes("Rollout", ("none", "token", "sequence", "geometric"))
#: What the per-sequence sums add up as x: nothing, the log-ratio (GSPO), GMPO's clipped one.
RowX = codes("RowX", ("none", "log_ratio", "geo_mean"))
#: Where the main kernel gets the per-sequence sums.
RowSums = codes("RowSums", ("none", "in_program", "partials"))
#: Per-sequence sums: Σ m·x, Σ m, Σ m·(old_logp − rollout_logp), Σ m·A.
RowCol = codes("RowCol", ("x", "tokens", "rollout", "adv"))
ROW_COLUMNS: tl.constexpr = tl.constexpr(len(RowCol))


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
def _block_row_sums(logp_ptr, old_logp_ptr, advantages_ptr, rollout_logp_ptr, mask_ptr, offs, inside, N, full,
                    clip_low, clip_high, ROW_X: tl.constexpr, SUM_ROLLOUT: tl.constexpr):  # fmt: skip
    """One block's contribution to its sequence's sums (``RowCol`` order), outside tokens 0."""
    m = tl.where(inside, load_block(mask_ptr, offs, N, full), 0.0)
    counted = m != 0
    old_logp = load_block(old_logp_ptr, offs, N, full)
    x = tl.zeros(m.shape, tl.float32)
    adv = tl.zeros(m.shape, tl.float32)
    d = tl.zeros(m.shape, tl.float32)
    if ROW_X != RowX.none:
        x = load_block(logp_ptr, offs, N, full) - old_logp
    if ROW_X == RowX.geo_mean:
        adv = load_block(advantages_ptr, offs, N, full)
        x, _ = _geo_log_ratio(x, adv, clip_low, clip_high)
    if SUM_ROLLOUT:
        d = old_logp - load_block(rollout_logp_ptr, offs, N, full)
    # where, not a product: tokens outside the sequence may hold inf or NaN, and 0·inf is NaN.
    s_x = tl.sum(tl.where(counted, m * x, 0.0), axis=0)
    s_d = tl.sum(tl.where(counted, m * d, 0.0), axis=0)
    s_a = tl.sum(tl.where(counted, m * adv, 0.0), axis=0)
    return s_x, tl.sum(m, axis=0), s_d, s_a


@triton.jit
def _program_row_sums(logp_ptr, old_logp_ptr, advantages_ptr, rollout_logp_ptr, mask_ptr, cu_seqlens_ptr,
                      clip_low, clip_high, T, N, parts, BLOCK: tl.constexpr, PACKED: tl.constexpr,
                      ROW_X: tl.constexpr, SUM_ROLLOUT: tl.constexpr):  # fmt: skip
    """This program's share of its sequence's sums, its blocks added in order."""
    pid = tl.program_id(0)
    _, part, start, end, first, n_blocks = program_blocks(pid, cu_seqlens_ptr, T, N, parts, BLOCK, PACKED)
    s_x = tl.zeros((), tl.float32)
    s_m = tl.zeros((), tl.float32)
    s_d = tl.zeros((), tl.float32)
    s_a = tl.zeros((), tl.float32)
    for k in range(part, n_blocks, parts):
        offs, inside, full = block_offsets(first, k, start, end, N, BLOCK)
        b_x, b_m, b_d, b_a = _block_row_sums(
            logp_ptr, old_logp_ptr, advantages_ptr, rollout_logp_ptr, mask_ptr, offs, inside, N, full,
            clip_low, clip_high, ROW_X, SUM_ROLLOUT,
        )  # fmt: skip
        s_x += b_x
        s_m += b_m
        s_d += b_d
        s_a += b_a
    return s_x, s_m, s_d, s_a


@triton.jit
def _row_sums_kernel(
    logp_ptr,
    old_logp_ptr,
    advantages_ptr,
    rollout_logp_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    row_sums_ptr,
    clip_low,
    clip_high,
    T,
    N,
    parts,
    BLOCK: tl.constexpr,
    PACKED: tl.constexpr,
    ROW_X: tl.constexpr,
    SUM_ROLLOUT: tl.constexpr,
):
    sums = _program_row_sums(
        logp_ptr, old_logp_ptr, advantages_ptr, rollout_logp_ptr, mask_ptr, cu_seqlens_ptr,
        clip_low, clip_high, T, N, parts, BLOCK, PACKED, ROW_X, SUM_ROLLOUT,
    )  # fmt: skip
    out = row_sums_ptr + tl.program_id(0).to(tl.int64) * ROW_COLUMNS
    tl.store(out + RowCol.x, sums[0])
    tl.store(out + RowCol.tokens, sums[1])
    tl.store(out + RowCol.rollout, sums[2])
    tl.store(out + RowCol.adv, sums[3])


@triton.jit
def _sequence_sums(row_sums_ptr, seq, parts):
    """A sequence's sums from its programs' partials, added in part order."""
    s_x = tl.zeros((), tl.float32)
    s_m = tl.zeros((), tl.float32)
    s_d = tl.zeros((), tl.float32)
    s_a = tl.zeros((), tl.float32)
    for c in range(0, parts):
        part = row_sums_ptr + (seq.to(tl.int64) * parts + c) * ROW_COLUMNS
        s_x += tl.load(part + RowCol.x)
        s_m += tl.load(part + RowCol.tokens)
        s_d += tl.load(part + RowCol.rollout)
        s_a += tl.load(part + RowCol.adv)
    return s_x, s_m, s_d, s_a


@triton.jit
def _rollout_weight(d, s_d, s_m, low, high, LEVEL: tl.constexpr, MASK: tl.constexpr):
    """(weight, filtered) of the rollout correction from d = old_logp − rollout_logp per token
    and the row sums Σ m·d, Σ m."""
    if LEVEL == Rollout.token:
        rho = tl.exp(tl.minimum(tl.maximum(d, -20.0), 20.0))
    elif LEVEL == Rollout.sequence:
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
    if LOSS == Loss.cispo:  # the clipped ratio is a constant weight on logp
        loss = -clipped_ratio * adv * logp
        dloss = -clipped_ratio * adv
        clipped = clipped_ratio != ratio
    elif LOSS == Loss.sapo:  # a sigmoid gate in place of the clip
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
def _policy_terms(logp, old_logp, adv, rollout_logp, weight, s_x, s_m, s_d, s_a, clip_low, clip_high,
                  dual_clip, tau_pos, tau_neg, rollout_low, rollout_high, LOSS: tl.constexpr,
                  SEQ_RATIO: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                  ROLLOUT: tl.constexpr, ROLLOUT_MASK: tl.constexpr):  # fmt: skip
    """Per token: the weighted policy loss l, ∂l/∂logp, the ratio, clipped, lower, the rollout
    weight and filtered, from the block's values and its sequence's sums."""
    log_ratio = logp - old_logp
    follows = log_ratio == log_ratio  # all True where it counts (NaN only outside the sequence)
    if LOSS == Loss.geo_mean:
        _, follows = _geo_log_ratio(log_ratio, adv, clip_low, clip_high)
    if SEQ_RATIO or LOSS == Loss.geo_mean:
        seq_log_ratio = s_x / tl.maximum(s_m, 1.0) + tl.zeros_like(logp)  # one per token
        bound = 10.0 if SEQ_RATIO else 20.0
        ratio = tl.exp(tl.minimum(seq_log_ratio, bound))
        grad_ok = seq_log_ratio <= bound
    else:
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
        grad_ok = tl.abs(log_ratio) <= 20.0
    if LOSS == Loss.geo_mean:  # GMPO-token: each token carries −Ā·ρ, ∂ρ/∂logpₜ = ρ where xₜ follows logp
        loss = -(s_a / tl.maximum(s_m, 1.0)) * ratio
        dloss = tl.where(grad_ok & follows, loss, 0.0)
        outside = (log_ratio > clip_high) | (log_ratio < -clip_low)
        clipped = outside & (adv > 0)
        lower = outside & (adv < 0)
    else:
        loss, dloss, clipped, lower = _surrogate(
            logp, ratio, grad_ok, adv, clip_low, clip_high, dual_clip, tau_pos, tau_neg, LOSS, HAS_DUAL_CLIP
        )
    is_weight = weight
    filtered = tl.zeros(logp.shape, tl.int1)
    if ROLLOUT != Rollout.none:
        d = old_logp - rollout_logp
        is_weight, filtered = _rollout_weight(d, s_d, s_m, rollout_low, rollout_high, ROLLOUT, ROLLOUT_MASK)
        weight *= is_weight
    if HAS_WEIGHTS or ROLLOUT != Rollout.none:
        loss *= weight
        dloss *= weight
    return loss, dloss, ratio, clipped, lower, is_weight, filtered


@triton.jit
def _msum(counted, m, x):
    """Σ m·x over the counted tokens (where, not a product: others may hold inf or NaN)."""
    return tl.sum(tl.where(counted, m * x, 0.0), axis=0)


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
    cu_seqlens_ptr,
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
    N,
    parts,
    BLOCK: tl.constexpr,
    PACKED: tl.constexpr,
    LOSS: tl.constexpr,
    SEQ_RATIO: tl.constexpr,
    ROW_X: tl.constexpr,
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
    seq, part, start, end, first, n_blocks = program_blocks(pid, cu_seqlens_ptr, T, N, parts, BLOCK, PACKED)
    seq_rollout = ROLLOUT == Rollout.sequence or ROLLOUT == Rollout.geometric
    s_x = tl.zeros((), tl.float32)
    s_m = tl.zeros((), tl.float32)
    s_d = tl.zeros((), tl.float32)
    s_a = tl.zeros((), tl.float32)
    if ROW_SUMS == RowSums.in_program:  # this program holds the whole sequence: a first loop
        s_x, s_m, s_d, s_a = _program_row_sums(
            logp_ptr, old_logp_ptr, advantages_ptr, rollout_logp_ptr, mask_ptr, cu_seqlens_ptr,
            clip_low, clip_high, T, N, parts, BLOCK, PACKED, ROW_X, seq_rollout,
        )  # fmt: skip
    elif ROW_SUMS == RowSums.partials:
        s_x, s_m, s_d, s_a = _sequence_sums(row_sums_ptr, seq, parts)

    acc_loss = tl.zeros((), tl.float32)
    acc_m = tl.zeros((), tl.float32)
    acc_clipped = tl.zeros((), tl.float32)
    acc_lower = tl.zeros((), tl.float32)
    acc_approx_kl = tl.zeros((), tl.float32)
    acc_ratio = tl.zeros((), tl.float32)
    max_ratio = tl.zeros((), tl.float32)
    acc_kl = tl.zeros((), tl.float32)
    acc_entropy = tl.zeros((), tl.float32)
    acc_is_weight = tl.zeros((), tl.float32)
    acc_filtered = tl.zeros((), tl.float32)
    acc_rollout_kl = tl.zeros((), tl.float32)
    acc_rollout_k3 = tl.zeros((), tl.float32)
    for k in range(part, n_blocks, parts):
        offs, inside, full = block_offsets(first, k, start, end, N, BLOCK)
        m = tl.where(inside, load_block(mask_ptr, offs, N, full), 0.0)
        counted = m != 0
        logp = load_block(logp_ptr, offs, N, full)
        old_logp = load_block(old_logp_ptr, offs, N, full)
        adv = load_block(advantages_ptr, offs, N, full)
        rollout_logp = old_logp
        if ROLLOUT != Rollout.none:
            rollout_logp = load_block(rollout_logp_ptr, offs, N, full)
        weight = tl.full((BLOCK,), 1.0, tl.float32)
        if HAS_WEIGHTS:
            weight = load_block(weights_ptr, offs, N, full)
        loss, dloss, ratio, clipped, lower, is_weight, filtered = _policy_terms(
            logp, old_logp, adv, rollout_logp, weight, s_x, s_m, s_d, s_a, clip_low, clip_high, dual_clip,
            tau_pos, tau_neg, rollout_low, rollout_high, LOSS, SEQ_RATIO, HAS_DUAL_CLIP, HAS_WEIGHTS, ROLLOUT,
            ROLLOUT_MASK,
        )  # fmt: skip
        if HAS_KL:
            kl, dkl = kl_estimate(logp - load_block(ref_logp_ptr, offs, N, full), 0.0, KL_ESTIMATOR, False)
            loss += kl_coef * kl
            dloss += kl_coef * dkl
            acc_kl += _msum(counted, m, kl)
        if HAS_ENTROPY:
            entropy = load_block(entropy_ptr, offs, N, full)
            loss -= entropy_coef * entropy
            acc_entropy += _msum(counted, m, entropy)
        if STORE_GRAD:
            tl.store(dlogp_ptr + offs, tl.where(counted, m * dloss, 0.0), mask=inside)
        acc_loss += _msum(counted, m, loss)
        acc_m += tl.sum(m, axis=0)
        acc_clipped += tl.sum(tl.where(counted & clipped, m, 0.0), axis=0)
        acc_lower += tl.sum(tl.where(counted & lower, m, 0.0), axis=0)
        acc_approx_kl += _msum(counted, m, old_logp - logp)
        acc_ratio += _msum(counted, m, ratio)
        max_ratio = tl.maximum(max_ratio, tl.max(tl.where(counted, ratio, 0.0), axis=0))
        if ROLLOUT != Rollout.none:
            d = old_logp - rollout_logp
            k3, _ = kl_estimate(-d, 0.0, Estimator.k3, False)  # k3 of the sampler against the trainer
            acc_is_weight += _msum(counted, m, is_weight)
            acc_filtered += tl.sum(tl.where(counted & filtered, m, 0.0), axis=0)
            acc_rollout_kl += _msum(counted, m, -d)
            acc_rollout_k3 += _msum(counted, m, k3)

    out = partials_ptr + pid.to(tl.int64) * N_STATS
    tl.store(out + Stat.loss, acc_loss)
    tl.store(out + Stat.tokens, acc_m)
    tl.store(out + Stat.clipfrac, acc_clipped)
    tl.store(out + Stat.clipfrac_lower, acc_lower)
    tl.store(out + Stat.approx_kl, acc_approx_kl)
    tl.store(out + Stat.ratio_mean, acc_ratio)
    tl.store(out + Stat.ratio_max, max_ratio)
    tl.store(out + Stat.kl, acc_kl)
    tl.store(out + Stat.entropy, acc_entropy)
    tl.store(out + Stat.is_weight_mean, acc_is_weight)
    tl.store(out + Stat.is_filtered, acc_filtered)
    tl.store(out + Stat.rollout_kl, acc_rollout_kl)
    tl.store(out + Stat.rollout_kl_k3, acc_rollout_k3)


def _row_sums(logp, old_logp, advantages, rollout_logp, mask, layout, clips, *, row_x, rollout):
    """(RowSums mode, partial per-sequence sums or None): none needed, one program per sequence
    (it sums its own), or ``_row_sums_kernel``'s (programs, len(RowCol)) partials."""
    if not (row_x or rollout):
        return RowSums.none, None
    if layout.parts == 1:
        return RowSums.in_program, None
    row_sums = torch.empty((layout.programs, len(RowCol)), dtype=torch.float32, device=logp.device)
    _row_sums_kernel[(layout.programs,)](
        logp, old_logp, advantages, rollout_logp if rollout else old_logp, mask, layout.cu_seqlens_or(logp),
        row_sums, *clips, *layout.sizes, ROW_X=row_x, SUM_ROLLOUT=rollout, **layout.constexprs,
    )  # fmt: skip
    return RowSums.partials, row_sums


def ppo_policy_loss_fwd(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    weights: torch.Tensor | None,
    rollout_logp: torch.Tensor | None,
    layout: TokenLayout,
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
    """All inputs contiguous with N tokens in ``layout`` ((B, T) or packed (N,)), mask any numeric
    dtype. Returns the loss (0-d), ``out`` (len(STATS),) fp32, the stored ∂l/∂logp (logp's shape)
    fp32 (or None) and ``row_scale`` (S,)."""
    partials = torch.zeros((layout.programs, len(STATS)), dtype=torch.float32, device=logp.device)
    dlogp = torch.empty(logp.shape, dtype=torch.float32, device=logp.device) if store_grad else None
    seq_ratio = ratio_level == "sequence"
    row_x = RowX.geo_mean if loss == "geo_mean" else (RowX.log_ratio if seq_ratio else RowX.none)
    rollout = Rollout.of(rollout_level or "none", "rollout_level")
    if layout.n_tokens and layout.programs:
        seq_rollout = rollout in (Rollout.sequence, Rollout.geometric)
        row_mode, row_sums = _row_sums(
            logp, old_logp, advantages, rollout_logp, mask, layout, (clip_low, clip_high),
            row_x=row_x, rollout=seq_rollout,
        )  # fmt: skip
        _ppo_policy_loss_fwd_kernel[(layout.programs,)](
            logp, old_logp, advantages, mask,
            ref_logp if ref_logp is not None else logp,
            entropy if entropy is not None else logp,
            weights if weights is not None else logp,
            rollout_logp if rollout_logp is not None else logp,
            layout.cu_seqlens_or(logp),
            row_sums if row_sums is not None else partials,
            dlogp if store_grad else logp,
            partials,
            clip_low, clip_high, 0.0 if dual_clip is None else dual_clip, kl_coef, entropy_coef,
            sapo_tau[0], sapo_tau[1], rollout_bounds[0], rollout_bounds[1],
            *layout.sizes,
            LOSS=Loss.of(loss, "loss"), SEQ_RATIO=seq_ratio, ROW_X=row_x, ROW_SUMS=row_mode,
            HAS_DUAL_CLIP=dual_clip is not None, HAS_KL=ref_logp is not None,
            KL_ESTIMATOR=ESTIMATORS[kl_estimator], HAS_ENTROPY=entropy is not None,
            HAS_WEIGHTS=weights is not None, ROLLOUT=rollout, ROLLOUT_MASK=rollout_mask,
            STORE_GRAD=store_grad, N_STATS=len(STATS), **layout.constexprs,
        )  # fmt: skip
    loss_value, out, row_scale = masked_agg_reduce(
        partials, layout.n_seqs, layout.parts, agg=agg, max_col=Stat.ratio_max
    )
    return loss_value, out, dlogp, row_scale


def ppo_policy_loss_bwd(
    grad_loss: torch.Tensor,
    dlogp: torch.Tensor | None,
    row_scale: torch.Tensor,
    mask: torch.Tensor,
    layout: TokenLayout,
    *,
    entropy_coef: float,
    logp_dtype: torch.dtype,
    entropy_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. logp and entropy (their shape): the stored derivative (resp.
    −entropy_coef·m) scaled by the upstream gradient and each sequence's weight in the loss."""
    grad_logp = None
    if dlogp is not None:
        grad_logp = scale_rows(dlogp, grad_loss, row_scale, layout, factor=1.0, out_dtype=logp_dtype)
    grad_entropy = None
    if entropy_dtype is not None:
        grad_entropy = scale_rows(
            mask, grad_loss, row_scale, layout, factor=-entropy_coef, out_dtype=entropy_dtype
        )
    return grad_logp, grad_entropy
