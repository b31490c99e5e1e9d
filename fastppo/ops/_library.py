"""The Triton launches of fastppo's ops as ``torch.library`` custom ops (namespace ``fastppo``).

A launcher reads ``data_ptr``s, picks block sizes on the host and (in the interpreter) copies
storages: nothing Dynamo can trace. As a custom op each launch is one opaque node of known
output shapes (the ``register_fake`` functions), so ``torch.compile(fullgraph=True)`` traces a
function that calls fastppo's ops; eager calls run the launcher as before. The ops' autograd
stays in the ``autograd.Function``s of ``fastppo.ops``, whose forward and backward call these.

Custom-op arguments are typed (Tensor, Tensor?, int, float, bool, str, dtype); outputs are tensors:
a gradient the caller does not need comes back as an empty tensor, turned into None by the
Python wrapper from the same flag (known when tracing). Launchers are imported on first call,
so importing this module does not need triton.
"""

import torch
from torch import Tensor
from torch.library import custom_op

from fastppo._checks import check_cu_seqlens, check_layout, check_tensor


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other input gives fp32 (the ops' accumulation dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fp32(like: Tensor, shape=None) -> Tensor:
    return like.new_empty(like.shape if shape is None else shape, dtype=torch.float32)


def _nothing(like: Tensor) -> Tensor:
    """The placeholder of an output that was not asked for (custom ops return no None)."""
    return like.new_empty(0)


def _longest(cu_seqlens: Tensor | None, tokens: Tensor, longest: int) -> int:
    """``longest`` as given, or (-1, under torch.compile) read from ``cu_seqlens`` in the op."""
    if longest >= 0:
        return longest
    if cu_seqlens is None:
        return tokens.shape[-1]
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def layout(cu_seqlens: Tensor | None, shape: torch.Size, device) -> tuple[Tensor | None, int]:
    """``check_layout`` for the ops that launch a scan: eager reads the bounds once to check them
    and to get the longest sequence. Under torch.compile nothing may read the host, so the checks
    of the values run as device asserts and the longest sequence is -1: the op reads it."""
    if cu_seqlens is None or not torch.compiler.is_compiling():
        return check_layout(cu_seqlens, shape, device)
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:  # as check_layout: the kernels index with int32 bounds
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    return check_cu_seqlens(cu_seqlens, shape, device), -1


# --- advantages (no autograd) ----------------------------------------------------------------------


@custom_op("fastppo::gae", mutates_args=())
def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    cu_seqlens: Tensor | None,
    gamma: float,
    lam: float,
    carry_masked: bool,
    longest: int,
) -> tuple[Tensor, Tensor]:
    """(advantages, returns) fp32 of contiguous padded (B, T) or packed (N,) inputs."""
    from fastppo.kernels.gae import gae_fwd

    return gae_fwd(
        rewards, values, mask, cu_seqlens, gamma=gamma, lam=lam, carry_masked=carry_masked,
        longest=_longest(cu_seqlens, rewards, longest),
    )  # fmt: skip


@gae.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam, carry_masked, longest):
    return _fp32(rewards), _fp32(rewards)


@custom_op("fastppo::discounted_returns", mutates_args=())
def discounted_returns(
    rewards: Tensor, mask: Tensor, cu_seqlens: Tensor | None, gamma: float, longest: int
) -> Tensor:
    """fp32 G of contiguous padded (B, T) or packed (N,) inputs (the gae scan with V = 0)."""
    from fastppo.kernels.gae import gae_fwd

    advantages, _ = gae_fwd(
        rewards, None, mask, cu_seqlens, gamma=gamma, lam=1.0, carry_masked=True,
        longest=_longest(cu_seqlens, rewards, longest),
    )  # fmt: skip
    return advantages


@discounted_returns.register_fake
def _(rewards, mask, cu_seqlens, gamma, longest):
    return _fp32(rewards)


@custom_op("fastppo::shape_rewards", mutates_args=())
def shape_rewards(
    scores: Tensor, mask: Tensor, kl: Tensor | None, cu_seqlens: Tensor | None, kl_coef: float, longest: int
) -> Tensor:
    """fp32 per-token rewards shaped like ``mask``; ``scores`` (B,), all contiguous."""
    from fastppo.kernels.shape_rewards import shape_rewards_fwd

    return shape_rewards_fwd(
        scores, mask, kl, cu_seqlens, kl_coef=kl_coef, longest=_longest(cu_seqlens, mask, longest)
    )


