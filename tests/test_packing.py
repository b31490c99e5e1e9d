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
