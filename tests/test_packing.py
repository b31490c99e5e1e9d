"""fastppo._C.unpad_layout through fastppo.packing.unpad, against the PyTorch reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastppo import packing, reference


def assert_same_layout(layout: packing.UnpadLayout, mask: torch.Tensor):
    expected = reference.unpad(mask)
    for key in ("indices", "cu_seqlens", "position_ids", "seqlens"):
        got = getattr(layout, key)
        assert got.dtype == expected[key].dtype, key
        assert got.device == mask.device, key
        assert torch.equal(got, expected[key].to(got.device)), key
    assert layout.max_seqlen == expected["max_seqlen"]


def test_right_and_left_padding(device):
    lengths = torch.tensor([3, 0, 5, 1])
    right = (torch.arange(5)[None] < lengths[:, None]).to(device)
    left = right.flip(1)
    for mask in (right, left, right.int(), left.long()):
        layout = packing.unpad(mask)
        assert_same_layout(layout, mask)
    layout = packing.unpad(left)
    assert layout.cu_seqlens.tolist() == [0, 3, 3, 8, 9]
    assert layout.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    assert layout.indices.tolist() == [2, 3, 4, 10, 11, 12, 13, 14, 19]
    assert layout.max_seqlen == 5


def test_holes_and_empty_shapes():
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 1, 0]])
    assert_same_layout(packing.unpad(mask), mask)
    for shape in [(0, 4), (3, 0), (0, 0)]:
        layout = packing.unpad(torch.zeros(shape, dtype=torch.bool))
        assert layout.indices.numel() == 0 and layout.cu_seqlens.tolist() == [0] * (shape[0] + 1)
        assert layout.max_seqlen == 0


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 9),
    cols=st.integers(0, 40),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    as_bool=st.booleans(),
)
def test_random_masks_match_reference(rows, cols, density, seed, as_bool):
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(rng.random((rows, cols)) < density)
    mask = mask if as_bool else mask.to(torch.int32)
    assert_same_layout(packing.unpad(mask), mask)


def test_non_contiguous_mask():
    mask = (torch.rand(6, 10) < 0.5).int().t()
    assert_same_layout(packing.unpad(mask), mask)


@pytest.mark.parametrize(
    "mask, exc, match",
    [
        (torch.ones(2, 3, 4, dtype=torch.int64), ValueError, r"mask must have shape \(B, T\)"),
        (torch.ones(5, dtype=torch.int64), ValueError, r"mask must have shape \(B, T\)"),
        (torch.tensor([[1, 2, 0]]), ValueError, r"only 0 and 1, found 2 at \(0, 1\)"),
        (torch.tensor([[1, 0], [0, -1]]), ValueError, r"found -1 at \(1, 1\)"),
        (torch.ones(2, 3), TypeError, "mask must be a bool or integer"),
        ([[1, 0]], TypeError, "mask must be a torch.Tensor"),
    ],
)
def test_bad_masks_are_rejected(mask, exc, match):
    with pytest.raises(exc, match=match):
        packing.unpad(mask)


def test_extension_checks_its_own_arguments():
    """The C++ function refuses bad buffers itself, so no caller can crash the interpreter."""
    from fastppo import _C

    with pytest.raises(TypeError, match="bool or integer"):
        _C.unpad_layout(np.ones((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        _C.unpad_layout(np.ones(3, dtype=np.int64))
    out = _C.unpad_layout(np.array([[True, False, True]]))
    assert out["indices"].tolist() == [0, 2] and out["cu_seqlens"].dtype == np.int32


# --------------------------------------------------------------------------------------------
# pack / pad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_pack_pad_round_trip(dtype, device):
    mask = torch.rand(5, 9) < 0.6
    mask[1] = False
    layout = packing.unpad(mask.to(device))
    x = (torch.randn(5, 9, 3, 2) * 10).to(dtype).to(device)
    packed = packing.pack(x, layout)
    assert packed.shape == (int(mask.sum()), 3, 2) and packed.dtype == dtype
    assert torch.equal(packed, x[mask.to(device)])
    assert packing.unpad_tensor is packing.pack
    restored = packing.pad(packed, layout, pad_value=7)
    expected = torch.where(mask.to(device)[..., None, None], x, torch.full_like(x, 7))
    assert torch.equal(restored, expected)


def test_pack_pad_are_differentiable(device):
    mask = (torch.rand(3, 6) < 0.5).to(device)
    layout = packing.unpad(mask)
    x = torch.randn(3, 6, 4, device=device, requires_grad=True)
    packed = packing.pack(x, layout)
    (packed * torch.arange(packed.numel(), device=device).view(packed.shape)).sum().backward()
    expected = torch.zeros(3, 6, 4, device=device)
    expected[mask] = torch.arange(packed.numel(), device=device, dtype=torch.float32).view(packed.shape)
    assert torch.equal(x.grad, expected)
    y = torch.randn(int(mask.sum()), 4, device=device, requires_grad=True)
    packing.pad(y, layout).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))


def test_pack_pad_reject_mismatched_layouts(device):
    layout = packing.unpad(torch.ones(2, 3, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"leading shape \(2, 3\)"):
        packing.pack(torch.zeros(3, 2, device=device), layout)
    with pytest.raises(ValueError, match="6 rows"):
        packing.pad(torch.zeros(5, device=device), layout)


# --------------------------------------------------------------------------------------------
# collate

token_lists = st.lists(st.lists(st.integers(-(2**40), 2**40), max_size=30), max_size=12)


@settings(max_examples=80, deadline=None)
@given(
    seqs=token_lists,
    side=st.sampled_from(["right", "left"]),
    extra=st.sampled_from([None, 0, 3]),
    multiple=st.sampled_from([None, 1, 8]),
    kind=st.sampled_from(["list", "tuple", "numpy32", "numpy64", "tensor"]),
)
def test_collate_matches_reference(seqs, side, extra, multiple, kind):
    longest = max((len(s) for s in seqs), default=0)
    max_length = None if extra is None else max(longest + extra, 1)
    convert = {
        "list": list, "tuple": tuple, "numpy64": lambda s: np.array(s, dtype=np.int64),
        "numpy32": lambda s: np.array(s, dtype=np.int64).astype(np.int32),
        "tensor": lambda s: torch.tensor(s, dtype=torch.long),
    }[kind]  # fmt: skip
    if kind == "numpy32":
        seqs = [[t % 2**31 for t in s] for s in seqs]
    got = packing.collate([convert(s) for s in seqs], pad_id=-7, side=side, max_length=max_length,
                          pad_to_multiple_of=multiple, return_layout=True)  # fmt: skip
    expected = reference.collate(seqs, -7, side=side, max_length=max_length, pad_to_multiple_of=multiple)
    assert got["input_ids"].dtype == got["attention_mask"].dtype == torch.int64
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert_same_layout(got["layout"], got["attention_mask"])  # the layout equals unpad of the mask


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(sequences=[[1, 2, 3], [1]], max_length=2), ValueError, r"sequences\[0\] has 3 tokens"),
        (dict(sequences=[[1, 2.5]]), TypeError, r"sequences\[0\]\[1\] must be an int"),
        (dict(sequences=[np.array([1.0])]), TypeError, r"sequences\[0\] must be a bool or integer"),
        (dict(sequences=[np.zeros((2, 2), dtype=np.int64)]), ValueError, r"sequences\[0\] must be 1-D"),
        (dict(sequences=[torch.tensor([0.5])]), TypeError, r"sequences\[0\] must hold integer"),
        (dict(sequences=[{1, 2}]), TypeError, r"sequences\[0\] must be a list or tuple"),
        (dict(sequences=[[2**70]]), (ValueError, OverflowError), "int64"),
        (dict(sequences="abc"), TypeError, "sequences must be a list"),
        (dict(sequences=[[1]], side="middle"), ValueError, "side"),
        (dict(sequences=[[1]], max_length=0), ValueError, "max_length"),
        (dict(sequences=[[1]], pad_to_multiple_of=-2), ValueError, "pad_to_multiple_of"),
        (dict(sequences=[[1]], pad_id=0.0), TypeError, "pad_id"),
    ],
)
def test_collate_rejects_bad_input(kwargs, exc, match):
    kwargs = {"pad_id": 0} | kwargs
    with pytest.raises(exc, match=match):
        packing.collate(kwargs.pop("sequences"), **kwargs)


def test_collate_empty_batch():
    out = packing.collate([], pad_id=0)
    assert out["input_ids"].shape == (0, 0)
    out = packing.collate([[], []], pad_id=3, pad_to_multiple_of=4)
    assert out["input_ids"].shape == (2, 0) and out["attention_mask"].sum() == 0


# --------------------------------------------------------------------------------------------
# plan_microbatches and balanced_partition


def assert_partition(groups, n):
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(n)), "every sequence exactly once"
    assert all(g == sorted(g) for g in groups)


def sums(groups, lengths):
    return [sum(lengths[i] for i in g) for g in groups]


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 500), max_size=60),
    slack=st.integers(0, 600),
    k=st.sampled_from([None, 1, 2, 3, 8]),
)
def test_plan_microbatches_fuzz(lengths, slack, k):
    max_tokens = max(lengths, default=0) + slack + 1
    groups = packing.plan_microbatches(lengths, max_tokens, k=k)
    assert_partition(groups, len(lengths))
    assert all(s <= max_tokens for s in sums(groups, lengths))
    assert len(groups) % (k or 1) == 0
    expected = reference.plan_microbatches(lengths, max_tokens, k=k)
    assert len(groups) <= len(expected)  # as few as first-fit-decreasing finds


def test_plan_microbatches_balances_tokens():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4096, 2000).tolist()
    groups = packing.plan_microbatches(lengths, 16384, k=4)
    ffd = reference.plan_microbatches(lengths, 16384, k=4)
    assert len(groups) == len(ffd) and len(groups) % 4 == 0
    load, ffd_load = sums(groups, lengths), sums(ffd, lengths)
    assert max(load) - min(load) < (max(ffd_load) - min(ffd_load)) / 10


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 10_000), min_size=0, max_size=64),
    k=st.integers(1, 9),
    equal_size=st.booleans(),
)
def test_balanced_partition_never_worse_than_greedy(lengths, k, equal_size):
    if equal_size:
        lengths = lengths[: len(lengths) - len(lengths) % k]
    groups = packing.balanced_partition(lengths, k, equal_size=equal_size)
    assert len(groups) == k
    assert_partition(groups, len(lengths))
    if equal_size:
        assert all(len(g) == len(lengths) // k for g in groups)
    greedy = reference.balanced_partition(lengths, k, equal_size=equal_size)
    spread = lambda gs: max(sums(gs, lengths)) - min(sums(gs, lengths))  # noqa: E731
    assert spread(groups) <= spread(greedy)


def test_karmarkar_karp_beats_greedy_where_greedy_is_poor():
    # Greedy: 8 | 7, then 6 → 7-side, 5 → 8-side, 4 → 13-side: {8,5,4} = 17 vs {7,6} = 13.
    # Largest differencing: 8−7 = 1, 6−5 = 1, then 4−1 = 3, then 3−1 = 2: 16 vs 14.
    lengths = [8, 7, 6, 5, 4]
    greedy = reference.balanced_partition(lengths, 2, equal_size=False)
    groups = packing.balanced_partition(lengths, 2, equal_size=False)
    assert sorted(sums(greedy, lengths)) == [13, 17]
    assert sorted(sums(groups, lengths)) == [14, 16]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: packing.plan_microbatches([3, 9, 2], 8), r"seqlens\[1\] = 9 does not fit in max_tokens = 8"),
        (lambda: packing.plan_microbatches([3, -1], 8), "found -1 at index 1"),
        (lambda: packing.plan_microbatches([3, 2**31], 2**32), "found 2147483648"),
        (lambda: packing.plan_microbatches([3], 0), "max_tokens must be > 0"),
        (lambda: packing.plan_microbatches([3], 8, k=0), "k must be > 0"),
        (lambda: packing.balanced_partition([1, 2, 3], 2), "multiple of k = 2"),
        (lambda: packing.balanced_partition([1, 2], -1), "k must be > 0"),
        (lambda: packing.balanced_partition([[1, 2]], 1), "seqlens must be 1-D"),
    ],
)
def test_planning_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_planning_type_errors_and_empty_input():
    with pytest.raises(TypeError, match="seqlens must hold integers"):
        packing.plan_microbatches([1.5, 2.0], 8)
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        packing.plan_microbatches([1], 8.0)
    assert packing.plan_microbatches([], 8, k=4) == []
    assert packing.balanced_partition([], 3) == [[], [], []]
    assert packing.plan_microbatches(torch.tensor([5, 5, 5]), 10) in (
        [[0, 1], [2]],
        [[0], [1, 2]],
        [[0, 2], [1]],
    )


def test_planning_at_scale():
    """100,000 sequences: still a valid plan (timing lives in fastppo/bench/bench_packing.py)."""
    lengths = np.random.default_rng(1).integers(1, 8192, 100_000)
    groups = packing.plan_microbatches(lengths, 65536, k=8)
    assert_partition(groups, lengths.size)
    parts = packing.balanced_partition(lengths, 8)
    assert_partition(parts, lengths.size)
    part_sums = sums(parts, lengths.tolist())
    assert max(part_sums) - min(part_sums) <= lengths.max()
