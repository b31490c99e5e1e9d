"""One batch laid out once for every model pass (the policy, reference and critic passes of a
rollout, the micro-batches of the update, the offline loops' batches).

``TokenBatch`` holds padded rows, or the attended tokens of all rows packed into one row with
position ids restarting at each sequence, and names the positions that predict a label. Its
index tensors are computed on the host from the batch's masks (``HostMasks``, read once, or
already known) and copied to the device in one transfer: building a batch reads nothing back.

Shapes: B sequences of T positions (P prompt positions, left-padded, then R response positions,
right-padded, for a rollout); n labels (response tokens) over the batch, listed row by row.
"""

from dataclasses import dataclass

import numpy as np
import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def to_device(device, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Host integer arrays → int64 device tensors of the same shapes, in one host-to-device copy
    (from pinned memory, asynchronous, on CUDA). A copy to the device reads nothing back."""
    device = torch.device(device)
    flat = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    host = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.int64))
    if device.type == "cuda":
        host = host.pin_memory()
    moved = host.to(device, non_blocking=True).split([a.size for a in flat])
    return [t.view(np.shape(a)) for t, a in zip(moved, arrays, strict=True)]


@dataclass(frozen=True)
class HostMasks:
    """A batch's masks on the host (numpy): what the layout needs, read from the device once."""

    attended: np.ndarray  # (B, T) bool, the attention mask
    predicts: np.ndarray  # (B, T) bool, positions whose next token is a label

    @classmethod
    def read(cls, attention_mask: torch.Tensor, next_labels: torch.Tensor) -> "HostMasks":
        """One device-to-host read of both masks."""
        both = torch.stack([attention_mask.bool(), next_labels != -100]).cpu().numpy()
        return cls(both[0], both[1])


@dataclass
class TokenBatch:
    """A batch laid out for the model passes.

    inputs: keyword arguments of the models' forward (padded rows, or one packed row).
    positions: (k,) int64, positions along the sequence whose outputs are read.
    rows: (n,) int64, which of the read outputs (flattened over (rows, k)) predict a label.
    labels: (n,) int64, those labels, row by row.
    row_of: (n,) int64, the batch row of each label.
    n_rows: B.
    sequence_of: (T,) int64 packed: which sequence each packed token is in (None padded).
    """

    inputs: dict
    positions: torch.Tensor
    rows: torch.Tensor
    labels: torch.Tensor
    row_of: torch.Tensor
    n_rows: int
    sequence_of: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        next_labels: torch.Tensor,
        *,
        padding_free: bool,
        host: HostMasks | None = None,
    ) -> "TokenBatch":
        """``input_ids``, ``attention_mask`` (B, T); ``next_labels`` (B, T): the token that position
        t predicts, -100 where it predicts none. ``host``: those masks on the host when the caller
        has them (no read); else they are read once."""
        host = host or HostMasks.read(attention_mask, next_labels)
        if padding_free:
            return cls._packed(input_ids, next_labels, host)
        B, T = input_ids.shape
        columns = np.flatnonzero(host.predicts.any(0))
        first, last = (int(columns[0]), int(columns[-1])) if columns.size else (0, -1)
        width = last - first + 1
        rows = np.flatnonzero(host.predicts[:, first : last + 1])  # over (B, width)
        row_of, column = rows // max(width, 1), first + rows % max(width, 1)
        positions, rows_d, row_of_d, label_at = to_device(
            input_ids.device, np.arange(first, last + 1), rows, row_of, row_of * T + column
        )
        inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        )
        labels = next_labels.reshape(-1)[label_at]
        return cls(inputs | {"use_cache": False}, positions, rows_d, labels, row_of_d, B)

    @classmethod
    def _packed(cls, input_ids: torch.Tensor, next_labels: torch.Tensor, host: HostMasks) -> "TokenBatch":
        """The attended tokens of all rows in one row, row by row (padding-free)."""
        B, T = input_ids.shape
        kept = np.flatnonzero(host.attended)  # (N,) b*T + t of the attended tokens
        positions = np.flatnonzero(host.predicts.reshape(-1)[kept])  # (n,) packed positions
        restart = (np.cumsum(host.attended, 1) - 1).reshape(-1)[kept]  # position ids
        kept_d, positions_d, restart_d, row_of, label_at, sequence_of = to_device(
            input_ids.device, kept, positions, restart, kept[positions] // T, kept[positions], kept // T
        )
        inputs = dict(input_ids=input_ids.reshape(-1)[kept_d][None], position_ids=restart_d[None])
        rows = torch.arange(positions.size, device=input_ids.device)
        labels = next_labels.reshape(-1)[label_at]
        return cls(inputs | {"use_cache": False}, positions_d, rows, labels, row_of, B, sequence_of)

    def select(self, outputs: torch.Tensor) -> torch.Tensor:
        """(n, ...) label-predicting rows of a model output over every position, (B or 1, T, ...)."""
        return outputs[:, self.positions].reshape(-1, *outputs.shape[2:])[self.rows]

    def row_sums(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) sums of per-label ``values`` (n,) over each row."""
        out = torch.zeros(self.n_rows, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.row_of, values)

    def attention_mask_4d(self, dtype: torch.dtype | None) -> torch.Tensor:
        """(B or 1, 1, T, T) the causal mask of these rows as transformers' sdpa (bool, ``dtype``
        None) or eager (additive ``dtype``) attention takes it, built on the device: handing it
        to the model spares the mask builder's reads (is the padding all ones? are the rows
        packed?). Every query attends at least itself, so no row is fully masked."""
        ids = self.inputs["input_ids"]
        T = ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        if self.sequence_of is not None:  # packed: the same sequence, causal
            same = self.sequence_of[:, None] == self.sequence_of[None, :]
            mask = (causal & same)[None, None]
        else:
            keys = self.inputs["attention_mask"].bool()[:, None, None, :]
            mask = (causal & keys) | torch.eye(T, dtype=torch.bool, device=ids.device)
        if dtype is None:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=ids.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )


def response_tokens(
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    padding_free: bool,
    host_attention: np.ndarray | None = None,
) -> TokenBatch:
    """The layout of prompt + response rows (B, P + R) whose labels are the response tokens
    (``response_mask`` (B, R)): position P − 1 + r predicts response token r. ``host_attention``:
    ``attention_mask`` on the host (numpy (B, P + R) bool, its last R columns the response mask)
    when the caller has it: then nothing is read from the device."""
    P = sequences.shape[1] - response_mask.shape[1]
    next_labels = torch.full_like(sequences, -100)
    next_labels[:, P - 1 : -1] = torch.where(response_mask, sequences[:, P:], -100)
    host = None
    if host_attention is not None:
        predicts = np.zeros_like(host_attention)
        predicts[:, P - 1 : -1] = host_attention[:, P:]
        host = HostMasks(host_attention, predicts)
    return TokenBatch.build(sequences, attention_mask, next_labels, padding_free=padding_free, host=host)
