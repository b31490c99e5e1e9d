"""``fastppo.kl_penalty``: per-token KL estimators between the policy and a reference.

Layers: kernels in ``fastppo.kernels.kl_penalty`` → ``KLPenaltyFunction`` → ``kl_penalty``.
The reference is ``fastppo.reference.kl_penalty``.
"""

import torch
from torch.autograd.function import once_differentiable

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import check_choice, check_positive, check_token_tensors


class KLPenaltyFunction(torch.autograd.Function):
    """forward(logp (N,), ref_logp (N,), estimator, clamp) -> kl (N,)"""

    @staticmethod
    def forward(ctx, logp, ref_logp, estimator, clamp):
        from fastppo.ops._library import kl_penalty_fwd

        ctx.save_for_backward(logp, ref_logp)
        ctx.estimator, ctx.clamp = estimator, clamp
        return kl_penalty_fwd(logp, ref_logp, estimator=estimator, clamp=clamp)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        from fastppo.ops._library import kl_penalty_bwd

        logp, ref_logp = ctx.saved_tensors
        grad_logp, grad_ref = kl_penalty_bwd(
            logp,
            ref_logp,
            grad_kl,
            estimator=ctx.estimator,
            clamp=ctx.clamp,
            need_logp=ctx.needs_input_grad[0],
            need_ref=ctx.needs_input_grad[1],
        )
        return grad_logp, grad_ref, None, None


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL estimate of the policy against a reference, d = logp − ref_logp.

    Estimators: "k1" d, "abs" |d|, "k2" d²/2, "k3" exp(−d) + d − 1 (−d clamped to [−20, 20]
    before the exp), and the straight-through "k1+"/"k3+" (value of k1/k3, gradient of k2).

    Args:
        logp, ref_logp: the same shape (any: padded (B, T) or packed (N,) alike, elementwise, no
            sequence bounds needed), float dtypes; both receive gradients.
        estimator: one of the names above.
        clamp: c > 0 bounds the result to [−c, c] (verl clamps k3 to 10); None for no bound.

    Returns:
        The per-token KL, shaped like ``logp``, fp32 (fp64 for fp64 input).
    """
    shape = check_token_tensors(allow_any_shape=True, logp=logp, ref_logp=ref_logp)
    check_choice("estimator", estimator, reference.KL_ESTIMATORS)
    if clamp is not None:
        clamp = check_positive("clamp", clamp)
    if not use_triton(logp):
        return reference.kl_penalty(logp, ref_logp, estimator, clamp)
    kl = KLPenaltyFunction.apply(
        logp.reshape(-1).contiguous(), ref_logp.reshape(-1).contiguous(), estimator, clamp
    )
    return kl.view(shape)
