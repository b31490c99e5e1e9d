"""What every kernel of fastppo shares: the block-size and warp-count rules, the bounds of a
sequence (padded or packed), walking it in aligned blocks, and named integer codes.

Host side (launchers):
    block_size(largest, cap)       power of two ≥ largest, 16 ≤ · ≤ cap
    chunking(T, cap)               (block, chunks per row) for one program per chunk of a row
    num_warps(block, per_thread)   block / (32·per_thread) warps, a power of two in [4, 16]
    codes(typename, names)         named codes 0, 1, … as one constexpr a kernel can read
Device side (@triton.jit):
    sequence_bounds(seq, cu_seqlens_ptr, T, PACKED)   [start, end) of sequence ``seq``
    block_offsets(first, k, start, end, N, BLOCK)     block first + k of the BLOCK-aligned blocks
    load_block(ptr, offs, N, full)                    its values: unmasked when inside the tensor

Why the last two: a masked load is only as wide as its mask is known to be constant. A mask
``offs < end`` with ``end`` read from ``cu_seqlens`` (or ``row·T`` with T not a multiple of 16) is
constant over one element, so the compiler emits 4-byte loads. Walking the BLOCK-aligned blocks
of the flat tensor that overlap [start, end) and loading each whole (unmasked unless it runs past
the tensor's end) gives 16-byte loads (``ld.global.v4``, ``.v2`` of 64-bit values) from a 16-byte
aligned pointer; the kernel keeps ``start ≤ offs < end`` with ``tl.where`` and masks its stores
exactly. Lanes outside [start, end) hold the neighbours' values: never use them unmasked.
"""

from collections import namedtuple
from collections.abc import Sequence

import triton
import triton.language as tl

#: Smallest block of any program: one 16-byte vector of 1-byte values (a bool mask).
MIN_BLOCK = 16


def block_size(largest: int, cap: int) -> int:
    """Lanes of a program that walks ``largest`` items (a sequence, a group, a row) in steps:
    the next power of two, at least ``MIN_BLOCK`` and at most ``cap`` (a power of two)."""
    return min(max(triton.next_power_of_2(max(largest, 1)), MIN_BLOCK), cap)


def chunking(T: int, cap: int = 2048) -> tuple[int, int]:
    """(block, chunks per row) for a row of T tokens split over one program per chunk."""
    block = block_size(T, cap)
    return block, triton.cdiv(T, block)


def num_warps(block: int, per_thread: int = 8) -> int:
    """Warps for a program of ``block`` lanes, each thread holding ``per_thread`` of them:
    ``block // (32·per_thread)``, a power of two clamped to [4, 16]. 8 fp32 lanes per thread is
    two 16-byte loads per stream; scans keep 5 values per lane (fewer lanes per thread), softmax
    tiles are one load per lane (more)."""
    return min(max(triton.next_power_of_2(max(block // (32 * per_thread), 1)), 4), 16)


class Codes(tl.constexpr):
    """Named integer codes as one ``tl.constexpr``: a kernel compares a constexpr argument with
    ``LOSS == Loss.clip`` and a launcher passes ``LOSS=Loss.of(name, "loss")``. It reads as a
    global in the interpreter and in the compiler (Triton 3.6 and 3.9), where a plain dict, enum
    class or namedtuple may not. The same type numbers statistic columns: ``part + Stat.kl``."""

    def __getattr__(self, name: str):
        # Only called for names that are not attributes of the constexpr itself.
        if name.startswith("__") or name == "value":
            raise AttributeError(name)
        return getattr(self.value, name)

    @property
    def names(self) -> tuple[str, ...]:
        """The names as given (``"token-mean"``), in code order."""
        return self.value._names

    def of(self, name: str, argument: str) -> int:
        """The code of ``name``; an unknown name is a ValueError naming ``argument``."""
        if name not in self.value._names:
            raise ValueError(f"{argument} must be one of {', '.join(self.value._names)}; got {name!r}")
        return self.value._names.index(name)

    def __len__(self) -> int:
        return len(self.value)


def codes(typename: str, names: Sequence[str]) -> Codes:
    """Codes 0, 1, … for ``names``; ``-`` in a name becomes ``_`` in its field
    (``codes("Agg", ("token-mean", …)).token_mean == 0``)."""
    fields = tuple(name.replace("-", "_") for name in names)
    cls = namedtuple(typename, fields)
    cls._names = tuple(names)
    return Codes(cls(*range(len(fields))))


@triton.jit
def sequence_bounds(seq, cu_seqlens_ptr, T, PACKED: tl.constexpr):
    """[start, end) (int64) of sequence ``seq``: from ``cu_seqlens`` when packed, else row ``seq``
    of a contiguous (B, T)."""
    if PACKED:
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    else:
        start = seq.to(tl.int64) * T
        end = start + T
    return start, end


@triton.jit
def block_offsets(first, k, start, end, N, BLOCK: tl.constexpr):
    """Block ``first + k`` of the BLOCK-aligned blocks of a flat tensor of N elements: its offsets
    (int64, from a known multiple of BLOCK), which of them lie in [start, end), and whether the
    whole block lies inside the tensor. ``first = start // BLOCK``; the blocks overlapping
    [start, end) number ``cdiv(end, BLOCK) − first``."""
    base = tl.multiple_of((first + k).to(tl.int64) * BLOCK, BLOCK)
    offs = base + tl.arange(0, BLOCK)
    return offs, (offs >= start) & (offs < end), base + BLOCK <= N


@triton.jit
def load_block(ptr, offs, N, full):
    """``ptr[offs]`` of a block from ``block_offsets``, as fp32: unmasked when the block is
    ``full`` (16-byte loads), else masked at N (0 beyond it; never read past the tensor)."""
    if full:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=offs < N, other=0)
    return x.to(tl.float32)
