"""verl 0.9.1's policy losses (``verl.trainer.ppo.core_algos``'s ``POLICY_LOSS_REGISTRY``) by
``fastppo.ppo_policy_loss``, with verl's global-batch aggregation.

Each function has the signature of verl's function of the same name,
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)``
with ``(B, T)`` tensors, and returns what verl returns: the 0-d loss in verl's dtype and the metrics
``{"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}`` as Python floats (one host sync).
``rollout_is_weights`` go to the op as ``weights`` (per-token constants; zeros allowed).

==========  ===================================================================================
verl        ``fastppo.ppo_policy_loss``
==========  ===================================================================================
vanilla     ``loss="clip"``, ``dual_clip=clip_ratio_c`` (dual-clip PPO)
gspo        ``loss="clip"``, ``ratio_level="sequence"`` (GSPO-token; default agg seq-mean-token-mean)
cispo       ``loss="cispo"`` (clip_ratio_low/high bound the stop-gradient ratio)
sapo        ``loss="sapo"``, ``sapo_tau=(tau_pos, tau_neg)``; always seq-mean-token-mean, as verl
geo_mean    ``loss="geo_mean"`` (GMPO-token), the mean over all rows whatever ``loss_agg_mode``,
            as verl; IS weights as their per-sequence geometric mean, as verl
==========  ===================================================================================

Left out (verl's own functions keep running): ``clip_cov`` picks a random subset of tokens
(``torch.randperm``) by a covariance over the whole batch and ``kl_cov`` a top-k over the whole
batch: neither is a per-token or per-sequence op (and clip_cov's draw is not deterministic);
``gpg``, ``dro``, ``dppo_tv`` and ``dppo_kl`` are not in scope.

Corners where the adapter is not verl, bit for bit:

- ``actor/ppo_kl`` is the masked mean of the unclamped ``old_log_prob − log_prob``. verl's
  vanilla, cispo and sapo clamp the log-ratio to ±20 first (it differs only where
  |log_prob − old_log_prob| > 20); verl's gspo does not clamp, and there the two agree.
- An aggregation over an entirely empty mask is NaN, as verl's 0/0 is (the op alone gives 0);
  verl's metrics there are 0 (it divides by count + 1e-8) and so are fastppo's.
- verl's seq-mean-token-mean divides each row by its token count + 1e-8, fastppo by the count:
  a relative difference of 1e-8 / count.
- A config the op has no form for runs verl's own function (gspo, cispo: clip ratios ≤ 0 or an
  infinite ``clip_ratio_high``; sapo: a τ ≤ 0), vanilla a PyTorch copy (see its docstring).
- geo_mean: the op bounds each sequence's mean log-ratio at 20 (verl at none: exp overflows at 88)
  and divides by the token count where verl adds 1e-8 to it.
- verl's gspo, cispo and sapo assert an ``ActorConfig``; the adapter takes any config with its
  fields (and raises ValueError for None or an AlgoConfig, as for vanilla).
"""

import math

import torch

import fastppo
from fastppo import reference
from fastppo.integrations._patching import VERL
from fastppo.integrations._peer_numerics import nan_if_zero

_CORE = "verl.trainer.ppo.core_algos"
_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
)
#: verl's registry names → the functions below.
POLICY_LOSSES = {
    "vanilla": "compute_policy_loss_vanilla",
    "gspo": "compute_policy_loss_gspo",
    "cispo": "compute_policy_loss_cispo",
    "sapo": "compute_policy_loss_sapo",
    "geo_mean": "compute_policy_loss_geo_mean",
}


def _float_dtype(*tensors) -> torch.dtype:
    """The dtype verl's arithmetic on ``tensors`` ends in (type promotion over the float ones)."""
    dtype = None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype or torch.get_default_dtype()


def _agg_dtype(loss_agg_mode: str, loss_mask: torch.Tensor, *tensors) -> torch.dtype:
    """The dtype of verl's ``agg_loss`` over a loss computed from ``tensors``: their promoted float
    dtype, promoted with a float mask (verl multiplies by it) and, in the seq modes, with fp32
    (verl's row mask is ``.float()``): a bf16 loss comes back fp32 there."""
    dtype = _float_dtype(*tensors, loss_mask)
    if str(loss_agg_mode).startswith("seq-mean"):
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


# ---------------------------------------------------------------------------------------------
# Aggregation


