"""fastppo.group_advantages: kernel vs reference vs a per-group Python loop."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastppo
from fastppo import reference

METHODS = reference.GROUP_METHODS


def hand(scores, ids, method, eps):
    out = []
    for s, i in zip(scores, ids, strict=True):
        group = [x for x, j in zip(scores, ids, strict=True) if j == i]
        n = len(group)
        mean = sum(group) / n
        if method == "rloo":
            out.append(s * n / (n - 1) - mean * n / (n - 1) if n > 1 else s)
            continue
        if n == 1:
            mean, std = 0.0, 1.0
        else:
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1))
        out.append((s - mean) / (std + eps) if method == "grpo" else s - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_uneven_unsorted_groups(method, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(
        [5, 3, 5, 9, 3, 3, 7, 5, 9, 100, 3, 5, -2, -2, 7, 7, 7, 7, 1, 5]
    )  # sizes 1..5, unsorted
    scores = torch.randn(ids.numel(), generator=g)
    got = fastppo.group_advantages(scores.to(device), ids.to(device), method=method)
    expected = hand(scores.double().tolist(), ids.tolist(), method, 1e-6)
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference.group_advantages(scores, ids, method=method).double(), expected,
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    ids=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=40),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_groups(ids, method, seed):
    device = "cuda" if torch.cuda.is_available() and not fastppo._backend.triton_interpreted() else "cpu"
    scores = torch.randn(len(ids), generator=torch.Generator().manual_seed(seed))
    ids = [i % 7 if seed % 2 else i for i in ids]  # half the cases share ids a lot
    got = fastppo.group_advantages(scores.to(device), torch.tensor(ids, device=device), method=method)
    torch.testing.assert_close(got.cpu().double(), hand(scores.double().tolist(), ids, method, 1e-6),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_large_groups_and_many_groups(device):
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.zeros(3000, dtype=torch.long), torch.arange(1, 2001).repeat_interleave(4)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    scores = torch.randn(ids.numel(), generator=g)
    for method in METHODS:
        torch.testing.assert_close(
            fastppo.group_advantages(scores.to(device), ids.to(device), method=method).cpu(),
            reference.group_advantages(scores, ids, method=method), atol=1e-5, rtol=1e-5,
        )  # fmt: skip


def test_bad_input(device):
    s, ids = torch.randn(4, device=device), torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="method"):
        fastppo.group_advantages(s, ids, method="ppo")
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        fastppo.group_advantages(s, ids[:3])
    with pytest.raises(TypeError, match="group_ids must be an integer"):
        fastppo.group_advantages(s, ids.float())
    with pytest.raises(ValueError, match="eps"):
        fastppo.group_advantages(s, ids, eps=0.0)
