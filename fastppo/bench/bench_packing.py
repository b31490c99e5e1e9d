"""Packing on the host CPU: collate, unpad, plan_microbatches, balanced_partition.

Providers: ``python_loop`` (the pure-Python references in ``fastppo.reference``: a loop over
sequences for collate), ``torch`` (the torch-only unpad that trainers use today: nonzero +
cumsum, as flash-attn's ``unpad_input`` does) and ``fastppo`` (the C++ extension).

Targets (CPU): collate of 4,096 sequences of random length 1–4,096 ≥ 20× the Python loop;
unpad at B = 256, T = 8,192 no slower than the torch-only way; plan_microbatches and
balanced_partition of 100,000 sequences under 50 ms.
"""

import numpy as np
import torch

import fastppo
from fastppo.bench.harness import Benchmark

OPS = ("collate", "unpad", "plan_microbatches", "balanced_partition")


def torch_unpad(mask: torch.Tensor):
    """flash-attn's unpad_input recipe, torch only."""
    seqlens = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max())
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, max_seqlen


def _sequences(n, longest, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 150_000, int(L)).tolist() for L in rng.integers(1, longest + 1, n)]


def benchmarks(*, device, quick, providers, modes, dtype=None, ops=OPS, log=print):
    del device, dtype  # host-side work: always CPU, int64
    if "fwd" not in modes:
        return
    n_seqs, longest = (64, 256) if quick else (4096, 4096)
    B, T = (16, 512) if quick else (256, 8192)
    n_plan = 1000 if quick else 100_000

    if "collate" in ops:

        def setup_collate(impl):
            def setup():
                seqs = _sequences(n_seqs, longest)
                return lambda: impl(seqs, 0)

            return setup

        tokens = sum(len(s) for s in _sequences(n_seqs, longest))
        floor = 8 * tokens + 2 * 8 * n_seqs * longest  # read the tokens, write ids + mask
        for name, impl in [("python_loop", fastppo.reference.collate), ("fastppo", fastppo.packing.collate)]:
            if name in providers or name == "python_loop":
                yield Benchmark("collate", name, "fwd", "int64", {"B": n_seqs, "max_len": longest}, floor,
                                setup_collate(impl))  # fmt: skip

    if "unpad" in ops:

        def setup_unpad(impl):
            def setup():
                lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(0))
                mask = torch.arange(T)[None, :] < lengths[:, None]
                return lambda: impl(mask)

            return setup

        floor = B * T + int(0.5 * B * T) * 8  # read the bool mask, write ~N int64 indices
        for name, impl in [("torch", torch_unpad), ("fastppo", fastppo.packing.unpad)]:
            if name in providers:
                yield Benchmark("unpad", name, "fwd", "bool", {"B": B, "T": T}, floor, setup_unpad(impl))

    lengths = np.random.default_rng(1).integers(1, 8192, n_plan)
    if "plan_microbatches" in ops and "fastppo" in providers:
        shape = {"B": n_plan, "max_tokens": 65536, "k": 8}
        setup = lambda: lambda: fastppo.packing.plan_microbatches(lengths, 65536, k=8)  # noqa: E731
        yield Benchmark("plan_microbatches", "fastppo", "fwd", "int64", shape, 0, setup)
    if "balanced_partition" in ops and "fastppo" in providers:
        setup = lambda: lambda: fastppo.packing.balanced_partition(lengths, 8)  # noqa: E731
        yield Benchmark("balanced_partition", "fastppo", "fwd", "int64", {"B": n_plan, "k": 8}, 0, setup)
