"""Reward functions as users write them: called as TRL calls them (prompts, completions and every
other column of the rows, aligned with the responses), or with (prompts, responses) alone, told
apart by the signature; what they return is checked, and a module is found in the current folder
or by its file path."""

import json
import math
import sys

import numpy as np
import processes
import pytest
import torch

from fastppo.trainer import ppo, rewards, rollout, tiny
from fastppo.trainer.config import PPOConfig
from fastppo.trainer.errors import UsageError
from fastppo.trainer.rewards import Reward, RewardError
from fastppo.trainer.sampling import HFSampler, SamplingSettings

CPU = torch.device("cpu")
COLUMNS = {"answer": ["1", "2"], "completion_ids": [[5, 1], [6, 1]]}


def pair(prompts, responses):
    return [1.0] * len(responses)


def trl_style(prompts, completions, **kwargs):
    return [float(a) for a in kwargs["answer"]]


def named(prompts, completions, answer):
    return [float(a) for a in answer]


def keyword_only(prompts, completions, *, completion_ids):
    return [float(len(ids)) for ids in completion_ids]


@pytest.mark.parametrize(
    "fn, columns, positional_only",
    [(pair, (), True), (trl_style, None, False), (named, ("answer",), False),
     (keyword_only, ("completion_ids",), False), (lambda p, r: [0.0] * len(r), (), True)],
)  # fmt: skip
def test_the_signature_says_how_a_reward_is_called(fn, columns, positional_only):
    reward = Reward.of(fn)
    assert (reward.columns, reward.positional_only) == (columns, positional_only)
    scores = reward(["a:", "b:"], ["x", "y"], COLUMNS)
    assert len(scores.values) == 2 and scores.invalid == 0


def test_columns_reach_the_reward_aligned_with_the_responses():
    assert Reward.of(trl_style)(["a:", "b:"], ["x", "y"], COLUMNS).values == [1.0, 2.0]
    assert Reward.of(named)(["a:", "b:"], ["x", "y"], COLUMNS).values == [1.0, 2.0]
    assert Reward.of(keyword_only)(["a:", "b:"], ["x", "y"], COLUMNS).values == [2.0, 2.0]


def test_a_column_the_rows_lack_is_one_line():
    def wants(prompts, completions, solution):
        return [0.0] * len(completions)

    with pytest.raises(
        RewardError,
        match=r"takes the column 'solution', which the data rows lack \(they have \['answer', 'compl",
    ):
        Reward.of(wants, "mine:wants")(["a:", "b:"], ["x", "y"], COLUMNS)


@pytest.mark.parametrize(
    "returned, values, invalid",
    [([1, 2.5], [1.0, 2.5], 0), ((None, 3), [0.0, 3.0], 1), ([math.nan, math.inf], [0.0, 0.0], 2),
     (np.array([0.5, 1.5], dtype=np.float32), [0.5, 1.5], 0), (torch.tensor([2.0, math.nan]), [2.0, 0.0], 1)],
)  # fmt: skip
def test_scores_none_and_nan_count_and_score_zero(returned, values, invalid):
    got = rewards.checked_scores("r", returned, 2)
    assert got.values == values and got.invalid == invalid


@pytest.mark.parametrize(
    "returned, message",
    [([1.0], "reward r returned 1 scores for 2 responses"),
     (3.0, "reward r returned float, not a list of 2 scores"),
     (["good", 1.0], "reward r returned 'good' for response 0, not a number")],
)  # fmt: skip
def test_a_bad_return_is_one_line_naming_the_reward(returned, message):
    with pytest.raises(RewardError, match=message):
        rewards.checked_scores("r", returned, 2)


def test_a_reward_that_raises_is_one_line():
    def broken(prompts, responses):
        raise KeyError("answer")

    with pytest.raises(RewardError, match=r"reward mine:broken raised KeyError: 'answer'"):
        Reward.of(broken, "mine:broken")(["a:"], ["x"], {})


