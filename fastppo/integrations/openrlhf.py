"""Drop-in fastppo backend for OpenRLHF 0.11.2.

``patch()`` swaps these into OpenRLHF, where its code looks them up:

- ``openrlhf.models.utils.compute_approx_kl``      → ``compute_approx_kl``   (``fastppo.kl_penalty``)
- ``openrlhf.models.utils.log_probs_from_logits``  → ``log_probs_from_logits`` (``fastppo.token_logprobs``)
- ``openrlhf.models.loss.PolicyLoss.forward``      → ``policy_loss_forward``  (``fastppo.ppo_policy_loss``)
- ``openrlhf.models.loss.ValueLoss.forward``       → ``value_loss_forward``   (``fastppo.value_loss``)
- ``RemoteExperienceMaker.get_advantages_and_returns`` and ``.get_cumulative_returns`` in
  ``openrlhf.trainer.ppo_utils.experience_maker`` → the functions of the same names (``fastppo.gae``)

Each has the peer's exact signature and returns what the peer returns (shapes, dtypes, tuple
structure, NaN where the peer divides by an empty mask). A call fastppo cannot express exactly —
named in each docstring — runs OpenRLHF's original instead; nothing computes something else.
``PolicyLoss.forward`` covers PPO, GSPO and the vLLM IS correction (every level/mode/gating);
its fallbacks are GSPO with a row mean log-ratio above 10 or, under autograd, an advantage that
varies within a row (the one check that reads a value back to the host, once per GSPO call), and
inputs outside fastppo's types and shapes. Importing this module does not import OpenRLHF.

Known differences (documented, not reproduced): a token whose mask is 0 is ignored even when its
loss, IS weight or metric term is inf or NaN, where OpenRLHF's ``x * mask`` turns the result into
NaN. An all-zero mask without OpenRLHF's global token/sample count gives the NaN loss and metrics
OpenRLHF gives; the gradient is then NaN at every token, where OpenRLHF's is NaN at most (0 at
clipped ones).

OpenRLHF runs the policy and critic losses inside Ray actors: call ``patch()`` in every process
(e.g. ``ray.init(runtime_env={"worker_process_setup_hook": "fastppo.integrations.openrlhf.patch"})``).
"""

import torch

import fastppo
from fastppo.integrations._patching import OPENRLHF
from fastppo.integrations._peer_numerics import nan_if_zero
from fastppo.reference import RolloutCorrection

_UTILS = "openrlhf.models.utils"
_LOSS = "openrlhf.models.loss"
_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"
_MAKER_CLASS = "RemoteExperienceMaker"
_KL_CLAMP = 10.0  # OpenRLHF bounds every estimator's value to [-10, 10]
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32)
_GSPO_LOG_RATIO_MAX = 10.0  # fastppo caps GSPO's mean log-ratio here; OpenRLHF does not
_GATE_MIN, _GATE_MAX = 1e-8, 1e8  # IS bands inside exp(±20), fastppo's bound on the IS log-ratio
_PROB_CLAMP = 1e-6  # OpenRLHF's clamp on the probabilities of its binary_kl / tv gates


def _original(module_name: str, attribute: str):
    """OpenRLHF's own function (or class attribute), also while ours is patched in."""
    return OPENRLHF.original(module_name, attribute)


def _all_fp32(*tensors: torch.Tensor) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tensors)


def _is_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


