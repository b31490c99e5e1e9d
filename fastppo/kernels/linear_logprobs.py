"""Fused lm_head + log-probs: launchers that never hold more than one chunk of logits.

Rows of ``hidden`` (N, H) are taken ``chunk`` at a time. Each chunk's logits
    z = h_c·Wᵀ (+ b),   z ← c·tanh(z / c) with a softcap c,
come from cuBLAS (``torch.mm``, one (chunk, H) × (H, V) product), and the Triton kernels of
``token_logprobs`` turn them into log-probs, entropy and logsumexp (one read). The backward
recomputes each chunk's logits, writes ∂/∂z over them in place (one read, one write; × the
softcap's 1 − (z/c)² when there is one), then
    ∂h_c = ∂z·W,   ∂W += ∂zᵀ·h_c (fp32),   ∂b += Σ_rows ∂z (fp32).
Extra memory: one chunk of logits, O(chunk·V), plus the fp32 weight-gradient accumulator.

Batch invariance: the last chunk is padded with zero rows, so every GEMM has the same shape and
a row's outputs do not depend on which other rows share its call; the softmax kernels read the
real rows only.
"""

import torch


def chunk_rows(V: int, itemsize: int) -> int:
    """Rows per chunk by default: about 256 MiB of logits (power of two, 16 to 4096)."""
    rows = (256 << 20) // max(V * itemsize, 1)
    return max(16, min(4096, 1 << max(rows.bit_length() - 1, 0)))


def _chunks(N: int, chunk: int):
    for start in range(0, N, chunk):
        yield start, min(start + chunk, N)


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` (n, H) extended to ``rows`` rows of zeros: every GEMM of a call has one shape."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    """(chunk, V) logits of one chunk in the compute dtype (fp32 after a softcap)."""
    z = h @ weight.T
    if bias is not None:
        z += bias
    if softcap is not None:
        z = softcap * torch.tanh(z.float() / softcap)
    return z


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
    softcap: float | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden`` (N, H) and ``weight`` (V, H) (and ``bias`` (V,)) in the compute dtype, ``labels``
    (N, K) contiguous. Returns fp32 ``logp`` (N, K), ``entropy`` (N,) and ``lse`` (N,)."""
    from .token_logprobs import token_logprobs_fwd

    N, K = labels.shape
    logp = torch.empty((N, K), dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    for start, stop in _chunks(N, chunk):
        z = _logits(_padded(hidden[start:stop], chunk), weight, bias, softcap)
        # The GEMM has the padded shape; the softmax kernel reads the real rows only.
        out = token_logprobs_fwd(z[: stop - start], labels[start:stop], temperature=temperature,
                                 ignore_index=ignore_index)  # fmt: skip
        for dst, src in zip((logp, entropy, lse), out, strict=True):
            dst[start:stop] = src
    return logp, entropy, lse


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    softcap: float | None,
    chunk: int,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of hidden (compute dtype), weight and bias (fp32; None when not needed)."""
    from .token_logprobs import token_logprobs_bwd

    N, K = labels.shape
    grad_hidden = torch.empty_like(hidden)
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    )
    grad_bias = (
        torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias_grad else None
    )
    for start, stop in _chunks(N, chunk):
        n = stop - start
        h = _padded(hidden[start:stop], chunk)
        z = _logits(h, weight, bias, softcap)
        cap_grad = 1 - (z[:n] / softcap).square() if softcap is not None else None  # d(c·tanh(x/c))/dx
        # ∂/∂z over the real rows' logits, in place; the padding rows' gradient is 0.
        token_logprobs_bwd(
            z[:n], labels[start:stop], lse[start:stop], entropy[start:stop],
            None if grad_logp is None else grad_logp[start:stop],
            None if grad_entropy is None else grad_entropy[start:stop],
            temperature=temperature, ignore_index=ignore_index, inplace=True,
        )  # fmt: skip
        z[n:] = 0
        if cap_grad is not None:
            z[:n] *= cap_grad
        grad_z = z.to(hidden.dtype)
        grad_hidden[start:stop] = (grad_z @ weight)[:n]
        if grad_weight is not None:
            grad_weight += (grad_z.T @ h).float()
        if grad_bias is not None:
            grad_bias += grad_z[:n].float().sum(0)
    return grad_hidden, grad_weight, grad_bias
