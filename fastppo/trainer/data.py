"""Rows of every loop, read from a data source (``sources.py``: files, save_to_disk folders, dataset
ids) or the synthetic default of the built-in "echo" task; the PPO family samples prompts from
``PromptRows`` (the dataset's rows read when taken), the offline loops read their rows whole and
tokenise them into right-padded batches with response-only labels.

    PPO family  {"prompt": ..., other columns for the reward}       (--prompt_column names it)
    SFT         {"prompt": ..., "response": ...}
    pairs       {"prompt": ..., "chosen": ..., "rejected": ...}     (reward model and DPO)
"""

import random
import string
from dataclasses import dataclass, field

import torch

from fastppo import packing
from fastppo.trainer import tiny
from fastppo.trainer.errors import UsageError
from fastppo.trainer.sources import Source, open_dataset


def is_messages(value) -> bool:
    """A conversational prompt: a non-empty list of ``{"role", "content"}`` dicts."""
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value)
    )


def _as_source(source: str | Source) -> Source:
    return source if isinstance(source, Source) else Source(str(source))


def _check_prompt_column(dataset, source: Source, column: str) -> None:
    if column not in dataset.column_names:
        raise UsageError(
            f"{source.arg}: {source.value} has no column {column!r} (its columns: "
            f"{', '.join(dataset.column_names)}); pass --prompt_column"
        )


def _row_problem(row: dict, fields: tuple[str, ...], prompt_column: str = "prompt") -> str | None:
    """What is wrong with a row read for ``fields``: the prompt must be text or chat messages, the
    other fields text (None: nothing)."""
    missing = [
        k for k in fields if (row.get(k) is None if k == "prompt" else not isinstance(row.get(k), str))
    ]
    if missing:
        return f"missing or non-text fields {[prompt_column if k == 'prompt' else k for k in missing]}"
    if "prompt" in fields and not (isinstance(row["prompt"], str) or is_messages(row["prompt"])):
        return (
            f"its {prompt_column!r} is neither text nor a list of chat messages ({{'role', 'content'}} dicts)"
        )
    return None


def read_rows(
    source: str | Source, fields: tuple[str, ...], keep_all: bool = False, prompt_column: str = "prompt"
) -> list[dict]:
    """Rows of a data source (``sources.Source``, or a file path), read whole, keeping ``fields``
    (``keep_all``: every column); the ``prompt_column``'s value is the row's ``prompt``. A source
    that cannot be read, a row without one of ``fields`` or with a non-text value there (a prompt may
    also be a list of chat messages) is a ``UsageError`` naming the source and the row (its line, for
    JSON lines)."""
    source = _as_source(source)
    dataset = open_dataset(source)
    if "prompt" in fields:
        _check_prompt_column(dataset, source, prompt_column)
    wanted = [prompt_column if k == "prompt" else k for k in fields]
    names = dataset.column_names if keep_all else [k for k in wanted if k in dataset.column_names]
    rows = []
    for index, row in enumerate(dataset.select_columns(names).to_list()):
        if prompt_column != "prompt" and prompt_column in row:
            row["prompt"] = row.pop(prompt_column)
        problem = _row_problem(row, fields, prompt_column)
        if problem:
            raise UsageError(f"{source.value}: row {source.row_number(index)}: {problem}")
        rows.append(row if keep_all else {k: row[k] for k in fields})
    return rows


@dataclass
class PromptRows:
    """The PPO family's data in memory: each row's prompt (text, or a list of chat messages), and
    every other column of the rows, row-aligned (a row without a column others have holds None
    there), for the reward."""

    prompts: list  # (N,) str or list[dict]
    columns: dict[str, list] = field(default_factory=dict)  # each (N,)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "PromptRows":
        names = list(dict.fromkeys(k for row in rows for k in row if k != "prompt"))
        return cls([row["prompt"] for row in rows], {k: [row.get(k) for row in rows] for k in names})

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def column_names(self) -> list[str]:
        """The columns beside the prompt, which the reward may take."""
        return list(self.columns)

    def take(self, index: list[int]) -> tuple[list, dict[str, list]]:
        """The prompts and columns of the rows ``index``, in that order."""
        return [self.prompts[i] for i in index], {k: [v[i] for i in index] for k, v in self.columns.items()}