# ── openrlhf.models.utils ───────────────────────────────────────────────────────────────────


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: torch.Tensor | None = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> torch.Tensor:
    """Per-token KL estimate of the policy against the reference, clamped to [-10, 10].

    Args:
        log_probs: ``(B, T)`` (any shape) log-probs of the current policy.
        log_probs_base: same shape, log-probs of the reference policy.
        log_probs_old: rollout log-probs, only read with ``unbiased_gradient``.
        kl_estimator: "k1", "k2" or "k3".
        unbiased_gradient: keep the estimator's value, back-propagate the reverse-KL gradient.

    Returns:
        fp32 tensor shaped like ``log_probs``.

    ``fastppo.kl_penalty(estimator, clamp=10)`` on the fp32 inputs; with ``unbiased_gradient`` and
    no ``log_probs_old``, "k1+"/"k3+" (value of k1/k3, gradient of k2 = the k1 score gradient).
    Falls back to OpenRLHF for ``unbiased_gradient`` with ``log_probs_old`` (an importance weight)
    or with "k2" (fastppo has no "k2+"). With ``unbiased_gradient`` the value is the clamped
    estimator itself; OpenRLHF's straight-through ``value + s − s`` (s = d²/2) rounds it by up to
    ulp(s) (e.g. 0 instead of −10 for k1 at d = −1e6). k3 matches for every log-ratio above −4.8e8; a −inf
    log-ratio gives −10 here where OpenRLHF (which clamps it at −10 before the exp) gives 10.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    if unbiased_gradient:
        if log_probs_old is not None or kl_estimator == "k2":
            return _original(_UTILS, "compute_approx_kl")(
                log_probs, log_probs_base, log_probs_old, kl_estimator, unbiased_gradient
            )
        kl_estimator += "+"
    return fastppo.kl_penalty(log_probs.float(), log_probs_base.float(), kl_estimator, clamp=_KL_CLAMP)


def log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``(B, T, V)`` (any leading shape) fp32. Divided by ``temperature`` in place
            when it is not 1, as OpenRLHF does (callers may read the scaled logits afterwards).
        labels: ``(B, T)`` int64 token ids.

    Returns:
        fp32 ``(B, T)``.

    ``fastppo.token_logprobs``. Labels equal to -100 give 0, as in OpenRLHF's flash-attn
    cross-entropy path (its gather fallback raises on them instead); other labels outside
    [0, V) raise an error naming them (fastppo's check without a host read: RuntimeError on CPU,
    a device-side assert on CUDA). Falls back to OpenRLHF for logits that are not fp32 (its bf16/fp16
    path computes in the input dtype), labels that are not int64 or not shaped like
    ``logits.shape[:-1]``.
    """
    supported = (
        isinstance(logits, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and logits.dtype == torch.float32
        and labels.dtype == torch.int64
        and logits.dim() >= 1
        and labels.shape == logits.shape[:-1]
    )
    if not supported:
        return _original(_UTILS, "log_probs_from_logits")(logits, labels, temperature)
    if temperature != 1.0:
        logits.div_(temperature)
    return fastppo.token_logprobs(logits, labels)


# ── openrlhf.models.loss ────────────────────────────────────────────────────────────────────


def _aggregate(
    token_level_loss: bool,
    agg_loss,
    action_mask: torch.Tensor,
    dp_size: int,
    batch_num_tokens,
    global_batch_size,
) -> torch.Tensor:
    """OpenRLHF's ``aggregate_loss`` from fastppo's fused loss ``agg_loss(agg)``."""
    if token_level_loss:
        if batch_num_tokens is None:  # masked mean: NaN for an empty mask, as 0/0 in OpenRLHF
            return agg_loss("token-mean") * nan_if_zero(action_mask.sum())
        return agg_loss("token-sum") / batch_num_tokens * dp_size
    rows = (torch.atleast_2d(action_mask).sum(-1) > 0).sum()
    if global_batch_size is None:  # mean over non-empty rows: NaN when there is none
        return agg_loss("seq-mean-token-mean") * nan_if_zero(rows)
    return agg_loss("seq-mean-token-mean") * rows / global_batch_size * dp_size


def _token_losses_supported(action_mask, *tensors: torch.Tensor) -> bool:
    return (
        action_mask is not None
        and _all_fp32(*tensors)
        and action_mask.dtype in _MASK_DTYPES
        and 1 <= tensors[0].dim() <= 2
        and all(t.shape == tensors[0].shape for t in (*tensors, action_mask))
        and not any(t.requires_grad for t in tensors[1:])  # fastppo treats them as constants
    )


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ m·x / Σ m over ``dim`` (all when None, else kept): NaN for an empty mask, as OpenRLHF's."""
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim, keepdim=True) / mask.sum(dim, keepdim=True)


def _gspo_matches(log_probs, ratio_base, advantages, action_mask) -> bool:
    """Whether the op's GSPO-token form is OpenRLHF's GSPO on these ``(B, T)`` (or ``(T,)``) inputs.
    One host sync.

    The op caps each row's mean log-ratio at 10 (OpenRLHF does not), so every row must stay at or
    below it. OpenRLHF's gradient goes through the row mean, so each token receives the row's mean
    per-token derivative, the op's its own: equal when the advantage is one value over the row's
    tokens (GRPO's), which only matters when a gradient is wanted (the values are equal anyway).
    """
    if log_probs.shape[-1] == 0:
        return False
    tokens = action_mask.sum(-1).clamp(min=1)
    row_log_ratio = ((log_probs.detach() - ratio_base) * action_mask).sum(-1) / tokens
    bad = ~(row_log_ratio <= _GSPO_LOG_RATIO_MAX)  # NaN included
    if torch.is_grad_enabled() and log_probs.requires_grad:
        counted = action_mask != 0
        highest = torch.where(counted, advantages, -torch.inf).amax(-1)
        lowest = torch.where(counted, advantages, torch.inf).amin(-1)
        bad |= highest > lowest
    return not bool(bad.any())


