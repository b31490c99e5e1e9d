"""fastppo as the log-prob and GRPO-loss backend of Hugging Face TRL (written against trl 1.16.0).

``patch()`` replaces:

- the log-prob functions below (computed by ``fastppo.token_logprobs``) and TRL's fused LM head
  (``ChunkedLogProbFunction``, by ``fastppo.linear_logprobs``), see below;
- ``GRPOTrainer._compute_loss`` by ``fastppo.integrations.trl_grpo.grpo_compute_loss``: the GRPO
  family's policy loss (loss types grpo, bnpo, dr_grpo, dapo, cispo, sapo; token and sequence
  importance sampling; the vLLM importance-sampling ratio; the beta KL term; the static entropy
  bonus) in one call of ``fastppo.ppo_policy_loss``, with TRL's metrics. What it cannot give
  exactly (vespo, luspo, delta, the off-policy and entropy masks, ...) runs TRL's own; the list is
  in that module's docstring.

Drop-in replacements, same signatures and return values, computed by ``fastppo.token_logprobs``:

- ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``
- ``entropy_from_logits(logits, chunk_size=128)``
- ``selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
  row_mask=None)`` (all three from ``trl.trainer.utils``)
- ``kernel_selective_log_softmax_and_entropy(logits, index, temperature=1.0, row_mask=None)``, TRL's
  Triton kernel entry ``trl.kernels.logprob_entropy.selective_log_softmax_and_entropy``.

``patch()`` installs them in ``trl.trainer.utils`` / ``trl.kernels`` and in every imported ``trl``
module that bound them by name (the experimental CPO, ORPO, A2PO, TPO, SDFT, SDPO trainers, ...),
and sets ``GRPOTrainer._compute_loss`` on the class (subclasses that do not override it inherit
it); ``unpatch()`` restores TRL's, the class's own entry included; ``with patched(): ...`` does
both.

What TRL returns depends on where it runs, and the adapter returns the same:

- TRL runs its Triton kernel when triton is available, the logits are on CUDA/XPU, fp16/bf16/fp32,
  1-3 dimensional with a unit last stride, and ``index`` (and ``row_mask``) have the logits' leading
  shape. Its outputs are then fp32. The adapter returns fp32 in exactly those cases.
- Otherwise (CPU, fp64, top-K ``index`` of shape ``(..., K)``, 4-D logits, ...) TRL falls back to
  PyTorch and returns ``logits.dtype``; the adapter casts fastppo's fp32 (fp64 for fp64) result to
  ``logits.dtype``. TRL's fallback computes bf16/fp16 inputs in that dtype (``logits / temperature``
  and ``log_softmax`` rounded to bf16), fastppo in fp32: the adapter's half-precision values are
  the exact ones correctly rounded, TRL's are up to about one unit in the last place off for
  log-probs and three to four for entropies (more with ``temperature != 1``, where TRL first rounds
  ``logits / temperature``). The two can therefore differ by that much.

Where TRL's own behaviour is undefined or an error, the adapter gives the mathematically meant
result: 1-D logits on CPU (TRL's fallback loops over the vocabulary), empty batches, ``-inf`` logits
(finite entropy instead of NaN). ``chunk_size`` only bounds the memory of TRL's fallback; fastppo
never materialises the softmax, so it is accepted and unused (as on TRL's kernel path).

TRL's fused LM head: in trl 1.16.0 the GRPO, RLOO, DPO, KTO and SFT trainers call none of the
functions above; they score completions with ``add_fused_lm_head``, whose forward calls
``trl.kernels.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature,
chunk_size, final_logit_softcapping, logit_scale, outputs)``. ``ChunkedLogProbFunction`` here has
that ``apply`` with TRL's defaults (``outputs`` defaults to all four of TRL's optional outputs, as
TRL's does) and its five outputs. ``fastppo.linear_logprobs`` computes them when ``outputs`` asks
for no more than the entropy (what the GRPO and RLOO trainers ask); ``chunk_size`` (TRL's
vocabulary tile) is TRL's own tuning and is not used. A call that asks for ``log_sum_sq_probs``,
``mean_logits`` or ``is_top1`` (TRL's default, the KTO and SFT trainers) runs TRL's original,
which computes them; fastppo has no fused form of them.

``patch()`` checks the installed trl against the tested range (``~=1.16.0``): outside it, it warns
once and keeps TRL's functions, unless ``patch(force=True)``.
"""

import torch

import fastppo
from fastppo.integrations._patching import TRL
from fastppo.integrations.trl_grpo import grpo_compute_loss

__all__ = [
    "ChunkedLogProbFunction",
    "entropy_from_logits",
    "grpo_compute_loss",
    "kernel_selective_log_softmax_and_entropy",
    "patch",
    "patched",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch",
]

# The ignore_index given to fastppo for rows that row_mask switches off. No valid index is
# negative, and unlike -100 no caller passes this one by accident (fastppo would then return 0
# where TRL raises).
_MASKED = -(2**31)


