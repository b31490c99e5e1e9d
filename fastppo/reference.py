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
