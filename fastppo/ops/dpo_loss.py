"""``fastppo.dpo_loss``: the DPO family on sequence log-probs (sequence-sized: plain PyTorch).

The reference is ``fastppo.reference.dpo_loss``; this adds the argument checks.
"""

import torch

from fastppo import reference
from fastppo._checks import check_choice, check_finite, check_positive, check_token_tensors


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss with h = β·((π_c − ref_c) − (π_r − ref_r)).

    Args:
        chosen_logp, rejected_logp: ``(B,)`` sequence log-probs under the policy (e.g. masked sums
            of ``token_logprobs``); they receive the gradient.
        ref_chosen_logp, ref_rejected_logp: ``(B,)`` the same under the frozen reference.
        beta: > 0. loss_type: "sigmoid", "ipo" or "hinge". label_smoothing: ε in [0, 0.5).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the mean loss and β·(π − ref), fp32.
    """
    check_token_tensors(
        allow_any_shape=True, chosen_logp=chosen_logp, rejected_logp=rejected_logp,
        ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp,
    )  # fmt: skip
    if chosen_logp.dim() != 1:
        raise ValueError(f"chosen_logp must have shape (B,), got {tuple(chosen_logp.shape)}")
    beta = check_positive("beta", beta)
    check_choice("loss_type", loss_type, reference.DPO_LOSS_TYPES)
    if not 0 <= check_finite("label_smoothing", label_smoothing) < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    return reference.dpo_loss(
        chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )  # fmt: skip
