"""References of ``kl_penalty``, ``value_loss`` and ``dpo_loss``."""

import math

import torch

from ._common import _acc_dtype, agg_loss, masked_mean

KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+")


class Rows:
    """Which packed sequence each of N tokens belongs to, from ``cu_seqlens`` (S + 1,) without a
    host read (``repeat_interleave`` told its output size): per-sequence sums by ``index_add``."""

    def __init__(self, cu_seqlens: torch.Tensor, n_tokens: int):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self.n_seqs = lengths.numel()
        seqs = torch.arange(self.n_seqs, device=cu_seqlens.device)
        self.seq = torch.repeat_interleave(seqs, lengths, output_size=n_tokens)

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """(S,) Σ of ``x`` (N,) over each sequence (differentiable). ``index_add`` adds in token
        order, whose fp32 error grows with the length (a 3000-token sum was 1e-5 off): fp64 inside."""
        total = x.new_zeros(self.n_seqs, dtype=torch.float64)
        return total.index_add(0, self.seq.to(x.device), x.reshape(-1).double()).to(x.dtype)

    def per_token(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's sequence's Σ of ``x``, shaped like ``x``."""
        return self.sums(x)[self.seq].reshape(x.shape)


def agg_rows(loss: torch.Tensor, mask: torch.Tensor, agg: str, rows: Rows | None) -> torch.Tensor:
    """``agg_loss`` (``(B, T)`` or one row), or over packed sequences when ``rows`` is given."""
    if rows is None:
        return agg_loss(loss, mask, agg)
    mask = mask.to(loss.dtype)
    row_sums = rows.sums(torch.where(mask != 0, loss * mask, 0.0))
    row_tokens = rows.sums(mask)
    has = row_tokens > 0
    n_rows = torch.clamp(has.sum().to(loss.dtype), min=1.0)
    if agg == "token-mean":
        tokens = row_tokens.sum()
        return row_sums.sum() / torch.where(tokens > 0, tokens, 1.0)
    if agg == "token-sum":
        return row_sums.sum()
    if agg == "seq-mean-token-sum":
        return row_sums.sum() / n_rows
    return torch.where(has, row_sums / torch.where(has, row_tokens, 1.0), 0.0).sum() / n_rows


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
    """Clipped value loss: v_c = old_v + clip(v − old_v, −clip, clip),
    l = ½·max((v − R)², (v_c − R)²) (½ (v − R)² when ``clip`` is None), aggregated by ``agg``.

    Args:
        values, old_values, returns, mask: ``(B, T)``, or ``(N,)``: one row, or packed sequences
        with ``cu_seqlens`` ``(S + 1,)`` (each a row of the seq aggregations); old_values and
        returns are constants.

    Returns:
        ``(loss, clipfrac)``, 0-d fp32: clipfrac is the masked fraction of tokens where the
        clipped term is larger.
    """
    rows = None if cu_seqlens is None else Rows(cu_seqlens, values.shape[0])
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
    return agg_rows(loss, m, agg, rows), masked_mean(clipped.to(v.dtype), m)


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
