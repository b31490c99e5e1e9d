"""fastppo.kl_penalty: kernel vs reference, reference vs the formulas in fp64."""

import math

import pytest
import torch

import fastppo
from fastppo import reference

ESTIMATORS = reference.KL_ESTIMATORS
TOLS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float64, 1e-12, 1e-12),
    (torch.bfloat16, 1e-5, 1e-5),
    (torch.float16, 1e-5, 1e-5),
]


def hand_kl(d: float, estimator: str, clamp: float | None) -> tuple[float, float]:
    """(value, ∂/∂d) written out from DESIGN §4 with the math module."""
    if estimator.startswith("k1"):
        value, grad = d, 1.0
    elif estimator == "k2":
        value, grad = d * d / 2, d
    elif estimator.startswith("k3"):
        inside = -20 <= -d <= 20
        value = math.exp(min(max(-d, -20), 20)) + d - 1
        grad = 1 - math.exp(-d) if inside else 1.0
    else:
        value, grad = abs(d), (d > 0) - (d < 0)
    if clamp is not None:
        grad = grad if -clamp <= value <= clamp else 0.0
        value = min(max(value, -clamp), clamp)
    if estimator.endswith("+"):
        grad = d
    return value, grad


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 0.7])
def test_reference_matches_formulas(estimator, clamp):
    d = torch.tensor([-25.0, -3.0, -0.4, 0.0, 0.3, 2.5, 30.0], dtype=torch.float64)
    logp = (d - 1.0).requires_grad_()
    kl = reference.kl_penalty(logp, torch.full_like(d, -1.0), estimator, clamp)
    kl.sum().backward()
    for i, di in enumerate(d.tolist()):
        value, grad = hand_kl(di, estimator, clamp)
        assert kl[i].item() == pytest.approx(value, rel=1e-12, abs=1e-12)
        assert logp.grad[i].item() == pytest.approx(grad, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("shape", [(7, 129), (1,), (3, 2, 5)])
def test_kernel_matches_reference(shape, clamp, estimator, dtype, atol, rtol, device):
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(shape, generator=g) * 2 - 1).to(dtype).to(device)
    ref = (torch.randn(shape, generator=g) - 1).to(dtype).to(device)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    outs = []
    for fn in (fastppo.kl_penalty, reference.kl_penalty):
        a, b = logp.clone().requires_grad_(), ref.clone().requires_grad_()
        kl = fn(a, b, estimator, clamp)
        (kl * upstream.to(kl.dtype)).sum().backward()
        outs.append((kl, a.grad, b.grad))
    (k, ka, kb), (r, ra, rb) = outs
    assert k.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and k.shape == logp.shape
    torch.testing.assert_close(k, r, atol=atol, rtol=rtol)
    grad_tol = dict(atol=atol, rtol=rtol) if dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(ka, ra, **grad_tol)
    torch.testing.assert_close(kb, rb, **grad_tol)
    assert torch.equal(ka, -kb)


def test_gradcheck_fp64(device):
    logp = torch.randn(11, dtype=torch.float64, device=device, requires_grad=True)
    ref = torch.randn(11, dtype=torch.float64, device=device, requires_grad=True)
    for estimator in ("k1", "k2", "k3", "abs"):
        assert torch.autograd.gradcheck(lambda a, b, e=estimator: fastppo.kl_penalty(a, b, e), (logp, ref))


def test_huge_differences_do_not_overflow(device):
    logp = torch.tensor([-1e4, -60.0, 60.0, 1e4], device=device, requires_grad=True)
    kl = fastppo.kl_penalty(logp, torch.zeros(4, device=device), "k3")
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logp.grad).all()
    torch.testing.assert_close(logp.grad, torch.ones(4, device=device))


def test_non_contiguous_and_empty(device):
    base = torch.randn(6, 10, device=device)
    ref = torch.randn(10, 6, device=device).t()
    torch.testing.assert_close(fastppo.kl_penalty(base, ref), reference.kl_penalty(base, ref))
    assert fastppo.kl_penalty(base[:0], ref[:0]).shape == (0, 10)


