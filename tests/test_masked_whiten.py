"""fastppo.masked_whiten: kernel vs reference vs an fp64 computation; deterministic."""

import math

import pytest
import torch

import fastppo
from fastppo import reference


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(7, 33), (5000,), (2, 3, 4000)])
def test_matches_fp64_and_reference(shape, shift_mean, device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 5 + 3).to(device)
    mask = (torch.rand(shape, generator=g) < 0.6).to(device)
    got = fastppo.masked_whiten(x, mask, shift_mean=shift_mean)
    values = x.cpu().double()[mask.cpu()].tolist()
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    expected = (x.cpu().double() - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        reference.masked_whiten(x, mask, shift_mean=shift_mean), got, atol=1e-5, rtol=1e-5
    )


def test_large_offset_is_stable(device):
    """No sum of squares of raw values: a large common offset does not destroy the variance."""
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1)).to(device) + 1e4
    got = fastppo.masked_whiten(x, torch.ones_like(x, dtype=torch.bool))
    assert abs(got.mean().item()) < 1e-3 and abs(got.std().item() - 1) < 1e-3


@pytest.mark.parametrize("n_counted", [0, 1])
def test_degenerate_masks_give_no_nan(n_counted, device):
    x = torch.randn(50, device=device)
    mask = torch.zeros(50, dtype=torch.bool, device=device)
    mask[:n_counted] = True
    got = fastppo.masked_whiten(x, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference.masked_whiten(x, mask), atol=1e-3, rtol=1e-5)


def test_float_weights_and_garbage_padding(device):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 50, generator=g).to(device), torch.rand(4, 50, generator=g).to(device)
    w[w < 0.3] = 0
    torch.testing.assert_close(
        fastppo.masked_whiten(x, w), reference.masked_whiten(x, w), atol=1e-5, rtol=1e-5
    )
    x[w == 0] = float("inf")
    got = fastppo.masked_whiten(x, w)
    assert torch.isfinite(got[w != 0]).all()


def test_deterministic(device):
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3)).to(device)
    mask = x > -1
    assert torch.equal(fastppo.masked_whiten(x, mask), fastppo.masked_whiten(x, mask))


def test_bad_input(device):
    with pytest.raises(ValueError, match="mask must have the shape"):
        fastppo.masked_whiten(torch.zeros(3, device=device), torch.ones(4, device=device))