@shape_rewards.register_fake
def _(scores, mask, kl, cu_seqlens, kl_coef, longest):
    return _fp32(mask)


@custom_op("fastppo::group_advantages", mutates_args=())
def group_advantages(scores: Tensor, group_ids: Tensor, method: str, eps: float) -> Tensor:
    """fp32 (B,) advantages; the launcher reads the number of groups inside the op."""
    from fastppo.kernels.group_advantages import group_advantages_fwd

    return group_advantages_fwd(scores, group_ids, method=method, eps=eps)


@group_advantages.register_fake
def _(scores, group_ids, method, eps):
    return _fp32(scores)


@custom_op("fastppo::masked_whiten", mutates_args=())
def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool) -> Tensor:
    """fp32 (N,) of flat contiguous ``x`` and ``mask`` (N,)."""
    from fastppo.kernels.masked_whiten import masked_whiten_fwd

    return masked_whiten_fwd(x, mask, shift_mean=shift_mean)


@masked_whiten.register_fake
def _(x, mask, shift_mean):
    return _fp32(x)


# --- log-probs (autograd in TokenLogprobsFunction / LinearLogprobsFunction) -------------------------


@custom_op("fastppo::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(
    logits: Tensor, labels: Tensor, *, temperature: float, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``logits`` (..., V) read in place, ``labels`` (N, K) → logp (N, K), entropy (N,), lse (N,)."""
    from fastppo.kernels.token_logprobs import token_logprobs_fwd as launch

    return launch(logits, labels, temperature=temperature, ignore_index=ignore_index)


@token_logprobs_fwd.register_fake
def _(logits, labels, *, temperature, ignore_index):
    N, K = labels.shape
    dtype = _out_dtype(logits.dtype)
    return (logits.new_empty((N, K), dtype=dtype), logits.new_empty(N, dtype=dtype),
            logits.new_empty(N, dtype=dtype))  # fmt: skip


@custom_op("fastppo::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd(
    logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor | None,
    grad_entropy: Tensor | None, temperature: float, ignore_index: int,
) -> Tensor:  # fmt: skip
    from fastppo.kernels.token_logprobs import token_logprobs_bwd as launch

    return launch(logits, labels, lse, entropy, grad_logp, grad_entropy,
                  temperature=temperature, ignore_index=ignore_index)  # fmt: skip


@_token_logprobs_bwd.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    return logits.new_empty(logits.shape)


@custom_op("fastppo::token_logprobs_bwd_", mutates_args=("logits",))
def _token_logprobs_bwd_inplace(
    logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor | None,
    grad_entropy: Tensor | None, temperature: float, ignore_index: int,
) -> None:  # fmt: skip
    from fastppo.kernels.token_logprobs import token_logprobs_bwd as launch

    launch(logits, labels, lse, entropy, grad_logp, grad_entropy,
           temperature=temperature, ignore_index=ignore_index, inplace=True)  # fmt: skip


def token_logprobs_bwd(
    logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor | None,
    grad_entropy: Tensor | None, *, temperature: float, ignore_index: int, inplace: bool = False,
) -> Tensor:  # fmt: skip
    """The launcher's contract: the logits' gradient, written over ``logits`` with ``inplace``
    (an op that mutates its input and returns nothing, then ``logits`` itself)."""
    args = (logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index)
    if not inplace:
        return _token_logprobs_bwd(*args)
    _token_logprobs_bwd_inplace(*args)
    return logits


@custom_op("fastppo::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, *, temperature: float,
    ignore_index: int, softcap: float | None, chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``hidden`` (N, H), ``weight`` (V, H), ``labels`` (N, K) → fp32 logp (N, K), entropy, lse (N,)."""
    from fastppo.kernels.linear_logprobs import linear_logprobs_fwd as launch

    return launch(hidden, weight, bias, labels, temperature=temperature, ignore_index=ignore_index,
                  softcap=softcap, chunk=chunk)  # fmt: skip


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, *, temperature, ignore_index, softcap, chunk):
    N, K = labels.shape
    return _fp32(hidden, (N, K)), _fp32(hidden, (N,)), _fp32(hidden, (N,))


