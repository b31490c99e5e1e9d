"""Kernels for the compile gate's own tests: one that compiles, and two written to fail under the
compiler while Triton's interpreter runs them, the two ways the first H200 run failed."""

import importlib.util
from collections import namedtuple
from pathlib import Path

import triton
import triton.language as tl

# By path: the gate's workers import this file where fastppo need not be installed (--python).
_spec = importlib.util.spec_from_file_location(
    "_fixture_common", Path(__file__).parents[2] / "fastppo" / "kernels" / "_common.py"
)
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
codes = _common.codes

_FLOOR: tl.constexpr = tl.constexpr(-1.0e30)  # a global a kernel may read
_PLAIN_FLOOR = -1.0e30  # one it may not: the interpreter reads it, the compiler raises NameError


@triton.jit
def clamp_below(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr + offs, tl.maximum(x, _FLOOR), mask=offs < N)


@triton.jit
def clamp_below_plain_global(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr + offs, tl.maximum(x, _PLAIN_FLOOR), mask=offs < N)


@triton.jit
def row_sums_of_chunk_tiles(partials_ptr, out_ptr, B, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """The row sums of fastppo's loss reduction as it was: a (rows, chunks) tile reduced inside the
    loop over row blocks. Triton 3.6's OptimizeThreadLocality pass asserts (loopResult.hasOneUse)
    for BLOCK_B = 256 with BLOCK_C = 4, 8 warps."""
    total = tl.zeros((), tl.float32)
    rows_with_tokens = tl.zeros((), tl.float32)
    offs_b = tl.arange(0, BLOCK_B)
    offs_c = tl.arange(0, BLOCK_C)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs_b
        row_l = tl.zeros((BLOCK_B,), tl.float32)
        row_m = tl.zeros((BLOCK_B,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            chunks = c0 + offs_c
            inside = (rows[:, None] < B) & (chunks[None, :] < C)
            base = (rows[:, None].to(tl.int64) * C + chunks[None, :]) * 2
            row_l += tl.sum(tl.load(partials_ptr + base, mask=inside, other=0.0), axis=1)
            row_m += tl.sum(tl.load(partials_ptr + base + 1, mask=inside, other=0.0), axis=1)
        has = row_m > 0
        total += tl.sum(row_l, axis=0)
        rows_with_tokens += tl.sum(has.to(tl.float32), axis=0)
        tl.store(out_ptr + 2 + rows, row_m, mask=rows < B)
    tl.store(out_ptr, total)
    tl.store(out_ptr + 1, rows_with_tokens)


#: Named codes for kernels: a namedtuple global reads fine in the interpreter, but the compiler
#: takes only a constexpr global, which is what ``_common.codes`` makes.
_Mode = namedtuple("Mode", ("copy", "negate"))
_PLAIN_MODE = _Mode(0, 1)
MODE = codes("Mode", ("copy", "negate"))


@triton.jit
def by_code(x_ptr, out_ptr, N, BLOCK: tl.constexpr, M: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    if M == MODE.negate:
        x = -x
    tl.store(out_ptr + offs, x, mask=offs < N)


@triton.jit
def by_plain_namedtuple(x_ptr, out_ptr, N, BLOCK: tl.constexpr, M: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    if M == _PLAIN_MODE.negate:
        x = -x
    tl.store(out_ptr + offs, x, mask=offs < N)