class DatasetPromptRows:
    """``PromptRows`` over a ``datasets.Dataset`` (memory-mapped Arrow): ``take`` reads only the rows
    it is asked for, so a dataset larger than memory samples as a list does."""

    def __init__(self, dataset, prompt_column: str = "prompt"):
        self.dataset = dataset
        self.prompt_column = prompt_column

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def column_names(self) -> list[str]:
        """The columns beside the prompt, which the reward may take; ``take`` reads their values."""
        return [c for c in self.dataset.column_names if c != self.prompt_column]

    def take(self, index: list[int]) -> tuple[list, dict[str, list]]:
        """The prompts (K,) and the other columns (each (K,)) of the rows ``index``, in that order."""
        batch = self.dataset[list(index)]
        return batch.pop(self.prompt_column), batch


def _first_bad_prompt(dataset, column: str, batch_size: int = 10_000) -> tuple[int, str] | None:
    """(index, problem) of the first row whose prompt is neither text nor chat messages, read a
    batch at a time: text columns by their Arrow null count, others row by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.select_columns([column])
    if pa.types.is_string(values.data.column(0).type) or pa.types.is_large_string(values.data.column(0).type):
        offset = 0
        for batch in values.with_format("arrow").iter(batch_size=batch_size):
            first = pc.index(pc.is_null(batch.column(0)), True).as_py()
            if first >= 0:
                return offset + first, f"missing or non-text fields [{column!r}]"
            offset += batch.num_rows
        return None
    for offset, batch in enumerate(values.iter(batch_size=batch_size)):
        for i, prompt in enumerate(batch[column]):
            problem = _row_problem({"prompt": prompt}, ("prompt",), column)
            if problem:
                return offset * batch_size + i, problem
    return None


def read_prompt_rows(source: str | Source, prompt_column: str = "prompt") -> DatasetPromptRows:
    """A prompt source's rows, left in its ``datasets.Dataset``: its ``prompt_column`` holds each
    row's prompt (every row's is checked here, a batch at a time), the other columns go to the
    reward."""
    source = _as_source(source)
    dataset = open_dataset(source)
    _check_prompt_column(dataset, source, prompt_column)
    bad = _first_bad_prompt(dataset, prompt_column)
    if bad is not None:
        raise UsageError(f"{source.value}: row {source.row_number(bad[0])}: {bad[1]}")
    return DatasetPromptRows(dataset, prompt_column)


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


def apply_template(tokenizer, prompt: str | list[dict]) -> str:
    """A prompt as the model reads it: chat messages through the tokenizer's chat template (with the
    assistant's turn opened); text inside a user turn of the template when the tokenizer has one,
    as it is otherwise."""
    template = getattr(tokenizer, "chat_template", None)
    if is_messages(prompt):
        if not template:
            raise UsageError(_no_template(tokenizer))
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    if template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    return prompt


def _no_template(tokenizer, arg: str = "the model") -> str:
    name = getattr(tokenizer, "name_or_path", "")
    who = f"{name}'s tokenizer" if name else "the built-in tiny model's tokenizer"
    return (
        f"{arg}: {who} has no chat template, and the prompts are chat messages; "
        "use text prompts or a model with a chat template"
    )


def check_chat_template(tokenizer, prompts: list, arg: str) -> None:
    """At set-up, on the first rows' prompts: chat messages need a tokenizer with a chat template
    (a ``UsageError`` naming ``arg``, the model's flag, otherwise)."""
    if not getattr(tokenizer, "chat_template", None) and any(is_messages(p) for p in prompts):
        raise UsageError(_no_template(tokenizer, arg))


def encode(tokenizer, prompts: list, responses: list[str]) -> dict:
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
