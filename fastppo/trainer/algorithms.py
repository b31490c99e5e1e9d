"""What makes PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO, GSPO or CISPO: the advantage estimators
and policy losses (registered into ``registry.ADVANTAGES`` and ``registry.POLICY_LOSSES``), and the
named presets of ``fastppo train``.

Each registry entry is the one home of its decision: an estimator says whether it needs a critic
or groups of responses per prompt and where the KL penalty goes by default (shaped into the
per-token rewards, or a term of the loss); a policy loss says which member of
``fastppo.ppo_policy_loss``'s family it is. Each declares its own hyperparameters, which become
``fastppo train`` flags (``registry.py``). Adding one is one decorated function here plus its test
(tests/test_algorithms.py).

Shapes: scores (B,); per-token tensors packed (n,), the response tokens row by row with their
sequences' bounds ``cu_seqlens`` (B + 1,) (the trainer's layout), or padded (B, R) with ``mask``.
"""

from dataclasses import dataclass

import torch

import fastppo
from fastppo.trainer import registry
from fastppo.trainer.registry import (
    Above,
    AdvantageEstimator,
    Hyperparameter,
    register_advantage,
    register_policy_loss,
)

#: The registries (``registry.py``), filled below.
ADVANTAGES = registry.ADVANTAGES
POLICY_LOSSES = registry.POLICY_LOSSES

# --------------------------------------------------------------------------------------------
# Advantage estimators.


@dataclass
class AdvantageInputs:
    """Per-token tensors packed (n,) with ``cu_seqlens`` (``mask`` all True), or padded (B, R)."""

    scores: torch.Tensor  # (B,) fp32
    mask: torch.Tensor  # (n,) or (B, R) bool, response tokens
    group_ids: torch.Tensor  # (B,) int64, the prompt of each response
    values: torch.Tensor | None  # (n,) or (B, R) the critic's, None without one
    kl: torch.Tensor  # (n,) or (B, R) per-token KL estimate (0 after each response)
    kl_coef: float  # its weight in the rewards: 0 when the KL goes into the loss
    gamma: float
    lam: float
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32 bounds of the packed rows; None padded


def on_tokens(per_sequence: torch.Tensor, x: AdvantageInputs) -> torch.Tensor:
    """(B,) per-sequence values on each token of their sequence, in ``x``'s layout (0 after each
    response padded; packed, repeated with the output size known: no read)."""
    if x.cu_seqlens is None:
        return per_sequence[:, None] * x.mask
    lengths = (x.cu_seqlens[1:] - x.cu_seqlens[:-1]).long()
    return per_sequence.repeat_interleave(lengths, output_size=x.mask.shape[0])


def _shaped_rewards(x: AdvantageInputs, scores: torch.Tensor) -> torch.Tensor:
    return fastppo.shape_rewards(scores, x.mask, kl=x.kl, kl_coef=x.kl_coef, cu_seqlens=x.cu_seqlens)


def _gae(x: AdvantageInputs):
    rewards = _shaped_rewards(x, x.scores)
    return fastppo.gae(rewards, x.values, x.mask, gamma=x.gamma, lam=x.lam, cu_seqlens=x.cu_seqlens)


def _per_sequence(method: str):
    def compute(x: AdvantageInputs):
        per_sequence = fastppo.group_advantages(x.scores, x.group_ids, method=method)
        return on_tokens(per_sequence, x), None

    return compute


def _reinforce_pp(x: AdvantageInputs):
    rewards = _shaped_rewards(x, x.scores)
    return fastppo.discounted_returns(rewards, x.mask, gamma=x.gamma, cu_seqlens=x.cu_seqlens), None


def _reinforce_pp_baseline(x: AdvantageInputs):
    centred = fastppo.group_advantages(x.scores, x.group_ids, method="dr_grpo")  # s − mean of its group
    rewards = _shaped_rewards(x, centred)
    return fastppo.discounted_returns(rewards, x.mask, gamma=x.gamma, cu_seqlens=x.cu_seqlens), None


