"""Group-relative advantages (GRPO, Dr. GRPO, RLOO): Triton kernel and launcher.

The launcher sorts the sequences by group id (a stable sort, so any ids in any order work) and
runs one program per group over its contiguous slice of the sorted order: a pass for the mean,
one for the unbiased std (grpo only), one writing each advantage back to its sequence.
"""

import torch
import triton
import triton.language as tl

from ._common import block_size, codes

#: The methods' codes (``Method.grpo`` …), in the order of ``reference.GROUP_METHODS``.
Method = codes("Method", ("grpo", "dr_grpo", "rloo"))
#: Largest block of the one program per group (members per step).
MAX_BLOCK = 1024


@triton.jit
def _group_advantages_kernel(
    scores_ptr,
    order_ptr,
    starts_ptr,
    counts_ptr,
    advantages_ptr,
    eps,
    BLOCK: tl.constexpr,
    METHOD: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(starts_ptr + g).to(tl.int64)
    n = tl.load(counts_ptr + g).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((), tl.float32)
    for j in range(0, n, BLOCK):
        inside = j + offs < n
        idx = tl.load(order_ptr + start + j + offs, mask=inside, other=0)
        total += tl.sum(tl.load(scores_ptr + idx, mask=inside, other=0.0).to(tl.float32), axis=0)
    nf = n.to(tl.float32)
    mean = total / nf
    std = tl.full((), 1.0, tl.float32)
    if METHOD == Method.grpo:
        sq = tl.zeros((), tl.float32)
        for j in range(0, n, BLOCK):
            inside = j + offs < n
            idx = tl.load(order_ptr + start + j + offs, mask=inside, other=0)
            s = tl.load(scores_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            sq += tl.sum(tl.where(inside, (s - mean) * (s - mean), 0.0), axis=0)
        std = tl.where(n > 1, tl.sqrt(sq / tl.maximum(nf - 1.0, 1.0)), 1.0)
    if METHOD != Method.rloo:
        mean = tl.where(n > 1, mean, 0.0)  # a group of one: mean 0 (and std 1)
    for j in range(0, n, BLOCK):
        inside = j + offs < n
        idx = tl.load(order_ptr + start + j + offs, mask=inside, other=0)
        s = tl.load(scores_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        if METHOD == Method.grpo:
            adv = (s - mean) / (std + eps)
        elif METHOD == Method.dr_grpo:
            adv = s - mean
        else:
            adv = tl.where(n > 1, (s - mean) * nf / tl.maximum(nf - 1.0, 1.0), s)
        tl.store(advantages_ptr + idx, adv, mask=inside)


def group_advantages_fwd(
    scores: torch.Tensor, group_ids: torch.Tensor, *, method: str, eps: float
) -> torch.Tensor:
    """``scores`` (B,) float and ``group_ids`` (B,) integer, contiguous; fp32 (B,) out.
    Reads the number of groups to the host (one sync)."""
    advantages = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    if not scores.numel():
        return advantages
    sorted_ids, order = torch.sort(group_ids, stable=True)
    _, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    block = block_size(int(counts.max()), MAX_BLOCK)
    _group_advantages_kernel[(counts.numel(),)](
        scores, order, starts, counts, advantages, eps, BLOCK=block, METHOD=Method.of(method, "method")
    )  # fmt: skip
    return advantages
