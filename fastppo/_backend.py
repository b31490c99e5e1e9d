"""Which implementation runs an op: compiled Triton, Triton's interpreter, or the PyTorch reference.

- CUDA tensors run the compiled Triton kernels.
- CPU tensors run the reference, unless ``TRITON_INTERPRET=1`` was set before triton was
  imported: then the kernels run in Triton's interpreter (this is how the tests check kernels
  on machines without a GPU).
- ``FASTPPO_BACKEND=triton|torch`` forces one path (``auto``, the default, picks as above).
"""

import os

import torch

BACKENDS = ("auto", "triton", "torch")

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
    TRITON_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # e.g. macOS or Windows wheels of torch without triton
    TRITON_AVAILABLE = False
    TRITON_IMPORT_ERROR = exc


def requested_backend() -> str:
    """The value of ``FASTPPO_BACKEND`` (default ``auto``), checked."""
    backend = os.environ.get("FASTPPO_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"FASTPPO_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_interpreted() -> bool:
    """Whether fastppo's kernels were built for Triton's interpreter (TRITON_INTERPRET=1 was set
    when triton first decorated them)."""
    if not TRITON_AVAILABLE:
        return False
    from fastppo.kernels import INTERPRETED

    return INTERPRETED


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the op on ``tensor`` should run the Triton kernel, False for the reference."""
    backend = requested_backend()
    if backend == "torch":
        return False
    runnable = TRITON_AVAILABLE and (tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreted()))
    if backend == "triton" and not runnable:
        if not TRITON_AVAILABLE:
            raise RuntimeError(f"FASTPPO_BACKEND=triton but triton cannot be imported: {TRITON_IMPORT_ERROR}")
        raise RuntimeError(
            f"FASTPPO_BACKEND=triton cannot run on a {tensor.device.type} tensor: Triton compiles for "
            "CUDA devices; for CPU tensors set TRITON_INTERPRET=1 before triton is imported"
        )
    return runnable


def active_backend(device: str | torch.device = "cuda") -> str:
    """A one-word description of what runs on ``device``: 'triton', 'triton-interpreter' or 'torch'."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    probe = torch.empty(0, device=device)
    try:
        if not use_triton(probe):
            return "torch"
    except RuntimeError as exc:
        return f"unavailable ({exc})"
    return "triton" if device.type == "cuda" else "triton-interpreter"
