"""Verified sync: a cheap fingerprint of every weight the engine holds, computed on both sides.

The engine does not hold the trainer's tensors one for one: vLLM fuses q/k/v into ``qkv_proj``
and gate/up into ``gate_up_proj`` (``packed_modules_mapping``), pads the vocabulary rows, and on
its CPU backend repacks linear weights for oneDNN (the plain tensor is gone). So a fingerprint must
be additive over row concatenation and must not need the plain tensor:

- a tensor ``t`` (rows, cols) gives ``(s, q, m)``: ``s = Σᵢⱼ tᵢⱼ·u(j)`` with fixed column weights
  ``u``, ``q = Σ t²`` and ``m = Σ |tᵢⱼ·u(j)|`` (the scale its tolerance is stated against), all in
  fp64. Row concatenation adds them, so a fused tensor's fingerprint is the sum of its parts'.
- where the engine holds only a repacked linear layer, the tensor fingerprinted is that layer's
  output on a fixed probe input, ``(W·xᵀ)`` of shape (out, k), through the engine's own kernel;
  the trainer computes ``W·xᵀ`` of its parts in fp64.

A held tensor is compared exactly (the same values summed in fp64: relative 1e-9 covers the
summation order); a probed layer within ``PROBE_TOLERANCE``·m, the reordering error of the
engine's fp32 (or bf16) matmul. A sync that was skipped, a tensor re-read from disk, or a
corrupted tensor differs by far more (tests/test_vllm.py).
"""

import json
import math
from dataclasses import dataclass

import torch

PROBE_ROWS = 2
#: Relative bound of a probed layer: an fp32 matmul's reordering error is at most ~K·2⁻²⁴ of
#: Σ|x·w| (5e-5 at K = 896), typically √K·2⁻²⁴; bf16 rounds each output to 2⁻⁹.
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
EXACT_TOLERANCE = 1e-9


def column_weights(n: int, device) -> torch.Tensor:
    """(n,) fp64 u(j) in [-1, 1], the same on every device (no random generator)."""
    j = torch.arange(n, dtype=torch.float64, device=device)
    return torch.cos(j * 0.6180339887 * 7.0 + 0.3)


def probe_input(cols: int, dtype, device) -> torch.Tensor:
    """(PROBE_ROWS, cols) fixed probe rows x."""
    i = torch.arange(PROBE_ROWS * cols, dtype=torch.float64, device=device).reshape(PROBE_ROWS, cols)
    return torch.sin(i * 0.37 + 0.1).to(dtype)


def of_tensor(t: torch.Tensor, rows: int | None = None, chunk: int = 8192) -> list[float]:
    """[s, q, m] of ``t`` (its first ``rows`` rows: an engine pads its vocabulary), in fp64, a
    chunk of rows at a time (no full fp64 copy of a large embedding)."""
    t = t.detach()
    t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    if rows is not None:
        t = t[:rows]
    u = column_weights(t.shape[1], t.device)
    s = q = m = 0.0
    for part in t.split(chunk):
        part = part.double()
        s += float((part @ u).sum())
        q += float((part * part).sum())
        m += float((part.abs() @ u.abs()).sum())
    return [s, q, m]


def add(a: list[float] | None, b: list[float]) -> list[float]:
    return b if a is None else [x + y for x, y in zip(a, b, strict=True)]


@dataclass
class EngineLayout:
    """What the engine reports of its weights (``vllm_worker.WorkerExtension.fastppo_layout``)."""

    params: dict[str, dict]  # vLLM name -> {"shape": [...], "probe": bool}
    packed: dict[str, list[str]]  # fused module -> the trainer's modules it holds, in order
    architecture: str
    vocab_size: int
    dtype: str

    @classmethod
    def from_json(cls, data: dict) -> "EngineLayout":
        return cls(**data)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype.removeprefix("torch."))

    def engine_name(self, name: str) -> str | None:
        """The engine parameter that holds the trainer's tensor ``name`` (None: not held, e.g. a
        tied lm_head)."""
        if name in self.params:
            return name
        module, _, leaf = name.rpartition(".")
        parent, _, short = module.rpartition(".")
        for fused, parts in self.packed.items():
            if short in parts:
                candidate = f"{parent}.{fused}.{leaf}" if parent else f"{fused}.{leaf}"
                if candidate in self.params:
                    return candidate
        return None


@dataclass
class Expected:
    """The trainer's side: per engine parameter, its fingerprint and the spec the engine needs."""

    fingerprints: dict[str, list[float]]
    spec: dict[str, dict]  # engine name -> {"rows": int, "cols": int}
    not_held: list[str]  # trainer tensors the engine holds no place for


def expected(weights, layout: EngineLayout) -> Expected:
    """Fingerprints of the trainer's ``weights`` ((name, tensor) pairs, Hugging Face names) in the
    engine's layout, each cast to the engine's dtype first (what loading it does)."""
    dtype = layout.torch_dtype
    prints: dict[str, list[float]] = {}
    spec: dict[str, dict] = {}
    not_held = []
    for name, tensor in weights:
        target = layout.engine_name(name)
        if target is None:
            not_held.append(name)
            continue
        t = tensor.detach().to(dtype)
        rows = spec.get(target, {}).get("rows", 0) + t.shape[0]
        cols = t[0].numel() if t.dim() > 1 else 1
        spec[target] = {"rows": rows, "cols": cols}
        if layout.params[target]["probe"]:
            x = probe_input(cols, torch.float64, t.device)
            t = t.double().reshape(t.shape[0], -1) @ x.T  # (rows, k): the layer's output, transposed
        prints[target] = add(prints.get(target), of_tensor(t))
    return Expected(prints, spec, not_held)


def mismatches(want: Expected, got: dict[str, list[float]], layout: EngineLayout) -> list[str]:
    """Engine parameters whose fingerprint differs from the trainer's, with the largest relative
    difference; a parameter the engine holds that no trainer tensor fills is listed too."""
    bad = []
    tol = PROBE_TOLERANCE.get(layout.torch_dtype, 1e-2)
    for name, w in want.fingerprints.items():
        g = got.get(name)
        if g is None:
            bad.append(f"{name} (not reported by the engine)")
            continue
        bound = tol if layout.params[name]["probe"] else EXACT_TOLERANCE
        rel = max(abs(g[0] - w[0]) / max(w[2], 1e-30), abs(g[1] - w[1]) / max(w[1], 1e-30))
        if not rel <= bound or not all(map(math.isfinite, g)):
            bad.append(f"{name} (relative difference {rel:.1e})")
    bad += [f"{name} (no trainer tensor fills it)" for name in layout.params if name not in want.fingerprints]
    return bad


def spec_json(want: Expected) -> str:
    """The request the engine's ``fastppo_fingerprints`` takes (a JSON string: it may cross HTTP)."""
    return json.dumps(want.spec)