def _policy_supported(self, log_probs, old_log_probs, advantages, action_mask, rollout_log_probs) -> bool:
    """Whether fastppo computes this ``PolicyLoss.forward`` call exactly (GSPO: one host sync)."""
    correcting = self.is_correction_level != "off"
    tensors = (log_probs, old_log_probs, advantages) + ((rollout_log_probs,) if correcting else ())
    dual_clip = self.dual_clip
    supported = (
        self.policy_loss_type in ("ppo", "gspo")
        and _token_losses_supported(action_mask, *tensors)
        and self.clip_eps_low > 0
        and self.clip_eps_high > 0
        and (dual_clip is None or dual_clip > 1.0)
    )
    if not supported or self.policy_loss_type == "ppo":
        return supported
    ratio_base = rollout_log_probs if correcting else old_log_probs
    return _gspo_matches(log_probs, ratio_base, advantages, action_mask)


def _rollout_correction(self) -> RolloutCorrection | None:
    """OpenRLHF's token-level ratio gate as the op's ``RolloutCorrection``, where they agree exactly.

    The op bounds d = old − rollout to ±20 before the exp, OpenRLHF does not: that decides no gate
    while the band lies within [1e-8, 1e8] (inside exp(±20)). None for every other gate.
    """
    low, high = self.is_correction_threshold
    exact = (
        self.is_correction_level == "token"
        and self.is_correction_gating == "ratio"
        and _GATE_MIN <= low <= high <= _GATE_MAX
    )
    if not exact:
        return None
    mode = "truncate" if self.is_correction_mode == "clip" else "mask"
    return RolloutCorrection(level="token", mode=mode, high=float(high), low=float(low))


def _gate_statistic(gating: str, log_is, old_log_probs, rollout_log_probs, mask, per_sequence: bool):
    """The statistic OpenRLHF's IS gate reads: ``(B, T)``, or ``(B, 1)`` per sequence.

    ratio: the IS ratio π_old/π_rollout (per sequence: its geometric mean); binary_kl / tv: the
    divergence between the sampled token's Bernoulli under the sampler p and the trainer q
    (probabilities clamped to [1e-6, 1 − 1e-6]), per sequence its mean. An empty row gives NaN.
    """
    if gating == "ratio":
        return (_masked_mean(log_is, mask, -1) if per_sequence else log_is).exp()
    p, q = (x.exp().clamp(_PROB_CLAMP, 1 - _PROB_CLAMP) for x in (rollout_log_probs, old_log_probs))
    if gating == "binary_kl":
        stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    else:
        stat = (p - q).abs()
    return _masked_mean(stat, mask, -1) if per_sequence else stat