def _rows(loss_mask: torch.Tensor) -> torch.Tensor:
    """How many rows hold at least one token (0-d)."""
    return (torch.atleast_2d(loss_mask).sum(-1) > 0).sum()


def _global_agg(
    loss_agg_mode, loss_mask, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None
):
    """Split verl's aggregation into fastppo's local one and a factor: verl's loss = fastppo's · factor.

    verl divides by global counts (``batch_num_tokens`` tokens, ``global_batch_size`` sequences)
    and multiplies by ``dp_size`` so that data-parallel gradient averaging yields the global mean.
    Returns ``(agg, factor)``; the factor is a number or a 0-d tensor.
    """
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return "token-mean", dp_size * nan_if_zero(loss_mask.sum())
        return "token-sum", dp_size / batch_num_tokens
    if loss_agg_mode == "token-sum":
        return "token-sum", dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        norm = 1
        if loss_agg_mode == "seq-mean-token-sum-norm":
            norm = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            return "seq-mean-token-sum", dp_size / norm * nan_if_zero(_rows(loss_mask))
        return "token-sum", dp_size / global_batch_size / norm  # Σ over non-empty rows = Σ over all
    if loss_agg_mode == "seq-mean-token-mean":
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            return "seq-mean-token-mean", dp_size * nan_if_zero(_rows(loss_mask))
        # fastppo's mean over the R non-empty rows, times R: the sum of the row means.
        return "seq-mean-token-mean", _rows(loss_mask) * dp_size / global_batch_size
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}; expected one of {_AGG_MODES}")


# ---------------------------------------------------------------------------------------------
# Shared steps


def _check_config(config) -> None:
    if config is None:
        raise ValueError("config must be verl's ActorConfig (clip ratios, global_batch_info), got None")
    if type(config).__name__ == "AlgoConfig":
        raise ValueError("config must be verl's ActorConfig, got an AlgoConfig")


def _clip_ratios(config) -> tuple[float, float]:
    """(low, high): ``clip_ratio_low`` / ``clip_ratio_high``, each defaulting to ``clip_ratio``."""
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def _op_takes_clips(low, high) -> bool:
    """Whether the op has a form for these clip ratios (both > 0, ``high`` finite; ``low`` may be inf)."""
    return (low == math.inf or 0 < low < math.inf) and 0 < high < math.inf


def _verl_own(name: str):
    """verl's own ``core_algos.<name>``, also while ``fastppo.integrations.verl.patch()`` is active."""
    return VERL.original(_CORE, name)


def _fused(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, weights, **options):
    """``fastppo.ppo_policy_loss`` under verl's (global-batch) aggregation.

    Returns ``(loss, stats)``: the 0-d loss in verl's dtype and the op's stats (0-d fp32 tensors).
    """
    agg, factor = _global_agg(loss_agg_mode, response_mask, **dict(config.global_batch_info))
    dtype = _agg_dtype(loss_agg_mode, response_mask, old_log_prob, log_prob, advantages, weights)
    if weights is not None:
        weights = torch.broadcast_to(weights, advantages.shape)  # e.g. sequence-level (B, 1) weights
    loss, stats = fastppo.ppo_policy_loss(
        log_prob, old_log_prob, advantages, response_mask, agg=agg, weights=weights, **options
    )
    return (loss * factor).to(dtype), stats


def _clipped_member(verl_name: str, args: tuple, **options):
    """A member of verl's registry with a clip range (gspo, cispo) by the op, or verl's own
    ``verl_name`` where the op has no form for the clip ratios. ``args``: verl's seven arguments."""
    config = args[5]
    _check_config(config)
    low, high = _clip_ratios(config)
    if not _op_takes_clips(low, high):
        return _verl_own(verl_name)(*args)
    pg_loss, stats = _fused(*args, clip_low=low, clip_high=high, **options)
    return pg_loss, _metrics(stats["clipfrac"], stats["approx_kl"], 0.0)


def _metrics(pg_clipfrac, ppo_kl, pg_clipfrac_lower) -> dict[str, float]:
    """verl's metrics dict from 0-d tensors or numbers, read to the host in one sync."""
    values = [pg_clipfrac, ppo_kl, pg_clipfrac_lower]
    tensors = [v.detach().float().reshape(()) for v in values if isinstance(v, torch.Tensor)]
    host = iter(torch.stack(tensors).tolist()) if tensors else iter(())
    values = [next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]
    keys = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
    return dict(zip(keys, values, strict=True))


