"""autograd.Functions and the functional API of fastppo's ops (dispatch between Triton and reference)."""

from .token_logprobs import TokenLogprobsFunction, token_logprobs

__all__ = ["TokenLogprobsFunction", "token_logprobs"]
