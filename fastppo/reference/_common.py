"""Helpers shared by the references: accumulation dtype, masked sums and the loss aggregations."""

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Accumulate in fp32 whatever the input; fp64 stays fp64 (gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean")


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