# ---------------------------------------------------------------------------------------------
# Losses


def _vanilla_losses_torch(old_log_prob, log_prob, advantages, response_mask, weights, low, high, clip_c):
    """Per-token dual-clip PPO loss and its statistics in plain PyTorch (the fallback for clip
    ratios the op has no form for)."""
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    surrogate = torch.maximum(unclipped, clipped)
    floor = -advantages * clip_c
    negative = advantages < 0
    losses = torch.where(negative, torch.minimum(surrogate, floor), surrogate)
    if weights is not None:
        losses = losses * weights
    # in verl's metric order: pg_clipfrac, ppo_kl, pg_clipfrac_lower
    stats = [(clipped > unclipped).float(), -log_ratio.detach(), ((surrogate > floor) & negative).float()]
    m = response_mask.float()
    stats = [(torch.where(m != 0, s, 0.0) * m).sum() / (m.sum() + 1e-8) for s in stats]
    return losses, stats


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``compute_policy_loss_vanilla``: dual-clip PPO by ``fastppo.ppo_policy_loss``.

    Per token, r = exp(clamp(log_prob − old_log_prob, ±20)):
    l = max(−A·r, −A·clip(r, 1 − clip_ratio_low, 1 + clip_ratio_high)), and for A < 0
    l = min(l, −A·clip_ratio_c); times ``rollout_is_weights`` (the op's ``weights``, zeros
    included, e.g. IcePop's); aggregated as verl's ``agg_loss(..., **config.global_batch_info)``.
    Clip ratios ≤ 0 (or an infinite ``clip_ratio_high``) run a PyTorch copy of the same formula:
    the op only takes clip ranges > 0 (a finite ``clip_high``), and verl accepts any number.

    Args:
        old_log_prob, log_prob, advantages, response_mask: ``(B, T)``; only ``log_prob`` gets a gradient.
        loss_agg_mode: token-mean, token-sum, seq-mean-token-sum(-norm) or seq-mean-token-mean.
        config: verl's ActorConfig (``clip_ratio``, ``clip_ratio_low``/``high``, ``clip_ratio_c``,
            ``global_batch_info``).
        rollout_is_weights: ``(B, T)`` (or broadcastable) importance weights, or None.

    Returns:
        ``(pg_loss, metrics)``: a 0-d tensor and verl's metrics dict of Python floats.
    """
    _check_config(config)
    low, high = _clip_ratios(config)
    clip_c = config.get("clip_ratio_c", 3.0)
    if not clip_c > 1.0:
        raise ValueError(f"config.clip_ratio_c (the dual-clip bound) must be > 1.0, got {clip_c}")
    args = (old_log_prob, log_prob, advantages, response_mask)
    if _op_takes_clips(low, high):
        pg_loss, stats = _fused(
            *args, loss_agg_mode, config, rollout_is_weights, clip_low=low, clip_high=high, dual_clip=clip_c
        )
        return pg_loss, _metrics(stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"])
    losses, stats = _vanilla_losses_torch(*args, rollout_is_weights, low, high, clip_c)
    agg, factor = _global_agg(loss_agg_mode, response_mask, **dict(config.global_batch_info))
    dtype = _agg_dtype(loss_agg_mode, response_mask, old_log_prob, log_prob, advantages, rollout_is_weights)
    pg_loss = (reference.agg_loss(losses.to(dtype), response_mask, agg) * factor).to(dtype)
    return pg_loss, _metrics(*stats)


def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``compute_policy_loss_gspo``: GSPO-token by ``ppo_policy_loss(ratio_level="sequence")``.

    Per row i, sᵢ = exp(min(Σₜ m·(log_prob − old_log_prob) / max(Σₜ m, 1), 10)); every token has the
    ratio value sᵢ and the gradient ∂r/∂log_probₜ = sᵢ (none where the clamp at 10 holds);
    l = max(−A·r, −A·clip(r, 1 − clip_ratio_low, 1 + clip_ratio_high)) (no dual clip), times
    ``rollout_is_weights``, aggregated by ``loss_agg_mode`` as verl's ``agg_loss``.

    Args:
        as ``compute_policy_loss_vanilla``; ``clip_ratio_c`` is not used.

    Returns:
        ``(pg_loss, metrics)``: pg_clipfrac over tokens, ppo_kl the mean of the unclamped
        old_log_prob − log_prob (verl's too), pg_clipfrac_lower 0.0.
    """
    args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    return _clipped_member("compute_policy_loss_gspo", args, ratio_level="sequence")


