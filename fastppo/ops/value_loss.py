"""``fastppo.value_loss``: the clipped value (critic) loss, fused.

Layers: kernels in ``fastppo.kernels.value_loss`` (and ``masked_reduce``) → ``ValueLossFunction``
→ ``value_loss``. The reference is ``fastppo.reference.value_loss``.
"""

import torch
from torch.autograd.function import once_differentiable

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import check_choice, check_cu_seqlens, check_positive, check_token_tensors


class ValueLossFunction(torch.autograd.Function):
    """forward(values, old_values, returns, mask, layout, clip, agg, store_grad) -> loss (0-d),
    clipfrac (0-d); inputs contiguous, (B, T) or packed (N,) as ``layout`` says."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask, layout, clip, agg, store_grad):
        from fastppo.kernels.value_loss import STATS
        from fastppo.ops._library import value_loss_fwd

        loss, out, dvalues, row_scale = value_loss_fwd(
            values, old_values, returns, mask, layout, clip=clip, agg=agg, store_grad=store_grad
        )
        ctx.save_for_backward(dvalues, row_scale)
        ctx.layout = layout
        ctx.values_dtype = values.dtype
        clipfrac = out[STATS.index("clipfrac")]
        ctx.mark_non_differentiable(clipfrac)
        return loss, clipfrac

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_clipfrac):
        from fastppo.ops._library import value_loss_bwd

        dvalues, row_scale = ctx.saved_tensors
        grad_values = value_loss_bwd(grad_loss, dvalues, row_scale, ctx.layout, values_dtype=ctx.values_dtype)
        return grad_values, None, None, None, None, None, None, None


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss in one pass over the tokens (plus a tiny deterministic reduction).

    ``v_c = old_v + clip(v − old_v, −clip, clip)``, ``l = ½·max((v − R)², (v_c − R)²)``
    (``½ (v − R)²`` when ``clip`` is None), aggregated over ``mask`` by ``agg``.

    Args:
        values: ``(B, T)`` or ``(N,)`` critic outputs (receive the gradient).
        old_values, returns: same shape; constants.
        mask: same shape, bool/int/float; 1 (or a weight) for tokens that count.
        clip: > 0, or None for the unclipped loss.
        agg: as in ``ppo_policy_loss`` (a flat ``(N,)`` input is one row unless ``cu_seqlens``).
        cu_seqlens: ``(S + 1,)`` int boundaries of S packed sequences in ``(N,)`` inputs, read in
            place by the kernel (no padding, no host read): each is a row of the seq aggregations.

    Returns:
        ``(loss, clipfrac)``, 0-d fp32; clipfrac is the masked fraction of tokens where the
        clipped term is the larger one.
    """
    shape = check_token_tensors(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip is not None:
        clip = check_positive("clip", clip)
    check_choice("agg", agg, reference.AGGREGATIONS)
    if cu_seqlens is not None:
        cu_seqlens = check_cu_seqlens(cu_seqlens, shape, values.device)
    if not use_triton(values):
        return reference.value_loss(
            values, old_values, returns, mask, clip=clip, agg=agg, cu_seqlens=cu_seqlens
        )
    from fastppo.kernels.masked_reduce import token_layout

    store_grad = torch.is_grad_enabled() and values.requires_grad
    tensors = (x.contiguous() for x in (values, old_values, returns, mask))
    return ValueLossFunction.apply(*tensors, token_layout(shape, cu_seqlens), clip, agg, store_grad)
