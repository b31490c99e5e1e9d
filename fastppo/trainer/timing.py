"""Where an iteration's time goes: wall seconds per phase (generate, score, logprobs, update, sync).

GPU work is asynchronous, so a phase that only launched kernels would look free and the next one
would pay for it: on a GPU the device is synchronized at each phase boundary (a handful of waits
per iteration, none inside the micro-batch loop), so each phase is charged its own work.
"""

import contextlib
import time
from collections import defaultdict

import torch

#: The phases an iteration logs as ``time/<phase>``, in order.
PHASES = ("generate", "score", "logprobs", "update", "sync")


class Phases:
    """Accumulates seconds per phase name; ``record()`` gives ``{"time/<phase>": seconds}``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _wait(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._wait()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._wait()
            self.seconds[name] += time.perf_counter() - start

    def record(self) -> dict[str, float]:
        return {f"time/{name}": self.seconds.get(name, 0.0) for name in PHASES}


def split_line(totals: dict[str, float]) -> str:
    """ "generate 41%, score 2%, ..." from summed ``time/<phase>`` seconds."""
    whole = sum(totals.get(f"time/{p}", 0.0) for p in PHASES)
    if whole <= 0:
        return ""
    return ", ".join(f"{p} {100 * totals.get(f'time/{p}', 0.0) / whole:.0f}%" for p in PHASES)


def untimed(record: dict) -> dict:
    """``record`` without its wall-clock entries (they differ run to run; nothing else may)."""
    return {
        k: v
        for k, v in record.items()
        if k != "seconds" and not k.startswith("time/") and k != "generate/tokens_per_s"
    }
