"""Pure-PyTorch specification of every fastppo op: the test oracle and the CPU path.

Each function here has the same name, arguments and meaning as the public op in ``fastppo``,
is written for clarity (vectorised, no Python loops over tokens) and is differentiable through
PyTorch's autograd. Math: ../shared/DESIGN.md §4.
"""

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


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, elementwise.

    With d = logp − ref_logp: k1 = d; abs = |d|; k2 = d²/2; k3 = exp(−d) + d − 1 with −d clamped
    to [−20, 20] before the exp. "k1+"/"k3+" have the value of k1/k3 and the gradient of k2.
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
        kl = torch.exp(torch.clamp(-d, -20.0, 20.0)) + d - 1.0
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
