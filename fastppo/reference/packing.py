"""Packing references: plain Python, the oracles of ``fastppo.packing``'s C++ functions."""

import torch


def unpad(mask: torch.Tensor) -> dict:
    """Packed layout of a ``(B, T)`` 0/1 mask (the reference of ``fastppo.packing.unpad``).

    Returns a dict with ``indices`` (N,) int64 flat positions of the ones, ``cu_seqlens``
    (B+1,) int32 with a leading 0, ``position_ids`` (N,) int64 restarting at 0 in each row,
    ``seqlens`` (B,) int32 and ``max_seqlen`` (int).
    """
    keep = mask.bool()
    seqlens = keep.sum(1)
    cu_seqlens = torch.nn.functional.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
    position_ids = (keep.long().cumsum(1) - 1)[keep]
    return {
        "indices": keep.flatten().nonzero().flatten(),
        "cu_seqlens": cu_seqlens,
        "position_ids": position_ids,
        "seqlens": seqlens.to(torch.int32),
        "max_seqlen": int(seqlens.max()) if mask.shape[0] > 0 else 0,
    }


def collate(sequences, pad_id: int, *, side: str = "right", max_length=None, pad_to_multiple_of=None) -> dict:
    """Reference of ``fastppo.packing.collate`` (a Python loop)."""
    seqs = [list(map(int, s)) for s in sequences]
    L = max_length if max_length is not None else max((len(s) for s in seqs), default=0)
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    ids, mask = [], []
    for s in seqs:
        if len(s) > L:
            raise ValueError(f"sequence longer than max_length={max_length}")
        padding = [pad_id] * (L - len(s))
        ids.append(padding + s if side == "left" else s + padding)
        ones, zeros = [1] * len(s), [0] * (L - len(s))
        mask.append(zeros + ones if side == "left" else ones + zeros)
    shape = (len(seqs), L)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long).reshape(shape),
        "attention_mask": torch.tensor(mask, dtype=torch.long).reshape(shape),
    }


def plan_microbatches(seqlens, max_tokens: int, *, k: int | None = None) -> list[list[int]]:
    """Reference: first-fit-decreasing by linear search, padded with empty groups to a
    multiple of k (fewest bins FFD finds; no balancing)."""
    order = sorted(range(len(seqlens)), key=lambda i: -seqlens[i])
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + seqlens[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += seqlens[i]
                break
        else:
            bins.append([i])
            loads.append(seqlens[i])
    k = k or 1
    bins += [[] for _ in range(-len(bins) % k)]
    return [sorted(b) for b in bins]


def balanced_partition(seqlens, k: int, *, equal_size: bool = True) -> list[list[int]]:
    """Reference: greedy, longest first to the lightest group (with room, when equal_size)."""
    per_group = len(seqlens) // k if equal_size else None
    groups: list[list[int]] = [[] for _ in range(k)]
    sums = [0] * k
    for i in sorted(range(len(seqlens)), key=lambda i: -seqlens[i]):
        open_groups = [g for g in range(k) if per_group is None or len(groups[g]) < per_group]
        g = min(open_groups, key=lambda g: (sums[g], g))
        groups[g].append(i)
        sums[g] += seqlens[i]
    return [sorted(g) for g in groups]
