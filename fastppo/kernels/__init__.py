"""Triton kernels of fastppo and their launchers (installed as ``fastppo.kernels``).

Only ``@triton.jit`` kernels and the functions that check, allocate and launch them live here;
autograd and the public API are in ``fastppo.ops``.
"""

from .token_logprobs import _token_logprobs_fwd_kernel, can_address, token_logprobs_bwd, token_logprobs_fwd

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

    #: True when the kernels were decorated with TRITON_INTERPRET=1 (they run on CPU tensors).
    INTERPRETED = isinstance(_token_logprobs_fwd_kernel, _InterpretedFunction)
except ImportError:  # pragma: no cover - very old triton
    import os

    INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

__all__ = ["INTERPRETED", "can_address", "token_logprobs_bwd", "token_logprobs_fwd"]