def _is_weights(self, old_log_probs, rollout_log_probs, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's IS coefficient on the per-token loss, ``(B, T)`` fp32, and its is_filter_ratio (0-d).

    clip: the statistic clamped to the band (filtered: outside it); mask: the per-token IS ratio
    where the unit's statistic lies in the band, else 0 (filtered: not inside, NaN included). The
    filter fraction is a masked token mean at token level, the fraction of all rows at seq level.
    """
    low, high = self.is_correction_threshold
    per_sequence = self.is_correction_level == "seq"
    log_is = old_log_probs - rollout_log_probs
    stat = _gate_statistic(
        self.is_correction_gating, log_is, old_log_probs, rollout_log_probs, mask, per_sequence
    )
    if self.is_correction_mode == "clip":
        coef, filtered = stat.clamp(min=low, max=high), (stat < low) | (stat > high)
    else:
        kept = (stat >= low) & (stat <= high)
        coef, filtered = torch.where(kept, log_is.exp(), 0.0), ~kept
    ratio = filtered.float().mean() if per_sequence else _masked_mean(filtered.float(), mask)
    return coef, ratio


def policy_loss_forward(
    self,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
) -> torch.Tensor:
    """``PolicyLoss.forward``: the PPO or GSPO clipped surrogate (with dual clip), the vLLM IS
    correction, and its metrics.

    Args:
        log_probs: ``(B, T)`` (or ``(T,)``) current log-probs (receive the gradient).
        old_log_probs, advantages, action_mask: same shape.
        rollout_log_probs: same shape, the sampler's (vLLM) log-probs, read when
            ``is_correction_level`` is not "off".
        dp_size, batch_num_tokens, global_batch_size: OpenRLHF's global loss normalisation.

    Returns:
        ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``: 0-d fp32 tensors; the last two
        only from the IS correction of "ppo" (else None, as in OpenRLHF).

    ``fastppo.ppo_policy_loss(clip_low=clip_eps_low, clip_high=clip_eps_high, dual_clip)`` with agg
    "token-mean"/"token-sum" (``token_level_loss``) or "seq-mean-token-mean"; clip_ratio and ppo_kl
    are its clipfrac and approx_kl (NaN on an empty mask, as OpenRLHF's 0/0).

    - "gspo": ``ratio_level="sequence"``, against rollout_log_probs when the IS correction is on
      (OpenRLHF's GSPO then only swaps the ratio's base; ppo_kl stays against old_log_probs).
    - IS correction of "ppo", token level, ratio gate, band within [1e-8, 1e8]:
      ``RolloutCorrection(level="token", mode="truncate" (clip) or "mask")``; vllm_kl and
      is_filter_ratio are its rollout_kl and is_filtered.
    - every other IS gate (seq level, binary_kl, tv, a band beyond those bounds): OpenRLHF's
      coefficient from a few elementwise ops here, passed as ``weights``.

    Falls back to OpenRLHF for GSPO where a row's mean log-ratio exceeds 10 (the op caps it there)
    or, when log_probs needs a gradient, the advantage is not one value over each row's tokens
    (OpenRLHF spreads the row's mean derivative over its tokens; the op is GSPO-token) — deciding
    that costs one host sync per GSPO call; and for no ``action_mask``, inputs that are not fp32
    or not one shape (1-D or 2-D), old/rollout log-probs or advantages that require grad, the IS
    correction without rollout_log_probs, a clip that is not > 0, a dual clip that is not > 1.
    """
    if not _policy_supported(self, log_probs, old_log_probs, advantages, action_mask, rollout_log_probs):
        return _original(_LOSS, "PolicyLoss.forward")(
            self,
            log_probs,
            old_log_probs,
            advantages,
            action_mask,
            rollout_log_probs,
            dp_size,
            batch_num_tokens,
            global_batch_size,
        )
    correcting = self.is_correction_level != "off"
    options = dict(clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, dual_clip=self.dual_clip)
    ratio_base, vllm_kl, is_filter_ratio = old_log_probs, None, None
    if self.policy_loss_type == "gspo":
        options["ratio_level"] = "sequence"
        ratio_base = rollout_log_probs if correcting else old_log_probs
    elif correcting:
        correction = _rollout_correction(self)
        if correction is not None:
            options.update(rollout_logp=rollout_log_probs, rollout_correction=correction)
        else:
            options["weights"], is_filter_ratio = _is_weights(
                self, old_log_probs, rollout_log_probs, action_mask
            )
            vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask)
    stats = {}

    def agg_loss(agg: str) -> torch.Tensor:
        loss, stats_of_agg = fastppo.ppo_policy_loss(
            log_probs, ratio_base, advantages, action_mask, agg=agg, **options
        )
        stats.update(stats_of_agg)
        return loss

    loss = _aggregate(
        self.token_level_loss, agg_loss, action_mask, dp_size, batch_num_tokens, global_batch_size
    )
    empty = nan_if_zero(action_mask.sum())  # OpenRLHF's metrics are 0/0 on an empty mask
    if "rollout_kl" in stats:
        vllm_kl, is_filter_ratio = stats["rollout_kl"] * empty, stats["is_filtered"] * empty
    if ratio_base is old_log_probs:
        ppo_kl = stats["approx_kl"] * empty
    else:  # the op's approx_kl is against the ratio's base, the sampler here
        ppo_kl = _masked_mean(old_log_probs - log_probs.detach(), action_mask)
    return loss, stats["clipfrac"] * empty, ppo_kl, vllm_kl, is_filter_ratio


def value_loss_forward(
    self,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
) -> torch.Tensor:
    """``ValueLoss.forward``: ½·max((v − R)², (v_clipped − R)²), or ½·(v − R)² without ``clip_eps``.

    Args:
        values: ``(B, T)`` critic outputs (receive the gradient).
        old_values, returns, action_mask: ``(B, T)``.
        dp_size, batch_num_tokens, global_batch_size: OpenRLHF's global loss normalisation.

    Returns:
        The 0-d fp32 loss (OpenRLHF returns the loss alone, no clip fraction).

    ``fastppo.value_loss(clip=clip_eps)`` with the aggregation of ``policy_loss_forward``.
    Falls back to OpenRLHF for no ``action_mask``, inputs that are not fp32 or not one shape
    (1-D or 2-D), old_values/returns that require grad, or a ``clip_eps`` that is not > 0.
    """
    clip = self.clip_eps
    supported = _token_losses_supported(action_mask, values, old_values, returns) and (
        clip is None or clip > 0
    )
    if not supported:
        return _original(_LOSS, "ValueLoss.forward")(
            self, values, old_values, returns, action_mask, dp_size, batch_num_tokens, global_batch_size
        )

    def agg_loss(agg: str) -> torch.Tensor:
        return fastppo.value_loss(values, old_values, returns, action_mask, clip=clip, agg=agg)[0]

    return _aggregate(
        self.token_level_loss, agg_loss, action_mask, dp_size, batch_num_tokens, global_batch_size
    )


# ── openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker ───────────────────────


def _scan_supported(mask, *tensors: torch.Tensor) -> bool:
    return (
        _all_fp32(*tensors)
        and tensors[0].dim() == 2
        and all(t.shape == tensors[0].shape for t in tensors)
        and (mask is None or (mask.dtype in _MASK_DTYPES and mask.shape == tensors[0].shape))
    )


@torch.no_grad()
def get_advantages_and_returns(
    self,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float,
    lambd: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE as OpenRLHF computes it: values and rewards multiplied by the mask, then the plain
    recursion over every position.

    Args:
        values, rewards: ``(B, T)`` fp32.
        action_mask: ``(B, T)``, or None for no masking.
        gamma, lambd: discount and GAE λ.

    Returns:
        ``(advantages, returns)`` fp32 ``(B, T)``; returns = advantages + values·mask.

    ``fastppo.gae(carry_masked=False)``. Falls back to OpenRLHF for inputs that are not fp32 or
    not one 2-D shape, and gamma or lambd outside [0, 1].
    """
    if not (_scan_supported(action_mask, values, rewards) and _is_fraction(gamma) and _is_fraction(lambd)):
        return _original(_MAKER, f"{_MAKER_CLASS}.get_advantages_and_returns")(
            self, values, rewards, action_mask, gamma, lambd
        )
    mask = torch.ones_like(rewards) if action_mask is None else action_mask
    return fastppo.gae(rewards, values, mask, gamma=float(gamma), lam=float(lambd), carry_masked=False)


@torch.no_grad()
def get_cumulative_returns(
    self,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """REINFORCE returns G_t = r_t·m_t + γ·G_{t+1} over every position (a masked position is
    discounted too, unlike ``fastppo.discounted_returns``).

    Args:
        rewards: ``(B, T)`` fp32.
        action_mask: ``(B, T)``, or None for no masking.
        gamma: discount.

    Returns:
        fp32 ``(B, T)`` returns (one tensor, despite the peer's annotation).

    ``fastppo.gae`` with zero values, λ = 1 and ``carry_masked=False``, which is that recursion.
    Falls back to OpenRLHF for rewards that are not fp32 or not 2-D, and gamma outside [0, 1].
    """
    if not (_scan_supported(action_mask, rewards) and _is_fraction(gamma)):
        return _original(_MAKER, f"{_MAKER_CLASS}.get_cumulative_returns")(self, rewards, action_mask, gamma)
    mask = torch.ones_like(rewards) if action_mask is None else action_mask
    returns, _ = fastppo.gae(
        rewards, torch.zeros_like(rewards), mask, gamma=float(gamma), lam=1.0, carry_masked=False
    )
    return returns


# ── patching ────────────────────────────────────────────────────────────────────────────────

OPENRLHF.add(_UTILS, "compute_approx_kl", compute_approx_kl)
OPENRLHF.add(_UTILS, "log_probs_from_logits", log_probs_from_logits)
OPENRLHF.add(_LOSS, "PolicyLoss.forward", policy_loss_forward)
OPENRLHF.add(_LOSS, "ValueLoss.forward", value_loss_forward)
OPENRLHF.add(_MAKER, f"{_MAKER_CLASS}.get_advantages_and_returns", get_advantages_and_returns)
OPENRLHF.add(_MAKER, f"{_MAKER_CLASS}.get_cumulative_returns", get_cumulative_returns)
patch = OPENRLHF.patch
unpatch = OPENRLHF.unpatch
patched = OPENRLHF.patched
