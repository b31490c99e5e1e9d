"""Numerics the peers have and fastppo's ops do not, shared by the adapters."""

import torch


def nan_if_zero(count: torch.Tensor) -> torch.Tensor:
    """1 where ``count`` is not 0 and NaN where it is, without a host sync: multiplied into a loss,
    it reproduces a peer's 0/0 over an empty mask, where fastppo's ops give 0."""
    count = count.float()
    return count / count
