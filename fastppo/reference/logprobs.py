"""References of ``token_logprobs`` and ``linear_logprobs``."""

import functools

import torch

from fastppo.kernels.linear_logprobs import chunk_rows

from ._common import _acc_dtype


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
    ``chunk_size`` rows at a time (default: the fused path's, about 256 MiB of logits), each chunk
    recomputed in the backward (``torch.utils.checkpoint``), so that no more than one chunk of
    logits is held. Batch-invariant as the fused path is: every chunk is a fresh buffer of one
    shape (the last one padded with zero rows), so every GEMM of a call has one shape and a row's
    outputs are bitwise the same whatever other rows share the call.

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

    step = chunk_size or chunk_rows(weight.shape[0], torch.finfo(dtype).bits // 8)
    # One chunk holds no more than itself: it needs no recomputation.
    run = (
        chunk_outputs
        if h.shape[0] <= step
        else functools.partial(checkpoint, chunk_outputs, use_reentrant=False)
    )

    def chunk(i):
        n = min(step, h.shape[0] - i)
        h_c = torch.cat([h[i : i + n], h.new_zeros(step - n, H)])  # a fresh buffer, always
        y_c = torch.cat([y[i : i + n], y.new_full((step - n, K), ignore_index)])
        logp_c, entropy_c = run(h_c, y_c, weight, bias)
        return logp_c[:n], entropy_c[:n]

    parts = [chunk(i) for i in range(0, h.shape[0], step)]
    logp = torch.cat([p[0] for p in parts]) if parts else h.new_zeros((0, K), dtype=torch.float32)
    entropy = torch.cat([p[1] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)
    logp = logp.float().view(labels.shape)
    return (logp, entropy.float().view(hidden.shape[:-1])) if return_entropy else logp