def _trl_runs_kernel(
    logits: torch.Tensor, index: torch.Tensor | None = None, row_mask: torch.Tensor | None = None
) -> bool:
    """Whether TRL 1.16.0 would run its Triton kernel (and so return fp32) on these inputs:
    ``is_triton_available() and _supports_trl_loss_kernel(logits, index, row_mask)`` in
    ``trl/trainer/utils.py``."""
    supported = (
        logits.device.type in ("cuda", "xpu")
        and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 1 <= logits.ndim <= 3
        and logits.stride(-1) == 1
        and logits.shape[-1] > 0
    )
    if index is not None:
        supported = (
            supported
            and index.shape == logits.shape[:-1]
            and index.dtype in (torch.int32, torch.int64)
            and index.device == logits.device
        )
    if row_mask is not None:
        supported = (
            supported
            and index is not None
            and row_mask.shape == index.shape
            and row_mask.dtype in (torch.bool, torch.int32, torch.int64)
            and row_mask.device == logits.device
        )
    if not supported:
        return False
    from transformers.utils import is_triton_available

    return is_triton_available()


def _check_temperature(temperature) -> None:
    if temperature <= 0:
        raise ValueError("temperature must be positive")  # TRL's message


def _labels(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """``index`` with the entries where ``row_mask == 0`` replaced by the ignore value."""
    if row_mask is None:
        return index
    if index.dtype not in (torch.int32, torch.int64):
        index = index.long()
    return index.masked_fill(row_mask == 0, _MASKED)


def _logprobs_and_entropy(logits, index, temperature, row_mask):
    return fastppo.token_logprobs(
        logits,
        _labels(index, row_mask),
        temperature=temperature,
        ignore_index=_MASKED,
        return_entropy=True,
        check_labels=False,  # no host sync; a bad index gives NaN (CUDA) or gather's error (CPU)
    )


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``trl.trainer.utils.selective_log_softmax``: ``log_softmax(logits / temperature)`` gathered at
    ``index`` (shape ``(...)``, or ``(..., K)`` for K per row); 0 where ``row_mask == 0``."""
    _check_temperature(temperature)
    logp = fastppo.token_logprobs(
        logits, _labels(index, row_mask), temperature=temperature, ignore_index=_MASKED, check_labels=False
    )
    return logp if _trl_runs_kernel(logits, index, row_mask) else logp.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """``trl.trainer.utils.entropy_from_logits``: the entropy (nats) of ``softmax(logits)`` per row,
    shape ``logits.shape[:-1]``. ``chunk_size`` is accepted and unused (see the module docstring)."""
    index = torch.zeros(logits.shape[:-1], dtype=torch.int32, device=logits.device)
    _, entropy = fastppo.token_logprobs(logits, index, return_entropy=True, check_labels=False)
    return entropy if _trl_runs_kernel(logits) else entropy.to(logits.dtype)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``trl.trainer.utils.selective_log_softmax_and_entropy``: ``(logprobs, entropy)`` of
    ``softmax(logits / temperature)`` in one pass; both 0 where ``row_mask == 0``. With
    ``entropy_requires_grad=False`` the entropy is detached (and costs the backward nothing)."""
    _check_temperature(temperature)
    logp, entropy = _logprobs_and_entropy(logits, index, temperature, row_mask)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    if _trl_runs_kernel(logits, index, row_mask):
        return logp, entropy
    return logp.to(logits.dtype), entropy.to(logits.dtype)


def kernel_selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``trl.kernels.logprob_entropy.selective_log_softmax_and_entropy``, TRL's Triton entry point:
    ``(logprobs, entropy)``, always fp32, both 0 where ``row_mask == 0``."""
    logp, entropy = _logprobs_and_entropy(logits, index, temperature, row_mask)
    return logp.float(), entropy.float()


#: TRL's ``trl.kernels.chunked_logprob.OPTIONAL_OUTPUTS``, the default of its ``outputs``.
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_CHUNKED = "trl.kernels.chunked_logprob"


class ChunkedLogProbFunction:
    """TRL's ``ChunkedLogProbFunction`` (an autograd Function used through ``apply``): the tuple
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each (N,) or None where
    ``outputs`` does not ask for it, as TRL's. ``fastppo.linear_logprobs`` computes the log-probs
    and the entropy (fp32); a call asking for any of the other three runs TRL's own."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):  # fmt: skip
        if any(name in outputs for name in OPTIONAL_OUTPUTS[1:]):  # TRL's test: `name in outputs`
            original = TRL.original(_CHUNKED, "ChunkedLogProbFunction")
            return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                  final_logit_softcapping, logit_scale, outputs)  # fmt: skip
        if logit_scale != 1.0:  # (h·Wᵀ + b)·s = (s·h)·Wᵀ + s·b, before the softcap as TRL has it
            hidden = hidden * logit_scale
            bias = None if bias is None else bias * logit_scale
        logp, entropy = fastppo.linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True,
            logit_softcap=final_logit_softcapping,
        )  # fmt: skip
        return logp, entropy if "entropy" in outputs else None, None, None, None


def _kernel_entry_exists() -> bool:
    from transformers.utils import is_triton_available

    return is_triton_available()  # TRL defines its kernel entry point only then


TRL.add(_CHUNKED, "ChunkedLogProbFunction", ChunkedLogProbFunction)
TRL.add("trl.trainer.utils", "selective_log_softmax", selective_log_softmax)
TRL.add("trl.trainer.utils", "entropy_from_logits", entropy_from_logits)
TRL.add("trl.trainer.utils", "selective_log_softmax_and_entropy", selective_log_softmax_and_entropy)
TRL.add(
    "trl.kernels.logprob_entropy",
    "selective_log_softmax_and_entropy",
    kernel_selective_log_softmax_and_entropy,
    when=_kernel_entry_exists,
)
patch = TRL.patch
unpatch = TRL.unpatch
patched = TRL.patched
