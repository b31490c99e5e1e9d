"""Argument checks shared by the public ops: each error names the argument and what was expected."""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, dtypes=None, integer: bool = False, min_dim: int = 0) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_token_tensors(*, allow_any_shape: bool = False, **tensors: torch.Tensor | None) -> torch.Size:
    """Per-token inputs: same shape ((B, T) or (N,) unless ``allow_any_shape``), same device.
    Float tensors must be floating point; a tensor named ``mask`` may be bool, int or float."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        check_tensor(name, t)
        if name != "mask" and not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if name == "mask" and t.dtype.is_complex:
            raise TypeError(f"mask must be a bool, integer or float tensor, got dtype {t.dtype}")
    (first, shape), *rest = [(name, t.shape) for name, t in present.items()]
    for name, t in present.items():
        if t.shape != shape:
            raise ValueError(f"{name} must have the shape of {first} {tuple(shape)}, got {tuple(t.shape)}")
    if not allow_any_shape and len(shape) not in (1, 2):
        raise ValueError(f"{first} must have shape (B, T) or (N,), got {tuple(shape)}")
    check_same_device(**present)
    return shape


def check_unit_interval(name: str, value) -> float:
    value = check_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_layout(
    cu_seqlens: torch.Tensor | None, shape: torch.Size, device
) -> tuple[torch.Tensor | None, int]:
    """Validate a per-token layout: padded ``(B, T)`` without ``cu_seqlens``, or packed ``(N,)``
    with ``cu_seqlens`` (B+1,) int32, a leading 0, non-decreasing, ending at N (read to the host
    once). A flat ``(N,)`` input without cu_seqlens is one sequence. Returns (cu_seqlens or None
    for padded, the longest sequence)."""
    if cu_seqlens is None:
        if len(shape) == 2:
            return None, shape[1]
        if len(shape) != 1:
            raise ValueError(f"per-token inputs must have shape (B, T) or (N,), got {tuple(shape)}")
        return torch.tensor([0, shape[0]], dtype=torch.int32, device=device), shape[0]
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if len(shape) != 1:
        raise ValueError(f"with cu_seqlens the per-token inputs must be packed (N,), got {tuple(shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (B+1,), got {tuple(cu_seqlens.shape)}")
    check_same_device(cu_seqlens=cu_seqlens, tokens=torch.empty(0, device=device))
    host = cu_seqlens.cpu()
    lengths = host[1:] - host[:-1]
    if host[0] != 0 or (lengths < 0).any() or host[-1] != shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at N={shape[0]}, got {host.tolist()[:16]}"
        )
    return cu_seqlens.contiguous(), int(lengths.max()) if lengths.numel() else 0


def assert_async(ok: torch.Tensor, message: str) -> None:
    """Fail with ``message`` where the 0-d bool ``ok`` is False, without a host read: a
    synchronous RuntimeError on CPU, a device-side assert on CUDA (as torch's own index checks)."""
    torch._assert_async(ok, message)


def check_cu_seqlens(cu_seqlens, shape: torch.Size, device) -> torch.Tensor:
    """Packed sequences: ``cu_seqlens`` (S + 1,) integer, a leading 0, never decreasing, ending at
    N = shape[0] for per-token inputs of ``shape`` (N,). Shape and dtype are checked here, the
    values by ``assert_async`` (no host read). Returns it as contiguous int32."""
    check_tensor("cu_seqlens", cu_seqlens, integer=True)
    if len(shape) != 1:
        raise ValueError(f"cu_seqlens needs packed (N,) inputs, got inputs of shape {tuple(shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (S + 1,), got {tuple(cu_seqlens.shape)}")
    check_same_device(cu_seqlens=cu_seqlens, tokens=torch.empty(0, device=device))
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == shape[0]) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    assert_async(
        ok, f"cu_seqlens must start at 0, never decrease and end at the number of tokens ({shape[0]})"
    )
    return cu_seqlens.to(torch.int32).contiguous()


def check_labels(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """Labels in [0, V) or equal to ``ignore_index``, checked by ``assert_async`` (no host read)."""
    if labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        assert_async(~bad.any(), f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
