"""Reference of ``ppo_policy_loss``: the clipped surrogate and its family, with rollout correction.

Per token, with A the advantage, m the mask and the log-ratio ``lr = logp − old_logp``:

ratio (``ratio_level``)
    token      r = exp(clamp(lr, −20, 20))                                        (PPO)
    sequence   log r = min(sg[ℓᵢ] + logp − sg[logp], 10), ℓᵢ = Σₜ m·lr / max(Σₜ m, 1)
               (GSPO-token, arXiv 2507.18071; verl's ``gspo``: every token of sequence i has
               the value sᵢ = exp(min(ℓᵢ, 10)) and the gradient ∂r/∂logpₜ = sᵢ). With an
               advantage constant over the sequence (GRPO's) this is GSPO itself, whatever the
               aggregation: TRL's ``importance_sampling_level="sequence"`` and OpenRLHF's
               ``gspo`` (gradient through the mean, no clamp at 10) in value and gradient.

per-token policy loss (``loss``)
    clip     l = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high)); with ``dual_clip`` c > 1
             and A < 0, l = min(l, −A·c)                                          (PPO, GSPO)
    cispo    l = −sg[clip(r, 1 − clip_low, 1 + clip_high)]·A·logp (arXiv 2506.13585;
             ``clip_low=math.inf`` truncates from above only, as TRL does)
    sapo     l = −A·σ(τ·(r − 1))·4/τ, τ = τ₊ where A > 0 else τ₋ (arXiv 2511.20347, verl, TRL)
    geo_mean GMPO (arXiv 2507.20673, verl's ``geo_mean``): a sequence loss. Per token the log-ratio
             clipped on the optimistic side, xₜ = min(lr, clip_high) where A > 0, max(lr, −clip_low)
             where A < 0, 0 where A = 0 (the bounds are log-space); the sequence ratio
             ρᵢ = exp(min(Σₜ m·x / max(Σₜ m, 1), 20)) and Āᵢ = Σₜ m·A / max(Σₜ m, 1); every
             token carries lₜ = −Āᵢ·ρᵢ,ₜ in GMPO-token form, as GSPO-token: value ρᵢ, gradient
             ∂ρᵢ,ₜ/∂logpₜ = ρᵢ·∂xₜ/∂logpₜ (``ratio_level`` does not apply). With weights
             constant over each sequence (verl's sequence IS weights) this is GMPO's gradient
             under any aggregation; verl's mean over sequences is seq-mean-token-mean here.

weights
    l ← l·w with ``weights`` w (constants, e.g. verl's ``rollout_is_weights``), then by the
    rollout-correction weight below when ``rollout_logp`` is given.

rollout correction (``rollout_logp``, ``rollout_correction``), with d = old_logp − rollout_logp
(the trainer's log-prob over the sampler's):
    level   token: ρ = exp(clamp(d, ±20)); sequence: ρᵢ = exp(clamp(Σₜ m·d, ±20)) (the product);
            geometric: ρᵢ = exp(Σₜ m·d / max(Σₜ m, 1)) (the geometric mean)
    mode    truncate (TIS): w = clamp(ρ, low, high) (``low`` None: no lower bound);
            mask (MIS, IcePop): w = ρ where low ≤ ρ ≤ high, else 0
    the weight is a constant: l ← l·w.

Then l += kl_coef·kl_penalty(logp, ref_logp) − entropy_coef·entropy, and the loss is
``agg_loss(l, mask, agg)``.

Stats (masked token means unless said): clipfrac (clip: the clipped branch is the larger; cispo:
the weight was clipped; sapo: 0; geo_mean: lr outside [−clip_low, clip_high] where A > 0, and
clipfrac_lower where A < 0), clipfrac_lower (the dual clip is active), approx_kl (of −lr),
ratio_mean, ratio_max (the max), kl and entropy when given; with ``rollout_logp``: is_weight_mean
(w), is_filtered (truncated or masked), rollout_kl (k1 of the sampler against the trainer,
mean of rollout_logp − old_logp) and rollout_kl_k3 (mean of exp(d) − d − 1).
"""

import dataclasses

import torch

from ._common import _masked, masked_mean
from .losses import Rows, agg_rows, kl_penalty

POLICY_LOSSES = ("clip", "cispo", "sapo", "geo_mean")
RATIO_LEVELS = ("token", "sequence")
ROLLOUT_LEVELS = ("token", "sequence", "geometric")
ROLLOUT_MODES = ("truncate", "mask")
#: Bound on log-ratios before exp (token ratio, rollout weights); the sequence ratio's upper bound.
LOG_RATIO_BOUND = 20.0
SEQ_LOG_RATIO_MAX = 10.0


