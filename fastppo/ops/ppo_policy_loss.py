"""``fastppo.ppo_policy_loss``: the PPO clipped surrogate and its family (GSPO, CISPO, SAPO, rollout
correction), fused, with its statistics.

Layers: kernels in ``fastppo.kernels.ppo_policy_loss`` (and ``masked_reduce``) →
``PPOPolicyLossFunction`` → ``ppo_policy_loss``. The reference, and the math of every option, is
``fastppo.reference.policy_loss``.
"""

import math

import torch
from torch.autograd.function import once_differentiable

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import (
    check_choice,
    check_cu_seqlens,
    check_finite,
    check_positive,
    check_token_tensors,
)
from fastppo.reference import POLICY_LOSSES, RATIO_LEVELS, RolloutCorrection


class PPOPolicyLossFunction(torch.autograd.Function):
    """forward(logp, old_logp, advantages, mask, ref_logp, entropy, weights, rollout_logp, layout,
    options, store_grad) -> loss (0-d), out (len(STATS),); inputs contiguous, (B, T) or packed (N,)
    as ``layout`` (``fastppo.kernels.masked_reduce.TokenLayout``) says."""

    @staticmethod
    def forward(
        ctx,
        logp,
        old_logp,
        advantages,
        mask,
        ref_logp,
        entropy,
        weights,
        rollout_logp,
        layout,
        options,
        store_grad,
    ):
        from fastppo.ops._library import ppo_policy_loss_fwd

        loss, out, dlogp, row_scale = ppo_policy_loss_fwd(
            logp, old_logp, advantages, mask, ref_logp, entropy, weights, rollout_logp, layout,
            **options, store_grad=store_grad,
        )  # fmt: skip
        ctx.save_for_backward(dlogp, row_scale, mask)
        ctx.layout = layout
        ctx.entropy_coef = options["entropy_coef"]
        ctx.logp_dtype = logp.dtype
        ctx.entropy_dtype = entropy.dtype if entropy is not None else None
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_out):
        from fastppo.ops._library import ppo_policy_loss_bwd

        dlogp, row_scale, mask = ctx.saved_tensors
        grad_logp, grad_entropy = ppo_policy_loss_bwd(
            grad_loss,
            dlogp if ctx.needs_input_grad[0] else None,
            row_scale,
            mask,
            ctx.layout,
            entropy_coef=ctx.entropy_coef,
            logp_dtype=ctx.logp_dtype,
            entropy_dtype=ctx.entropy_dtype if ctx.needs_input_grad[5] else None,
        )
        return grad_logp, None, None, None, None, grad_entropy, None, None, None, None, None


