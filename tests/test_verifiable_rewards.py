"""The built-in verifiable rewards (``--reward math|exact|format``, fastppo/trainer/verifiable.py) on
answers as real data sets write them: GSM8K solutions ending in ``#### 72``, MATH's ``\\boxed{}``
answers with LaTeX fractions, negative numbers, thousands separators, wrong, unparsable and empty
responses; ``math`` with math-verify and with it hidden (the fallback match). Then a GRPO run with
``--reward math`` that learns a small arithmetic task."""

import json
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from fastppo.trainer import ppo, rewards, tiny, verifiable
from fastppo.trainer.config import DEFAULT_FORMAT_REGEX, PPOConfig
from fastppo.trainer.errors import UsageError
from fastppo.trainer.rewards import RewardError

GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)

#: (response, the row's answer, score of the fallback match, score with math-verify)
MATH_CASES = [
    # GSM8K: a solution against a solution, its #### line, or the bare number
    ("She sold 24 clips in May, so 48 + 24 = 72 in all.\n#### 72", GSM8K_GOLD, 1.0, 1.0),
    ("48 + 24 = 73\n#### 73", GSM8K_GOLD, 0.0, 0.0),
    ("In total she sold 72 clips.", "72", 1.0, 1.0),
    ("The total is $1,234.", "#### 1234", 1.0, 1.0),
    ("It costs 1,234,567 dollars", 1234567, 1.0, 1.0),
    ("#### 1,243", "1234", 0.0, 0.0),
    ("So she has -15 dollars left.", "-15", 1.0, 1.0),
    ("The answer is -7.", "7", 0.0, 0.0),
    ("Subtracting, 10-3 leaves 7", "7", 1.0, 1.0),  # 10-3 is a subtraction, not -3
    ("3.50", "3.5", 1.0, 1.0),
    ("x = 2.5", "5/2", 1.0, 1.0),
    # MATH: \boxed answers, LaTeX fractions, nested braces, text
    ("So the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", 1.0, 1.0),
    ("x = \\boxed{\\dfrac{3}{4}}", "\\boxed{\\frac34}", 1.0, 1.0),
    ("\\boxed{-\\frac{2}{3}}", "-2/3", 1.0, 1.0),
    ("First 5, then \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", 1.0, 1.0),
    ("\\boxed{42 \\text{ apples}}", "42", 1.0, 1.0),
    ("\\boxed{\\text{Monday}}", "monday", 1.0, 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0, 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0, 0.0),
    # equal only symbolically: math-verify's
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 0.0, 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 0.0, 1.0),
    # no answer: 0
    ("I have no idea.", "5", 0.0, 0.0),
    ("", "5", 0.0, 0.0),
    ("So the answer is \\boxed{", "5", 0.0, 0.0),  # never closed
    ("\\boxed{5", "5", 1.0, 1.0),  # never closed: its last number
]


@pytest.mark.parametrize("response, answer, fallback, with_math_verify", MATH_CASES)
def test_math_with_math_verify(response, answer, fallback, with_math_verify):
    assert verifiable.math_verify_available()  # the dev extra installs it (fastppo[math])
    assert verifiable.math_reward(["q"], [response], [answer]) == [with_math_verify]


