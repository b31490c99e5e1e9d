"""autograd.Functions and the functional API of fastppo's ops (dispatch between Triton and reference)."""

from .kl_penalty import KLPenaltyFunction, kl_penalty
from .ppo_policy_loss import PPOPolicyLossFunction, ppo_policy_loss
from .token_logprobs import TokenLogprobsFunction, token_logprobs
from .value_loss import ValueLossFunction, value_loss

__all__ = [
    "KLPenaltyFunction",
    "PPOPolicyLossFunction",
    "TokenLogprobsFunction",
    "ValueLossFunction",
    "kl_penalty",
    "ppo_policy_loss",
    "token_logprobs",
    "value_loss",
]
