"""``fastppo.masked_whiten``: whitening over masked elements, deterministic.

Kernels: ``fastppo.kernels.masked_whiten``; reference ``fastppo.reference.masked_whiten``.
"""

import torch

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import check_token_tensors

from . import _library


@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """``(x − mean) / sqrt(var + 1e-8)`` with mean and unbiased variance over the masked elements,
    applied to every element (as verl does); ``shift_mean=False`` adds the mean back.

    Args:
        x, mask: the same shape (any); mask bool, int or float weights.

    Returns:
        fp32, shaped like ``x``. Σ mask ≤ 1 gives var 0 and an all-zero mask mean 0: never NaN.
        The reduction is two-stage and fixed-order (bitwise identical run to run).
    """
    check_token_tensors(allow_any_shape=True, x=x, mask=mask)
    if not use_triton(x):
        return reference.masked_whiten(x, mask, shift_mean=shift_mean)
    out = _library.masked_whiten(x.reshape(-1).contiguous(), mask.reshape(-1).contiguous(), bool(shift_mean))
    return out.view(x.shape)
