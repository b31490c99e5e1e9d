"""autograd.Functions and the functional API of fastppo's ops (dispatch between Triton and reference)."""

from .dpo_loss import dpo_loss
from .gae import discounted_returns, gae
from .group_advantages import group_advantages
from .kl_penalty import KLPenaltyFunction, kl_penalty
from .linear_logprobs import LinearLogprobsFunction, linear_logprobs
from .masked_whiten import masked_whiten
from .ppo_policy_loss import PPOPolicyLossFunction, ppo_policy_loss
from .shape_rewards import shape_rewards
from .token_logprobs import TokenLogprobsFunction, token_logprobs
from .value_loss import ValueLossFunction, value_loss

__all__ = [
    "KLPenaltyFunction",
    "LinearLogprobsFunction",
    "PPOPolicyLossFunction",
    "TokenLogprobsFunction",
    "ValueLossFunction",
    "discounted_returns",
    "dpo_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "masked_whiten",
    "ppo_policy_loss",
    "shape_rewards",
    "token_logprobs",
    "value_loss",
]
