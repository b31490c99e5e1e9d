"""TRL's GRPO policy loss by ``fastppo.ppo_policy_loss`` (written against trl 1.16.0).

``grpo_compute_loss`` replaces ``trl.GRPOTrainer._compute_loss(self, model, inputs)``
(``fastppo.integrations.trl.patch()`` installs it). It scores the completions with TRL's own
``self._get_per_token_logps_and_entropies`` (the same call as TRL), computes the loss in ONE call of
``fastppo.ppo_policy_loss``, logs TRL's metrics (same keys and values) and returns TRL's loss: the
same value and the same gradient for the log-probs, in train and eval mode.

How TRL's options map onto the op (B rows, T completion tokens, m the mask ``completion_mask``,
times ``tool_mask`` when given):

- ``loss_type`` grpo, bnpo, dr_grpo, dapo: ``loss="clip"``, ``clip_low=epsilon_low``,
  ``clip_high=epsilon_high``; cispo: ``loss="cispo"``, ``clip_low=math.inf``,
  ``clip_high=epsilon_high - 1`` (TRL clamps the ratio at ``epsilon_high`` from above only);
  sapo: ``loss="sapo"``, ``sapo_tau=(sapo_temperature_pos, sapo_temperature_neg)``.
- ``importance_sampling_level`` token / sequence: ``ratio_level`` token / sequence.
- aggregation: grpo and sapo average the per-row token means over ALL B rows, where the op's
  ``seq-mean-token-mean`` leaves empty rows out (times #non-empty rows / B); bnpo: ``token-mean``;
  dr_grpo: ``token-sum / (B · max_completion_length)``; dapo and cispo: ``token-sum`` over TRL's
  ``num_items_in_batch`` normalizer. Then TRL's gradient-accumulation scaling (train mode only).
- the vLLM importance-sampling ratio ``inputs["importance_sampling_ratio"]`` ((B, T), or (B, 1)
  for the sequence modes): ``weights``, before the KL term as TRL has it.
- ``beta``: ``kl_coef`` with ``kl_estimator="k3"`` and ``ref_logp=inputs["ref_per_token_logps"]``.
- the static entropy bonus: TRL's own separate term (a masked token mean of the entropies),
  subtracted after the policy loss as TRL does, with its ``policy_loss`` and ``entropy_coef`` logs.

TRL's original ``_compute_loss`` runs instead (fallback) unless the configuration is one the op
reproduces exactly. Decided from the configuration, before scoring, by an allow-list (``_RULES``):

- ``loss_type`` grpo, bnpo, dr_grpo, dapo, cispo or sapo, and ``importance_sampling_level`` token
  or sequence (vespo, luspo and values TRL does not know run TRL's, which raises its error);
- no ``args.delta`` with a clipped loss (a third clamp of the ratio, unclipped branch only), no
  ``off_policy_mask_threshold`` (a data-dependent sequence mask), ``top_entropy_quantile`` not
  below 1 (no entropy mask), ``beta`` 0 or positive and finite without
  ``args.use_bias_correction_kl`` (a KL term times the ratio, with gradient; TRL's default is True:
  with ``beta != 0`` set it False to run the op), no MoE aux loss, no adaptive entropy controller
  (state updated across steps);
- parameters inside the op's domain: ``epsilon_low`` and ``epsilon_high`` > 0 (clip losses), CISPO
  with 1 < ``epsilon_high`` ≤ e¹⁰, SAPO temperatures > 0;
- and every option of ``self.args`` known: the fields GRPOConfig adds to TrainingArguments in trl
  1.16.0, each listed in ``_LOSS_OPTIONS`` (checked by the rules) or ``_OTHER_OPTIONS`` (they do not
  reach ``_compute_loss``). An option this list has never seen (a newer TRL's, a subclass's) runs
  TRL's own loss, whatever its value.

Every fallback logs its reason once (logger ``fastppo.integrations.trl_grpo``, level WARNING).

Decided from the data, after scoring: TRL's ``_compute_loss`` then runs on the log-probs already
computed (``self._get_per_token_logps_and_entropies`` is answered from them: no second forward
pass, the same dropout draw):

- log-probs that are not fp32 (TRL's arithmetic then rounds to bf16/fp16 on the way);
- where the op's bounds on log-ratios bind and TRL has none (clip and sapo losses): a token
  log-ratio above 20 (token level: the op's ratio is exp(min(lr, 20))), a row's mean log-ratio
  above 10 (sequence level: the op's ratio is exp(min(mean, 10))), and with ``beta`` a
  ``ref − logp`` above 20 (the op's k3 goes on linearly beyond it, TRL's exponentially);
- at sequence level (clip, sapo): advantages or vLLM ratios that vary within a row's tokens.
  The op's sequence ratio has the gradient of GSPO-token, which is TRL's only when each row's
  tokens carry the same factor.

These data checks cost one host synchronisation (``.item()``), made after the op is launched;
a configuration that cannot trigger them (cispo without ``beta``, say) makes none.

Differences that remain, all below fp32 rounding of a realistic loss:

- below −20 the op's token ratio is e⁻²⁰ where TRL's is e^lr: the loss and the gradient differ
  there by at most 2.1e-9·|A| per token (2.1e-9·|A·logp| for CISPO);
- the op sums k3 as a series for small ``logp − ref``, where TRL's fp32 ``exp(x) − x − 1``
  cancels: the KL term differs by about beta·1e-7 per token (the ``kl`` metric is TRL's formula);
- the op's sums run in another order (the loss and ``policy_loss`` differ by fp32 rounding).
"""

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Callable

