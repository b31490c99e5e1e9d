"""Several rewards at once (``--reward a,b`` or ``--reward a --reward b``, ``--reward_weights``): the
score is their weighted sum, each one is logged apart (``reward/<name>/mean|std|invalid``) in
training and reported by ``fastppo eval``; what a reward gets wrong is one line naming it."""

import json
import math

import pytest
from huggingface_hub import constants

from fastppo import cli
from fastppo.trainer import evaluate, ppo, rewards, tiny
from fastppo.trainer.config import PPOConfig
from fastppo.trainer.errors import UsageError
from fastppo.trainer.evaluate import EvalConfig
from fastppo.trainer.rewards import Reward, Rewards

REWARDS = """
import math

def length(prompts, completions):
    return [len(c) / 8 for c in completions]

def vowels(prompts, completions, **columns):
    return [sum(ch in "aeiou" for ch in c) for c in completions]

def holes(prompts, completions):  # every third response has no score
    return [None if i % 3 == 0 else 1.0 for i in range(len(completions))]

def nans(prompts, completions):
    return [math.nan if i % 4 == 1 else 0.5 for i in range(len(completions))]

def short(prompts, completions):
    return [1.0] * (len(completions) - 1)

def boom(prompts, completions):
    raise KeyError("answer")
"""


FAST = ["--iterations", "1", "--batch_size", "16", "--minibatch_size", "8"]


def fails(capsys, *argv) -> str:
    """The one line ``fastppo`` prints for a mistake (exit status 2 asserted), beside the progress
    bar of a run that had started (tqdm's, on stderr too)."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith(f"{argv[1]}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny policies, "a" and "b", saved with their tokenizer."""
    folder = tmp_path_factory.mktemp("models")
    tokenizer = tiny.build_tokenizer()
    for name, seed in (("a", 0), ("b", 1)):
        tiny.build_policy(tokenizer, seed).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return folder


