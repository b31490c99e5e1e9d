"""Padded ↔ packed (variable-length) batch layouts, computed by the C++ extension ``fastppo._C``.

The C++ side works on numpy buffers on the host; this module moves tensors with torch.
"""

from dataclasses import dataclass

import numpy as np
import torch

from fastppo._checks import check_tensor

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


def unpad(mask: torch.Tensor) -> UnpadLayout:
    """Packed layout of a ``(B, T)`` attention mask (bool or integer 0/1, any padding side,
    holes allowed). A GPU mask is read to the host once; the layout comes back on its device.
    """
    check_tensor("mask", mask)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask must be a bool or integer tensor, got dtype {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    host = mask.detach().cpu()
    if host.dtype == torch.bool:
        host = host.to(torch.uint8)
    out = _require_extension().unpad_layout(np.ascontiguousarray(host.numpy()))
    to_dev = lambda key: torch.from_numpy(out[key]).to(mask.device)
    return UnpadLayout(
        indices=to_dev("indices"),
        cu_seqlens=to_dev("cu_seqlens"),
        max_seqlen=int(out["max_seqlen"]),
        position_ids=to_dev("position_ids"),
        seqlens=to_dev("seqlens"),
    )
