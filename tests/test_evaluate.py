"""``fastppo eval --policy A --baseline B``: the paired comparison (difference, standard error, win
rate), its table, JSON and plot, prompts from JSONL or Parquet, and one-line errors naming the
argument. Tiny untrained models saved in a checkpoint's layout keep it fast; one test trains two
PPO iterations to evaluate a real checkpoint against its start."""

import json
import math
import statistics

import pytest
import torch

from fastppo import cli
from fastppo.trainer import evaluate, tiny
from fastppo.trainer.config import PPOConfig
from fastppo.trainer.evaluate import EvalConfig
from fastppo.trainer.ppo import train

pytestmark = pytest.mark.usefixtures("loop_backend")

SMALL = dict(n_prompts=24, batch_size=8)  # three generation batches


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def mute_policy(tokenizer) -> torch.nn.Module:
    """A tiny policy that answers every prompt with EOS alone (an empty response, echo reward 0):
    attention and MLP outputs zeroed, so the last hidden state is the normalised input embedding,
    dominated by a component every embedding shares and that EOS's has twice as large."""
    model = tiny.build_policy(tokenizer, seed=5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding = model.get_input_embeddings().weight  # (V, H), tied to the lm_head
        embedding[:, 0] = 100.0
        embedding[tokenizer.eos_token_id, 0] = 200.0
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A checkpoint's layout (run/policy, run/reference) of two differently seeded tiny policies, and
    a mute model outside it."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = tiny.build_tokenizer()
    return {
        "policy": save(tiny.build_policy(tokenizer, seed=1), tokenizer, root / "run" / "policy"),
        "reference": save(tiny.build_policy(tokenizer, seed=0), tokenizer, root / "run" / "reference"),
        "mute": save(mute_policy(tokenizer), tokenizer, root / "mute"),
    }


def test_model_against_itself_is_exactly_even(folders):
    cfg = EvalConfig(policy=folders["reference"], baseline=folders["reference"], **SMALL)
    assert cfg.reference == folders["reference"]  # found beside the policy
    result = evaluate.evaluate(cfg)
    assert set(result) == {"policy", "baseline", "difference", "win_rate"}
    assert result["policy"] == result["baseline"]  # the same seed: the same samples
    assert result["win_rate"] == 0.5
    assert all(value == 0.0 for value in result["difference"].values())
    assert result["policy"]["kl_to_reference"] == 0.0 and result["policy"]["prompts"] == 24


def test_paired_arithmetic_from_per_prompt_scores(folders):
    cfg = EvalConfig(policy=folders["policy"], baseline=folders["reference"], **SMALL)
    prompts, runs = evaluate.sample(cfg)
    a, b = runs["policy"].scores, runs["baseline"].scores
    assert len(prompts) == len(a) == len(b) == 24
    assert a != b  # different models: different responses
    wins = sum(x > y for x, y in zip(a, b, strict=True)) + 0.5 * sum(
        x == y for x, y in zip(a, b, strict=True)
    )
    result = evaluate.summarize(runs)
    assert result["win_rate"] == pytest.approx(wins / 24)
    assert result["difference"]["reward"] == pytest.approx(statistics.mean(a) - statistics.mean(b))
    paired = [x - y for x, y in zip(a, b, strict=True)]
    assert result["difference"]["reward_stderr"] == pytest.approx(statistics.stdev(paired) / math.sqrt(24))
    assert result["policy"]["reward_stderr"] == pytest.approx(statistics.stdev(a) / math.sqrt(24))
    lengths = runs["policy"].lengths
    assert result["policy"]["response_length"] == pytest.approx(sum(lengths) / 24)
    for key in ("response_length", "distinct_1", "kl_to_reference"):
        assert result["difference"][key] == pytest.approx(result["policy"][key] - result["baseline"][key])
    assert abs(result["baseline"]["kl_to_reference"]) < 1e-6  # the reference against itself
    assert evaluate.evaluate(cfg) == result  # sampling is seeded: the same numbers again


def test_difference_has_the_sign_of_the_better_model(folders):
    """B answers with EOS only: reward 0 and one token on every prompt, so A − B is A's own mean
    and A wins wherever it scores above 0."""
    cfg = EvalConfig(policy=folders["policy"], baseline=folders["mute"], reference=folders["reference"],
                     **SMALL)  # fmt: skip
    _, runs = evaluate.sample(cfg)
    assert runs["baseline"].scores == [0.0] * 24 and runs["baseline"].lengths == [1] * 24
    result = evaluate.summarize(runs)
    a = runs["policy"].scores
    assert result["difference"]["reward"] == pytest.approx(statistics.mean(a)) and statistics.mean(a) > 0
    assert result["win_rate"] == pytest.approx((sum(x > 0 for x in a) + 0.5 * a.count(0.0)) / 24)
    assert result["difference"]["response_length"] == pytest.approx(result["policy"]["response_length"] - 1)
    assert result["baseline"]["kl_to_reference"] > 1  # all its mass on EOS, the reference's ~1/32


def test_cli_trained_checkpoint_against_its_start(tmp_path, capsys):
    """Two PPO iterations, then `fastppo eval` of the checkpoint's policy/ against its reference/:
    the table, the JSON on stdout and in --output, the plot beside it."""
    small = dict(batch_size=16, minibatch_size=8, max_new_tokens=8)
    train(PPOConfig(iterations=2, output_dir=str(tmp_path / "run"), seed=3, **small), log=lambda *_: None)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    argv = ["eval", "--policy", str(checkpoint / "policy"), "--baseline", str(checkpoint / "reference"),
            "--n_prompts", "16", "--output", str(tmp_path / "out" / "eval.json")]  # fmt: skip
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert json.loads(stdout[stdout.index("{") :]) == written
    assert written["baseline"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert 0 <= written["win_rate"] <= 1 and written["policy"]["prompts"] == 16
    table = stdout[: stdout.index("{")]
    assert "sampling seed 1234 for both" in table and f"reference: {checkpoint / 'reference'}" in table
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert rows["metric"].split() == ["metric", "A", "B", "A", "−", "B"]
    assert f"{written['win_rate']:.3f}" in rows["win rate of A over B"]
    assert (
        f"{written['difference']['reward']:+.3f} ± {written['difference']['reward_stderr']:.3f}"
        in (rows["mean reward (± s.e.)"])
    )
    assert (tmp_path / "out" / "eval.png").stat().st_size > 1000  # --plot defaults to beside --output


def test_single_model_keeps_its_keys_and_plot_flag(folders, tmp_path):
    png = tmp_path / "one.png"
    result = evaluate.evaluate(EvalConfig(policy=folders["policy"], plot=str(png), **SMALL))
    old_keys = {"prompts", "reward", "kl_to_reference", "response_length", "distinct_1", "distinct_2",
                "repeated_3gram_rate"}  # fmt: skip
    assert old_keys <= set(result) and "difference" not in result
    assert png.stat().st_size > 1000
    table = evaluate.format_table(result).splitlines()
    assert table[0].split() == ["metric", "A"]
    assert len(table) == 2 + len(evaluate.METRICS) + 1  # and reward/echo, the one reward's mean
    assert EvalConfig(policy=folders["policy"], output=str(tmp_path / "r.json"), plot="none").plot is None


def test_prompts_from_parquet_and_jsonl(folders, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": p, "id": i} for i, p in enumerate(tiny.synthetic_prompts(12, 7))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = [
        evaluate.evaluate(EvalConfig(policy=folders["policy"], prompts=str(tmp_path / name), n_prompts=10))
        for name in ("p.parquet", "p.jsonl")
    ]
    assert results[0] == results[1] and results[0]["prompts"] == 10


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--baseline", "{tmp}/nowhere"], "baseline: no such folder"),
        (["--baseline", "{tmp}"], "baseline: {tmp} holds no Hugging Face model"),
        (["--reference", "{tmp}/nowhere"], "reference: no such folder"),
        (["--prompts", "{tmp}/p.parquet"], "prompts: no such file"),
        (["--prompts", "{tmp}/bad.jsonl"], "bad.jsonl: row 2: missing or non-text fields ['prompt']"),
        (["--n_prompts", "0"], "n_prompts must be > 0"),
        (["--basline", "x"], "unknown flag --basline"),
    ],
)
def test_bad_input_is_one_line_naming_the_argument(folders, tmp_path, capsys, flags, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "abc:"}\n{"text": "abc:"}\n')
    argv = ["eval", "--policy", folders["policy"], *[f.format(tmp=tmp_path) for f in flags]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastppo eval: ")
    assert message.format(tmp=tmp_path) in err


def test_eval_reads_any_source_training_reads(tmp_path):
    """`fastppo eval --data` takes a save_to_disk folder with --data_split and --prompt_column, as
    training does: the first n_prompts rows of that split, each with its other columns."""
    import datasets

    rows = [{"question": p, "answer": p[0]} for p in tiny.synthetic_prompts(6, 2)]
    splits = {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "saved")
    tokenizer = tiny.build_tokenizer()
    policy = save(tiny.build_policy(tokenizer, seed=0), tokenizer, tmp_path / "policy")
    cfg = EvalConfig(policy=policy, prompts=str(tmp_path / "saved"), data_split="test",
                     prompt_column="question", n_prompts=3)  # fmt: skip
    loaded = evaluate.load_prompts(cfg)
    assert loaded.prompts == [r["question"] for r in rows[2:5]]
    assert loaded.columns == {"answer": [r["answer"] for r in rows[2:5]]}
