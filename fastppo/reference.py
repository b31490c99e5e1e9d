"""Pure-PyTorch specification of every fastppo op: the test oracle and the CPU path.

Each function here has the same name, arguments and meaning as the public op in ``fastppo``,
is written for clarity (vectorised, no Python loops over tokens) and is differentiable through
PyTorch's autograd. Math: ../shared/DESIGN.md §4.
"""

import functools
import math

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Accumulate in fp32 whatever the input; fp64 stays fp64 (gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``(..., V)`` float tensor.
        labels: ``(...)`` integer labels, or ``(..., K)`` to gather K labels per row (top-K).
            Entries equal to ``ignore_index`` give 0 and no gradient.
        temperature: τ > 0; logits are divided by it.
        ignore_index: label value that marks a row (or entry) that does not count.
        return_entropy: also return the entropy of each row's distribution.

    Returns:
        ``logp`` with the shape of ``labels`` (fp32, fp64 for fp64 logits), and with
        ``return_entropy`` the entropy ``(...)``; rows whose labels are all ``ignore_index``
        get entropy 0.
    """
    z = logits.to(_acc_dtype(logits.dtype)) / temperature
    top_k = labels.dim() == logits.dim()
    y = labels if top_k else labels.unsqueeze(-1)
    counted = y != ignore_index
    logp_all = torch.log_softmax(z, dim=-1)
    logp = torch.gather(logp_all, -1, torch.where(counted, y, 0).long())
    logp = torch.where(counted, logp, 0.0)
    if not top_k:
        logp = logp.squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # −Σ p·log p, with p = 0 entries (−inf logits) contributing 0 rather than 0·(−inf).
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    entropy = torch.where(counted.any(-1), entropy, 0.0)
    return logp, entropy


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    logit_softcap: float | None = None,
    chunk_size: int | None = None,
    head_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` of the logits ``hidden·weightᵀ + bias`` (softcapped as c·tanh(z / c)),
    ``chunk_size`` rows at a time (default 1024), each chunk recomputed in the backward
    (``torch.utils.checkpoint``), so that no more than one chunk of logits is held.

    Args: as ``fastppo.linear_logprobs``: hidden ``(..., H)``, weight ``(V, H)``, labels ``(...)``
    or ``(..., K)``; ``head_dtype`` the projection's dtype (default: hidden's).
    Returns: fp32 ``logp`` shaped like ``labels`` (and the entropy ``(...)``).
    """
    from torch.utils.checkpoint import checkpoint

    dtype = head_dtype or hidden.dtype
    H = weight.shape[1]
    top_k = labels.dim() == hidden.dim()
    K = labels.shape[-1] if top_k else 1
    h, y = hidden.reshape(-1, H), labels.reshape(-1, K)

    def chunk_outputs(h_c, y_c, w, b):
        z = h_c.to(dtype) @ w.to(dtype).T
        if b is not None:
            z = z + b.to(dtype)
        if logit_softcap is not None:
            z = logit_softcap * torch.tanh(z.float() / logit_softcap)
        return token_logprobs(z, y_c, temperature=temperature, ignore_index=ignore_index, return_entropy=True)

    step = chunk_size or 1024
    # One chunk holds no more than itself: it needs no recomputation.
    run = (
        chunk_outputs
        if h.shape[0] <= step
        else functools.partial(checkpoint, chunk_outputs, use_reentrant=False)
    )
    parts = [run(h[i : i + step], y[i : i + step], weight, bias) for i in range(0, h.shape[0], step)]
    logp = torch.cat([p[0] for p in parts]) if parts else h.new_zeros((0, K), dtype=torch.float32)
    entropy = torch.cat([p[1] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)
    logp = logp.float().view(labels.shape)
    return (logp, entropy.float().view(hidden.shape[:-1])) if return_entropy else logp


def unpad(mask: torch.Tensor) -> dict:
    """Packed layout of a ``(B, T)`` 0/1 mask (the reference of ``fastppo.packing.unpad``).

    Returns a dict with ``indices`` (N,) int64 flat positions of the ones, ``cu_seqlens``
    (B+1,) int32 with a leading 0, ``position_ids`` (N,) int64 restarting at 0 in each row,
    ``seqlens`` (B,) int32 and ``max_seqlen`` (int).
    """
    keep = mask.bool()
    seqlens = keep.sum(1)
    cu_seqlens = torch.nn.functional.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
    position_ids = (keep.long().cumsum(1) - 1)[keep]
    return {
        "indices": keep.flatten().nonzero().flatten(),
        "cu_seqlens": cu_seqlens,
        "position_ids": position_ids,
        "seqlens": seqlens.to(torch.int32),
        "max_seqlen": int(seqlens.max()) if mask.shape[0] > 0 else 0,
    }


KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+")
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean")


def _k3(x: torch.Tensor) -> torch.Tensor:
    """eˣ − 1 − x to a few ulp of itself. k3 ≈ x²/2 is the small difference of numbers near 1:
    for |x| < 1/2 it is summed as x²·Σ_{n≥0} xⁿ/(n+2)! through x¹⁶/16! (truncation below 1e-19
    relative), elsewhere as expm1(x) − x."""
    series = torch.zeros_like(x)
    for n in range(16, 1, -1):
        series = series * x + 1.0 / math.factorial(n)
    series = series * x * x
    return torch.where(x.abs() < 0.5, series, torch.expm1(x) - x)


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, elementwise.

    With d = logp − ref_logp: k1 = d; abs = |d|; k2 = d²/2; k3 = exp(−d) − 1 + d with −d clamped
    to [−20, 20] before the exp, summed as a series for |d| < 1/2 (see ``_k3``).
    "k1+"/"k3+" have the value of k1/k3 and the gradient of k2.
    ``clamp`` c bounds the value to [−c, c] (verl uses 10 for k3).

    Args:
        logp, ref_logp: same shape, any float dtype. Returns: fp32 (fp64 for fp64) of that shape.
    """
    d = logp.to(_acc_dtype(logp.dtype)) - ref_logp.to(_acc_dtype(ref_logp.dtype))
    if estimator in ("k1", "k1+"):
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d.square()
    elif estimator in ("k3", "k3+"):
        # Beyond the clamp k3 goes on linearly in the excess of d (relu: no gradient term inside
        # it, where 1 − 1 added to a small derivative would cancel it away).
        kl = _k3(torch.clamp(-d, -20.0, 20.0)) + torch.relu(d - 20.0) - torch.relu(-d - 20.0)
    elif estimator == "abs":
        kl = d.abs()
    else:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    if estimator.endswith("+"):
        k2 = 0.5 * d.square()
        kl = k2 + (kl - k2).detach()
    return kl


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not a product alone: padding may hold inf or NaN, and 0·inf is NaN.
    return torch.where(mask != 0, x * mask, 0.0)


def _safe(den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, den, torch.ones_like(den))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ m·x / Σ m over every element, 0 when the mask is empty."""
    return _masked(x, mask).sum() / _safe(mask.sum())


def agg_loss(loss: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Aggregate a per-token loss ``(B, T)`` (or ``(N,)``, one row) with ``mask`` of that shape.

    token-mean = Σ m·l / Σ m; token-sum = Σ m·l; seq-mean-token-sum = mean over rows with
    Σ m > 0 of Σ_t m·l; seq-mean-token-mean = mean over those rows of Σ_t m·l / Σ_t m.
    An all-zero mask gives 0.
    """
    loss, mask = torch.atleast_2d(loss), torch.atleast_2d(mask).to(loss.dtype)
    row_sums = _masked(loss, mask).sum(-1)
    row_tokens = mask.sum(-1)
    n_rows = _safe((row_tokens > 0).sum().to(loss.dtype))
    if agg == "token-mean":
        return row_sums.sum() / _safe(row_tokens.sum())
    if agg == "token-sum":
        return row_sums.sum()
    if agg == "seq-mean-token-sum":
        return row_sums.sum() / n_rows
    if agg == "seq-mean-token-mean":
        return torch.where(row_tokens > 0, row_sums / _safe(row_tokens), 0.0).sum() / n_rows
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


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
    """PPO clipped surrogate loss with optional dual clip, KL term and entropy bonus.

    Per token, with r = exp(clamp(logp − old_logp, −20, 20)) and A the advantage:
    l = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high)); with dual clip c > 1 and A < 0,
    l = min(l, −A·c); then l += kl_coef·kl(logp, ref_logp) − entropy_coef·entropy. The loss is
    ``agg_loss(l, mask, agg)``. ``old_logp``, ``advantages`` and ``ref_logp`` are constants.

    Args:
        logp, old_logp, advantages, mask (and ref_logp, entropy): ``(B, T)`` or ``(N,)``.

    Returns:
        ``(loss, stats)``: fp32 0-d loss; stats of 0-d fp32 tensors, masked token means:
        clipfrac (the clipped branch is active), clipfrac_lower (the dual clip is active),
        approx_kl (old_logp − logp), ratio_mean, ratio_max, and kl / entropy when given.
    """
    clip_high = clip_low if clip_high is None else clip_high
    f32 = lambda x: x.detach().float() if x.dtype != torch.float64 else x.detach()  # noqa: E731
    lp = logp.float() if logp.dtype != torch.float64 else logp
    old, adv, m = f32(old_logp), f32(advantages), f32(mask)
    log_ratio = lp - old
    ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(pg_unclipped, pg_clipped)
    clipped = pg_clipped > pg_unclipped
    lower = torch.zeros_like(clipped)
    if dual_clip is not None:
        floor = -adv * dual_clip
        lower = (adv < 0) & (loss > floor)
        loss = torch.where(adv < 0, torch.minimum(loss, floor), loss)
    stats = {}
    if ref_logp is not None:
        kl = kl_penalty(lp, f32(ref_logp), kl_estimator)
        loss = loss + kl_coef * kl
        stats["kl"] = masked_mean(kl.detach(), m)
    if entropy is not None:
        ent = entropy.float() if entropy.dtype != torch.float64 else entropy
        loss = loss - entropy_coef * ent
        stats["entropy"] = masked_mean(ent.detach(), m)
    counted = m != 0
    ratio = ratio.detach()
    stats = {
        "clipfrac": masked_mean(clipped.to(m.dtype), m),
        "clipfrac_lower": masked_mean(lower.to(m.dtype), m),
        "approx_kl": masked_mean(-log_ratio.detach(), m),
        "ratio_mean": masked_mean(ratio, m),
        "ratio_max": torch.where(counted, ratio, 0.0).max() if ratio.numel() else ratio.new_zeros(()),
        **stats,
    }
    return agg_loss(loss, m, agg), stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: v_c = old_v + clip(v − old_v, −clip, clip),
    l = ½·max((v − R)², (v_c − R)²) (½ (v − R)² when ``clip`` is None), aggregated by ``agg``.

    Args:
        values, old_values, returns, mask: ``(B, T)`` or ``(N,)``; old_values and returns are
        constants.

    Returns:
        ``(loss, clipfrac)``, 0-d fp32: clipfrac is the masked fraction of tokens where the
        clipped term is larger.
    """
    v = values.float() if values.dtype != torch.float64 else values
    f32 = lambda x: x.detach().to(v.dtype)  # noqa: E731
    ret, m = f32(returns), f32(mask)
    loss = 0.5 * (v - ret).square()
    clipped = torch.zeros_like(loss, dtype=torch.bool)
    if clip is not None:
        old = f32(old_values)
        loss_clipped = 0.5 * (old + torch.clamp(v - old, -clip, clip) - ret).square()
        clipped = loss_clipped > loss
        loss = torch.maximum(loss, loss_clipped)
    return agg_loss(loss, m, agg), masked_mean(clipped.to(v.dtype), m)


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


# Packing references: plain Python, the oracles of fastppo.packing's C++ functions.


def collate(sequences, pad_id: int, *, side: str = "right", max_length=None, pad_to_multiple_of=None) -> dict:
    """Reference of ``fastppo.packing.collate`` (a Python loop)."""
    seqs = [list(map(int, s)) for s in sequences]
    L = max_length if max_length is not None else max((len(s) for s in seqs), default=0)
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    ids, mask = [], []
    for s in seqs:
        if len(s) > L:
            raise ValueError(f"sequence longer than max_length={max_length}")
        padding = [pad_id] * (L - len(s))
        ids.append(padding + s if side == "left" else s + padding)
        ones, zeros = [1] * len(s), [0] * (L - len(s))
        mask.append(zeros + ones if side == "left" else ones + zeros)
    shape = (len(seqs), L)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long).reshape(shape),
        "attention_mask": torch.tensor(mask, dtype=torch.long).reshape(shape),
    }


