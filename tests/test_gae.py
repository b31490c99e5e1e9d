"""fastppo.gae and fastppo.discounted_returns: kernel and reference vs an fp64 loop of the
textbook recursion; padded == packed; both masking semantics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastppo
from fastppo import reference


def hand_gae(r, v, m, gamma, lam, carry_masked):
    """One sequence, plain Python floats: the recursion of DESIGN §4 written out."""
    if not carry_masked:
        r = [ri * mi for ri, mi in zip(r, m, strict=True)]
        v = [vi * mi for vi, mi in zip(v, m, strict=True)]
    adv, next_value, last = [0.0] * len(r), 0.0, 0.0
    for t in reversed(range(len(r))):
        if carry_masked and not m[t]:
            adv[t] = last
            continue
        last = r[t] + gamma * next_value - v[t] + gamma * lam * last
        next_value = v[t]
        adv[t] = last
    return adv, [a + vi for a, vi in zip(adv, v, strict=True)]


def hand_batch(rewards, values, mask, gamma, lam, carry_masked):
    out = [hand_gae(r, v, m, gamma, lam, carry_masked) for r, v, m in
           zip(rewards.tolist(), values.tolist(), mask.tolist(), strict=True)]  # fmt: skip
    return torch.tensor([a for a, _ in out], dtype=torch.float64), torch.tensor(
        [b for _, b in out], dtype=torch.float64
    )


def make_batch(B, T, device, *, seed=0, holes=True):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # right-padded responses
    if holes:  # tool-observation tokens inside responses
        mask &= torch.rand(B, T, generator=g) > 0.2
    return rewards.to(device), values.to(device), mask.to(device)


@pytest.mark.parametrize("carry_masked", [True, False])
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 0.7)])
@pytest.mark.parametrize("B, T", [(6, 37), (3, 1), (2, 2500)])
def test_matches_hand_loop(B, T, gamma, lam, carry_masked, device):
    rewards, values, mask = make_batch(B, T, device, seed=B * T)
    mask[0] = False  # an all-zero row
    adv, ret = fastppo.gae(rewards, values, mask, gamma=gamma, lam=lam, carry_masked=carry_masked)
    hand_adv, hand_ret = hand_batch(
        rewards.cpu().double(), values.cpu().double(), mask.cpu(), gamma, lam, carry_masked
    )
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == rewards.shape
    torch.testing.assert_close(adv.cpu().double(), hand_adv, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ret.cpu().double(), hand_ret, atol=5e-5, rtol=1e-5)
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam, carry_masked=carry_masked)
    torch.testing.assert_close(ref_adv.cpu().double(), hand_adv, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ref_ret.cpu().double(), hand_ret, atol=5e-5, rtol=1e-5)


def test_carry_semantics_by_hand(device):
    """A hole inside a response carries the running advantage; trailing padding stays 0."""
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]], device=device)
    v = torch.tensor([[0.5, 9.0, 0.5, 0.5, 7.0]], device=device)
    m = torch.tensor([[1, 0, 1, 1, 0]], device=device)
    adv, ret = fastppo.gae(r, v, m, gamma=1.0, lam=1.0)
    # t=3: 1 − 0.5 = 0.5; t=2: 0 + 0.5 − 0.5 + 0.5 = 0.5; t=1 carries 0.5; t=0: 0 + 0.5 − 0.5 + 0.5.
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]], device=device))
    torch.testing.assert_close(ret, adv + v)
    adv, ret = fastppo.gae(r, v, m, gamma=1.0, lam=1.0, carry_masked=False)
    # Masked values become 0: t=3: 0.5; t=2: 0.5; t=1: 0 + 0.5 − 0 + 0.5 = 1.0; t=0: 0 + 0 − 0.5 + 1.0.
    torch.testing.assert_close(adv, torch.tensor([[0.5, 1.0, 0.5, 0.5, 0.0]], device=device))
    torch.testing.assert_close(ret, adv + v * m)


@pytest.mark.parametrize("carry_masked", [True, False])
def test_padded_equals_packed(carry_masked, device):
    rewards, values, mask = make_batch(7, 300, device, seed=5)
    lengths = mask.cumsum(1).argmax(1) + 1  # the response ends at its last counted token
    lengths = torch.where(mask.any(1), lengths, 0)
    keep = torch.arange(300, device=device)[None, :] < lengths[:, None]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    padded = fastppo.gae(rewards, values, mask, gamma=0.97, lam=0.9, carry_masked=carry_masked)
    packed = fastppo.gae(rewards[keep], values[keep], mask[keep], gamma=0.97, lam=0.9, cu_seqlens=cu,
                         carry_masked=carry_masked)  # fmt: skip
    for p, q in zip(padded, packed, strict=True):
        torch.testing.assert_close(p[keep], q, atol=1e-5, rtol=1e-5)
    ref = reference.gae(rewards[keep], values[keep], mask[keep], gamma=0.97, lam=0.9, cu_seqlens=cu,
                        carry_masked=carry_masked)  # fmt: skip
    for p, q in zip(packed, ref, strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_packed_with_empty_sequences_and_flat_input(device):
    g = torch.Generator().manual_seed(6)
    lengths = [0, 5, 1, 0, 40]
    cu = torch.tensor([0, 0, 5, 6, 6, 46], dtype=torch.int32, device=device)
    r, v = torch.randn(46, generator=g).to(device), torch.randn(46, generator=g).to(device)
    m = torch.ones(46, dtype=torch.bool, device=device)
    adv, _ = fastppo.gae(r, v, m, gamma=0.9, lam=0.8, cu_seqlens=cu)
    start = 0
    for n in lengths:
        hand, _ = hand_gae(
            r[start : start + n].tolist(), v[start : start + n].tolist(), [1] * n, 0.9, 0.8, True
        )
        torch.testing.assert_close(
            adv[start : start + n].cpu().double(),
            torch.tensor(hand, dtype=torch.float64),
            atol=1e-5,
            rtol=1e-5,
        )
        start += n
    flat, _ = fastppo.gae(r, v, m, gamma=0.9, lam=0.8)  # no cu_seqlens: one sequence
    hand, _ = hand_gae(r.tolist(), v.tolist(), [1] * 46, 0.9, 0.8, True)
    torch.testing.assert_close(
        flat.cpu().double(), torch.tensor(hand, dtype=torch.float64), atol=1e-5, rtol=1e-5
    )


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.lists(st.sampled_from([0, 1]), min_size=1, max_size=30), min_size=1, max_size=5),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    carry_masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_masks(rows, gamma, lam, carry_masked, seed):
    device = "cuda" if torch.cuda.is_available() and not fastppo._backend.triton_interpreted() else "cpu"
    T = max(len(r) for r in rows)
    mask = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)
    rewards, values, _ = make_batch(len(rows), T, device, seed=seed)
    adv, ret = fastppo.gae(rewards, values, mask, gamma=gamma, lam=lam, carry_masked=carry_masked)
    hand_adv, hand_ret = hand_batch(
        rewards.cpu().double(), values.cpu().double(), mask.cpu(), gamma, lam, carry_masked
    )
    torch.testing.assert_close(adv.cpu().double(), hand_adv, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ret.cpu().double(), hand_ret, atol=5e-5, rtol=1e-5)


def test_discounted_returns(device):
    rewards, _, mask = make_batch(5, 60, device, seed=7)
    got = fastppo.discounted_returns(rewards, mask, gamma=0.9)
    zeros = torch.zeros_like(rewards)
    hand, _ = hand_batch(rewards.cpu().double(), zeros.cpu().double(), mask.cpu(), 0.9, 1.0, True)
    torch.testing.assert_close(got.cpu().double(), hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        reference.discounted_returns(rewards, mask, gamma=0.9), got, atol=1e-5, rtol=1e-5
    )
    lengths = mask.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    packed = fastppo.discounted_returns(
        rewards[mask], torch.ones_like(rewards[mask]), gamma=0.9, cu_seqlens=cu
    )
    torch.testing.assert_close(packed, got[mask], atol=1e-5, rtol=1e-5)


def test_deterministic(device):
    rewards, values, mask = make_batch(8, 3000, device, seed=8)
    first = fastppo.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    second = fastppo.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_bad_input(device):
    r, v, m = make_batch(2, 5, device)
    with pytest.raises(ValueError, match="values must have the shape"):
        fastppo.gae(r, v[:, :4], m)
    with pytest.raises(ValueError, match="gamma"):
        fastppo.gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        fastppo.gae(r, v, m, lam=-0.1)
    flat = (r.flatten(), v.flatten(), m.flatten())
    for cu, exc, match in [
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), ValueError, "never decrease"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), ValueError, "end at N=10"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), ValueError, "start at 0"),
        (torch.tensor([0, 4, 10]), TypeError, "cu_seqlens must be int32"),
    ]:
        with pytest.raises(exc, match=match):
            fastppo.gae(*flat, cu_seqlens=cu.to(device))
    with pytest.raises(ValueError, match="packed"):
        fastppo.gae(r, v, m, cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"\(B, T\) or \(N,\)"):
        fastppo.gae(r[None], v[None], m[None])


@pytest.mark.gpu
def test_long_and_wide_on_gpu():
    rewards, values, mask = make_batch(4096, 32768, "cuda", seed=9)
    adv, ret = fastppo.gae(rewards, values, mask, gamma=0.999, lam=0.95)
    rows = torch.tensor([0, 17, 2048, 4095])
    r, v, m = rewards[rows].cpu().double(), values[rows].cpu().double(), mask[rows].cpu()
    hand_adv, hand_ret = hand_batch(r, v, m, 0.999, 0.95, True)
    torch.testing.assert_close(adv[rows].cpu().double(), hand_adv, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(ret[rows].cpu().double(), hand_ret, atol=2e-3, rtol=1e-4)