def test_a_module_in_the_current_folder_and_a_file_path(tmp_path, monkeypatch):
    """As `python script.py` finds modules: the current folder, after the installed packages."""
    (tmp_path / "myreward_here.py").write_text(
        "def score(prompts, responses):\n    return [0.25] * len(responses)\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rewards_file.py").write_text(
        "def score(prompts, completions, **kw):\n    return [0.5] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert rewards.load_reward("myreward_here:score", None)(["a:"], ["x"], {}).values == [0.25]
    assert rewards.load_reward("sub/rewards_file.py:score", None)(["a:"], ["x"], {}).values == [0.5]
    assert rewards.load_reward(str(tmp_path / "sub" / "rewards_file.py") + ":score", None).columns is None
    with pytest.raises(UsageError, match="reward: no such file: nothere.py"):
        rewards.load_reward("nothere.py:score", None)
    with pytest.raises(UsageError, match="reward: module 'myreward_here' has no 'missing'"):
        rewards.load_reward("myreward_here:missing", None)


def test_every_response_gets_its_own_rows_answer(tmp_path):
    """A JSONL of prompt/answer rows (and a column of numbers): collect calls the reward with each
    response's own row, repeated over its group in group order, and the response token ids."""
    rows = [
        {"prompt": p, "answer": p.rstrip(":")[::-1], "n": i}
        for i, p in enumerate(tiny.synthetic_prompts(6, 3))
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ppo.load_prompts(PPOConfig(prompts=str(tmp_path / "rows.jsonl"), output_dir=str(tmp_path / "o")))
    assert len(data) == 6 and data.column_names == ["answer", "n"]
    assert data.take(range(6)) == ([r["prompt"] for r in rows],
                                   {"answer": [r["answer"] for r in rows], "n": list(range(6))})  # fmt: skip
    seen = {}

    def record(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, **columns)
        return [0.0] * len(completions)

    tokenizer = tiny.build_tokenizer()
    policy = tiny.build_policy(tokenizer, seed=0)
    index = [4, 1, 2]
    prompts, columns = data.take(index)
    batch = rollout.collect(
        policy, policy, None, HFSampler(policy, tokenizer), tokenizer, prompts, Reward.of(record), CPU,
        group_size=2, settings=SamplingSettings(6, 1.0), padding_free=False, columns=columns,
    )  # fmt: skip
    assert seen["prompts"] == [rows[i]["prompt"] for i in index for _ in range(2)]
    assert seen["answer"] == [rows[i]["answer"] for i in index for _ in range(2)]
    assert seen["n"] == [i for i in index for _ in range(2)]
    lengths = batch.response_mask.sum(1).tolist()
    responses = batch.sequences[:, -batch.response_mask.shape[1] :].tolist()
    assert seen["completion_ids"] == [row[:n] for row, n in zip(responses, lengths, strict=True)]
    assert seen["completions"] == tokenizer.batch_decode(seen["completion_ids"], skip_special_tokens=True)


RECORDER = """
import json, os

def score(prompts, completions, answer, completion_ids):
    with open(os.environ["RECORD_TO"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "answer": answer, "ids": completion_ids}) + "\\n")
    return [None if i % 5 == 0 else float(a == c[:3]) for i, (a, c) in enumerate(zip(answer, completions))]
"""


@pytest.mark.usefixtures("loop_backend")
def test_a_run_feeds_each_response_its_rows_answer(tmp_path, monkeypatch):
    """`train grpo` on prompt/answer rows with a reward module given by its path: over 3 iterations
    every response's answer is its own row's, the group's members together; the Nones of every
    fifth response score 0 and are counted in ``reward_invalid``."""
    rows = [{"prompt": p, "answer": p[:3]} for p in tiny.synthetic_prompts(40, 4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "recorder.py").write_text(RECORDER)
    monkeypatch.setenv("RECORD_TO", str(tmp_path / "seen.jsonl"))
    cfg = PPOConfig(algo="grpo", group_size=4, batch_size=16, minibatch_size=8, iterations=3,
                    prompts=str(tmp_path / "rows.jsonl"), reward=str(tmp_path / "recorder.py") + ":score",
                    output_dir=str(tmp_path / "run"))  # fmt: skip
    history = ppo.train(cfg, log=lambda *_: None)
    answer_of = {r["prompt"]: r["answer"] for r in rows}
    calls = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(calls) == 3
    for call in calls:
        assert len(call["prompts"]) == 16 and call["answer"] == [answer_of[p] for p in call["prompts"]]
        groups = [call["prompts"][i : i + 4] for i in range(0, 16, 4)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 4
        assert all(1 <= len(ids) <= cfg.max_new_tokens for ids in call["ids"])
    assert [h["reward_invalid"] for h in history] == [4, 4, 4]  # responses 0, 5, 10, 15


def test_a_bad_reward_stops_the_command_in_one_line(tmp_path):
    """As a user meets it: `fastppo train grpo --reward bad.py:short` (a file in the current folder)
    stops at the first iteration with one line naming the reward, exit 2, no traceback."""
    (tmp_path / "bad.py").write_text("def short(prompts, completions, **kw):\n    return [1.0] * 15\n")
    proc = processes.run(
        [*processes.CLI, "train", "grpo", "--reward", "bad.py:short", "--iterations", "2",
         "--batch_size", "16", "--minibatch_size", "8", "--output_dir", str(tmp_path / "run"),
         "--report_to", "none"],
        tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "fastppo train grpo: reward bad.py:short returned 15 scores for 16 responses"
    )