import torch

import fastppo
from fastppo.integrations._patching import TRL

__all__ = ["grpo_compute_loss"]

_MODULE, _METHOD = "trl.trainer.grpo_trainer", "GRPOTrainer._compute_loss"
_CLIP_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")
_AGG = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "token-sum",
    "dapo": "token-sum",
    "cispo": "token-sum",
}
# Multimodal inputs TRL forwards to its scoring call (None when absent).
_MODEL_INPUTS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip
_TOKEN_LOG_RATIO_MAX = 20.0  # the op's bound on token log-ratios (and on ref − logp in k3)
_SEQ_LOG_RATIO_MAX = 10.0  # the op's bound on the sequence mean log-ratio
_ABSENT = object()
_logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()  # the fallback reasons already logged

# GRPOConfig's own options (the fields it adds to TrainingArguments) in trl 1.16.0. Those that
# reach _compute_loss, through the trainer's attributes or ``self.args``, are checked by _RULES:
_LOSS_OPTIONS = frozenset((
    "loss_type", "importance_sampling_level", "beta", "epsilon", "epsilon_high", "delta",
    "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
    "vespo_lambda_neg", "top_entropy_quantile", "off_policy_mask_threshold", "use_bias_correction_kl",
    "router_aux_loss_coef", "entropy_coef", "use_adaptive_entropy", "entropy_coef_min",
    "entropy_coef_max", "entropy_coef_delta", "entropy_target", "use_vllm",
    "vllm_importance_sampling_correction", "steps_per_generation", "max_completion_length",
))  # fmt: skip
# ... and those that do not reach it: model loading, generation, vLLM, rewards, logging. The
# importance-sampling modes and bounds, num_iterations and mask_truncated_completions shape the
# inputs (the ratio, the old log-probs, the mask), which the loss reads whatever their values.
_OTHER_OPTIONS = frozenset((
    "model_init_kwargs", "trust_remote_code", "disable_dropout", "cast_lm_head_to_fp32",
    "num_generations", "num_generations_eval", "ds3_gather_for_generation", "shuffle_dataset",
    "pad_to_multiple_of", "generation_batch_size", "temperature", "top_p", "top_k", "min_p",
    "generation_kwargs", "chat_template_kwargs", "repetition_penalty", "cache_implementation",
    "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
    "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
    "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
    "vllm_tensor_parallel_size", "num_iterations", "reward_weights", "multi_objective_aggregation",
    "scale_rewards", "mask_truncated_completions", "sync_ref_model", "ref_model_mixup_alpha",
    "ref_model_sync_steps", "max_tool_calling_iterations", "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_cap", "log_completions", "log_multimodal", "num_completions_to_print",
    "log_unique_prompts", "log_completions_hub_repo", "use_transformers_continuous_batching",
    "transformers_continuous_batching_config", "use_transformers_paged",
))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Rule:
    """A condition on the trainer's configuration under which the op gives TRL's loss exactly."""

    reason: str  # logged when it does not hold
    holds: Callable[[object], bool]


