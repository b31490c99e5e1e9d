"""fastppo: fused Triton kernels for RL fine-tuning of language models.

The functional API (see ../shared/DESIGN.md §3) dispatches to Triton kernels on CUDA tensors and
to the PyTorch reference (``fastppo.reference``) elsewhere; ``fastppo env`` tells which runs.
"""

from fastppo import packing, reference
from fastppo._backend import active_backend
from fastppo.ops import kl_penalty, ppo_policy_loss, token_logprobs, value_loss
from fastppo.packing import extension_available

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "active_backend",
    "extension_available",
    "kl_penalty",
    "packing",
    "ppo_policy_loss",
    "reference",
    "token_logprobs",
    "value_loss",
]
