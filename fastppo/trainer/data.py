"""Data for the offline loops (SFT, reward model, DPO): local JSONL or Parquet files, or the synthetic
default of the built-in "echo" task, tokenised into right-padded batches with response-only
labels.

    SFT         {"prompt": ..., "response": ...}
    pairs       {"prompt": ..., "chosen": ..., "rejected": ...}     (reward model and DPO)
"""

import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastppo import packing
from fastppo.trainer import tiny
from fastppo.trainer.errors import UsageError


def _jsonl_rows(path: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; a line that is not JSON is an error
    naming the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UsageError(
                    f"{path}: row {number}: not valid JSON ({exc.msg}, column {exc.colno})"
                ) from None
    return rows


def _parquet_rows(path: str) -> list[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UsageError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    except Exception as exc:  # pyarrow raises its own ArrowInvalid and OSError kinds
        raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None


def read_rows(path: str, fields: tuple[str, ...], keep_all: bool = False) -> list[dict]:
    """Rows of a JSONL file (one JSON object per line) or a Parquet file (needs pyarrow), keeping
    ``fields`` (``keep_all``: every column). A missing file, a line that is not JSON, a row without
    one of ``fields`` or with a non-text value there is a ``UsageError`` naming the file and the row
    (its line, for JSONL)."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    parquet = str(path).endswith(".parquet")
    try:
        raw = _parquet_rows(path) if parquet else _jsonl_rows(path)
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a UTF-8 text file (JSONL), nor named .parquet") from None
    rows = []
    for number, row in raw:
        if not isinstance(row, dict):
            raise UsageError(f"{path}: row {number}: a JSON object with {list(fields)} expected")
        missing = [k for k in fields if not isinstance(row.get(k), str)]
        if missing:
            raise UsageError(f"{path}: row {number}: missing or non-text fields {missing}")
        rows.append(dict(row) if keep_all else {k: row[k] for k in fields})
    if not rows:
        raise UsageError(f"{path}: no rows")
    return rows


@dataclass
class PromptRows:
    """The PPO family's data: each row's prompt, and every other column of the rows, row-aligned
    (a row without a column others have holds None there), for the reward."""

    prompts: list[str]  # (N,)
    columns: dict[str, list] = field(default_factory=dict)  # each (N,)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "PromptRows":
        names = list(dict.fromkeys(k for row in rows for k in row if k != "prompt"))
        return cls([row["prompt"] for row in rows], {k: [row.get(k) for row in rows] for k in names})

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, index: list[int]) -> tuple[list[str], dict[str, list]]:
        """The prompts and columns of the rows ``index``, in that order."""
        return [self.prompts[i] for i in index], {k: [v[i] for i in index] for k, v in self.columns.items()}


def read_prompt_rows(path: str) -> PromptRows:
    """A prompt file's rows whole: a text ``prompt`` in each, any other columns beside it."""
    return PromptRows.from_rows(read_rows(path, ("prompt",), keep_all=True))


def synthetic_sft(n: int, seed: int) -> list[dict]:
    """Echo-task demonstrations: the response repeats letters of the prompt."""
    rng = random.Random(seed)
    rows = []
    for prompt in tiny.synthetic_prompts(n, seed):
        letters = prompt.rstrip(":")
        rows.append({"prompt": prompt, "response": "".join(rng.choices(letters, k=tiny.RESPONSE_CHARS))})
    return rows


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Echo-task preferences: letters of the prompt are preferred to letters not in it."""
    rng = random.Random(seed + 1)
    rows = []
    for row in synthetic_sft(n, seed):
        others = [c for c in string.ascii_lowercase if c not in row["prompt"]]
        rejected = "".join(rng.choices(others, k=tiny.RESPONSE_CHARS))
        rows.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": rejected})
    return rows


def apply_template(tokenizer, prompt: str) -> str:
    """The tokenizer's chat template around the prompt when it has one; the prompt otherwise."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    return prompt


def encode(tokenizer, prompts: list[str], responses: list[str]) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B, L); labels are the token
    ids on response tokens (and the final EOS) and -100 elsewhere, so losses cover responses only."""
    sequences, n_prompt = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        head += tokenizer(apply_template(tokenizer, prompt), add_special_tokens=False).input_ids
        tail = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        sequences.append(head + tail)
        n_prompt.append(len(head))
    batch = packing.collate(sequences, tokenizer.pad_token_id, side="right")
    positions = torch.arange(batch["input_ids"].shape[1])
    is_response = (positions[None, :] >= torch.tensor(n_prompt)[:, None]) & batch["attention_mask"].bool()
    batch["labels"] = torch.where(is_response, batch["input_ids"], -100)
    return batch


def batches(rows: list[dict], batch_size: int, rng: random.Random):
    order = list(range(len(rows)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [rows[i] for i in order[start : start + batch_size]]


def split(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows; held-out gets ⌈fraction·n⌉ rows (at least one when fraction > 0)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = min(len(rows) - 1, max(1, round(eval_fraction * len(rows)))) if eval_fraction > 0 else 0
    return rows[n_eval:], rows[:n_eval]
