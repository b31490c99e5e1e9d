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
