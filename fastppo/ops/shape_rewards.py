"""``fastppo.shape_rewards``: per-token PPO rewards from sequence scores and a KL penalty.

Kernel: ``fastppo.kernels.shape_rewards``; reference ``fastppo.reference.shape_rewards``.
"""

import torch

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import check_finite, check_tensor, check_token_tensors

from . import _library


@torch.no_grad()
def shape_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token rewards: ``−kl_coef·kl`` at every masked token, plus the sequence's score at its
    last masked token; 0 where the mask is 0.

    Args:
        scores: ``(B,)`` float, one per sequence.
        mask (and kl): ``(B, T)``, or packed ``(N,)`` with ``cu_seqlens`` (B+1,) int32.
        kl_coef: finite; needs ``kl`` when not 0.

    Returns:
        fp32 rewards shaped like ``mask``.
    """
    shape = check_token_tensors(mask=mask, kl=kl)
    check_tensor("scores", scores, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if check_finite("kl_coef", kl_coef) != 0 and kl is None:
        raise ValueError("kl_coef != 0 needs kl")
    cu, longest = _library.layout(cu_seqlens, shape, mask.device)
    n_seqs = shape[0] if cu is None else cu.numel() - 1
    if scores.shape != (n_seqs,):
        raise ValueError(f"scores must have shape ({n_seqs},), one per sequence, got {tuple(scores.shape)}")
    if scores.device != mask.device:
        raise ValueError(f"scores must be on {mask.device}, got {scores.device}")
    if not use_triton(mask):
        return reference.shape_rewards(scores, mask, kl=kl, kl_coef=kl_coef, cu_seqlens=cu_seqlens)
    kl = None if kl is None else kl.contiguous()
    return _library.shape_rewards(scores.contiguous(), mask.contiguous(), kl, cu, float(kl_coef), longest)