@custom_op("fastppo::linear_logprobs_bwd", mutates_args=())
def _linear_logprobs_bwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor, entropy: Tensor,
    grad_logp: Tensor | None, grad_entropy: Tensor | None, temperature: float, ignore_index: int,
    softcap: float | None, chunk: int, need_weight_grad: bool, need_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    from fastppo.kernels.linear_logprobs import linear_logprobs_bwd as launch

    grads = launch(
        hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature=temperature,
        ignore_index=ignore_index, softcap=softcap, chunk=chunk, need_weight_grad=need_weight_grad,
        need_bias_grad=need_bias_grad,
    )  # fmt: skip
    return tuple(_nothing(hidden) if g is None else g for g in grads)


@_linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
      softcap, chunk, need_weight_grad, need_bias_grad):  # fmt: skip
    grad_weight = _fp32(weight) if need_weight_grad else _nothing(hidden)
    grad_bias = _fp32(weight, weight.shape[:1]) if need_bias_grad else _nothing(hidden)
    return torch.empty_like(hidden), grad_weight, grad_bias


def linear_logprobs_bwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor, entropy: Tensor,
    grad_logp: Tensor | None, grad_entropy: Tensor | None, *, temperature: float, ignore_index: int,
    softcap: float | None, chunk: int, need_weight_grad: bool, need_bias_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """The launcher's contract: grad of hidden, and of weight and bias (fp32) or None unasked."""
    grad_hidden, grad_weight, grad_bias = _linear_logprobs_bwd(
        hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
        softcap, chunk, need_weight_grad, need_bias_grad,
    )  # fmt: skip
    return grad_hidden, grad_weight if need_weight_grad else None, grad_bias if need_bias_grad else None


# --- losses (autograd in KLPenaltyFunction / ValueLossFunction / PPOPolicyLossFunction) ------------


@custom_op("fastppo::kl_penalty_fwd", mutates_args=())
def kl_penalty_fwd(logp: Tensor, ref_logp: Tensor, *, estimator: str, clamp: float | None) -> Tensor:
    """Per-token KL (N,) of flat contiguous ``logp`` and ``ref_logp``; fp32 (fp64 for fp64)."""
    from fastppo.kernels.kl_penalty import kl_penalty_fwd as launch

    return launch(logp, ref_logp, estimator=estimator, clamp=clamp)


@kl_penalty_fwd.register_fake
def _(logp, ref_logp, *, estimator, clamp):
    both64 = logp.dtype == ref_logp.dtype == torch.float64
    return logp.new_empty(logp.shape, dtype=torch.float64 if both64 else torch.float32)


