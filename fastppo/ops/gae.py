"""``fastppo.gae`` and ``fastppo.discounted_returns``: reverse scans over each sequence.

Kernel: ``fastppo.kernels.gae`` (a chunked associative scan of affine maps, one program per
sequence). References of the same names in ``fastppo.reference``. Advantages are constants in
PPO, so these ops have no autograd.
"""

import torch

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import check_token_tensors, check_unit_interval

from . import _library


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
    carry_masked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation in one pass, each sequence scanned in reverse on the GPU.

    Walking t from last to first with next_value = 0 and last = 0: δ = r_t + γ·next_value − V_t,
    a = δ + γλ·last. ``carry_masked=True`` (verl): a masked position inside a response (e.g. a
    tool observation) stores the carried a and leaves next_value and last unchanged.
    ``carry_masked=False`` (OpenRLHF): rewards·mask and values·mask run the plain recursion.

    Args:
        rewards, values, mask: padded ``(B, T)``; or packed ``(N,)`` with ``cu_seqlens``
            (B+1,) int32 with a leading 0 (a flat input without it is one sequence).
        gamma, lam: in [0, 1] (runtime arguments: new values do not recompile).

    Returns:
        ``(advantages, returns)``, fp32, shaped like ``rewards``; returns = advantages + values
        (values·mask without ``carry_masked``), before any whitening.
    """
    shape = check_token_tensors(rewards=rewards, values=values, mask=mask)
    gamma, lam = check_unit_interval("gamma", gamma), check_unit_interval("lam", lam)
    cu, longest = _library.layout(cu_seqlens, shape, rewards.device)
    if not use_triton(rewards):
        return reference.gae(
            rewards, values, mask, gamma=gamma, lam=lam, cu_seqlens=cu, carry_masked=carry_masked
        )
    c = lambda x: x.contiguous()  # noqa: E731
    return _library.gae(c(rewards), c(values), c(mask), cu, gamma, lam, bool(carry_masked), longest)


@torch.no_grad()
def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Reverse discounted sums G_t = r_t + γ·G_{t+1} over each sequence's masked tokens, for
    critic-free methods (REINFORCE-style). A masked position stores the carried G and its reward
    is ignored. Layouts as in ``gae``; fp32 out."""
    shape = check_token_tensors(rewards=rewards, mask=mask)
    gamma = check_unit_interval("gamma", gamma)
    cu, longest = _library.layout(cu_seqlens, shape, rewards.device)
    if not use_triton(rewards):
        return reference.discounted_returns(rewards, mask, gamma=gamma, cu_seqlens=cu)
    return _library.discounted_returns(rewards.contiguous(), mask.contiguous(), cu, gamma, longest)