def _clip_epsilons(t) -> bool:
    return t.loss_type not in _CLIP_LOSSES or (t.epsilon_low > 0.0 and t.epsilon_high > 0.0)


def _cispo_epsilon(t) -> bool:
    return t.loss_type != "cispo" or 1.0 < t.epsilon_high <= math.exp(_SEQ_LOG_RATIO_MAX)


def _sapo_temperatures(t) -> bool:
    return t.loss_type != "sapo" or (t.args.sapo_temperature_pos > 0 and t.args.sapo_temperature_neg > 0)


def _beta(t) -> bool:
    return t.beta == 0.0 or (0.0 < t.beta < math.inf and not t.args.use_bias_correction_kl)


# Checked in order: the first that does not hold is the reason logged.
_RULES = (
    _Rule("loss_type is not one of " + ", ".join(_AGG), lambda t: t.loss_type in _AGG),
    _Rule("importance_sampling_level is not token or sequence",
          lambda t: t.importance_sampling_level in ("token", "sequence")),
    _Rule("args.delta clamps the ratio of a clip loss",
          lambda t: t.args.delta is None or t.loss_type not in _CLIP_LOSSES),
    _Rule("off_policy_mask_threshold masks sequences", lambda t: t.off_policy_mask_threshold is None),
    _Rule("top_entropy_quantile < 1 masks tokens", lambda t: not t.top_entropy_quantile < 1.0),
    _Rule("beta is negative or not finite, or weighted by use_bias_correction_kl", _beta),
    _Rule("the MoE aux loss", lambda t: not t.aux_loss_enabled),
    _Rule("the adaptive entropy controller",
          lambda t: not (t._entropy_bonus_enabled and t.use_adaptive_entropy)),
    _Rule("epsilon_low or epsilon_high is not > 0", _clip_epsilons),
    _Rule("cispo's epsilon_high is outside (1, e^10]", _cispo_epsilon),
    _Rule("a sapo temperature is not > 0", _sapo_temperatures),
)  # fmt: skip


def grpo_compute_loss(self, model, inputs):
    """``GRPOTrainer._compute_loss``: the 0-d loss TRL returns, its metrics logged in
    ``self._metrics[mode]``. ``inputs`` as TRL's (``completion_mask`` (B, T), ``advantages`` (B,)
    or (B, T), ``old_per_token_logps`` (B, T) or absent, ...)."""
    reason = _config_fallback(self)
    if reason is not None:
        return _trl(self, model, inputs, reason=reason)
    scored = _score(self, model, inputs)
    logps, entropies, _ = scored
    if logps.dtype != torch.float32:
        return _trl(self, model, inputs, scored, f"the log-probs are {logps.dtype}, not fp32")
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    advantages = inputs["advantages"]
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    old = inputs.get("old_per_token_logps")
    old = logps.detach() if old is None else old
    ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
    weights = None
    if self.use_vllm and self.vllm_importance_sampling_correction:
        weights = inputs["importance_sampling_ratio"]  # (B, T) or (B, 1)

    loss, _ = fastppo.ppo_policy_loss(
        logps, old, advantages.expand_as(logps), mask,
        agg=_AGG[self.loss_type], ref_logp=ref, kl_coef=self.beta, kl_estimator="k3",
        ratio_level=self.importance_sampling_level,
        weights=None if weights is None else weights.expand_as(logps),
        **_loss_options(self),
    )  # fmt: skip
    log_w = _log_importance_weights(self, logps.detach() - old, mask)
    outside = _outside_op(self, log_w, logps, ref, mask, advantages, weights)
    if outside is not None and outside.item():
        return _trl(self, model, inputs, scored, "the data leave the range where the op equals TRL")

    mode = "train" if self.model.training else "eval"
    loss, policy_loss = _normalize(self, loss, mask, inputs, mode)
    if self._entropy_bonus_enabled:
        loss = _entropy_bonus(self, loss, policy_loss, entropies, mask, mode)
    _log_metrics(self, mode, mask, log_w, advantages, entropies, logps, ref)
    return loss


