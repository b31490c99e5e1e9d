"""``fastppo.linear_logprobs``: per-token log-probs (and entropy) straight from hidden states and
the lm_head weight; the logits never exist beyond one chunk of rows.

Math (DESIGN §4, fused head), per row with hidden state h and label y:
    x = h·Wᵀ (+ b),   z = c·tanh(x / c) with a softcap c (else z = x),   then z / τ:
    logp = z[y]/τ − logsumexp(z/τ),   entropy = logsumexp(z/τ) − Σ softmax(z/τ)·z/τ
Backward: ∂/∂z as for token_logprobs, ∂/∂x = ∂/∂z·(1 − (z/c)²), ∂h = ∂x·W, ∂W = Σ_rows ∂xᵀ·h,
∂b = Σ_rows ∂x (the last two accumulated in fp32).

Layers: chunked launchers in ``fastppo.kernels.linear_logprobs`` (cuBLAS tiles + the
token_logprobs Triton kernels) → ``LinearLogprobsFunction`` (autograd) → ``linear_logprobs``
(checks, dispatch). The reference of the same name is ``fastppo.reference.linear_logprobs``.
"""

import torch
from torch.autograd.function import once_differentiable

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import check_int, check_labels, check_positive, check_same_device, check_tensor

HALF_AND_SINGLE = (torch.bfloat16, torch.float16, torch.float32)


class LinearLogprobsFunction(torch.autograd.Function):
    """forward(hidden (N, H), weight (V, H), bias (V,) | None, labels (N, K), temperature,
    ignore_index, softcap, chunk) -> logp (N, K), entropy (N,), both fp32. ``hidden``, ``weight``
    and ``bias`` arrive in the compute dtype; rows whose labels are all ignored give 0."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, softcap, chunk):
        from fastppo.ops._library import linear_logprobs_fwd

        logp, entropy, lse = linear_logprobs_fwd(
            hidden, weight, bias, labels, temperature=temperature, ignore_index=ignore_index,
            softcap=softcap, chunk=chunk,
        )  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.settings = dict(temperature=temperature, ignore_index=ignore_index, softcap=softcap, chunk=chunk)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        from fastppo.ops._library import linear_logprobs_bwd

        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 8
        grad_hidden, grad_weight, grad_bias = linear_logprobs_bwd(
            hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy,
            need_weight_grad=ctx.needs_input_grad[1], need_bias_grad=ctx.needs_input_grad[2], **ctx.settings,
        )  # fmt: skip
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return grad_hidden, cast(grad_weight, weight), cast(grad_bias, bias), None, None, None, None, None


def _compute_dtype(hidden: torch.Tensor, head_dtype: torch.dtype | None) -> torch.dtype:
    """The GEMMs' dtype: ``head_dtype`` when given, else autocast's when it is on, else hidden's."""
    if head_dtype is not None:
        return head_dtype
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


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
    """Log-probabilities of ``labels`` under ``softmax((hidden·weightᵀ + bias) / temperature)``
    without materialising the logits: forward and backward hold one chunk of rows' logits at a time.

    Args:
        hidden: ``(..., H)`` bf16, fp16 or fp32 hidden states (the model body's output).
        weight: ``(V, H)`` lm_head weight (tied embeddings work: it may be the embedding's
            Parameter). No gradient is computed for it when it does not require one (frozen, PEFT).
        labels: ``(...)`` in [0, V) or ``ignore_index``; or ``(..., K)`` for K labels per row.
            Rows whose labels are all ignored give 0 and no gradient (they still go through the
            GEMMs: skipping them would need their count on the host). Values are checked without
            a host read (``torch._assert_async``).
        bias: optional ``(V,)``.
        temperature, ignore_index: as in ``token_logprobs`` (runtime arguments).
        return_entropy: also return the per-row entropy ``(...)``.
        logit_softcap: c for Gemma's z = c·tanh(z / c), applied before the temperature.
        chunk_size: rows per chunk (default: about 256 MiB of logits). Fixed within a call, the
            last chunk padded: a row's outputs are bitwise independent of the other rows.
        head_dtype: dtype of the projection (e.g. ``torch.float32`` for an fp32 lm_head, as vLLM
            users run to keep trainer and sampler log-probs matched). Default: autocast's dtype
            when autocast is on, else ``hidden``'s.

    Returns:
        fp32 ``logp`` shaped like ``labels``; with ``return_entropy``, ``(logp, entropy)``.
    """
    check_tensor("hidden", hidden, dtypes=HALF_AND_SINGLE, min_dim=1)
    check_tensor("weight", weight, dtypes=HALF_AND_SINGLE, min_dim=2)
    check_tensor("labels", labels, integer=True)
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    V, H = weight.shape
    if weight.dim() != 2 or hidden.shape[-1] != H:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, dtypes=HALF_AND_SINGLE)
        check_same_device(hidden=hidden, bias=bias)
        if bias.shape != (V,):
            raise ValueError(f"bias must be ({V},), got {tuple(bias.shape)}")
    if logit_softcap is not None:
        logit_softcap = check_positive("logit_softcap", logit_softcap)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    lead = hidden.shape[:-1]
    top_k = labels.dim() == hidden.dim()
    if (labels.shape[:-1] if top_k else labels.shape) != lead:
        raise ValueError(
            f"labels must have shape {tuple(lead)} (or + (K,)) to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    check_labels(labels, V, ignore_index)

    dtype = _compute_dtype(hidden, head_dtype)
    kwargs = dict(temperature=temperature, ignore_index=ignore_index, logit_softcap=logit_softcap)
    if not use_triton(hidden):
        out = reference.linear_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            return_entropy=True,
            chunk_size=chunk_size,
            head_dtype=dtype,
            **kwargs,
        )
        return out if return_entropy else out[0]

    from fastppo.kernels.linear_logprobs import chunk_rows

    K = labels.shape[-1] if top_k else 1
    labels_2d = labels.reshape(-1, K).contiguous()
    # Every row goes through the GEMMs (rows whose labels are all ignored give 0 and no gradient):
    # leaving them out would need their count on the host, a read that stalls the GPU's queue.
    logp = torch.zeros(labels_2d.shape, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros(labels_2d.shape[0], dtype=torch.float32, device=hidden.device)
    if labels_2d.shape[0]:
        chunk = chunk_size or chunk_rows(V, torch.finfo(dtype).bits // 8)
        head_bias = None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # the op picks its dtype itself
            logp, entropy = LinearLogprobsFunction.apply(
                hidden.reshape(-1, H).to(dtype), weight.to(dtype), head_bias, labels_2d, temperature,
                ignore_index, logit_softcap, chunk,
            )  # fmt: skip
    logp = logp.view(labels.shape)
    return (logp, entropy.view(lead)) if return_entropy else logp
