"""``--data`` through the ``datasets`` library: JSONL, JSON, CSV and Parquet files, save_to_disk
folders and dataset ids read from a Hugging Face cache laid out here as the hub lays it out (no
network: offline, as a user without one meets it). Each PPO response is scored with its own row's
columns; chat-message prompts go through the tokenizer's chat template; every mistake is one line."""

import hashlib
import json
import os
import sys

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import run

from fastppo import cli
from fastppo.trainer import data, offline, ppo, tiny
from fastppo.trainer.config import DPOConfig, PPOConfig, SFTConfig
from fastppo.trainer.errors import UsageError
from fastppo.trainer.sampling import HFSampler
from fastppo.trainer.sources import Source

pytestmark = pytest.mark.usefixtures("loop_backend")

SHA = "0123456789abcdef0123456789abcdef01234567"
DATASET_ID = "fastppo-test/rows"
RECORDER = """
import json, os

def record(prompts, completions, answer, **columns):
    with open(os.environ["RECORD_TO"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "answer": answer, "columns": sorted(columns)}) + "\\n")
    return [float(len(c)) for c in completions]
"""
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def quiet(*_):
    pass


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own, offline (HF_HUB_OFFLINE=1 as the libraries
    read it at import); ``datasets``' Arrow cache beside it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path / "hub"


def answer_rows(n: int, seed: int, tag: str = "") -> list[dict]:
    """Distinct prompts of the echo task, each with an answer of its own."""
    return [
        {"prompt": p, "answer": f"{tag}a{i}", "level": i % 3}
        for i, p in enumerate(tiny.synthetic_prompts(n, seed))
    ]


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def hub_dataset(cache, dataset_id: str, files: dict[str, pa.Table]) -> None:
    """``dataset_id`` in the hub cache as ``hf download --repo-type dataset`` leaves it: blobs,
    a snapshot of links to them, refs/main naming the snapshot."""
    repo = cache / f"datasets--{dataset_id.replace('/', '--')}"
    for name, table in files.items():
        blob = repo / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, blob)
        link = repo / "snapshots" / SHA / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)


def write_source(kind: str, tmp_path, cache, rows: list[dict]) -> tuple[str, str]:
    """``rows`` as a source of ``kind``, with decoy rows in another split where there are splits:
    (the --data value, its --data_split)."""
    decoys = answer_rows(len(rows), 99, tag="decoy")
    if kind == "jsonl":
        return write_jsonl(tmp_path / "rows.jsonl", rows), "train"
    if kind == "json":
        (tmp_path / "rows.json").write_text(json.dumps(rows))
        return str(tmp_path / "rows.json"), "train"
    if kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(tmp_path / "rows.csv")
        return str(tmp_path / "rows.csv"), "train"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
        return str(tmp_path / "rows.parquet"), "train"
    if kind == "save_to_disk":
        splits = {"train": datasets.Dataset.from_list(decoys), "test": datasets.Dataset.from_list(rows)}
        datasets.DatasetDict(splits).save_to_disk(tmp_path / "saved")
        return str(tmp_path / "saved"), "test"
    files = {"data/train-00000-of-00001.parquet": pa.Table.from_pylist(decoys),
             "data/test-00000-of-00001.parquet": pa.Table.from_pylist(rows)}  # fmt: skip
    hub_dataset(cache, DATASET_ID, files)
    return DATASET_ID, "test"


READ = """
import json, sys
from fastppo.trainer import data, sources
from fastppo.trainer.errors import UsageError
rows = data.read_prompt_rows(sources.Source(sys.argv[1], "prompts", "test"))
print(json.dumps([len(rows), *rows.take([0, 1])]))
try:
    data.read_prompt_rows(sources.Source(sys.argv[2], "prompts"))
except UsageError as exc:
    print(exc)
"""


