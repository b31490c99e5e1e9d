"""What makes PPO, GRPO, RLOO, REINFORCE++ or DAPO: registries of advantage estimators and policy
losses, and the named presets of ``fastppo train``.

Each registry entry is the one home of its decision: an estimator says whether it needs a critic
or groups of responses per prompt and where the KL penalty goes by default (shaped into the
per-token rewards, or a term of the loss); a policy loss says how per-token log-probs become a
loss. Adding one is one entry here plus its test (tests/test_algorithms.py).

Shapes: scores (B,); per-token tensors (B, R) over response positions with ``mask`` (B, R).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastppo

# --------------------------------------------------------------------------------------------
# Advantage estimators.


@dataclass
class AdvantageInputs:
    scores: torch.Tensor  # (B,) fp32
    mask: torch.Tensor  # (B, R) bool, response tokens
    group_ids: torch.Tensor  # (B,) int64, the prompt of each response
    values: torch.Tensor | None  # (B, R) the critic's, None without one
    kl: torch.Tensor  # (B, R) per-token KL estimate (0 after each response)
    kl_coef: float  # its weight in the rewards: 0 when the KL goes into the loss
    gamma: float
    lam: float


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    summary: str
    # inputs -> (advantages (B, R), returns (B, R) or None: the critic's targets)
    compute: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]
    needs_critic: bool = False
    needs_groups: bool = False
    token_rewards: bool = True  # built from per-token rewards, so the KL can be shaped into them
    kl_in: str = "reward"  # where the KL penalty goes by default: "reward" or "loss"
    always_whiten: bool = False  # whitened over the batch's tokens whatever whiten_advantages says


def _shaped_rewards(x: AdvantageInputs, scores: torch.Tensor) -> torch.Tensor:
    return fastppo.shape_rewards(scores, x.mask, kl=x.kl, kl_coef=x.kl_coef)


def _gae(x: AdvantageInputs):
    return fastppo.gae(_shaped_rewards(x, x.scores), x.values, x.mask, gamma=x.gamma, lam=x.lam)


def _per_sequence(method: str):
    def compute(x: AdvantageInputs):
        per_sequence = fastppo.group_advantages(x.scores, x.group_ids, method=method)
        return per_sequence[:, None] * x.mask, None

    return compute


def _reinforce_pp(x: AdvantageInputs):
    return fastppo.discounted_returns(_shaped_rewards(x, x.scores), x.mask, gamma=x.gamma), None


def _reinforce_pp_baseline(x: AdvantageInputs):
    centred = fastppo.group_advantages(x.scores, x.group_ids, method="dr_grpo")  # s − mean of its group
    return fastppo.discounted_returns(_shaped_rewards(x, centred), x.mask, gamma=x.gamma), None


_GROUPS = dict(needs_groups=True, token_rewards=False, kl_in="loss")

ADVANTAGES: dict[str, AdvantageEstimator] = {
    e.name: e
    for e in (
        AdvantageEstimator(
            "gae", "GAE(γ, λ) over KL-shaped token rewards, with a critic", _gae, needs_critic=True
        ),
        AdvantageEstimator(
            "grpo",
            "(score − group mean) / (group std + ε) on every token of a response",
            _per_sequence("grpo"),
            **_GROUPS,
        ),
        AdvantageEstimator(
            "dr_grpo", "score − group mean (Dr. GRPO: no std division)", _per_sequence("dr_grpo"), **_GROUPS
        ),
        AdvantageEstimator(
            "rloo", "score − mean of the other responses to its prompt", _per_sequence("rloo"), **_GROUPS
        ),
        AdvantageEstimator(
            "reinforce++",
            "discounted returns of KL-shaped rewards, whitened over the batch",
            _reinforce_pp,
            always_whiten=True,
        ),
        AdvantageEstimator(
            "reinforce++-baseline",
            "as reinforce++, the group mean subtracted from scores first",
            _reinforce_pp_baseline,
            needs_groups=True,
            always_whiten=True,
        ),
    )  # fmt: skip
}


def advantages(
    estimator: AdvantageEstimator, x: AdvantageInputs, *, whiten: bool, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``estimator``, then whiten the advantages when it or the config asks, with the mean
    and variance of the response tokens of the ``keep`` (B,) responses (all by default).
    Returns (advantages, returns), 0 after each response."""
    adv, returns = estimator.compute(x)
    counted = x.mask if keep is None else x.mask & keep[:, None]
    if (whiten or estimator.always_whiten) and counted.any():
        adv = fastppo.masked_whiten(adv, counted) * x.mask
    return adv, returns