@pytest.mark.parametrize("response, answer, fallback, with_math_verify", MATH_CASES)
def test_math_without_math_verify(response, answer, fallback, with_math_verify, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    assert not verifiable.math_verify_available()
    assert verifiable.math_reward(["q"], [response], [answer]) == [fallback]


@pytest.mark.parametrize(
    "text, answer",
    [("so \\boxed{\\frac{a}{\\sqrt{b}}} here", "\\frac{a}{\\sqrt{b}}"), ("\\boxed 5$.", "5"),
     ("\\boxed{1} then \\boxed{2}", "2"), ("work\n#### 1,000\n", "1,000"), ("2 and -3.5", "-3.5"),
     ("1/2 of 3/4", "3/4"), ("nothing", None), ("", None)],
)  # fmt: skip
def test_the_final_answer_of_a_response(text, answer):
    assert verifiable.extract_answer(text) == answer


def test_math_needs_the_answer_column_and_counts_rows_without_one():
    math = rewards.load_reward("math", None)
    with pytest.raises(RewardError, match=r"reward math takes the column 'answer', which the data rows lack"):
        math(["1+1="], ["2"], {"completion_ids": [[5]]})
    scores = math(["1+1=", "2+2="], ["2", "4"], {"answer": ["2", None], "completion_ids": [[5], [6]]})
    assert scores.values == [1.0, 0.0] and scores.invalid == 1


@pytest.mark.parametrize(
    "response, answer, score",
    [("Paris.", "paris", 1.0), ("  The   Eiffel\nTower ", "the eiffel tower.", 1.0),
     ("Paris is", "Paris", 0.0), ("", "Paris", 0.0), ("42", 42, 1.0), ("42.0", "42", 0.0)],
)  # fmt: skip
def test_exact(response, answer, score):
    assert verifiable.exact_reward(["q"], [response], [answer]) == [score]
    assert rewards.load_reward("exact", None)(["q"], [response], {"answer": [answer]}).values == [score]


@pytest.mark.parametrize(
    "response, pattern, score",
    [("<think>2+2 is\nfour</think>\n<answer>4</answer>", DEFAULT_FORMAT_REGEX, 1.0),
     ("<think>hm</think>", DEFAULT_FORMAT_REGEX, 0.0), ("<answer>4</answer>", DEFAULT_FORMAT_REGEX, 0.0),
     ("x <think>a</think><answer>4</answer>", DEFAULT_FORMAT_REGEX, 0.0), ("12", r"\d+", 1.0),
     ("12a", r"\d+", 0.0), ("", r"\d*", 1.0)],
)  # fmt: skip
def test_format_matches_the_whole_response(response, pattern, score):
    reward = rewards.load_reward("format", None, format_regex=pattern)
    assert reward(["q"], [response], {}).values == [score]


def test_a_bad_format_regex_fails_when_the_config_is_built(tmp_path):
    with pytest.raises(UsageError, match=r"^format_regex: '\(<think>' is not a valid regular expression \("):
        PPOConfig(reward="format", format_regex="(<think>", output_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------
# A GRPO run with --reward math learns a small arithmetic task.

#: Single-digit sums: "3+4=" → "7" for a, b in 0..4 (answers 0..8, one token each).
SUMS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]


def digit_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in character tokenizer's idea (tiny.build_tokenizer) over digits, '+' and '='."""
    vocab = {token: i for i, token in enumerate(tiny.SPECIAL + list("0123456789+="))}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.mark.usefixtures("loop_backend")
def test_grpo_with_the_math_reward_learns_single_digit_sums(tmp_path):
    """60 GRPO iterations of 8 prompts × 8 one-token answers with ``--reward math`` on a one-layer
    tiny Qwen2: a JSONL of the 25 prompt/answer rows of ``SUMS``, the model and its digit tokenizer
    saved in a folder, as a user's would be.

    A fresh policy spreads its answer over the 16 tokens: about 1/16 correct. A policy that ignores
    the prompt can do no better than always answering 4, right on 5 of the 25 sums (0.2): anything
    well above that needs both operands. Measured over seeds 0-5 with these settings: the first 5
    iterations' mean math reward 0.07-0.08, the last 10's 0.38-0.56 (seed 0: 0.51). The test asks
    for more than 0.3 at the end (the 640 responses' mean has a standard error of about 0.02 at
    0.2), and a gain of more than 0.2 over the start."""
    tokenizer = digit_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny.model_config(tokenizer, layers=1)).save_pretrained(
        tmp_path / "policy"
    )
    tokenizer.save_pretrained(tmp_path / "policy")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SUMS))
    cfg = PPOConfig(algo="grpo", policy=str(tmp_path / "policy"), prompts=str(tmp_path / "rows.jsonl"),
                    reward="math", iterations=60, batch_size=64, minibatch_size=64, max_new_tokens=1,
                    kl_coef=0.0, lr=3e-3, seed=0, output_dir=str(tmp_path / "run"),
                    report_to="none")  # fmt: skip
    history = ppo.train(cfg, log=lambda *_: None)
    first = sum(h["reward/math/mean"] for h in history[:5]) / 5
    last = sum(h["reward/math/mean"] for h in history[-10:]) / 10
    assert last > 0.3 and last > first + 0.2, (first, last)
    assert all(h["reward"] == h["reward/math/mean"] and h["reward/math/invalid"] == 0 for h in history)
