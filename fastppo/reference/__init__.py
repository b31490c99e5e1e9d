"""Pure-PyTorch specification of every fastppo op: the test oracle and the CPU path.

Each function here has the same name, arguments and meaning as the public op in ``fastppo``,
is written for clarity (vectorised, no Python loops over tokens) and is differentiable through
PyTorch's autograd. Math: DESIGN.md §4. One module per family: ``logprobs``,
``losses`` (KL, value, DPO), ``policy_loss``, ``advantages``, ``packing``.
"""

from ._common import AGGREGATIONS, agg_loss, masked_mean
from .advantages import GROUP_METHODS, discounted_returns, gae, group_advantages, masked_whiten, shape_rewards
from .logprobs import linear_logprobs, token_logprobs
from .losses import DPO_LOSS_TYPES, KL_ESTIMATORS, dpo_loss, kl_penalty, value_loss
from .packing import balanced_partition, collate, plan_microbatches, unpad
from .policy_loss import POLICY_LOSSES, RATIO_LEVELS, RolloutCorrection, ppo_policy_loss

__all__ = [
    "AGGREGATIONS",
    "DPO_LOSS_TYPES",
    "GROUP_METHODS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "RATIO_LEVELS",
    "RolloutCorrection",
    "agg_loss",
    "balanced_partition",
    "collate",
    "discounted_returns",
    "dpo_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "masked_mean",
    "masked_whiten",
    "plan_microbatches",
    "ppo_policy_loss",
    "shape_rewards",
    "token_logprobs",
    "unpad",
    "value_loss",
]