def test_a_dataset_id_reads_the_hub_cache_offline(tmp_path):
    """As a user runs it, with HF_HUB_OFFLINE=1 and the cache folders in the environment (the
    libraries read them at import): the id's split comes from the hub cache's snapshot; an id not
    there is one line."""
    rows = answer_rows(4, 1)
    home = tmp_path / "home"
    hub_dataset(home / "hub", DATASET_ID, {"data/test.parquet": pa.Table.from_pylist(rows)})
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_DATASETS_CACHE": str(home / "datasets")}  # fmt: skip
    proc = run(
        [sys.executable, "-c", READ, DATASET_ID, "fastppo-test/absent"], tmp_path, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    read, missing = proc.stdout.strip().splitlines()
    assert json.loads(read) == [
        4,
        [rows[0]["prompt"], rows[1]["prompt"]],
        {"answer": ["a0", "a1"], "level": [0, 1]},
    ]
    assert missing.startswith("prompts: 'fastppo-test/absent' is neither a file, a folder nor a dataset")
    assert f"cache ({home / 'hub'}); offline (HF_HUB_OFFLINE=1)" in missing


CARD = """---
configs:
- config_name: easy
  data_files:
  - split: train
    path: easy/train.parquet
- config_name: hard
  data_files:
  - split: train
    path: hard/train.parquet
---
"""


def test_data_config_picks_a_configuration_of_a_dataset_id(offline_cache):
    """--data_config: the configuration a dataset card lists; one it does not list is one line."""
    easy, hard = answer_rows(4, 1, "easy"), answer_rows(6, 2, "hard")
    hub_dataset(offline_cache, DATASET_ID, {"easy/train.parquet": pa.Table.from_pylist(easy),
                                            "hard/train.parquet": pa.Table.from_pylist(hard)})  # fmt: skip
    (offline_cache / "datasets--fastppo-test--rows" / "snapshots" / SHA / "README.md").write_text(CARD)
    rows = data.read_prompt_rows(Source(DATASET_ID, "prompts", "train", "hard"))
    assert len(rows) == 6 and rows.take([5])[1]["answer"] == ["harda5"]
    with pytest.raises(UsageError) as failed:
        data.read_prompt_rows(Source(DATASET_ID, "prompts", "train", "medium"))
    assert str(failed.value) == (
        f"prompts: {DATASET_ID} has no configuration 'medium' (its configurations: easy, hard); "
        "pass --data_config"
    )


def recorded(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]


def grpo(tmp_path, monkeypatch, **kwargs) -> PPOConfig:
    (tmp_path / "recorder.py").write_text(RECORDER)
    monkeypatch.setenv("RECORD_TO", str(tmp_path / "seen.jsonl"))
    fields = dict(algo="grpo", group_size=4, batch_size=8, minibatch_size=8, iterations=2, max_new_tokens=4,
                  reward=f"{tmp_path / 'recorder.py'}:record", output_dir=str(tmp_path / "run"),
                  report_to="none")  # fmt: skip
    return PPOConfig(**(fields | kwargs))


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "save_to_disk", "dataset_id"])
def test_each_response_gets_its_rows_answer(kind, tmp_path, monkeypatch, offline_cache):
    """Over 2 iterations of GRPO, the reward sees group_size responses of one prompt in a row, each
    with its own row's answer, from every kind of source (the asked split where there are several)."""
    rows = answer_rows(24, 3)
    value, split = write_source(kind, tmp_path, offline_cache, rows)
    ppo.train(grpo(tmp_path, monkeypatch, prompts=value, data_split=split), log=quiet)
    answer_of = {r["prompt"]: r["answer"] for r in rows}
    calls = recorded(tmp_path)
    assert len(calls) == 2
    for call in calls:
        assert len(call["prompts"]) == 8 and call["answer"] == [answer_of[p] for p in call["prompts"]]
        groups = [call["prompts"][i : i + 4] for i in range(0, 8, 4)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 2
        assert call["columns"] == ["completion_ids", "level"]


def test_prompt_column_names_the_prompt(tmp_path, monkeypatch):
    """--prompt_column question: the reward's prompts are the questions, the other columns beside."""
    rows = [{"question": r["prompt"], "answer": r["answer"]} for r in answer_rows(8, 5)]
    value = write_jsonl(tmp_path / "q.jsonl", rows)
    ppo.train(grpo(tmp_path, monkeypatch, prompts=value, prompt_column="question", iterations=1), log=quiet)
    (call,) = recorded(tmp_path)
    answer_of = {r["question"]: r["answer"] for r in rows}
    assert call["answer"] == [answer_of[p] for p in call["prompts"]] and call["columns"] == ["completion_ids"]


def failure(capsys, *argv) -> str:
    capsys.readouterr()  # what writing the data printed
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "{d}/rows.jsonl", "--prompt_column", "question"],
         "prompts: {d}/rows.jsonl has no column 'question' (its columns: prompt, answer, level); "
         "pass --prompt_column"),
        (["--data", "{d}/saved", "--data_split", "valid"],
         "prompts: {d}/saved has no split 'valid' (its splits: train, test); pass --data_split"),
        (["--data", DATASET_ID, "--data_split", "valid"],
         f"prompts: {DATASET_ID} has no split 'valid' (its splits: train, test); pass --data_split"),
        (["--data", "fastppo-test/absent"],
         "prompts: 'fastppo-test/absent' is neither a file, a folder nor a dataset in the local Hugging Face "
         "cache ({d}/hub); offline (HF_HUB_OFFLINE=1), so download it first "
         "(`hf download fastppo-test/absent --repo-type dataset`) or pass a file or folder"),
        (["--data", "{d}/odd.jsonl"],
         "{d}/odd.jsonl: row 3: its 'prompt' is neither text nor a list of chat messages"),
        (["--data", "{d}/gap.jsonl"], "{d}/gap.jsonl: row 4: missing or non-text fields ['prompt']"),
        (["--data", "{d}/empty"], "prompts: {d}/empty holds no dataset"),
        (["--data", "{d}/none.csv"], "prompts: no such file: {d}/none.csv"),
        (["--data", "{d}/blank.jsonl"], "{d}/blank.jsonl: no rows"),
    ],
)  # fmt: skip
def test_a_bad_source_is_one_line(flags, message, tmp_path, offline_cache, capsys):
    write_source("jsonl", tmp_path, offline_cache, answer_rows(8, 1))
    write_source("save_to_disk", tmp_path, offline_cache, answer_rows(8, 1))
    write_source("dataset_id", tmp_path, offline_cache, answer_rows(8, 1))
    (tmp_path / "odd.jsonl").write_text('{"prompt": "ab:"}\n{"prompt": "cd:"}\n{"prompt": {"x": 1}}\n')
    (tmp_path / "gap.jsonl").write_text('{"prompt": "ab:"}\n\n{"prompt": "cd:"}\n{"text": "ef:"}\n')
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "empty").mkdir()
    d = str(tmp_path)
    err = failure(capsys, "train", "grpo", *[f.format(d=d) for f in flags], "--output_dir", f"{d}/run")
    assert err.startswith("fastppo train grpo: ") and message.format(d=d) in err, err