def test_bad_input(device):
    x = torch.randn(4, device=device)
    with pytest.raises(ValueError, match="estimator"):
        fastppo.kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="ref_logp must have the shape"):
        fastppo.kl_penalty(x, x[:3])
    with pytest.raises(TypeError, match="ref_logp must be a floating-point"):
        fastppo.kl_penalty(x, x.long())
    with pytest.raises(ValueError, match="clamp"):
        fastppo.kl_penalty(x, x, clamp=0.0)
    with pytest.raises(ValueError, match="one device"):
        fastppo.kl_penalty(x, x.to("meta"))


def _exact_k3_and_grad(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k3 and its derivative in fp64 from expm1: each within 5e-8 relative for |d| ≥ 1e-6 (the
    cancellation in expm1(−d) + d costs ulp(d), against k3 ≈ d²/2), and inside the clamp."""
    d = d.double()
    return torch.expm1(-d) + d, -torch.expm1(-d)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_k3_keeps_its_relative_precision_for_small_differences(impl, device):
    """k3 ≈ d²/2 is the small difference of numbers near 1: exp(−d) − 1 + d rounds it at the scale
    of 1 (1e-7 absolute, 0.1 relative at d = 1e-3, on any device). For |d| < 1/2 it is a series
    of products and sums, no exp, so the bound holds wherever it runs: a few roundings of fp32,
    2⁻²¹ ≈ 4.8e-7 relative (measured in the interpreter and the reference: 1.5e-7). Its gradient
    1 − exp(−d) ≈ d has the same cancellation and the same remedy."""
    magnitudes = torch.logspace(-6, math.log10(0.49), 500)
    d = torch.cat([magnitudes, -magnitudes]).requires_grad_()
    exact, exact_grad = _exact_k3_and_grad(d.detach())
    kl_fn = fastppo.kl_penalty if impl == "kernel" else reference.kl_penalty
    x = d.detach().to(device).requires_grad_()
    kl = kl_fn(x, torch.zeros_like(x), "k3")
    kl.sum().backward()
    assert ((kl.detach().cpu().double() - exact).abs() / exact).max() < 2**-21
    assert ((x.grad.cpu().double() - exact_grad).abs() / exact_grad.abs()).max() < 2**-21


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_k3_relative_precision_over_its_range(impl, device):
    """Beyond |d| = 1/2, k3 = expm1(−d) + d from exp: fp32 exp is within 1 ulp on CPU and about 2 on
    CUDA (ex2.approx), i.e. ≤ 3·ulp(e^{1/2}) = 3.6e-7 absolute against k3 ≥ 0.106 there:
    3.4e-6 relative at worst, less as |d| grows (measured in the interpreter: 1.1e-6 at d = −0.52)."""
    magnitudes = torch.linspace(0.5, 19.5, 2000)
    d = torch.cat([magnitudes, -magnitudes])
    exact, _ = _exact_k3_and_grad(d)
    kl_fn = fastppo.kl_penalty if impl == "kernel" else reference.kl_penalty
    kl = kl_fn(d.to(device), torch.zeros_like(d, device=device), "k3").cpu().double()
    assert ((kl - exact).abs() / exact).max() < 3.4e-6


def test_fp64_clamp_keeps_every_bit(device):
    """A Python float reaches a kernel as fp32 unless the kernel declares it fp64: 0.3 would be
    clamped at 0.30000001192092896 (found on the H200 for the temperature of token_logprobs)."""
    d = torch.tensor([0.3 - 1e-12, 0.3 + 1e-12, -0.3 - 1e-12, 0.1], dtype=torch.float64)
    kl = fastppo.kl_penalty(d.to(device), torch.zeros_like(d, device=device), "k1", clamp=0.3).cpu()
    assert kl.tolist() == [0.3 - 1e-12, 0.3, -0.3, 0.1]
