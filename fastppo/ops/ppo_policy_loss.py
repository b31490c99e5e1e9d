"""``fastppo.ppo_policy_loss``: the PPO clipped surrogate loss, fused, with its statistics.

Layers: kernels in ``fastppo.kernels.ppo_policy_loss`` (and ``masked_reduce``) →
``PPOPolicyLossFunction`` → ``ppo_policy_loss``. The reference is
``fastppo.reference.ppo_policy_loss``.
"""

import torch
from torch.autograd.function import once_differentiable

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import check_choice, check_finite, check_positive, check_token_tensors


class PPOPolicyLossFunction(torch.autograd.Function):
    """forward(logp, old_logp, advantages, mask, ref_logp, entropy, options, store_grad)
    -> loss (0-d), out (len(STATS),); inputs (B, T) contiguous."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, ref_logp, entropy, options, store_grad):
        from fastppo.kernels.ppo_policy_loss import ppo_policy_loss_fwd

        loss, out, dlogp, row_scale = ppo_policy_loss_fwd(
            logp, old_logp, advantages, mask, ref_logp, entropy, **options, store_grad=store_grad
        )
        ctx.save_for_backward(dlogp, row_scale, mask)
        ctx.entropy_coef = options["entropy_coef"]
        ctx.logp_dtype = logp.dtype
        ctx.entropy_dtype = entropy.dtype if entropy is not None else None
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_out):
        from fastppo.kernels.ppo_policy_loss import ppo_policy_loss_bwd

        dlogp, row_scale, mask = ctx.saved_tensors
        grad_logp, grad_entropy = ppo_policy_loss_bwd(
            grad_loss,
            dlogp if ctx.needs_input_grad[0] else None,
            row_scale,
            mask,
            entropy_coef=ctx.entropy_coef,
            logp_dtype=ctx.logp_dtype,
            entropy_dtype=ctx.entropy_dtype if ctx.needs_input_grad[5] else None,
        )
        return grad_logp, None, None, None, None, grad_entropy, None, None


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped policy loss in one pass over the tokens (plus a tiny deterministic reduction).

    Per token, with r = exp(clamp(logp − old_logp, −20, 20)) and A the advantage:
    ``l = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))``; with ``dual_clip`` c > 1,
    ``l = min(l, −A·c)`` where A < 0; then ``+ kl_coef·kl(logp, ref_logp) − entropy_coef·entropy``.

    Args:
        logp: ``(B, T)`` or ``(N,)`` log-probs under the current policy (receives the gradient).
        old_logp, advantages: same shape; constants (no gradient flows to them).
        mask: same shape, bool/int/float; 1 (or a weight) for tokens that count.
        clip_low, clip_high: ratio clip; ``clip_high`` defaults to ``clip_low``. Both > 0.
        dual_clip: c > 1 bounds the loss of negative-advantage tokens at −A·c; None to disable.
        agg: "token-mean", "token-sum", "seq-mean-token-sum" or "seq-mean-token-mean" (rows with
            no tokens are left out; a flat ``(N,)`` input is one row).
        ref_logp: reference log-probs (a constant) for the KL term, with ``kl_coef`` ≥ 0 and
            ``kl_estimator`` (as in ``kl_penalty``).
        entropy: per-token entropy (receives the gradient −entropy_coef per token weight).

    Returns:
        ``(loss, stats)``: the fp32 0-d loss and a dict of 0-d fp32 tensors (no host sync):
        clipfrac, clipfrac_lower, approx_kl (mean of old_logp − logp), ratio_mean, ratio_max,
        kl (with ref_logp), entropy (with entropy) — masked token means. An all-zero mask gives
        0 everywhere, never NaN.
    """
    shape = check_token_tensors(
        logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, entropy=entropy
    )
    clip_low = check_positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else check_positive("clip_high", clip_high)
    if dual_clip is not None and check_finite("dual_clip", dual_clip) <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    check_choice("agg", agg, reference.AGGREGATIONS)
    check_choice("kl_estimator", kl_estimator, reference.KL_ESTIMATORS)
    if check_finite("kl_coef", kl_coef) < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    if check_finite("entropy_coef", entropy_coef) != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    options = dict(
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        kl_coef=float(kl_coef),
        kl_estimator=kl_estimator,
        entropy_coef=float(entropy_coef),
    )
    if not use_triton(logp):
        return reference.ppo_policy_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy, **options
        )

    from fastppo.kernels.ppo_policy_loss import STATS

    as_2d = lambda x: None if x is None else x.reshape(-1, shape[-1] if shape else 1).contiguous()  # noqa: E731
    store_grad = torch.is_grad_enabled() and logp.requires_grad
    loss, out = PPOPolicyLossFunction.apply(
        as_2d(logp),
        as_2d(old_logp),
        as_2d(advantages),
        as_2d(mask),
        as_2d(ref_logp),
        as_2d(entropy),
        options,
        store_grad,
    )
    names = ["clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max"]
    names += ["kl"] if ref_logp is not None else []
    names += ["entropy"] if entropy is not None else []
    return loss, {name: out[STATS.index(name)] for name in names}
