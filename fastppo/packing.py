"""Padded ↔ packed (variable-length) batch layouts, collation and token-budget planning.

The layouts and plans are computed by the C++ extension ``fastppo._C`` on host buffers; this
module moves the data with torch (``index_select`` / ``index_copy``: any device, any dtype, any
trailing dimensions, autograd-aware). Pure-Python references of every function are in
``fastppo.reference`` (``unpad``, ``collate``, ``plan_microbatches``, ``balanced_partition``).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastppo._checks import check_int, check_tensor

try:
    from fastppo import _C

    EXTENSION_ERROR: Exception | None = None
except ImportError as exc:  # built by `pip install` (setup.py); missing in a bare source checkout
    _C = None
    EXTENSION_ERROR = exc


def extension_available() -> bool:
    """Whether the C++ extension ``fastppo._C`` is built and importable."""
    return _C is not None


def _require_extension():
    if _C is None:
        raise RuntimeError(
            "fastppo._C, the C++ extension, is not built or cannot be loaded "
            f"({EXTENSION_ERROR}); reinstall fastppo with `pip install -e .` (needs a C++17 compiler)"
        )
    return _C


@dataclass(frozen=True)
class UnpadLayout:
    """Where the kept tokens of a padded ``(B, T)`` batch sit once packed into ``(N,)``."""

    indices: torch.Tensor  # (N,) int64 flat positions b*T + t of the kept tokens
    cu_seqlens: torch.Tensor  # (B+1,) int32, leading 0
    max_seqlen: int
    position_ids: torch.Tensor  # (N,) int64, restarting at 0 in each row
    seqlens: torch.Tensor  # (B,) int32
    shape: tuple[int, int]  # (B, T) of the padded batch


def unpad(mask: torch.Tensor) -> UnpadLayout:
    """Packed layout of a ``(B, T)`` attention mask (bool or integer 0/1, any padding side,
    holes allowed). A GPU mask is read to the host once; the layout comes back on its device.
    """
    check_tensor("mask", mask)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask must be a bool or integer tensor, got dtype {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    host = mask.detach().cpu().contiguous()
    out = _require_extension().unpad_layout(host.numpy())
    return _layout(out, tuple(mask.shape), mask.device)


def _layout(out: dict, shape: tuple[int, int], device) -> UnpadLayout:
    to_dev = lambda key: torch.from_numpy(out[key]).to(device)  # noqa: E731
    return UnpadLayout(
        indices=to_dev("indices"),
        cu_seqlens=to_dev("cu_seqlens"),
        max_seqlen=int(out["max_seqlen"]),
        position_ids=to_dev("position_ids"),
        seqlens=to_dev("seqlens"),
        shape=shape,
    )


def pack(x: torch.Tensor, layout: UnpadLayout) -> torch.Tensor:
    """Gather the kept tokens of a padded ``(B, T, ...)`` tensor into ``(N, ...)``.

    Any dtype and trailing dimensions; differentiable (the gradient scatters back, zeros at
    padding). ``unpad_tensor`` is the same function.
    """
    check_tensor("x", x, min_dim=2)
    if tuple(x.shape[:2]) != layout.shape:
        raise ValueError(f"x must have leading shape {layout.shape} (the layout's), got {tuple(x.shape)}")
    if x.device != layout.indices.device:
        raise ValueError(f"x is on {x.device} but the layout on {layout.indices.device}")
    return x.flatten(0, 1).index_select(0, layout.indices)


unpad_tensor = pack


def pad(x: torch.Tensor, layout: UnpadLayout, pad_value: float = 0) -> torch.Tensor:
    """Scatter packed ``(N, ...)`` tokens back to ``(B, T, ...)``, ``pad_value`` elsewhere.

    The exact inverse of ``pack`` on the kept positions; differentiable with respect to ``x``.
    """
    check_tensor("x", x, min_dim=1)
    n = layout.indices.numel()
    if x.shape[0] != n:
        raise ValueError(f"x must have {n} rows (the layout's tokens), got shape {tuple(x.shape)}")
    if x.device != layout.indices.device:
        raise ValueError(f"x is on {x.device} but the layout on {layout.indices.device}")
    B, T = layout.shape
    out = x.new_full((B * T, *x.shape[1:]), pad_value)
    return out.index_copy(0, layout.indices, x).view(B, T, *x.shape[1:])


def _host_tokens(seq, i: int):
    if isinstance(seq, torch.Tensor):
        if seq.dtype.is_floating_point or seq.dtype.is_complex:
            raise TypeError(f"sequences[{i}] must hold integer token ids, got dtype {seq.dtype}")
        return seq.detach().cpu().numpy()
    return seq


def collate(
    sequences: Sequence,
    pad_id: int,
    *,
    side: str = "right",
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    return_layout: bool = False,
) -> dict:
    """Pad token sequences into a batch in one C++ pass (for data loaders).

    Args:
        sequences: B token-id sequences: lists or tuples of ints, 1-D integer numpy arrays or
            torch tensors.
        pad_id: id written at padding positions.
        side: "right" (tokens first) or "left" (padding first, for generation).
        max_length: pad every row to this length; a longer sequence raises ``ValueError``
            (nothing is silently truncated). Default: the longest sequence.
        pad_to_multiple_of: round the row length up to a multiple of this.
        return_layout: also return the packed layout (``UnpadLayout``) under "layout".

    Returns:
        dict with ``input_ids`` and ``attention_mask``, ``(B, L)`` int64 CPU tensors.
    """
    pad_id = check_int("pad_id", pad_id)
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    max_length = -1 if max_length is None else check_int("max_length", max_length)
    multiple = -1 if pad_to_multiple_of is None else check_int("pad_to_multiple_of", pad_to_multiple_of)
    if isinstance(sequences, (str, bytes, torch.Tensor)) or not isinstance(sequences, Sequence):
        raise TypeError(f"sequences must be a list of token-id sequences, got {type(sequences).__name__}")
    host = [_host_tokens(seq, i) for i, seq in enumerate(sequences)]
    out = _require_extension().collate(host, pad_id, side, max_length, multiple, return_layout)
    batch = {
        "input_ids": torch.from_numpy(out["input_ids"]),
        "attention_mask": torch.from_numpy(out["attention_mask"]),
    }
    if return_layout:
        batch["layout"] = _layout(out["layout"], tuple(batch["input_ids"].shape), torch.device("cpu"))
    return batch


def _lengths(seqlens) -> np.ndarray:
    if isinstance(seqlens, torch.Tensor):
        if seqlens.dtype.is_floating_point or seqlens.dtype.is_complex or seqlens.dtype == torch.bool:
            raise TypeError(f"seqlens must hold integers, got dtype {seqlens.dtype}")
        return seqlens.detach().cpu().numpy()
    array = np.asarray(seqlens)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"seqlens must hold integers, got {array.dtype}")
    return array.astype(np.int64).reshape(-1) if array.ndim <= 1 else array


def plan_microbatches(seqlens, max_tokens: int, *, k: int | None = None) -> list[list[int]]:
    """Group sequences into as few micro-batches of at most ``max_tokens`` tokens as
    first-fit-decreasing achieves, balanced in tokens (longest first into the lightest batch)
    whenever the same count allows it.

    Args:
        seqlens: ``(B,)`` sequence lengths (list, numpy or tensor), each ≤ ``max_tokens``.
        max_tokens: token budget of a micro-batch, > 0.
        k: make the number of micro-batches a multiple of k (data-parallel ranks step together;
            some micro-batches may then be empty).

    Returns:
        Lists of indices into ``seqlens``, ascending within each micro-batch.
    """
    max_tokens = check_int("max_tokens", max_tokens)
    k = 1 if k is None else check_int("k", k)
    groups = _require_extension().plan_microbatches(_lengths(seqlens), max_tokens, k)
    return [g.tolist() for g in groups]


def balanced_partition(seqlens, k: int, *, equal_size: bool = True) -> list[list[int]]:
    """Partition sequences into ``k`` groups with balanced token sums (Karmarkar–Karp largest
    differencing; the greedy longest-first assignment is also computed and kept when it is
    better balanced, so the result is never worse than greedy).

    Args:
        seqlens: ``(B,)`` sequence lengths.
        k: number of groups, > 0.
        equal_size: every group gets B/k sequences (B must be a multiple of k).

    Returns:
        k lists of indices into ``seqlens``, ascending.
    """
    k = check_int("k", k)
    groups = _require_extension().balanced_partition(_lengths(seqlens), k, bool(equal_size))
    return [g.tolist() for g in groups]
