"""``fastppo.token_logprobs``: per-token log-probs (and entropy) gathered from logits.

Layers: Triton kernels and launchers in ``fastppo.kernels.token_logprobs`` →
``TokenLogprobsFunction`` (autograd) → ``token_logprobs`` (checks, dispatch). The reference of
the same name is ``fastppo.reference.token_logprobs``.
"""

import torch
from torch.autograd.function import once_differentiable

from fastppo import reference
from fastppo._backend import use_triton
from fastppo._checks import FLOAT_DTYPES, check_int, check_positive, check_same_device, check_tensor
from fastppo._checks import check_labels as check_label_values


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels.

    forward(logits (..., V), labels (N, K), temperature, ignore_index, inplace_backward)
        -> logp (N, K), entropy (N,)
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, inplace_backward):
        from fastppo.ops._library import token_logprobs_fwd

        logp, entropy, lse = token_logprobs_fwd(
            logits, labels, temperature=temperature, ignore_index=ignore_index
        )
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        # An output nobody differentiates arrives as None and costs nothing in the kernel.
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        from fastppo.ops._library import token_logprobs_bwd

        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        logits, labels, lse, entropy = ctx.saved_tensors
        grad_logits = token_logprobs_bwd(
            logits,
            labels,
            lse,
            entropy,
            grad_logp,
            grad_entropy,
            temperature=ctx.temperature,
            ignore_index=ctx.ignore_index,
            inplace=ctx.inplace_backward,
        )
        if ctx.inplace_backward:
            # Anything else that saved these logits now fails loudly instead of reading gradients.
            torch.autograd.graph.increment_version(logits)
        return grad_logits, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    check_labels: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``, fused.

    One read of the logits computes the log-prob and the entropy of every row; the backward
    reads them once more and writes their gradient once. Rows whose label is ``ignore_index``
    give 0, get no gradient and are never read.

    Args:
        logits: ``(..., V)`` bf16, fp16, fp32 or fp64. Non-contiguous views such as
            ``logits[:, :-1]`` are read in place.
        labels: ``(...)`` integer labels in [0, V), or ``(..., K)`` for K labels per row
            (top-K gather; the entropy is still one value per row).
        temperature: τ > 0 (runtime argument: a new value does not recompile).
        ignore_index: label value of entries that do not count (runtime argument).
        return_entropy: also return the per-row entropy ``(...)``.
        inplace_backward: write the logits' gradient into the logits' own storage, so
            forward + backward need no extra N×V buffer. The logits' values are destroyed by the
            backward; anything else that saved them for its backward then raises.
        check_labels: verify labels lie in [0, V) or equal ``ignore_index`` (no host read:
            ``torch._assert_async``, which raises at once on CPU and fails the CUDA stream
            asynchronously). When off, out-of-range labels give NaN (never an out-of-bounds read).

    Returns:
        ``logp`` shaped like ``labels``, fp32 (fp64 for fp64 logits); with ``return_entropy``,
        ``(logp, entropy)``.

    Example::

        logits = model(input_ids).logits                      # (B, T, V)
        logp = fastppo.token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature=0.7)
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("labels", labels, integer=True)
    check_same_device(logits=logits, labels=labels)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    if V == 0:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}"
        )
    top_k = labels.dim() == logits.dim()
    if (labels.shape[:-1] if top_k else labels.shape) != lead:
        raise ValueError(
            f"labels must have shape {tuple(lead)} (or {tuple(lead)} + (K,) for top-K) to match logits "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if check_labels:
        check_label_values(labels, V, ignore_index)

    if not use_triton(logits):
        return reference.token_logprobs(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )

    from fastppo.kernels import can_address

    if not can_address(logits):
        logits = logits.contiguous()
    K = labels.shape[-1] if top_k else 1
    labels_2d = labels.reshape(-1, K).contiguous()
    logp, entropy = TokenLogprobsFunction.apply(
        logits, labels_2d, temperature, ignore_index, inplace_backward
    )
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, entropy.view(lead)
    return logp