def chat_rows(n: int) -> list[dict]:
    messages = [[{"role": "system", "content": "echo"}, {"role": "user", "content": p}]
                for p in tiny.synthetic_prompts(n, 7)]  # fmt: skip
    return [{"prompt": m, "answer": m[1]["content"][:2]} for m in messages]


def test_chat_messages_go_through_the_chat_template(tmp_path, monkeypatch):
    """Chat-message prompts: the policy reads exactly the template's rendering with the assistant's
    turn opened, and the reward gets the messages as the rows hold them."""
    build = tiny.build_tokenizer

    def with_template():
        tokenizer = build()
        tokenizer.chat_template = TEMPLATE
        return tokenizer

    monkeypatch.setattr(tiny, "build_tokenizer", with_template)
    seen, generate = [], HFSampler.generate

    def recording(self, prompt_ids, *args, **kwargs):
        seen.extend(tiny.build_tokenizer().decode(ids, skip_special_tokens=True) for ids in prompt_ids)
        return generate(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(HFSampler, "generate", recording)
    rows = chat_rows(8)
    value = write_jsonl(tmp_path / "chat.jsonl", rows)
    ppo.train(grpo(tmp_path, monkeypatch, prompts=value, iterations=1), log=quiet)
    (call,) = recorded(tmp_path)
    assert all(p in [r["prompt"] for r in rows] for p in call["prompts"])
    rendered = [f"system: echo user: {m[1]['content']} assistant:" for m in call["prompts"]]
    assert seen == rendered
    assert data.apply_template(with_template(), rows[0]["prompt"]) == rendered_one(rows[0])


def rendered_one(row: dict) -> str:
    return f"system: echo user: {row['prompt'][1]['content']} assistant:"


def test_chat_messages_without_a_template_are_one_line(tmp_path, capsys):
    value = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    err = failure(capsys, "train", "grpo", "--data", value, "--output_dir", str(tmp_path / "run"))
    assert err == (
        "fastppo train grpo: policy: the built-in tiny model's tokenizer has no chat template, and "
        "the prompts are chat messages; use text prompts or a model with a chat template"
    )


def test_prompt_rows_read_only_the_rows_taken(tmp_path):
    """A dataset's rows stay in its memory-mapped Arrow table; take() reads the rows asked for."""
    rows = answer_rows(500, 2)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet")
    prompts = data.read_prompt_rows(Source(str(tmp_path / "big.parquet"), "prompts"))
    assert isinstance(prompts.dataset, datasets.Dataset) and len(prompts) == 500
    assert isinstance(prompts.dataset.data, datasets.table.MemoryMappedTable)
    assert not any(isinstance(v, list) for v in vars(prompts).values())
    taken, columns = prompts.take([7, 3])
    assert taken == [rows[7]["prompt"], rows[3]["prompt"]]
    assert columns == {"answer": ["a7", "a3"], "level": [1, 0]}
    assert prompts.column_names == ["answer", "level"]


def test_sft_from_parquet_and_dpo_from_save_to_disk(tmp_path):
    """The offline loops read every kind of source too: SFT a Parquet file whose prompts sit in
    another column, DPO the split of a save_to_disk folder."""
    sft_rows = [{"question": r["prompt"], "response": r["response"]} for r in data.synthetic_sft(32, 0)]
    pq.write_table(pa.Table.from_pylist(sft_rows), tmp_path / "sft.parquet")
    cfg = SFTConfig(data=str(tmp_path / "sft.parquet"), prompt_column="question", epochs=1, batch_size=8,
                    output_dir=str(tmp_path / "sft"), report_to="none")  # fmt: skip
    assert offline.read_data(cfg, ("prompt", "response"), tiny.build_tokenizer()) == [
        {"prompt": r["question"], "response": r["response"]} for r in sft_rows
    ]
    assert len(offline.train_sft(cfg, log=quiet)) >= 1
    pairs = datasets.Dataset.from_list(data.synthetic_pairs(32, 0))
    datasets.DatasetDict({"train": pairs, "test": pairs.select(range(4))}).save_to_disk(tmp_path / "pairs")
    cfg = DPOConfig(data=str(tmp_path / "pairs"), data_split="train", epochs=1, batch_size=8,
                    output_dir=str(tmp_path / "dpo"), report_to="none")  # fmt: skip
    assert len(offline.read_data(cfg, ("prompt", "chosen", "rejected"), tiny.build_tokenizer())) == 32
    assert len(offline.train_dpo(cfg, log=quiet)) >= 1
    with pytest.raises(UsageError, match=r"pairs has no split 'valid' \(its splits: train, test\)"):
        offline.train_dpo(DPOConfig(data=str(tmp_path / "pairs"), data_split="valid"), log=quiet)