@dataclasses.dataclass(frozen=True)
class RolloutCorrection:
    """How ``ppo_policy_loss`` corrects for the sampler: importance weights π_old/π_rollout.

    Attributes:
        level: "token" (per-token weight), "sequence" (the product over the sequence) or
            "geometric" (its geometric mean).
        mode: "truncate" (TIS: clamp to [low, high]) or "mask" (MIS / IcePop: weight 0 outside).
        high: upper bound, > 0.
        low: lower bound in [0, high], or None (truncate: none; mask: 0).
    """

    level: str = "token"
    mode: str = "truncate"
    high: float = 2.0
    low: float | None = None

    def __post_init__(self):
        if self.level not in ROLLOUT_LEVELS:
            raise ValueError(f"rollout_correction.level must be one of {ROLLOUT_LEVELS}, got {self.level!r}")
        if self.mode not in ROLLOUT_MODES:
            raise ValueError(f"rollout_correction.mode must be one of {ROLLOUT_MODES}, got {self.mode!r}")
        high = self.high
        if isinstance(high, bool) or not isinstance(high, (int, float)) or not 0 < high < float("inf"):
            raise ValueError(f"rollout_correction.high must be a finite number > 0, got {high!r}")
        low = self.low
        number = not isinstance(low, bool) and isinstance(low, (int, float))
        if low is not None and not (number and 0 <= low <= high):
            raise ValueError(f"rollout_correction.low must be None or in [0, high={high}], got {low!r}")

    @property
    def lower(self) -> float:
        """The lower bound as a number (0 when there is none: weights are positive)."""
        return 0.0 if self.low is None else float(self.low)


