"""gae, masked_whiten and group_advantages.

Providers: ``python_loop`` (the reverse loop over time that trainers run today, written here as
verl's ``compute_gae_advantage_return`` does it, without its whitening; for group advantages the
per-sample loop over a dict of groups), ``verl`` (verl's own ``compute_gae_advantage_return`` and
``compute_grpo_outcome_advantage``, when verl is installed),
``torch`` (``fastppo.reference``), ``compile`` (torch.compile of the whitening reference; not of
the GAE loop, whose unrolled graph over T steps is impractical) and ``fastppo``.

Bytes floor per token (fp32 rewards, values, bool mask): gae reads 9 B and writes 8 B = 17 B;
masked_whiten reads 5 B and writes 4 B = 9 B. Group advantages: 4 B score + 8 B id + 4 B out
per sequence.
"""

import torch

import fastppo
from fastppo.bench import harness
from fastppo.bench.harness import Benchmark

OPS = ("gae", "masked_whiten", "group_advantages")
FULL_SHAPES = [(64, 1024), (256, 4096), (1024, 8192)]
QUICK_SHAPES = [(4, 64), (8, 200)]
GAMMA, LAM = 0.99, 0.95


def python_loop_gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """verl's loop (carry over masked tokens): PyTorch ops for every token position."""
    next_values = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    mask = mask.to(values.dtype)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        new_last = delta + gamma * lam * last
        next_values = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_values
        last = new_last * mask[:, t] + (1 - mask[:, t]) * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def python_loop_group(scores, group_ids, eps=1e-6):
    """The per-sample loop of GRPO trainers: a dict of lists, then one normalisation per sample."""
    by_group: dict[int, list] = {}
    ids = group_ids.tolist()
    for i, g in enumerate(ids):
        by_group.setdefault(g, []).append(scores[i])
    mean = {g: torch.mean(torch.stack(v)) if len(v) > 1 else torch.tensor(0.0) for g, v in by_group.items()}
    std = {g: torch.std(torch.stack(v)) if len(v) > 1 else torch.tensor(1.0) for g, v in by_group.items()}
    out = scores.clone()
    for i, g in enumerate(ids):
        out[i] = (scores[i] - mean[g]) / (std[g] + eps)
    return out


def _gae_impl(provider):
    if provider == "python_loop":
        return python_loop_gae
    if provider == "verl":
        from verl.trainer.ppo.core_algos import compute_gae_advantage_return

        return lambda r, v, m: compute_gae_advantage_return(r, v, m.float(), GAMMA, LAM)  # a float mask
    if provider == "torch":
        return lambda r, v, m: fastppo.reference.gae(r, v, m, gamma=GAMMA, lam=LAM)
    return lambda r, v, m: fastppo.gae(r, v, m, gamma=GAMMA, lam=LAM)


def _whiten_impl(provider):
    if provider == "torch":
        return fastppo.reference.masked_whiten
    if provider == "compile":
        return torch.compile(fastppo.reference.masked_whiten, dynamic=False)
    return fastppo.masked_whiten


def _group_impl(provider):
    if provider == "python_loop":
        return python_loop_group
    if provider == "verl":  # outcome rewards as (n, 1) token rewards, group ids as a numpy index
        from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

        def verl_grpo(s, g):
            rewards = s[:, None]
            return compute_grpo_outcome_advantage(rewards, torch.ones_like(rewards), g.cpu().numpy())[0][:, 0]

        return verl_grpo
    if provider == "torch":
        return lambda s, g: fastppo.reference.group_advantages(s, g, method="grpo")
    return lambda s, g: fastppo.group_advantages(s, g, method="grpo")


def _token_batch(B, T, device):
    gen = torch.Generator(device=device).manual_seed(0)
    rewards = torch.randn(B, T, device=device, generator=gen)
    values = torch.randn(B, T, device=device, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), device=device, generator=gen)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    return rewards, values, mask


def _setup(kind, provider, shape, device):
    def setup():
        if kind == "gae":
            impl, batch = _gae_impl(provider), _token_batch(*shape, device)
            return lambda: impl(*batch)
        if kind == "masked_whiten":
            impl, (_, values, mask) = _whiten_impl(provider), _token_batch(*shape, device)
            return lambda: impl(values, mask)
        n, group = shape
        impl = _group_impl(provider)
        scores = torch.randn(n, device=device)
        ids = torch.randperm(n, device=device) // group  # shuffled ids, groups of `group`
        return lambda: impl(scores, ids)

    return setup


def benchmarks(*, device, quick, providers, modes, dtype=None, ops=OPS, log=print):
    del dtype  # rewards, values and advantages are fp32
    if "fwd" not in modes:
        return
    providers = harness.importable_providers(
        providers, {"verl": "verl.trainer.ppo.core_algos"}, "advantages", log
    )
    # The Python loop is the baseline every speed-up here is measured against.
    providers = set(providers) | {"python_loop"}
    for B, T in QUICK_SHAPES if quick else FULL_SHAPES:
        for op, candidates, floor in [
            ("gae", ("python_loop", "verl", "torch", "fastppo"), 17),
            ("masked_whiten", ("torch", "compile", "fastppo"), 9),
        ]:
            for p in (p for p in candidates if op in ops and p in providers):
                yield Benchmark(
                    op, p, "fwd", "float32", {"B": B, "T": T}, floor * B * T, _setup(op, p, (B, T), device)
                )
    if "group_advantages" in ops:
        n, group = (64, 8) if quick else (8192, 8)
        for p in (p for p in ("python_loop", "verl", "torch", "fastppo") if p in providers):
            setup = _setup("group_advantages", p, (n, group), device)
            yield Benchmark("group_advantages", p, "fwd", "float32", {"B": n, "group": group}, 16 * n, setup)