@custom_op("fastppo::kl_penalty_bwd", mutates_args=())
def _kl_penalty_bwd(
    logp: Tensor, ref_logp: Tensor, grad_kl: Tensor, estimator: str, clamp: float | None,
    need_logp: bool, need_ref: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    from fastppo.kernels.kl_penalty import kl_penalty_bwd as launch

    grads = launch(logp, ref_logp, grad_kl, estimator=estimator, clamp=clamp, need_logp=need_logp,
                   need_ref=need_ref)  # fmt: skip
    return tuple(_nothing(logp) if g is None else g for g in grads)


@_kl_penalty_bwd.register_fake
def _(logp, ref_logp, grad_kl, estimator, clamp, need_logp, need_ref):
    return (torch.empty_like(logp) if need_logp else _nothing(logp),
            torch.empty_like(ref_logp) if need_ref else _nothing(logp))  # fmt: skip


def kl_penalty_bwd(
    logp: Tensor, ref_logp: Tensor, grad_kl: Tensor, *, estimator: str, clamp: float | None,
    need_logp: bool, need_ref: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """The launcher's contract: the gradients of logp and ref_logp, None where not needed."""
    grad_logp, grad_ref = _kl_penalty_bwd(logp, ref_logp, grad_kl, estimator, clamp, need_logp, need_ref)
    return grad_logp if need_logp else None, grad_ref if need_ref else None


def _layout_args(layout) -> tuple:
    """A ``TokenLayout`` as the typed arguments of a custom op (rebuilt by ``_layout``)."""
    return layout.cu_seqlens, layout.n_tokens, layout.n_seqs, layout.row_len, layout.block, layout.parts


def _layout(cu_seqlens, n_tokens, n_seqs, row_len, block, parts):
    from fastppo.kernels.masked_reduce import TokenLayout

    return TokenLayout(n_tokens, n_seqs, row_len, cu_seqlens, block, parts)


@custom_op("fastppo::value_loss_fwd", mutates_args=())
def _value_loss_fwd(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cu_seqlens: Tensor | None,
    n_tokens: int, n_seqs: int, row_len: int, block: int, parts: int, clip: float | None, agg: str,
    store_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    from fastppo.kernels.value_loss import value_loss_fwd as launch

    layout = _layout(cu_seqlens, n_tokens, n_seqs, row_len, block, parts)
    loss, out, dvalues, row_scale = launch(values, old_values, returns, mask, layout, clip=clip, agg=agg,
                                           store_grad=store_grad)  # fmt: skip
    return loss, out, _nothing(out) if dvalues is None else dvalues, row_scale


@_value_loss_fwd.register_fake
def _(values, old_values, returns, mask, cu_seqlens, n_tokens, n_seqs, row_len, block, parts, clip, agg,
      store_grad):  # fmt: skip
    from fastppo.kernels.value_loss import STATS

    dvalues = _fp32(values) if store_grad else _fp32(values, (0,))
    return _fp32(values, ()), _fp32(values, (len(STATS),)), dvalues, _fp32(values, (n_seqs,))


def value_loss_fwd(values, old_values, returns, mask, layout, *, clip, agg, store_grad):
    """The launcher's contract: loss (0-d), out (len(STATS),), ∂l/∂v fp32 or None, row_scale (S,)."""
    loss, out, dvalues, row_scale = _value_loss_fwd(
        values, old_values, returns, mask, *_layout_args(layout), clip, agg, store_grad
    )
    return loss, out, dvalues if store_grad else None, row_scale


@custom_op("fastppo::value_loss_bwd", mutates_args=())
def _value_loss_bwd(
    grad_loss: Tensor, dvalues: Tensor, row_scale: Tensor, cu_seqlens: Tensor | None, n_tokens: int,
    n_seqs: int, row_len: int, block: int, parts: int, values_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    from fastppo.kernels.value_loss import value_loss_bwd as launch

    layout = _layout(cu_seqlens, n_tokens, n_seqs, row_len, block, parts)
    return launch(grad_loss, dvalues, row_scale, layout, values_dtype=values_dtype)


@_value_loss_bwd.register_fake
def _(grad_loss, dvalues, row_scale, cu_seqlens, n_tokens, n_seqs, row_len, block, parts, values_dtype):
    return dvalues.new_empty(dvalues.shape, dtype=values_dtype)


def value_loss_bwd(grad_loss, dvalues, row_scale, layout, *, values_dtype):
    """The launcher's contract: the gradient of the values (their shape and dtype)."""
    return _value_loss_bwd(grad_loss, dvalues, row_scale, *_layout_args(layout), values_dtype)


@custom_op("fastppo::ppo_policy_loss_fwd", mutates_args=())
def _ppo_policy_loss_fwd(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ref_logp: Tensor | None,
    entropy: Tensor | None, weights: Tensor | None, rollout_logp: Tensor | None,
    cu_seqlens: Tensor | None, n_tokens: int, n_seqs: int, row_len: int, block: int, parts: int,
    loss: str, ratio_level: str, clip_low: float, clip_high: float, dual_clip: float | None,
    kl_coef: float, kl_estimator: str, entropy_coef: float, sapo_tau_pos: float, sapo_tau_neg: float,
    rollout_level: str | None, rollout_mask: bool, rollout_low: float, rollout_high: float, agg: str,
    store_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    from fastppo.kernels.ppo_policy_loss import ppo_policy_loss_fwd as launch

    layout = _layout(cu_seqlens, n_tokens, n_seqs, row_len, block, parts)
    loss_value, out, dlogp, row_scale = launch(
        logp, old_logp, advantages, mask, ref_logp, entropy, weights, rollout_logp, layout, loss=loss,
        ratio_level=ratio_level, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
        sapo_tau=(sapo_tau_pos, sapo_tau_neg), rollout_level=rollout_level, rollout_mask=rollout_mask,
        rollout_bounds=(rollout_low, rollout_high), agg=agg, store_grad=store_grad,
    )  # fmt: skip
    return loss_value, out, _nothing(out) if dlogp is None else dlogp, row_scale


@_ppo_policy_loss_fwd.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, entropy, weights, rollout_logp, cu_seqlens, n_tokens,
      n_seqs, row_len, block, parts, *options_then_store_grad):  # fmt: skip
    from fastppo.kernels.ppo_policy_loss import STATS

    dlogp = _fp32(logp) if options_then_store_grad[-1] else _fp32(logp, (0,))
    return _fp32(logp, ()), _fp32(logp, (len(STATS),)), dlogp, _fp32(logp, (n_seqs,))


def ppo_policy_loss_fwd(
    logp, old_logp, advantages, mask, ref_logp, entropy, weights, rollout_logp, layout, *, loss,
    ratio_level, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, sapo_tau,
    rollout_level, rollout_mask, rollout_bounds, agg, store_grad,
):  # fmt: skip
    """The launcher's contract: loss (0-d), out (len(STATS),), ∂l/∂logp fp32 or None, row_scale (S,)."""
    loss_value, out, dlogp, row_scale = _ppo_policy_loss_fwd(
        logp, old_logp, advantages, mask, ref_logp, entropy, weights, rollout_logp, *_layout_args(layout),
        loss, ratio_level, float(clip_low), float(clip_high), dual_clip, float(kl_coef), kl_estimator,
        float(entropy_coef), float(sapo_tau[0]), float(sapo_tau[1]), rollout_level, bool(rollout_mask),
        float(rollout_bounds[0]), float(rollout_bounds[1]), agg, store_grad,
    )  # fmt: skip
    return loss_value, out, dlogp if store_grad else None, row_scale


@custom_op("fastppo::ppo_policy_loss_bwd", mutates_args=())
def _ppo_policy_loss_bwd(
    grad_loss: Tensor, dlogp: Tensor | None, row_scale: Tensor, mask: Tensor, cu_seqlens: Tensor | None,
    n_tokens: int, n_seqs: int, row_len: int, block: int, parts: int, entropy_coef: float,
    logp_dtype: torch.dtype, entropy_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    from fastppo.kernels.ppo_policy_loss import ppo_policy_loss_bwd as launch

    layout = _layout(cu_seqlens, n_tokens, n_seqs, row_len, block, parts)
    grads = launch(grad_loss, dlogp, row_scale, mask, layout, entropy_coef=entropy_coef,
                   logp_dtype=logp_dtype, entropy_dtype=entropy_dtype)  # fmt: skip
    return tuple(_nothing(row_scale) if g is None else g for g in grads)


@_ppo_policy_loss_bwd.register_fake
def _(grad_loss, dlogp, row_scale, mask, cu_seqlens, n_tokens, n_seqs, row_len, block, parts, entropy_coef,
      logp_dtype, entropy_dtype):  # fmt: skip
    grad_logp = _nothing(row_scale) if dlogp is None else dlogp.new_empty(dlogp.shape, dtype=logp_dtype)
    grad_entropy = (
        _nothing(row_scale) if entropy_dtype is None else mask.new_empty(mask.shape, dtype=entropy_dtype)
    )
    return grad_logp, grad_entropy


def ppo_policy_loss_bwd(
    grad_loss, dlogp, row_scale, mask, layout, *, entropy_coef, logp_dtype, entropy_dtype
):
    """The launcher's contract: the gradients of logp and entropy (None where not asked)."""
    grad_logp, grad_entropy = _ppo_policy_loss_bwd(
        grad_loss, dlogp, row_scale, mask, *_layout_args(layout), float(entropy_coef), logp_dtype,
        entropy_dtype,
    )  # fmt: skip
    return grad_logp if dlogp is not None else None, grad_entropy if entropy_dtype is not None else None
