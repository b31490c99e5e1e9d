"""fastppo.shape_rewards: kernel vs reference vs a hand loop; padded and packed layouts."""

import pytest
import torch

import fastppo
from fastppo import reference


def hand(scores, mask, kl, kl_coef):
    out = []
    for s, m, k in zip(scores.tolist(), mask.tolist(), kl.tolist(), strict=True):
        row = [-kl_coef * ki if mi else 0.0 for mi, ki in zip(m, k, strict=True)]
        counted = [t for t, mi in enumerate(m) if mi]
        if counted:
            row[counted[-1]] += s
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("B, T", [(5, 40), (3, 1), (2, 3000)])
def test_matches_hand_and_reference(B, T, device):
    g = torch.Generator().manual_seed(B + T)
    scores, kl = torch.randn(B, generator=g).to(device), torch.randn(B, T, generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(device)
    mask[0] = False
    got = fastppo.shape_rewards(scores, mask, kl=kl, kl_coef=0.05)
    expected = hand(scores.cpu(), mask.cpu(), kl.cpu(), 0.05)
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reference.shape_rewards(scores, mask, kl=kl, kl_coef=0.05), got)
    no_kl = fastppo.shape_rewards(scores, mask)
    torch.testing.assert_close(no_kl.cpu().double(), hand(scores.cpu(), mask.cpu(), torch.zeros(B, T), 0.0))


def test_packed(device):
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(4, 20, generator=g) < 0.8).to(device)
    scores, kl = torch.randn(4, generator=g).to(device), torch.randn(4, 20, generator=g).to(device)
    cu = torch.arange(0, 81, 20, dtype=torch.int32, device=device)
    packed = fastppo.shape_rewards(scores, mask.flatten(), kl=kl.flatten(), kl_coef=0.1, cu_seqlens=cu)
    padded = fastppo.shape_rewards(scores, mask, kl=kl, kl_coef=0.1)
    torch.testing.assert_close(packed, padded.flatten())
    torch.testing.assert_close(reference.shape_rewards(scores, mask.flatten(), kl=kl.flatten(), kl_coef=0.1,
                                                       cu_seqlens=cu), packed)  # fmt: skip


def test_bad_input(device):
    mask = torch.ones(3, 4, device=device)
    with pytest.raises(ValueError, match="scores must have shape \\(3,\\)"):
        fastppo.shape_rewards(torch.zeros(2, device=device), mask)
    with pytest.raises(ValueError, match="needs kl"):
        fastppo.shape_rewards(torch.zeros(3, device=device), mask, kl_coef=0.1)
    with pytest.raises(TypeError, match="scores must have dtype"):
        fastppo.shape_rewards(torch.zeros(3, dtype=torch.long, device=device), mask)
