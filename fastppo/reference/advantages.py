"""References of ``gae``, ``discounted_returns``, ``shape_rewards``, ``masked_whiten`` and
``group_advantages``."""

import torch

from ._common import _masked, _safe


def _padded_view(
    x: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed (N,) with cu_seqlens → right-padded (B, L) (and the gather index to come back)."""
    if cu_seqlens is None:
        return torch.atleast_2d(x), None
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    L = int(lengths.max()) if lengths.numel() else 0
    t = torch.arange(L, device=x.device)
    index = cu_seqlens[:-1, None].long() + t[None, :]
    keep = t[None, :] < lengths[:, None]
    padded = torch.zeros(lengths.numel(), L, dtype=x.dtype, device=x.device)
    padded[keep] = x[index[keep]]
    return padded, index[keep]


def _unpad(x: torch.Tensor, index: torch.Tensor | None, lengths_like: torch.Tensor, shape) -> torch.Tensor:
    if index is None:
        return x.reshape(shape)
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths_like[:, None]
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    out[index] = x[keep]
    return out


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
    """Generalised advantage estimation, the recursion of DESIGN §4 (vectorised over sequences;
    the loop runs over time, as the recursion does).

    Walking t from last to first with next_value = 0 and last = 0: δ = r_t + γ·next_value − V_t,
    a = δ + γλ·last. With ``carry_masked`` (verl) a masked position stores the carried last and
    leaves the state alone; without it (OpenRLHF) rewards and values are multiplied by the mask
    and every position runs the recursion. ``returns = advantages + values`` (values·mask
    without ``carry_masked``).

    Args:
        rewards, values, mask: ``(B, T)``, or packed ``(N,)`` with ``cu_seqlens`` (B+1,) int32
            with a leading 0 (without cu_seqlens a flat input is one sequence).

    Returns:
        ``(advantages, returns)``, fp32, shaped like ``rewards``.
    """
    return _reverse_scan(rewards, values, mask, gamma, lam, cu_seqlens, carry_masked)


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Reverse discounted sums G_t = r_t + γ·G_{t+1} over the masked tokens of each sequence
    (critic-free methods); a masked position stores the carried G and its reward is ignored.
    This is ``gae`` with V = 0 and λ = 1. Layouts as in ``gae``; fp32 out."""
    return _reverse_scan(rewards, None, mask, gamma, 1.0, cu_seqlens, True)[0]


def _reverse_scan(rewards, values, mask, gamma, lam, cu_seqlens, carry_masked):
    shape = rewards.shape
    r, index = _padded_view(rewards.float(), cu_seqlens)
    m, _ = _padded_view(mask.float(), cu_seqlens)
    v = _padded_view(values.float(), cu_seqlens)[0] if values is not None else torch.zeros_like(r)
    if not carry_masked:
        r, v = torch.where(m != 0, r * m, 0.0), torch.where(m != 0, v * m, 0.0)
    next_value = torch.zeros(r.shape[0], device=r.device)
    last = torch.zeros(r.shape[0], device=r.device)
    advantages = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        a = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * last
        counted = (m[:, t] != 0) if carry_masked else torch.ones_like(last, dtype=torch.bool)
        next_value = torch.where(counted, v[:, t], next_value)
        last = torch.where(counted, a, last)
        advantages[:, t] = last
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long() if cu_seqlens is not None else None
    advantages = _unpad(advantages, index, lengths, shape)
    if values is None:
        return advantages, None
    v_out = values.float() if carry_masked else torch.where(mask != 0, values.float() * mask, 0.0)
    return advantages, advantages + v_out


def shape_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token rewards: −kl_coef·kl at every masked token, plus each sequence's score at its
    last masked token; 0 at unmasked positions.

    Args:
        scores: ``(B,)`` one score per sequence.
        mask, kl: ``(B, T)``, or packed ``(N,)`` with ``cu_seqlens`` (B+1,).

    Returns:
        ``(B, T)`` (or ``(N,)``) fp32 rewards.
    """
    m, index = _padded_view(mask.float(), cu_seqlens)
    rewards = torch.zeros_like(m)
    if kl is not None:
        k, _ = _padded_view(kl.float(), cu_seqlens)
        rewards = torch.where(m != 0, -kl_coef * k, 0.0)
    T = m.shape[1]
    has = (m != 0).any(1)
    last = T - 1 - (m != 0).flip(1).int().argmax(1) if T else torch.zeros_like(has, dtype=torch.long)
    rows = torch.arange(m.shape[0], device=m.device)[has]
    rewards[rows, last[has]] += scores.float()[has]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long() if cu_seqlens is not None else None
    return _unpad(rewards, index, lengths, mask.shape)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) with mean and unbiased var over the masked elements, applied
    to every element (as verl does); with ``shift_mean=False`` the mean is added back.
    Σ mask ≤ 1 gives var 0 (never NaN); an all-zero mask gives mean 0. fp32 out."""
    xf, m = x.float(), mask.float()
    n = m.sum()
    mean = _masked(xf, m).sum() / _safe(n)
    var = _masked((xf - mean).square(), m).sum() / torch.where(n > 1, n - 1, torch.ones_like(n))
    var = torch.where(n > 1, var, torch.zeros_like(var))
    out = (xf - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


GROUP_METHODS = ("grpo", "dr_grpo", "rloo")


def group_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, *, method: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Per-sequence advantages from scores grouped by prompt (any integer ids, any order).

    grpo: (s − mean_g) / (std_g + eps), std unbiased, a group of one has mean 0 and std 1;
    dr_grpo: s − mean_g (a group of one: mean 0); rloo: s·n/(n−1) − mean_g·n/(n−1) for n > 1,
    s for n = 1.

    Args:
        scores: ``(B,)`` float. group_ids: ``(B,)`` integer.
    Returns:
        ``(B,)`` fp32.
    """
    s = scores.float()
    _, group, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.float()[group]
    sums = torch.zeros(counts.numel(), device=s.device).index_add(0, group, s)
    mean = sums[group] / n
    if method == "rloo":
        return torch.where(n > 1, (s - mean) * n / torch.clamp(n - 1, min=1), s)
    mean = torch.where(n > 1, mean, 0.0)
    if method == "dr_grpo":
        return s - mean
    if method != "grpo":
        raise ValueError(f"method must be one of {GROUP_METHODS}, got {method!r}")
    sq = torch.zeros(counts.numel(), device=s.device).index_add(0, group, (s - mean).square())
    std = torch.sqrt(sq[group] / torch.clamp(n - 1, min=1))
    std = torch.where(n > 1, std, 1.0)
    return (s - mean) / (std + eps)