def _row_sum(x: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    """Per row Σ x kept as a column (B, 1); packed (``rows``): each token's sequence's Σ x."""
    return x.sum(-1, keepdim=True) if rows is None else rows.per_token(x)


def _row_mean(x: torch.Tensor, m: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
    """Per row Σ m·x / max(Σ m, 1), as ``_row_sum`` shapes it."""
    return _row_sum(_masked(x, m), rows) / torch.clamp(_row_sum(m, rows), min=1.0)


def ratio_of(lp, old, m, ratio_level: str, rows: Rows | None = None) -> torch.Tensor:
    """The ratio for ``ratio_level``, differentiable in ``lp`` (B, T) (packed: (1, N), ``rows``)."""
    log_ratio = lp - old
    if ratio_level == "token":
        return torch.exp(torch.clamp(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    seq = _row_mean(log_ratio.detach(), m, rows)
    # exp(lp − sg[lp]) is exactly 1 with derivative 1: the value is sᵢ unrounded, the gradient sᵢ
    # (none where the clamp at 10 holds).
    tie = torch.where(seq <= SEQ_LOG_RATIO_MAX, torch.exp(lp - lp.detach()), 1.0)
    return torch.exp(torch.clamp(seq, max=SEQ_LOG_RATIO_MAX)) * tie


def geo_mean_terms(lp, old, adv, m, clip_low, clip_high, rows: Rows | None = None):
    """GMPO-token's (B, T) per-token loss, ratio, clipped and lower (module docstring)."""
    lr = lp - old
    sign = torch.sign(adv)
    x = sign * torch.minimum(sign * lr, sign * torch.clamp(lr, -clip_low, clip_high))
    seq = _row_mean(x.detach(), m, rows)
    # exp(x − sg[x]) is exactly 1 with derivative ∂x/∂logp: value ρᵢ, gradient ρᵢ·∂xₜ/∂logpₜ.
    tie = torch.where(seq <= LOG_RATIO_BOUND, torch.exp(x - x.detach()), 1.0)
    ratio = torch.exp(torch.clamp(seq, max=LOG_RATIO_BOUND)) * tie
    outside = (lr > clip_high) | (lr < -clip_low)
    return -_row_mean(adv, m, rows) * ratio, ratio, outside & (adv > 0), outside & (adv < 0)


def surrogate(lp, ratio, adv, *, loss, clip_low, clip_high, dual_clip, sapo_tau):
    """Per-token policy loss and its (clipped, lower) indicators."""
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    lower = torch.zeros_like(ratio, dtype=torch.bool)
    if loss == "cispo":
        return -clipped_ratio.detach() * adv * lp, clipped_ratio.detach() != ratio.detach(), lower
    if loss == "sapo":
        tau = torch.where(adv > 0, adv.new_tensor(sapo_tau[0]), adv.new_tensor(sapo_tau[1]))  # in adv's dtype
        return -adv * torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau, lower, lower
    unclipped, clipped = -adv * ratio, -adv * clipped_ratio
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        floor = -adv * dual_clip
        lower = (adv < 0) & (pg > floor)
        pg = torch.where(adv < 0, torch.minimum(pg, floor), pg)
    return pg, clipped > unclipped, lower


def rollout_weights(old, rollout, m, rc: RolloutCorrection, rows: Rows | None = None):
    """(weight w, filtered indicator) of the rollout correction, constants."""
    d = old - rollout
    if rc.level == "token":
        rho = torch.exp(torch.clamp(d, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    elif rc.level == "sequence":
        rho = torch.exp(torch.clamp(_row_sum(_masked(d, m), rows), -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    else:
        rho = torch.exp(_row_mean(d, m, rows))
    rho = rho.expand_as(d)
    if rc.mode == "truncate":
        w = torch.clamp(rho, min=rc.low, max=rc.high)
        return w, w != rho
    keep = (rho >= rc.lower) & (rho <= rc.high)
    return torch.where(keep, rho, 0.0), ~keep


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss: str = "clip",
    ratio_level: str = "token",
    sapo_tau: tuple[float, float] = (1.0, 1.05),
    weights: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    rollout_correction: RolloutCorrection | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss family (module docstring). ``old_logp``, ``advantages``, ``ref_logp``,
    ``weights`` and ``rollout_logp`` are constants.

    Args:
        logp, old_logp, advantages, mask (and ref_logp, entropy, weights, rollout_logp): ``(B, T)``,
            or ``(N,)``: one row, or packed sequences with ``cu_seqlens`` ``(S + 1,)``.

    Returns:
        ``(loss, stats)``: fp32 0-d loss and a dict of 0-d fp32 tensors (module docstring).
    """
    # Packed: per-sequence sums by index_add (no padded copy, no host read).
    rows = None if cu_seqlens is None else Rows(cu_seqlens, logp.shape[0])
    clip_high = clip_low if clip_high is None else clip_high
    f32 = lambda x: x.detach().float() if x.dtype != torch.float64 else x.detach()  # noqa: E731
    lp = logp.float() if logp.dtype != torch.float64 else logp
    old, adv, m = f32(old_logp), f32(advantages), mask.detach().to(lp.dtype)
    if loss == "geo_mean":
        terms = geo_mean_terms(*map(torch.atleast_2d, (lp, old, adv, m)), clip_low, clip_high, rows)
        pg, ratio, clipped, lower = (t.reshape(lp.shape) for t in terms)
    else:
        ratio = ratio_of(*map(torch.atleast_2d, (lp, old, m)), ratio_level, rows).reshape(lp.shape)
        clips = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
        pg, clipped, lower = surrogate(lp, ratio, adv, loss=loss, sapo_tau=sapo_tau, **clips)
    if weights is not None:
        pg = pg * f32(weights)
    stats = {}
    if rollout_logp is not None:
        rc = rollout_correction or RolloutCorrection()
        w, filtered = rollout_weights(*(torch.atleast_2d(x) for x in (old, f32(rollout_logp), m)), rc, rows)
        w, filtered = w.reshape(lp.shape), filtered.reshape(lp.shape)
        pg = pg * w
        stats["is_weight_mean"] = masked_mean(w, m)
        stats["is_filtered"] = masked_mean(filtered.to(m.dtype), m)
        stats["rollout_kl"] = masked_mean(f32(rollout_logp) - old, m)
        stats["rollout_kl_k3"] = masked_mean(kl_penalty(f32(rollout_logp), old, "k3"), m)
    if ref_logp is not None:
        kl = kl_penalty(lp, f32(ref_logp), kl_estimator)
        pg = pg + kl_coef * kl
        stats["kl"] = masked_mean(kl.detach(), m)
    if entropy is not None:
        ent = entropy.float() if entropy.dtype != torch.float64 else entropy
        pg = pg - entropy_coef * ent
        stats["entropy"] = masked_mean(ent.detach(), m)
    ratio = ratio.detach()
    counted = m != 0
    stats = {
        "clipfrac": masked_mean(clipped.to(m.dtype), m),
        "clipfrac_lower": masked_mean(lower.to(m.dtype), m),
        "approx_kl": masked_mean(old - lp.detach(), m),
        "ratio_mean": masked_mean(ratio, m),
        "ratio_max": torch.where(counted, ratio, 0.0).max() if ratio.numel() else ratio.new_zeros(()),
        **stats,
    }
    return agg_rows(pg, m, agg, rows), stats