@pytest.fixture
def reward_file(tmp_path, monkeypatch):
    """``rw.py`` in the current folder (a tmp folder), as a user's ``--reward rw.py:fn`` finds it."""
    (tmp_path / "rw.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_total_is_the_weighted_sum_of_the_parts():
    both = Rewards([Reward.of(lambda p, c: [1.0, 2.0], "a"), Reward.of(lambda p, c: [None, 4.0], "b")],
                   [0.5, -2.0], ["a", "b"])  # fmt: skip
    got = both(["x", "y"], ["r", "s"], {"completion_ids": [[1], [2]]})
    assert got.values == [0.5, 1.0 - 8.0] and got.invalid == 1
    assert {n: (p.values, p.invalid) for n, p in got.parts.items()} == {
        "a": ([1.0, 2.0], 0),
        "b": ([0.0, 4.0], 1),
    }


def test_specs_names_and_weights(tmp_path):
    specs = rewards.parse_reward_specs(" math, format ,rw.py:length,math", "1, 0.5,-1,2e-1")
    assert [(s.spec, s.name, s.weight) for s in specs] == [
        ("math", "math", 1.0), ("format", "format", 0.5), ("rw.py:length", "rw.py:length", -1.0),
        ("math", "math#2", 0.2),
    ]  # fmt: skip
    assert [s.weight for s in rewards.parse_reward_specs("echo,exact", None)] == [1.0, 1.0]
    assert rewards.metric_name(f"{tmp_path}/sub/rw.py:score") == "rw.py:score"
    assert rewards.metric_name(str(tmp_path)) == tmp_path.name  # a model folder: its name


@pytest.mark.parametrize(
    "reward, weights, message",
    [("math,format", "1", "reward_weights: 1 weights (1) for 2 rewards (math, format); give one per reward"),
     ("math", "1,2", "reward_weights: 2 weights (1,2) for 1 rewards (math); give one per reward"),
     ("math,format", "1,x", "reward_weights: 'x' in '1,x' is not a number"),
     ("math,format", "1,nan", "reward_weights: 'nan' in '1,nan' is not a finite number"),
     ("math,,format", None, "reward: an empty entry in 'math,,format'; comma-separated rewards expected"),
     ("mod:", None, "reward: 'mod:' is not module:function (or file.py:function)")],
)  # fmt: skip
def test_bad_reward_fields_fail_when_the_config_is_built(reward, weights, message, tmp_path, models):
    with pytest.raises(UsageError) as training:
        PPOConfig(reward=reward, reward_weights=weights, output_dir=str(tmp_path))
    with pytest.raises(UsageError) as evaluation:
        EvalConfig(policy=str(models / "a"), reward=reward, reward_weights=weights)
    assert str(training.value) == str(evaluation.value) == message


def test_an_unknown_name_lists_the_built_ins(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no request to the hub for "maths"
    built_ins = r"the built-in rewards are echo, math, exact, format \(did you mean math\?\)$"
    with pytest.raises(UsageError, match=r"^reward: 'maths' is neither .*" + built_ins):
        PPOConfig(reward="maths", output_dir=str(tmp_path))
    with pytest.raises(UsageError, match="reward_batch_size must be > 0, got 0"):
        PPOConfig(reward_batch_size=0, output_dir=str(tmp_path))


@pytest.mark.usefixtures("loop_backend")
def test_a_run_logs_each_reward_and_their_weighted_sum(reward_file):
    """GRPO with two module rewards weighted 1 and 0.5 and a third with holes weighted -0.25: every
    iteration's logged ``reward`` is the weighted sum of the logged means; the holes are counted
    per reward and in ``reward_invalid``."""
    cfg = PPOConfig(algo="grpo", group_size=4, batch_size=12, minibatch_size=12, iterations=3,
                    reward="rw.py:length,rw.py:vowels,rw.py:holes", reward_weights="1,0.5,-0.25",
                    output_dir=str(reward_file / "run"), report_to="none")  # fmt: skip
    history = ppo.train(cfg, log=lambda *_: None)
    logged = [json.loads(line) for line in (reward_file / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == len(logged) == 3
    for record in logged:
        parts = {n: record[f"reward/rw.py:{n}/mean"] for n in ("length", "vowels", "holes")}
        assert record["reward"] == pytest.approx(
            parts["length"] + 0.5 * parts["vowels"] - 0.25 * parts["holes"]
        )
        assert parts["holes"] == pytest.approx(8 / 12)  # 4 of 12 responses left None: 0
        assert record["reward/rw.py:holes/invalid"] == 4 and record["reward_invalid"] == 4
        assert record["reward/rw.py:length/invalid"] == record["reward/rw.py:vowels/invalid"] == 0
        assert all(math.isfinite(record[f"reward/rw.py:{n}/std"]) for n in parts)


def test_repeated_reward_flags_and_config_lists_are_one_comma_list(tmp_path):
    argv = ["--reward", "math", "--output_dir", str(tmp_path), "--reward=format", "--reward", "exact",
            "--reward_weights", "1,0.1,2"]  # fmt: skip
    cfg = cli.parse_train_config("grpo", argv)
    assert (cfg.reward, cfg.reward_weights) == ("math,format,exact", "1,0.1,2")
    (tmp_path / "run.yaml").write_text(
        f"reward: [math, format]\nreward_weights: [1, 0.5]\noutput_dir: {tmp_path}\n"
    )
    cfg = cli.parse_train_config("grpo", [str(tmp_path / "run.yaml")])
    assert (cfg.reward, cfg.reward_weights) == ("math,format", "1,0.5")
    assert cli.merge_repeated(["--output_dir", "reward", "--reward", "a", "--lr", "1", "--reward", "b"]) == [
        "--output_dir", "reward", "--reward=a,b", "--lr", "1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [(["--reward", "echo", "--reward", "echo", "--reward_weights", "1"],
      "reward_weights: 1 weights (1) for 2 rewards (echo, echo); give one per reward"),
     (["--reward", "format", "--format_regex", "(<think>"],
      "format_regex: '(<think>' is not a valid regular expression "
      "(missing ), unterminated subpattern at position 0)"),
     (["--reward", "echo", "--reward", "math"],
      "reward math takes the column 'answer', which the data rows lack (they have ['completion_ids'])"),
     (["--reward", "echo", "--reward", "rw.py:short"],
      "reward rw.py:short returned 15 scores for 16 responses"),
     (["--reward", "rw.py:boom", "--reward", "echo"], "reward rw.py:boom raised KeyError: 'answer'")],
)  # fmt: skip
@pytest.mark.usefixtures("loop_backend")
def test_a_bad_reward_among_several_is_one_line(args, message, reward_file, capsys):
    err = fails(
        capsys, "train", "grpo", *args, *FAST, "--output_dir", str(reward_file / "run"), "--report_to", "none"
    )
    assert err == f"fastppo train grpo: {message}"


@pytest.mark.usefixtures("loop_backend")
def test_none_and_nan_score_zero_and_are_counted_per_reward_through_the_cli(reward_file, capsys):
    argv = ["train", "grpo", "--reward", "rw.py:holes", "--reward", "rw.py:nans", "--reward_weights", "2,1",
            "--iterations", "2", "--batch_size", "16", "--minibatch_size", "8",
            "--output_dir", str(reward_file / "run"), "--report_to", "none"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    for record in map(json.loads, (reward_file / "run" / "metrics.jsonl").read_text().splitlines()):
        assert record["reward/rw.py:holes/invalid"] == 6  # responses 0, 3, ..., 15
        assert record["reward/rw.py:nans/invalid"] == 4  # responses 1, 5, 9, 13
        assert record["reward_invalid"] == 10
        assert record["reward/rw.py:holes/mean"] == pytest.approx(10 / 16)
        assert record["reward/rw.py:nans/mean"] == pytest.approx(0.5 * 12 / 16)
        assert record["reward"] == pytest.approx(2 * 10 / 16 + 0.5 * 12 / 16)


def test_eval_reports_each_rewards_mean(reward_file, models):
    """``fastppo eval`` with two rewards: each one's mean beside the weighted total, for A, B and A − B."""
    cfg = EvalConfig(policy=str(models / "a"), baseline=str(models / "b"), n_prompts=8, device="cpu",
                     reward="echo,rw.py:length", reward_weights="1,2", plot="none")  # fmt: skip
    result = evaluate.evaluate(cfg)
    for model in ("policy", "baseline"):
        s = result[model]
        assert s["reward"] == pytest.approx(s["reward/echo"] + 2 * s["reward/rw.py:length"])
    diff = result["difference"]["reward/rw.py:length"]
    assert diff == pytest.approx(
        result["policy"]["reward/rw.py:length"] - result["baseline"]["reward/rw.py:length"]
    )
    table = evaluate.format_table(result)
    assert "  reward/echo" in table and "  reward/rw.py:length" in table