def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``compute_policy_loss_cispo``: CISPO by ``ppo_policy_loss(loss="cispo")``.

    Per token, r = exp(clamp(log_prob − old_log_prob, ±20)):
    l = −sg[clip(r, 1 − clip_ratio_low, 1 + clip_ratio_high)]·A·log_prob, times
    ``rollout_is_weights``, aggregated by ``loss_agg_mode``.

    Args:
        as ``compute_policy_loss_vanilla``; ``clip_ratio_c`` is not used.

    Returns:
        ``(pg_loss, metrics)``: pg_clipfrac the fraction of tokens whose ratio the clip changed,
        ppo_kl, pg_clipfrac_lower 0.0.
    """
    args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    return _clipped_member("compute_policy_loss_cispo", args, loss="cispo")


def compute_policy_loss_sapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``compute_policy_loss_sapo``: SAPO by ``ppo_policy_loss(loss="sapo")``.

    Per token, r = exp(clamp(log_prob − old_log_prob, ±20)) and τ = ``config.tau_pos`` where A > 0,
    else ``config.tau_neg``: l = −A·σ(τ·(r − 1))·4/τ, times ``rollout_is_weights``. Aggregated as
    seq-mean-token-mean whatever ``loss_agg_mode`` says (verl ignores it too), with
    ``config.global_batch_info``.

    Returns:
        ``(pg_loss, metrics)``: pg_clipfrac and pg_clipfrac_lower 0.0, ppo_kl.
    """
    _check_config(config)
    tau = (config.tau_pos, config.tau_neg)
    args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    if not all(0 < t < math.inf for t in tau):
        return _verl_own("compute_policy_loss_sapo")(*args)
    args = (*args[:4], "seq-mean-token-mean", *args[5:])
    pg_loss, stats = _fused(*args, loss="sapo", sapo_tau=tau)
    return pg_loss, _metrics(0.0, stats["approx_kl"], 0.0)


def compute_policy_loss_geo_mean(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``compute_policy_loss_geo_mean``: GMPO by ``ppo_policy_loss(loss="geo_mean")``.

    Per row i: ρᵢ = exp(mean over its masked tokens of the log-ratio clipped to [−clip_ratio_low,
    clip_ratio_high] on the side the advantage's sign makes optimistic), Āᵢ the mean advantage,
    lᵢ = −Āᵢ·ρᵢ times the geometric mean of the row's ``rollout_is_weights``; the loss is the mean
    of lᵢ over all B rows (``loss_agg_mode`` and ``global_batch_info`` are not used, as in verl).

    Returns:
        ``(pg_loss, metrics)``: pg_clipfrac / pg_clipfrac_lower the fractions of tokens whose
        log-ratio lies outside the clip range with A > 0 / A < 0, ppo_kl.
    """
    _check_config(config)
    low, high = _clip_ratios(config)
    args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    if not (0 < low < math.inf and 0 < high < math.inf):
        return _verl_own("compute_policy_loss_geo_mean")(*args)
    weights = None
    if rollout_is_weights is not None:  # one weight per row: the geometric mean of its tokens'
        mask = response_mask.to(torch.float32)
        log_w = torch.where(mask != 0, torch.log(rollout_is_weights + 1e-10) * mask, 0.0)
        weights = torch.exp(log_w.sum(-1, keepdim=True) / (mask.sum(-1, keepdim=True) + 1e-8))
        weights = weights.expand_as(advantages)
    loss, stats = fastppo.ppo_policy_loss(
        log_prob, old_log_prob, advantages, response_mask, agg="seq-mean-token-mean", weights=weights,
        loss="geo_mean", clip_low=low, clip_high=high,
    )  # fmt: skip
    rows = torch.atleast_2d(response_mask).shape[0]
    # verl divides by the integer token count + 1e-8: fp32 at least.
    dtype = torch.promote_types(
        _float_dtype(old_log_prob, log_prob, advantages, rollout_is_weights), torch.float32
    )
    pg_loss = (loss * _rows(response_mask) / max(rows, 1)).to(dtype)  # verl: the mean over all rows
    return pg_loss, _metrics(stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"])
