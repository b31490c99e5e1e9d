"""Timing, bandwidth and memory measurement shared by every ``fastppo/bench/bench_<op>.py``.

A bench module yields ``Benchmark`` cases; ``run_cases`` measures each one and returns records in
the schema of DESIGN §7. On CUDA, times come from ``triton.testing.do_bench`` (median and 20/80
quantiles after warm-up, L2 flushed between runs); on CPU, from wall-clock repeats.
"""

import gc
import importlib
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

PROVIDERS = ("torch", "compile", "fastppo", "trl", "verl", "openrlhf", "liger", "python_loop", "matmul")
MODES = ("fwd", "fwd_bwd")


@dataclass
class Benchmark:
    """One measurement: ``setup()`` allocates the inputs and returns the function to time."""

    op: str
    provider: str
    mode: str
    dtype: str
    shape: dict[str, int]
    bytes_floor: int  # the least traffic the op needs: each input read once, each output written once
    setup: Callable[[], Callable[[], object]]

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {self.provider!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


def importable_providers(providers, peer_modules: dict[str, str], what: str, log=print) -> list[str]:
    """``providers`` without the peers whose module (``peer_modules``: provider → module) does not
    import here, each said to be left out with the reason (not installed, or an import it needs)."""
    kept = []
    for name in providers:
        if name in peer_modules:
            try:
                importlib.import_module(peer_modules[name])
            except ImportError as exc:
                log(f"{what}: provider {name!r} left out: {exc}")
                continue
        kept.append(name)
    return kept


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device, *, cpu_budget_s: float = 2.0
) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return float(median), float(p20), float(p80)
    fn()  # warm-up (and compilation, for torch.compile)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < cpu_budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), measured now."""
    nbytes = 2**30 if device.type == "cuda" else 2**27
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e6)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory ``fn()`` allocates above what was allocated before the call (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_cases(
    cases: Iterable[Benchmark], device: torch.device, *, cpu_budget_s: float = 2.0, log=print
) -> tuple[list[dict], list[dict]]:
    """Measure every case. Returns (records, skipped); a case that runs out of memory or that its
    provider cannot run is listed in ``skipped`` with the reason, never silently dropped."""
    records, skipped = [], []
    for case in cases:
        head = f"{case.op:>15} {case.mode:>7} {case.provider:>8} {case.dtype:>9} {case.shape}"
        fn = None
        try:
            fn = case.setup()
            peak = peak_extra_bytes(fn, device)
            ms, p20, p80 = time_ms(fn, device, cpu_budget_s=cpu_budget_s)
        except torch.cuda.OutOfMemoryError:
            skipped.append(_skip(case, "out of memory"))
            log(f"{head}  OOM")
            fn = None
            _free(device)
            continue
        except Exception as exc:  # a provider that cannot run this case is reported, not fatal
            skipped.append(_skip(case, f"{type(exc).__name__}: {exc}"))
            log(f"{head}  failed: {type(exc).__name__}: {str(exc)[:200]}")
            fn = None
            _free(device)
            continue
        gbps = case.bytes_floor / (ms * 1e6) if case.bytes_floor else None
        records.append(
            {
                "op": case.op,
                "provider": case.provider,
                "mode": case.mode,
                "dtype": case.dtype,
                "shape": dict(case.shape),
                "ms": ms,
                "ms_p20": p20,
                "ms_p80": p80,
                "gbps": gbps,
                "peak_bytes": peak,
            }
        )
        bw = f"{gbps:8.1f} GB/s" if gbps is not None else ""
        mem = f"  peak +{peak / 2**20:.0f} MiB" if peak is not None else ""
        log(f"{head}  {ms:9.3f} ms [{p20:.3f}, {p80:.3f}] {bw}{mem}")
        del fn
        _free(device)
    return records, skipped


def _skip(case: Benchmark, reason: str) -> dict:
    return {
        "op": case.op,
        "provider": case.provider,
        "mode": case.mode,
        "dtype": case.dtype,
        "shape": case.shape,
        "reason": reason,
    }