# --------------------------------------------------------------------------------------------
# Policy losses: per-token losses summed with weights (the update normalises the sum).


@dataclass
class PolicyLossInputs:
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
    clip_low: float
    clip_high: float | None
    dual_clip: float | None
    sapo_tau: tuple[float, float] = (1.0, 1.05)
    rollout_logp: torch.Tensor | None = None  # (n,) the sampler's own log-probs, for rollout correction
    rollout_correction: fastppo.RolloutCorrection | None = None


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    summary: str
    # inputs -> (Σ weight·loss over the tokens (0-d), stats: dict of 0-d tensors)
    compute: Callable[[PolicyLossInputs], tuple[torch.Tensor, dict]]


def _family(loss: str, ratio_level: str) -> Callable[[PolicyLossInputs], tuple[torch.Tensor, dict]]:
    """A member of ``fastppo.ppo_policy_loss``'s family over the packed response tokens."""

    def compute(x: PolicyLossInputs):
        return fastppo.ppo_policy_loss(
            x.logp, x.old_logp, x.advantages, x.weights, agg="token-sum", cu_seqlens=x.cu_seqlens,
            loss=loss, ratio_level=ratio_level, sapo_tau=x.sapo_tau,
            clip_low=x.clip_low, clip_high=x.clip_high, dual_clip=x.dual_clip if loss == "clip" else None,
            ref_logp=x.ref_logp, kl_coef=x.kl_coef if x.ref_logp is not None else 0.0,
            kl_estimator=x.kl_estimator, entropy=x.entropy, entropy_coef=x.entropy_coef,
            rollout_logp=x.rollout_logp, rollout_correction=x.rollout_correction,
        )  # fmt: skip

    return compute


POLICY_LOSSES: dict[str, PolicyLoss] = {
    loss.name: loss
    for loss in (
        PolicyLoss("ppo-clip", "clipped surrogate of the token ratio (clip_low, clip_high, dual_clip)",
                   _family("clip", "token")),
        PolicyLoss("gspo", "GSPO: the clipped surrogate of each response's length-normalised ratio "
                   "(token form of the gradient)", _family("clip", "sequence")),
        PolicyLoss("cispo", "CISPO: REINFORCE weighted by the clipped token ratio, stop-gradient "
                   "(clip_high bounds the weight at 1 + clip_high)", _family("cispo", "token")),
        PolicyLoss("sapo", "SAPO: a sigmoid gate of the token ratio in place of the clip "
                   "(sapo_tau_pos, sapo_tau_neg)", _family("sapo", "token")),
        PolicyLoss("geo_mean", "GMPO: each response's geometric-mean ratio (log-ratios clipped to "
                   "[-clip_low, clip_high] on the optimistic side) times its mean advantage",
                   _family("geo_mean", "token")),
    )
}  # fmt: skip

#: How per-token losses of a mini-batch are averaged: the weight of each token and what the
#: weighted sum is divided by.
LOSS_AGGREGATIONS = {
    "token-mean": "every token of the mini-batch counts once",
    "seq-mean-token-mean": "each response's mean, averaged over responses",
    "seq-mean-token-sum-norm": "each response's sum over max_new_tokens, averaged over responses (Dr. GRPO)",
}


def token_weights(response_mask: torch.Tensor, agg: str) -> torch.Tensor:
    """(B, R) fp32 weight of each response token for ``agg`` (0 outside responses)."""
    mask = response_mask.float()
    if agg == "seq-mean-token-mean":
        return mask / mask.sum(1, keepdim=True).clamp(min=1)
    return mask


def loss_normaliser(response_mask: torch.Tensor, agg: str, max_new_tokens: int) -> float:
    """What a mini-batch's weighted token sum is divided by (one host sync)."""
    if agg == "token-mean":
        return max(int(response_mask.sum()), 1)
    n_seqs = max(response_mask.shape[0], 1)
    return n_seqs * max_new_tokens if agg == "seq-mean-token-sum-norm" else n_seqs


# --------------------------------------------------------------------------------------------
# Presets: `fastppo train <preset>`.


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    defaults: dict  # PPOConfig fields the preset sets when the user leaves them unset


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
    keeps only those: a group of equal scores has zero advantage and teaches nothing)."""
    n_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    low = torch.full((n_groups,), float("inf"), device=scores.device).scatter_reduce(
        0, group_ids, scores, "amin"
    )
    high = torch.full((n_groups,), -float("inf"), device=scores.device).scatter_reduce(
        0, group_ids, scores, "amax"
    )
    return (high > low)[group_ids]
