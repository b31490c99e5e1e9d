"""fastppo.value_loss: kernel vs reference, reference vs an fp64 loop, masks from hypothesis,
packed sequences (read in place) vs padded."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastppo
from fastppo import reference

AGGS = reference.AGGREGATIONS


def make_batch(B, T, device, *, seed=0, dtype=torch.float32, density=0.7):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g)
    batch = {
        "values": values,
        "old_values": values + torch.randn(B, T, generator=g) * 0.3,
        "returns": torch.randn(B, T, generator=g),
        "mask": torch.rand(B, T, generator=g) < density,
    }
    return {k: (v.to(dtype) if v.dtype.is_floating_point else v).to(device) for k, v in batch.items()}


def run(fn, batch, upstream=0.6, **kwargs):
    values = batch["values"].clone().requires_grad_()
    loss, clipfrac = fn(values, batch["old_values"], batch["returns"], batch["mask"], **kwargs)
    (loss * upstream).backward()
    return loss, clipfrac, values.grad


def grad_tol(grad, atol, rtol):
    # 16-bit gradients are fp32 values rounded once, along different paths: one ulp apart at most.
    return {} if grad.dtype in (torch.bfloat16, torch.float16) else dict(atol=atol, rtol=rtol)


def assert_match(batch, atol=1e-5, rtol=1e-5, **kwargs):
    k_loss, k_clip, k_grad = run(fastppo.value_loss, batch, **kwargs)
    r_loss, r_clip, r_grad = run(reference.value_loss, batch, **kwargs)
    assert k_loss.dtype == k_clip.dtype == torch.float32 and k_loss.shape == k_clip.shape == ()
    torch.testing.assert_close(k_loss, r_loss.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(k_clip, r_clip.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(k_grad, r_grad, **grad_tol(k_grad, atol, rtol))
    return k_loss, k_clip, k_grad


@pytest.mark.parametrize("clip", [None, 0.2])
def test_reference_matches_hand_loop(clip):
    batch = make_batch(3, 7, "cpu", seed=1, dtype=torch.float64)
    v, old, ret, m = (batch[k].tolist() for k in ("values", "old_values", "returns", "mask"))
    num = den = clipped = 0.0
    for i in range(3):
        for t in range(7):
            unclipped = 0.5 * (v[i][t] - ret[i][t]) ** 2
            if clip is None:
                l, c = unclipped, 0
            else:
                vc = old[i][t] + min(max(v[i][t] - old[i][t], -clip), clip)
                l, c = max(unclipped, 0.5 * (vc - ret[i][t]) ** 2), 0.5 * (vc - ret[i][t]) ** 2 > unclipped
            num, den, clipped = num + l * m[i][t], den + m[i][t], clipped + c * m[i][t]
    loss, clipfrac = reference.value_loss(
        *(batch[k] for k in ("values", "old_values", "returns", "mask")), clip=clip
    )
    assert loss.item() == pytest.approx(num / den, rel=1e-12)
    assert clipfrac.item() == pytest.approx(clipped / den, rel=1e-12)
    values = batch["values"].clone().requires_grad_()
    fn = lambda x: reference.value_loss(x, batch["old_values"], batch["returns"], batch["mask"], clip=clip)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (values,))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2, 5.0])
@pytest.mark.parametrize("shape", [(5, 33), (2, 4500), (1, 1)])
def test_matches_reference(shape, clip, agg, device):
    assert_match(make_batch(*shape, device, seed=2), clip=clip, agg=agg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype, device):
    _, _, grad = assert_match(make_batch(4, 50, device, seed=3, dtype=dtype), atol=1e-4, rtol=1e-4)
    assert grad.dtype == dtype


def test_flat_input_and_float_mask(device):
    batch = make_batch(1, 64, device, seed=4)
    batch["mask"] = batch["mask"] * torch.rand(1, 64, device=device)
    flat = {k: v.reshape(-1) for k, v in batch.items()}
    for agg in AGGS:
        assert_match(flat, agg=agg)
        assert torch.equal(
            run(fastppo.value_loss, flat, agg=agg)[0], run(fastppo.value_loss, batch, agg=agg)[0]
        )


@pytest.mark.parametrize("agg", AGGS)
def test_all_zero_mask(agg, device):
    loss, clipfrac, grad = run(fastppo.value_loss, make_batch(3, 9, device, density=0.0), agg=agg)
    assert loss.item() == 0 and clipfrac.item() == 0 and not grad.any()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN padding, by design
def test_padding_garbage(device):
    batch = make_batch(2, 10, device, seed=5)
    batch["returns"][~batch["mask"]] = float("inf")
    batch["values"][~batch["mask"]] = float("nan")
    loss, clipfrac, grad = run(fastppo.value_loss, batch)
    assert torch.isfinite(loss) and torch.isfinite(clipfrac) and torch.isfinite(grad).all()


def test_deterministic(device):
    batch = make_batch(16, 3000, device, seed=6)
    a = run(fastppo.value_loss, batch, agg="seq-mean-token-mean")
    b = run(fastppo.value_loss, batch, agg="seq-mean-token-mean")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.lists(st.booleans(), min_size=1, max_size=40), min_size=1, max_size=6),
    agg=st.sampled_from(AGGS),
    clip=st.sampled_from([None, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_masks(rows, agg, clip, seed):
    device = "cuda" if torch.cuda.is_available() and not fastppo._backend.triton_interpreted() else "cpu"
    T = max(len(r) for r in rows)
    batch = make_batch(len(rows), T, device, seed=seed)
    batch["mask"] = torch.tensor([r + [False] * (T - len(r)) for r in rows], device=device)
    assert_match(batch, clip=clip, agg=agg)


#: Empty sequences, single tokens, sequences longer than a 2048-token block; packed, the first
#: set has one program per sequence, the second several.
LENGTHS = {"one-program": [0, 3000, 37, 1, 0, 2100], "several": [4500, 0, 4200]}


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("clip", [None, 0.2])
def test_packed_equals_padded(lengths, clip, device):
    """Every aggregation: packed with cu_seqlens gives the padded batch's loss, clipfrac and
    gradient, and the reference's on the packed input (other block boundaries, so other summation
    orders: fp32 sums of up to 4500 O(1) terms agree to about √n·ε ≈ 4e-6 relative, so 1e-5)."""
    lengths_t = torch.tensor(lengths)
    padded = make_batch(len(lengths), max(lengths), device, seed=8)
    keep = (torch.arange(max(lengths))[None, :] < lengths_t[:, None]).to(device)
    padded["mask"] &= keep
    packed = {k: v[keep] for k, v in padded.items()}
    cu = torch.nn.functional.pad(lengths_t.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    for agg in AGGS:
        p_loss, p_clip, p_grad = run(fastppo.value_loss, packed, agg=agg, clip=clip, cu_seqlens=cu)
        d_loss, d_clip, d_grad = run(fastppo.value_loss, padded, agg=agg, clip=clip)
        r_loss, r_clip, r_grad = run(reference.value_loss, packed, agg=agg, clip=clip, cu_seqlens=cu)
        for loss, clipfrac, grad in ((d_loss, d_clip, d_grad[keep]), (r_loss, r_clip, r_grad)):
            torch.testing.assert_close(p_loss, loss.float(), atol=1e-5, rtol=1e-5, msg=agg)
            torch.testing.assert_close(p_clip, clipfrac.float(), atol=1e-5, rtol=1e-5, msg=agg)
            torch.testing.assert_close(p_grad, grad, atol=1e-5, rtol=1e-5, msg=agg)


def test_bad_cu_seqlens():
    x = torch.zeros(6)
    with pytest.raises(ValueError, match=r"cu_seqlens needs packed \(N,\) inputs"):
        fastppo.value_loss(
            x.view(2, 3), x.view(2, 3), x.view(2, 3), x.view(2, 3), cu_seqlens=torch.tensor([0, 6])
        )
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        fastppo.value_loss(x, x, x, x, cu_seqlens=torch.tensor([0.0, 6.0]))
    # Values: torch._assert_async (no host read), a RuntimeError at once on CPU.
    with pytest.raises(RuntimeError, match=r"cu_seqlens must start at 0, never decrease and end at .* \(6\)"):
        fastppo.value_loss(x, x, x, x, cu_seqlens=torch.tensor([0, 4, 3, 6]))


def test_bad_input(device):
    b = make_batch(2, 4, device)
    args = (b["values"], b["old_values"], b["returns"], b["mask"])
    with pytest.raises(ValueError, match="clip"):
        fastppo.value_loss(*args, clip=0.0)
    with pytest.raises(ValueError, match="agg"):
        fastppo.value_loss(*args, agg="sum")
    with pytest.raises(ValueError, match="returns must have the shape"):
        fastppo.value_loss(args[0], args[1], args[2][:, :2], args[3])
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        fastppo.value_loss(*args[:3], [[1, 0]])


@pytest.mark.gpu
def test_large_batch_on_gpu():
    assert_match(
        make_batch(512, 8192, "cuda", seed=7, dtype=torch.bfloat16),
        atol=1e-4,
        rtol=1e-4,
        agg="seq-mean-token-mean",
    )