# --- when TRL's own loss runs ------------------------------------------------------------------


def _config_fallback(self) -> str | None:
    """Why this trainer's configuration needs TRL's ``_compute_loss`` (None: the op gives it)."""
    unknown = sorted(set(_options(self.args)) - _LOSS_OPTIONS - _OTHER_OPTIONS)
    if unknown:
        return f"option {unknown[0]!r} is not one fastppo's GRPO loss knows (trl 1.16.0)"
    return next((rule.reason for rule in _RULES if not rule.holds(self)), None)


def _options(args) -> tuple[str, ...]:
    """The option names of ``args``: a GRPOConfig's fields beyond TrainingArguments' (any other
    dataclass likewise), else its attributes."""
    if dataclasses.is_dataclass(args):
        return _own_fields(type(args))
    return tuple(vars(args))


@functools.cache
def _own_fields(config_class: type) -> tuple[str, ...]:
    from transformers import TrainingArguments

    base = {field.name for field in dataclasses.fields(TrainingArguments)}
    return tuple(field.name for field in dataclasses.fields(config_class) if field.name not in base)


def _outside_op(self, log_w, logps, ref, mask, advantages, weights) -> torch.Tensor | None:
    """A 0-d bool tensor, True where the data leave the range in which the op equals TRL (module
    docstring); None when this configuration cannot leave it. ``log_w``: (B, T) token or (B, 1)
    sequence log-ratios."""
    checks = []
    if self.loss_type != "cispo":  # CISPO's weight is clamped at epsilon_high ≤ e¹⁰ either way
        sequence = self.importance_sampling_level == "sequence"
        checks.append((log_w > (_SEQ_LOG_RATIO_MAX if sequence else _TOKEN_LOG_RATIO_MAX)).any())
        if sequence:
            checks += [_varies_in_row(x, mask) for x in (advantages, weights) if x is not None]
    if ref is not None:
        checks.append(((ref - logps.detach()) > _TOKEN_LOG_RATIO_MAX).any())
    return torch.stack(checks).any() if checks else None


