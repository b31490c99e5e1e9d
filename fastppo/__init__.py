"""fastppo: fused Triton kernels for RL fine-tuning of language models.

The functional API (see DESIGN.md §3) dispatches to Triton kernels on CUDA tensors and
to the PyTorch reference (``fastppo.reference``) elsewhere; ``fastppo env`` tells which runs.
"""

from fastppo import packing, reference
from fastppo._backend import active_backend
from fastppo.ops import (
    discounted_returns,
    dpo_loss,
    gae,
    group_advantages,
    kl_penalty,
    linear_logprobs,
    masked_whiten,
    ppo_policy_loss,
    shape_rewards,
    token_logprobs,
    value_loss,
)
from fastppo.packing import extension_available
from fastppo.reference import RolloutCorrection

__version__ = "0.1.0"

__all__ = [
    "RolloutCorrection",
    "__version__",
    "active_backend",
    "discounted_returns",
    "dpo_loss",
    "gae",
    "group_advantages",
    "extension_available",
    "kl_penalty",
    "linear_logprobs",
    "masked_whiten",
    "packing",
    "ppo_policy_loss",
    "reference",
    "shape_rewards",
    "token_logprobs",
    "value_loss",
]