def plan_microbatches(seqlens, max_tokens: int, *, k: int | None = None) -> list[list[int]]:
    """Reference: first-fit-decreasing by linear search, padded with empty groups to a
    multiple of k (fewest bins FFD finds; no balancing)."""
    order = sorted(range(len(seqlens)), key=lambda i: -seqlens[i])
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + seqlens[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += seqlens[i]
                break
        else:
            bins.append([i])
            loads.append(seqlens[i])
    k = k or 1
    bins += [[] for _ in range(-len(bins) % k)]
    return [sorted(b) for b in bins]


def balanced_partition(seqlens, k: int, *, equal_size: bool = True) -> list[list[int]]:
    """Reference: greedy, longest first to the lightest group (with room, when equal_size)."""
    per_group = len(seqlens) // k if equal_size else None
    groups: list[list[int]] = [[] for _ in range(k)]
    sums = [0] * k
    for i in sorted(range(len(seqlens)), key=lambda i: -seqlens[i]):
        open_groups = [g for g in range(k) if per_group is None or len(groups[g]) < per_group]
        g = min(open_groups, key=lambda g: (sums[g], g))
        groups[g].append(i)
        sums[g] += seqlens[i]
    return [sorted(g) for g in groups]


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation on sequence log-probs ``(B,)``.

    With h = β·((π_c − ref_c) − (π_r − ref_r)): sigmoid = −(1−ε)·logσ(h) − ε·logσ(−h);
    ipo = (h/β − 1/(2β))²; hinge = relu(1 − h). The loss is the mean over pairs; the rewards
    β·(π − ref) are returned detached.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: 0-d and ``(B,)`` each, fp32.
    """
    f = lambda x: x.float() if x.dtype != torch.float64 else x  # noqa: E731
    chosen, rejected = f(chosen_logp) - f(ref_chosen_logp), f(rejected_logp) - f(ref_rejected_logp)
    h = beta * (chosen - rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * torch.nn.functional.logsigmoid(
            h
        ) - label_smoothing * torch.nn.functional.logsigmoid(-h)
    elif loss_type == "ipo":
        losses = (h / beta - 1 / (2 * beta)).square()
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    return losses.mean(), (beta * chosen).detach(), (beta * rejected).detach()