# The registrations: the decorator applied to the functions above (gamma and lam come in the
# inputs, read from the trainer's options; an estimator's own hyperparameters would be `params`).
_GROUPS = dict(needs_groups=True, token_rewards=False, kl_in="loss")
# fmt: off
register_advantage("gae", "GAE(γ, λ) over KL-shaped token rewards, with a critic", needs_critic=True,
                   reads=("gamma", "lam"))(_gae)
register_advantage("grpo", "(score − group mean) / (group std + ε) on every token of a response",
                   **_GROUPS)(_per_sequence("grpo"))
register_advantage("dr_grpo", "score − group mean (Dr. GRPO: no std division)",
                   **_GROUPS)(_per_sequence("dr_grpo"))
register_advantage("rloo", "score − mean of the other responses to its prompt",
                   **_GROUPS)(_per_sequence("rloo"))
register_advantage("reinforce++", "discounted returns of KL-shaped rewards, whitened over the batch",
                   always_whiten=True, reads=("gamma",))(_reinforce_pp)
register_advantage("reinforce++-baseline", "as reinforce++, the group mean subtracted from scores first",
                   needs_groups=True, always_whiten=True, reads=("gamma",))(_reinforce_pp_baseline)
# fmt: on


def advantages(
    estimator: AdvantageEstimator, x: AdvantageInputs, *, whiten: bool, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``estimator``, then whiten the advantages when it or the config asks, with the mean
    and variance of the response tokens of the ``keep`` (B,) responses (all by default).
    Returns (advantages, returns) in ``x``'s layout (padded: 0 after each response). Reads nothing
    back: with no token counted, the advantages are left as they are."""
    adv, returns = estimator.compute(x)
    if whiten or estimator.always_whiten:
        counted = x.mask if keep is None else x.mask & on_tokens(keep, x).bool()
        adv = torch.where(counted.any(), fastppo.masked_whiten(adv, counted) * x.mask, adv)
    return adv, returns


# --------------------------------------------------------------------------------------------
# Policy losses: per-token losses summed with weights (the update normalises the sum).


@dataclass
class PolicyLossInputs:
    """What the trainer gives every policy loss: the packed response tokens and the terms every
    loss carries (KL, entropy, rollout correction). A loss's own hyperparameters come as keywords."""

    logp: torch.Tensor  # (n,) the policy's log-probs of the response tokens, row by row, with grad
    old_logp: torch.Tensor  # (n,) the sampling policy's (as the trainer computes them)
    advantages: torch.Tensor  # (n,)
    weights: torch.Tensor  # (n,) fp32 weight of each token in the sum (row sums: 1 or the row's tokens)
    cu_seqlens: torch.Tensor  # (B + 1,) int32 bounds of each response's tokens in the (n,) tensors
    ref_logp: torch.Tensor | None  # (n,) the reference's, when the KL is a term of the loss
    kl_coef: float
    kl_estimator: str
    entropy: torch.Tensor | None  # (n,) with grad, for the entropy bonus
    entropy_coef: float
    rollout_logp: torch.Tensor | None = None  # (n,) the sampler's own log-probs, for rollout correction
    rollout_correction: fastppo.RolloutCorrection | None = None


def _family(x: PolicyLossInputs, loss: str, ratio_level: str = "token", **options):
    """``fastppo.ppo_policy_loss``'s member ``loss``/``ratio_level`` over the packed response
    tokens, with the KL, entropy and rollout-correction terms of ``x`` and the member's
    ``options`` (clip_low, sapo_tau, ...): (Σ weight·loss (0-d), stats)."""
    return fastppo.ppo_policy_loss(
        x.logp, x.old_logp, x.advantages, x.weights, agg="token-sum", cu_seqlens=x.cu_seqlens,
        loss=loss, ratio_level=ratio_level, ref_logp=x.ref_logp,
        kl_coef=x.kl_coef if x.ref_logp is not None else 0.0, kl_estimator=x.kl_estimator,
        entropy=x.entropy, entropy_coef=x.entropy_coef,
        rollout_logp=x.rollout_logp, rollout_correction=x.rollout_correction, **options,
    )  # fmt: skip


# Hyperparameters that several losses read: one declaration each.
# fmt: off
CLIP_LOW = Hyperparameter("clip_low", float, 0.2, "How far below 1 the ratio is clipped (cispo: 1 is no "
                          "lower bound; geo_mean: the log-ratio's bound).", Above(0))
CLIP_HIGH = Hyperparameter("clip_high", float, None, "How far above 1 the ratio is clipped (unset: "
                           "clip_low; cispo: the weight's cap is 1 + clip_high).", Above(0, finite=False))
DUAL_CLIP = Hyperparameter("dual_clip", float, None, "Dual clip c > 1: the loss of a negative advantage "
                           "is at most -c·A (off when unset).", Above(1, finite=False))
_CLIPS = (CLIP_LOW, CLIP_HIGH)
SAPO_TAU_POS = Hyperparameter("sapo_tau_pos", float, 1.0, "SAPO gate temperature for positive advantages.",
                              Above(0, finite=False))
SAPO_TAU_NEG = Hyperparameter("sapo_tau_neg", float, 1.05, "SAPO gate temperature for negative advantages.",
                              Above(0, finite=False))
# fmt: on


# The table: each loss is a member of the op's family with the hyperparameters it reads.
@register_policy_loss("ppo-clip", "clipped surrogate of the token ratio", params=(*_CLIPS, DUAL_CLIP))
def _ppo_clip(x: PolicyLossInputs, *, clip_low, clip_high, dual_clip):
    return _family(x, "clip", clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


@register_policy_loss(
    "gspo",
    "GSPO: the clipped surrogate of each response's length-normalised ratio (token form of the gradient)",
    params=(*_CLIPS, DUAL_CLIP),
)
def _gspo(x: PolicyLossInputs, *, clip_low, clip_high, dual_clip):
    return _family(x, "clip", "sequence", clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


@register_policy_loss(
    "cispo", "CISPO: REINFORCE weighted by the clipped token ratio, stop-gradient", params=_CLIPS
)
def _cispo(x: PolicyLossInputs, *, clip_low, clip_high):
    return _family(x, "cispo", clip_low=clip_low, clip_high=clip_high)


@register_policy_loss(
    "sapo",
    "SAPO: a sigmoid gate of the token ratio in place of the clip",
    params=(SAPO_TAU_POS, SAPO_TAU_NEG),
)
def _sapo(x: PolicyLossInputs, *, sapo_tau_pos, sapo_tau_neg):
    return _family(x, "sapo", sapo_tau=(sapo_tau_pos, sapo_tau_neg))


@register_policy_loss(
    "geo_mean",
    "GMPO: each response's geometric-mean ratio (log-ratios clipped on the optimistic side) times its "
    "mean advantage",
    params=_CLIPS,
)
def _geo_mean(x: PolicyLossInputs, *, clip_low, clip_high):
    return _family(x, "geo_mean", clip_low=clip_low, clip_high=clip_high)


#: How per-token losses of a mini-batch are averaged: the weight of each token and what the
#: weighted sum is divided by.
LOSS_AGGREGATIONS = {
    "token-mean": "every token of the mini-batch counts once",
    "seq-mean-token-mean": "each response's mean, averaged over responses",
    "seq-mean-token-sum-norm": "each response's sum over max_new_tokens, averaged over responses (Dr. GRPO)",
}


def token_weights(cu_seqlens: torch.Tensor, n: int, agg: str) -> torch.Tensor:
    """(n,) fp32 weight of each packed response token for ``agg``; ``cu_seqlens`` (B + 1,) the
    responses' bounds, ``n`` their tokens (known on the host: no read)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if agg == "seq-mean-token-mean":
        share = 1 / lengths.clamp(min=1).float()
        return share.repeat_interleave(lengths, output_size=n)
    return torch.ones(n, device=cu_seqlens.device)


def loss_normaliser(lengths, agg: str, max_new_tokens: int) -> float:
    """What a mini-batch's weighted token sum is divided by; ``lengths`` (B,) its responses' token
    counts on the host (a list or numpy array: no read)."""
    if agg == "token-mean":
        return max(int(sum(lengths)), 1)
    n_seqs = max(len(lengths), 1)
    return n_seqs * max_new_tokens if agg == "seq-mean-token-sum-norm" else n_seqs


# --------------------------------------------------------------------------------------------
# Presets: `fastppo train <preset>`.


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    # PPOConfig fields (hyperparameters included) the preset sets when the user leaves them unset;
    # the others keep their own defaults (config.PPOConfig, registry.Hyperparameter)
    defaults: dict

    def __post_init__(self):
        chosen = ("advantage", "group_size", "kl_in", "kl_estimator")
        missing = [name for name in chosen if name not in self.defaults]
        if missing:  # they have no default of their own: each preset chooses them
            raise ValueError(f"preset {self.name} must set {', '.join(missing)}")


#: Critic-free presets: 8 responses per prompt, the KL (k3) a term of the loss.
_GROUPED = dict(group_size=8, kl_in="loss", kl_estimator="k3")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("ppo", "PPO with a critic: GAE advantages, the KL (k1) shaped into the rewards",
               dict(advantage="gae", group_size=1, kl_in="reward", kl_estimator="k1")),
        Preset("grpo", "GRPO: 8 responses per prompt, group-normalised scores, the KL (k3) in the loss",
               dict(advantage="grpo", **_GROUPED)),
        Preset("dr_grpo", "Dr. GRPO: GRPO without the std division and the per-response length mean",
               dict(advantage="dr_grpo", loss_agg="seq-mean-token-sum-norm", **_GROUPED)),
        Preset("rloo", "RLOO: 8 responses per prompt, leave-one-out baseline, the KL (k3) in the loss",
               dict(advantage="rloo", **_GROUPED)),
        Preset("reinforce++", "REINFORCE++: no critic, KL-shaped rewards, discounted returns whitened",
               dict(advantage="reinforce++", group_size=1, kl_in="reward", kl_estimator="k1")),
        Preset("dapo", "DAPO: GRPO with clip-higher (0.2/0.28), token-mean, no KL, truncated left out",
               dict(advantage="grpo", kl_coef=0.0, clip_high=0.28, drop_truncated=True, **_GROUPED)),
        Preset("gspo", "GSPO: GRPO advantages, sequence-level ratio clipped to [1 - 3e-4, 1 + 4e-4], "
               "per-response mean", dict(advantage="grpo", policy_loss="gspo", clip_low=3e-4, clip_high=4e-4,
                                         loss_agg="seq-mean-token-mean", **_GROUPED)),
        Preset("cispo", "CISPO: GRPO advantages, REINFORCE with the token ratio truncated at 5 "
               "(stop-gradient), token-mean", dict(advantage="grpo", policy_loss="cispo", clip_low=1.0,
                                                   clip_high=4.0, **_GROUPED)),
    )
}  # fmt: skip


def groups_with_spread(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the responses whose group's scores are not all equal (DAPO's dynamic sampling
    keeps only those: a group of equal scores has zero advantage and teaches nothing). Group ids
    lie in [0, B): B slots hold every group without reading how many there are."""
    n_groups = group_ids.shape[0]
    low = torch.full((n_groups,), float("inf"), device=scores.device).scatter_reduce(
        0, group_ids, scores, "amin"
    )
    high = torch.full((n_groups,), -float("inf"), device=scores.device).scatter_reduce(
        0, group_ids, scores, "amax"
    )
    return (high > low)[group_ids]
