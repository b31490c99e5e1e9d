"""What one rollout logs: its rewards (the total and each reward's part), the KL to the reference,
lengths, the critic's explained variance, and how far the sampler is from the trainer.

Every value is a Python number; ``rollout_metrics`` reads them from the device together where it
can (the reward parts in one read)."""

import torch

import fastppo
from fastppo.trainer.rollout import Rollout


def kl_per_token(rollout: Rollout, estimator: str) -> torch.Tensor:
    """(B, R) KL estimate of the sampling policy against the reference, 0 after each response."""
    return fastppo.kl_penalty(rollout.old_logp, rollout.ref_logp, estimator) * rollout.response_mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(returns − values) / Var(returns) over the response tokens: how much of the return
    the critic predicts (1 perfect, 0 no better than the mean, negative worse)."""
    r, v = returns[mask], values[mask]
    var = r.var(unbiased=False) if r.numel() > 1 else r.new_zeros(())
    return float(1 - (r - v).var(unbiased=False) / var) if var > 0 else float("nan")


#: π_trainer/π_sampler outside this band counts in ``is_ratio_outside``: the tail a mean hides.
RATIO_BAND = (0.8, 1.25)


def sampler_metrics(rollout: Rollout) -> dict:
    """How far the sampler's distribution is from the trainer's π_old over the rollout's tokens:
    ``rollout_kl`` mean of (log π_sampler − log π_old) (k1), ``rollout_kl_k3``, ``is_weight_mean``
    mean of π_old/π_sampler (before any truncation) and ``is_ratio_outside``, the fraction of
    tokens whose ratio lies outside ``RATIO_BAND``."""
    m = rollout.response_mask
    d = (rollout.rollout_logp - rollout.old_logp)[m]
    ratio = torch.exp(-d)
    outside = (ratio < RATIO_BAND[0]) | (ratio > RATIO_BAND[1])
    k3 = fastppo.kl_penalty(rollout.rollout_logp[m], rollout.old_logp[m], "k3")
    values = torch.stack([d.mean(), k3.mean(), ratio.mean(), outside.float().mean()]).tolist()
    return dict(
        zip(("rollout_kl", "rollout_kl_k3", "is_weight_mean", "is_ratio_outside"), values, strict=True)
    )


def reward_part_metrics(rollout: Rollout) -> dict:
    """Each reward's ``reward/<name>/mean``, ``/std`` and ``/invalid`` (its None or NaN scores),
    for every --reward, one or several: ``reward`` is their weighted sum."""
    if not rollout.reward_parts:
        return {}
    parts = torch.stack(list(rollout.reward_parts.values()))  # (K, B)
    means, stds = torch.stack([parts.mean(1), parts.std(1)]).tolist()  # one read from the device
    metrics = {}
    for name, mean, std in zip(rollout.reward_parts, means, stds, strict=True):
        metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = mean, std
        metrics[f"reward/{name}/invalid"] = rollout.invalid_parts[name]  # summed over ranks in ``iterate``
    return metrics


def is_count(key: str) -> bool:
    """Metrics that count responses: summed over ranks, not averaged."""
    return key == "reward_invalid" or (key.startswith("reward/") and key.endswith("/invalid"))


def rollout_metrics(rollout: Rollout) -> dict:
    lengths = rollout.response_mask.sum(1).float()
    metrics = {
        "reward": float(rollout.scores.mean()), "reward_std": float(rollout.scores.std()),
        "kl": float(kl_per_token(rollout, "k1").sum(1).mean()),  # per response, summed over its tokens
        "response_length": float(lengths.mean()),
        "truncated_fraction": float(rollout.truncated.float().mean()),
        "reward_invalid": rollout.invalid_scores,  # summed over ranks in ``iterate``
    }  # fmt: skip
    metrics |= reward_part_metrics(rollout)
    if rollout.values is not None:
        metrics["explained_variance"] = explained_variance(
            rollout.values, rollout.returns, rollout.response_mask
        )
    if rollout.rollout_logp is not None and rollout.response_mask.any():
        metrics |= sampler_metrics(rollout)
    return metrics