def _check_options(loss, ratio_level, clip_low, clip_high, dual_clip, sapo_tau, rollout_correction):
    """Validated (clip_low, clip_high, sapo_tau) of the family's options."""
    check_choice("loss", loss, POLICY_LOSSES)
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    clip_low = math.inf if clip_low == math.inf else check_positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else check_positive("clip_high", clip_high)
    if clip_high == math.inf:
        raise ValueError("clip_high must be finite (give it when clip_low is math.inf)")
    if dual_clip is not None:
        if check_finite("dual_clip", dual_clip) <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
        if loss != "clip":
            raise ValueError(f"dual_clip applies to loss='clip' only, got loss={loss!r}")
    if loss == "geo_mean" and ratio_level != "token":
        raise ValueError("loss='geo_mean' has its own sequence ratio: leave ratio_level='token'")
    if not (isinstance(sapo_tau, (tuple, list)) and len(sapo_tau) == 2):
        raise ValueError(f"sapo_tau must be a pair (tau_pos, tau_neg), got {sapo_tau!r}")
    sapo_tau = (check_positive("sapo_tau[0]", sapo_tau[0]), check_positive("sapo_tau[1]", sapo_tau[1]))
    if rollout_correction is not None and not isinstance(rollout_correction, RolloutCorrection):
        raise TypeError(
            f"rollout_correction must be a RolloutCorrection, got {type(rollout_correction).__name__}"
        )
    return clip_low, clip_high, sapo_tau


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss: str = "clip",
    ratio_level: str = "token",
    sapo_tau: tuple[float, float] = (1.0, 1.05),
    weights: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    rollout_correction: RolloutCorrection | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss family in one pass over the tokens (plus a tiny deterministic reduction).

    Per token, with the ratio r (``ratio_level``) and A the advantage (full math:
    ``fastppo.reference.policy_loss``):

    - ``loss="clip"``: ``l = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))``; with
      ``dual_clip`` c > 1, ``l = min(l, −A·c)`` where A < 0 (PPO; GSPO with the sequence ratio).
    - ``loss="cispo"``: ``l = −sg[clip(r, 1 − clip_low, 1 + clip_high)]·A·logp``.
    - ``loss="sapo"``: ``l = −A·σ(τ·(r − 1))·4/τ``, τ = ``sapo_tau[0]`` where A > 0, else ``[1]``.
    - ``loss="geo_mean"`` (GMPO): each token carries its sequence's ``−Ā·exp(mean of the log-ratio
      clipped to [−clip_low, clip_high] on the side the advantage's sign makes optimistic)``.

    ``ratio_level="token"``: r = exp(clamp(logp − old_logp, ±20)); ``"sequence"``: GSPO's sequence
    ratio exp(min(mean over the row's masked tokens of (logp − old_logp), 10)) with the per-token
    gradient of the GSPO-token form. Then ``l ×= weights`` and, with ``rollout_logp``, by the
    rollout-correction weight (``RolloutCorrection``: token / sequence / geometric importance weights
    π_old/π_rollout, truncated or masked); then ``+ kl_coef·kl(logp, ref_logp) − entropy_coef·entropy``.

    Args:
        logp: ``(B, T)`` or ``(N,)`` log-probs under the current policy (receives the gradient).
        old_logp, advantages: same shape; constants (no gradient flows to them).
        mask: same shape, bool/int/float; 1 (or a weight) for tokens that count.
        clip_low, clip_high: ratio clip; ``clip_high`` defaults to ``clip_low``. Both > 0;
            ``clip_low=math.inf`` (with a finite ``clip_high``) clips from above only.
        dual_clip: c > 1 bounds the loss of negative-advantage tokens at −A·c (``loss="clip"``).
        agg: "token-mean", "token-sum", "seq-mean-token-sum" or "seq-mean-token-mean" (rows with
            no tokens are left out; a flat ``(N,)`` input is one row unless ``cu_seqlens`` is given).
        ref_logp: reference log-probs (a constant) for the KL term, with ``kl_coef`` ≥ 0 and
            ``kl_estimator`` (as in ``kl_penalty``).
        entropy: per-token entropy (receives the gradient −entropy_coef per token weight).
        loss, ratio_level, sapo_tau: the family member (above).
        weights: per-token constant weights on the policy term (e.g. precomputed IS weights).
        rollout_logp: the sampler's log-probs (a constant), with ``rollout_correction``
            (default ``RolloutCorrection()``: token-level TIS at 2).
        cu_seqlens: ``(S + 1,)`` int boundaries of S packed sequences in ``(N,)`` inputs: each is
            a row (for the sequence ratio, the sequence rollout weight and the seq aggregations).
            The kernels read the packed tokens in place: no padded copy, no host read (its
            values are checked with ``torch._assert_async``).

    Returns:
        ``(loss, stats)``: the fp32 0-d loss and a dict of 0-d fp32 tensors (no host sync):
        clipfrac, clipfrac_lower, approx_kl (mean of old_logp − logp), ratio_mean, ratio_max,
        kl (with ref_logp), entropy (with entropy), and with ``rollout_logp``: is_weight_mean,
        is_filtered (fraction truncated or masked), rollout_kl (mean of rollout_logp − old_logp)
        and rollout_kl_k3 — masked token means. An all-zero mask gives 0 everywhere, never NaN.
    """
    shape = check_token_tensors(
        logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, entropy=entropy,
        weights=weights, rollout_logp=rollout_logp,
    )  # fmt: skip
    clip_low, clip_high, sapo_tau = _check_options(
        loss, ratio_level, clip_low, clip_high, dual_clip, sapo_tau, rollout_correction
    )
    check_choice("agg", agg, reference.AGGREGATIONS)
    check_choice("kl_estimator", kl_estimator, reference.KL_ESTIMATORS)
    if check_finite("kl_coef", kl_coef) < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    if check_finite("entropy_coef", entropy_coef) != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if rollout_correction is not None and rollout_logp is None:
        raise ValueError("rollout_correction needs rollout_logp")
    if cu_seqlens is not None:
        cu_seqlens = check_cu_seqlens(cu_seqlens, shape, logp.device)
    rc = rollout_correction or RolloutCorrection()
    options = dict(
        loss=loss,
        ratio_level=ratio_level,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        kl_coef=float(kl_coef),
        kl_estimator=kl_estimator,
        entropy_coef=float(entropy_coef),
        sapo_tau=sapo_tau,
    )
    if not use_triton(logp):
        return reference.ppo_policy_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy, weights=weights,
            rollout_logp=rollout_logp, rollout_correction=rollout_correction, cu_seqlens=cu_seqlens,
            **options,
        )  # fmt: skip

    from fastppo.kernels.masked_reduce import token_layout
    from fastppo.kernels.ppo_policy_loss import STATS

    contiguous = lambda x: None if x is None else x.contiguous()  # noqa: E731
    store_grad = torch.is_grad_enabled() and logp.requires_grad
    options.update(
        rollout_level=rc.level if rollout_logp is not None else None,
        rollout_mask=rc.mode == "mask",
        rollout_bounds=(rc.lower, float(rc.high)),
    )
    loss_value, out = PPOPolicyLossFunction.apply(
        *map(contiguous, (logp, old_logp, advantages, mask, ref_logp, entropy, weights, rollout_logp)),
        token_layout(shape, cu_seqlens),
        options,
        store_grad,
    )
    names = ["clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max"]
    names += ["kl"] if ref_logp is not None else []
    names += ["entropy"] if entropy is not None else []
    names += (
        ["is_weight_mean", "is_filtered", "rollout_kl", "rollout_kl_k3"] if rollout_logp is not None else []
    )
    return loss_value, {name: out[STATS.index(name)] for name in names}
