"""One batch laid out once for every model pass (the policy, reference and critic passes of a
rollout, the micro-batches of the update, the offline loops' batches).

``TokenBatch`` holds padded rows, or the attended tokens of all rows packed into one row with
position ids restarting at each sequence, and names the positions that predict a label.

Shapes: B sequences of P prompt positions (left-padded) and R response positions (right-padded);
n response tokens over the batch, listed row by row.
"""

from dataclasses import dataclass

import torch

from fastppo import packing


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class TokenBatch:
    """A batch laid out for the model passes.

    inputs: keyword arguments of the models' forward (padded rows, or one packed row).
    positions: (k,) int64, positions along the sequence whose outputs are read.
    rows: (n,) int64, which of the read outputs (flattened over (rows, k)) predict a label.
    labels: (n,) int64, those labels, row by row.
    row_of: (n,) int64, the batch row of each label.
    n_rows: B.
    """

    inputs: dict
    positions: torch.Tensor
    rows: torch.Tensor
    labels: torch.Tensor
    row_of: torch.Tensor
    n_rows: int

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        next_labels: torch.Tensor,
        *,
        padding_free: bool,
    ) -> "TokenBatch":
        """``input_ids``, ``attention_mask`` (B, T); ``next_labels`` (B, T): the token that position
        t predicts, -100 where it predicts none. Reads the label positions to the host once."""
        B, T = input_ids.shape
        if padding_free:
            layout = packing.unpad(attention_mask)
            packed_labels = packing.pack(next_labels, layout)
            positions = (packed_labels != -100).nonzero().squeeze(1)
            inputs = dict(
                input_ids=packing.pack(input_ids, layout)[None], position_ids=layout.position_ids[None]
            )
            rows = torch.arange(positions.numel(), device=input_ids.device)
            return cls(inputs | {"use_cache": False}, positions, rows, packed_labels[positions],
                       layout.indices[positions] // T, B)  # fmt: skip
        predicts = next_labels != -100
        columns = predicts.any(0).nonzero().squeeze(1)
        first, last = (int(columns[0]), int(columns[-1])) if columns.numel() else (0, -1)
        positions = torch.arange(first, last + 1, device=input_ids.device)
        kept = predicts[:, first : last + 1].reshape(-1)
        rows = kept.nonzero().squeeze(1)
        inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        )
        labels = next_labels[:, first : last + 1].reshape(-1)[rows]
        return cls(
            inputs | {"use_cache": False}, positions, rows, labels, rows // max(positions.numel(), 1), B
        )

    def select(self, outputs: torch.Tensor) -> torch.Tensor:
        """(n, ...) label-predicting rows of a model output over every position, (B or 1, T, ...)."""
        return outputs[:, self.positions].reshape(-1, *outputs.shape[2:])[self.rows]

    def row_sums(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) sums of per-label ``values`` (n,) over each row."""
        out = torch.zeros(self.n_rows, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.row_of, values)


def response_tokens(
    sequences: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, *, padding_free: bool
) -> TokenBatch:
    """The layout of prompt + response rows (B, P + R) whose labels are the response tokens
    (``response_mask`` (B, R)): position P − 1 + r predicts response token r."""
    P = sequences.shape[1] - response_mask.shape[1]
    next_labels = torch.full_like(sequences, -100)
    next_labels[:, P - 1 : -1] = torch.where(response_mask, sequences[:, P:], -100)
    return TokenBatch.build(sequences, attention_mask, next_labels, padding_free=padding_free)


def to_padded(flat: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Response-token values listed row by row (n,), back to (B, R) with zeros after each response."""
    out = torch.zeros(response_mask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(response_mask, flat)