def _varies_in_row(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whether some row of ``x`` ((B, 1) or (B, T)) takes two values on its masked tokens."""
    if x.size(1) == 1:
        return torch.zeros((), dtype=torch.bool, device=x.device)
    counted = mask != 0
    high = torch.where(counted, x, -math.inf).amax(-1)
    low = torch.where(counted, x, math.inf).amin(-1)
    return (high > low).any()


def _trl(self, model, inputs, scored=None, reason: str = ""):
    """TRL's own ``_compute_loss`` (``reason`` logged the first time); with ``scored``, answering its
    scoring call from those outputs."""
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        _logger.warning("fastppo: TRL's own GRPO loss runs: %s", reason)
    original = TRL.original(_MODULE, _METHOD)
    if original is grpo_compute_loss:  # set on the class by hand: TRL's own is lost
        raise RuntimeError("install grpo_compute_loss with fastppo.integrations.trl.patch()")
    if scored is None:
        return original(self, model, inputs)
    with _answering_scoring(self, scored):
        return original(self, model, inputs)


@contextlib.contextmanager
def _answering_scoring(self, scored):
    """Shadow ``self._get_per_token_logps_and_entropies`` by an instance attribute returning
    ``scored``, and put back what was there."""
    name = "_get_per_token_logps_and_entropies"
    own = vars(self).get(name, _ABSENT)
    setattr(self, name, lambda *args, **kwargs: scored)
    try:
        yield
    finally:
        if own is _ABSENT:
            delattr(self, name)
        else:
            setattr(self, name, own)


# --- the loss ----------------------------------------------------------------------------------


def _score(self, model, inputs):
    """TRL's scoring call: (log-probs (B, T), entropies (B, T), aux loss or None)."""
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    return self._get_per_token_logps_and_entropies(
        model,
        torch.cat([prompt_ids, completion_ids], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        completion_ids.size(1),  # logits_to_keep: the completion tokens
        compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled,
        **{key: inputs.get(key) for key in _MODEL_INPUTS},
    )


def _loss_options(self) -> dict:
    """The op's family member and clip range for ``self.loss_type``."""
    if self.loss_type == "cispo":  # TRL: min(ratio, epsilon_high), no lower bound
        return dict(loss="cispo", clip_low=math.inf, clip_high=self.epsilon_high - 1.0)
    if self.loss_type == "sapo":
        return dict(loss="sapo", sapo_tau=(self.args.sapo_temperature_pos, self.args.sapo_temperature_neg))
    return dict(loss="clip", clip_low=self.epsilon_low, clip_high=self.epsilon_high)


def _normalize(self, loss, mask, inputs, mode):
    """(TRL's returned loss, its ``policy_loss``) from the op's aggregate ``loss`` (0-d)."""
    rows = mask.size(0)
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    if self.loss_type in ("grpo", "sapo"):  # TRL's mean also counts the empty rows, as zeros
        loss = loss * ((mask.sum(-1) > 0).sum().to(loss.dtype) / rows)
    elif self.loss_type == "dr_grpo":
        loss = loss / (rows * self.max_completion_length)
    elif self.loss_type in ("dapo", "cispo"):
        # num_items_in_batch counts the generation batch of all processes: one process's share of
        # one accumulation window in train mode (eval neither splits nor accumulates).
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = (
                normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            )
        loss = loss / normalizer
        return loss, loss.detach()
    return loss / accumulation, loss.detach()


def _entropy_bonus(self, loss, policy_loss, entropies, mask, mode):
    """TRL's static entropy bonus: ``loss − coef · (masked token mean of the entropies) / GA``."""
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    mean_entropy = (entropies * mask).sum() / mask.sum().clamp(min=1.0)
    loss = loss - self.entropy_coef * (mean_entropy / accumulation)
    self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
    if mode == "train" and self.accelerator.sync_gradients:
        self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
    return loss


def _log_importance_weights(self, log_ratio, mask):
    """TRL's log importance weights (detached): (B, T) token log-ratios, or (B, 1) row means."""
    if self.importance_sampling_level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


# --- TRL's metrics -----------------------------------------------------------------------------


def _log_metrics(self, mode, mask, log_w, advantages, entropies, logps, ref):
    """TRL's loss metrics: kl (with beta), entropy, and the clip fractions of the loss type."""
    metrics = self._metrics[mode]
    if ref is not None:  # TRL's k3, from its own formula: the metric is TRL's to the last bit
        delta = ref - logps.detach()
        metrics["kl"].append(_global_mean(self, torch.exp(delta) - delta - 1, mask))
    metrics["entropy"].append(_global_mean(self, entropies.detach(), mask))
    ratio = torch.exp(log_w)  # (B, T) or (B, 1), as TRL's coef_1
    if self.loss_type in _CLIP_LOSSES:
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(_global_mean(self, low, mask))
        metrics["clip_ratio/high_mean"].append(_global_mean(self, high, mask))
        metrics["clip_ratio/region_mean"].append(_global_mean(self, torch.maximum(low, high), mask))
        metrics["clip_ratio/low_min"].append(_gathered(self, low, mask, "min"))
        metrics["clip_ratio/high_max"].append(_gathered(self, high, mask, "max"))
    elif self.loss_type == "cispo":
        clipped = ((ratio > self.epsilon_high) & (advantages > 0)).float()
        metrics["cispo_clip_ratio"].append(_global_mean(self, clipped, mask))


def _global_mean(self, x, mask) -> float:
    """The mean over all processes of ``x``: over masked tokens for (B, T), over rows for (B, 1)
    (TRL's rule: one column means one value per sequence)."""
    if x.shape[1] == 1:
        total, count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
    else:
        total, count = (x * mask).sum(), mask.sum().float()
    totals = self.accelerator.reduce(torch.stack([total, count]), reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


def _gathered(self, x, mask, which: str) -> float:
    """The min or max over all processes of the per-row masked means of ``x`` (NaN rows skipped)."""
    from trl.trainer.utils import nanmax, nanmin

    per_row = x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)
    gathered = self.accelerator.gather(per_row)
    return (nanmin if which == "min" else nanmax)(gathered).item()


TRL.add(_MODULE, _METHOD, grpo_compute_loss)
