"""``fastppo.group_advantages``: GRPO / Dr. GRPO / RLOO advantages from grouped scores.

Kernel: ``fastppo.kernels.group_advantages``; reference ``fastppo.reference.group_advantages``.
"""

import torch

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import check_choice, check_positive, check_same_device, check_tensor

from . import _library


@torch.no_grad()
def group_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, *, method: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Per-sequence advantages of scores grouped by prompt.

    grpo: (s − mean_g) / (std_g + eps), std unbiased, a group of one has mean 0 and std 1;
    dr_grpo: s − mean_g; rloo: s·n/(n−1) − mean_g·n/(n−1) for n > 1, s for n = 1.

    Args:
        scores: ``(B,)`` float.
        group_ids: ``(B,)`` integer ids of any value and order (not necessarily sorted or
            contiguous); sequences with the same id form a group.
        method: "grpo", "dr_grpo" or "rloo".
        eps: > 0.

    Returns:
        ``(B,)`` fp32. Any number of groups and group sizes, no Python loop; the number of groups
        is read to the host once.
    """
    check_tensor("scores", scores, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    check_tensor("group_ids", group_ids, integer=True)
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            "scores and group_ids must both have shape (B,), got "
            f"{tuple(scores.shape)} and {tuple(group_ids.shape)}"
        )
    check_same_device(scores=scores, group_ids=group_ids)
    check_choice("method", method, reference.GROUP_METHODS)
    eps = check_positive("eps", eps)
    if not use_triton(scores):
        return reference.group_advantages(scores, group_ids, method=method, eps=eps)
    return _library.group_advantages(scores.contiguous(), group_ids.contiguous(), method, eps)
