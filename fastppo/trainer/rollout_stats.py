"""What one rollout logs: its rewards (the total and each reward's part), the KL to the reference,
lengths, the critic's explained variance, and how far the sampler is from the trainer.

Every value is a Python number; ``rollout_metrics`` computes them on the device over the packed
per-token tensors and reads them back together, in one read (the reward parts in another)."""

import torch

import fastppo
from fastppo.trainer.rollout import Rollout


def kl_per_token(rollout: Rollout, estimator: str) -> torch.Tensor:
    """(n,) KL estimate of the sampling policy against the reference, per response token."""
    return fastppo.kl_penalty(rollout.old_logp, rollout.ref_logp, estimator)


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """0-d: 1 − Var(returns − values) / Var(returns) over the response tokens (n,): how much of the
    return the critic predicts (1 perfect, 0 no better than the mean, negative worse); NaN when
    the returns do not vary. On the device, not read."""
    var = returns.var(unbiased=False) if returns.numel() > 1 else returns.new_zeros(())
    ratio = (returns - values).var(unbiased=False) / var.clamp(min=torch.finfo(var.dtype).tiny)
    return torch.where(var > 0, 1 - ratio, torch.full_like(var, float("nan")))


#: π_trainer/π_sampler outside this band counts in ``is_ratio_outside``: the tail a mean hides.
RATIO_BAND = (0.8, 1.25)


def sampler_metrics(rollout: Rollout) -> dict[str, torch.Tensor]:
    """How far the sampler's distribution is from the trainer's π_old over the rollout's tokens
    (0-d tensors, not read): ``rollout_kl`` mean of (log π_sampler − log π_old) (k1),
    ``rollout_kl_k3``, ``is_weight_mean`` mean of π_old/π_sampler (before any truncation) and
    ``is_ratio_outside``, the fraction of tokens whose ratio lies outside ``RATIO_BAND``."""
    d = rollout.rollout_logp - rollout.old_logp
    ratio = torch.exp(-d)
    outside = (ratio < RATIO_BAND[0]) | (ratio > RATIO_BAND[1])
    k3 = fastppo.kl_penalty(rollout.rollout_logp, rollout.old_logp, "k3")
    names = ("rollout_kl", "rollout_kl_k3", "is_weight_mean", "is_ratio_outside")
    return dict(zip(names, (d.mean(), k3.mean(), ratio.mean(), outside.float().mean()), strict=True))


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
    """The rollout's metrics as Python numbers: computed on the device, read in one transfer (and
    the reward parts in one more)."""
    lengths = (rollout.cu_seqlens[1:] - rollout.cu_seqlens[:-1]).float()
    n_seqs = max(len(rollout), 1)
    on_device = {
        "reward": rollout.scores.mean(), "reward_std": rollout.scores.std(),
        "kl": kl_per_token(rollout, "k1").sum() / n_seqs,  # per response, summed over its tokens
        "response_length": lengths.mean(), "truncated_fraction": rollout.truncated.float().mean(),
    }  # fmt: skip
    if rollout.values is not None:
        on_device["explained_variance"] = explained_variance(rollout.values, rollout.returns)
    if rollout.rollout_logp is not None and rollout.n_tokens:
        on_device |= sampler_metrics(rollout)
    values = torch.stack([v.float().reshape(()) for v in on_device.values()]).tolist()
    metrics = dict(zip(on_device, values, strict=True))
    metrics["reward_invalid"] = rollout.invalid_scores  # summed over ranks in ``iterate``
    return metrics | reward_part_metrics(rollout)
