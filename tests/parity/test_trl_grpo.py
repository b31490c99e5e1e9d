"""Short TRL 1.16.0 trainer runs on CPU, each twice: as shipped and with
``fastppo.integrations.trl.patch()``; the logged losses must agree.

- GRPOTrainer and DPOTrainer score completions through TRL's fused LM head
  (``trl.kernels.ChunkedLogProbFunction``: hidden states and the lm_head weight, no logits).
  Patched, ``fastppo.linear_logprobs`` computes them (the test counts its calls); its tiles and
  TRL's fold the vocabulary in another order, so per-token log-probs differ by fp32 rounding.
- A2POTrainer (GRPO's on-policy sibling: sampled completions, a Python reward, a reference model)
  computes every sequence log-prob with ``selective_log_softmax``; TPOTrainer (offline preferences)
  with ``selective_log_softmax_and_entropy(..., row_mask=completion_mask)``. Patched, fastppo computes
  them. TRL sums ``logit − logsumexp(row)`` over the whole row, fastppo folds the row in vocabulary
  tiles (online max and sum, times 1/T), so per-token log-probs differ by a few fp32 units (~1e-7
  relative), the losses (squares and log-sigmoids of 4-8-token sums) by ~1e-6 relative after two
  optimizer steps. The tolerance, rtol 1e-4 (about a thousand fp32 units), stays far below what a
  wrong mask, temperature or off-by-one token would move (1e-2 and more).
"""

import pytest
import torch

import fastppo

pytest.importorskip("trl")

from fastppo.integrations import trl as adapter  # noqa: E402
from fastppo.trainer.tiny import build_policy, build_tokenizer, synthetic_prompts  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are importing from 'trl.experimental'",
    "ignore:.*deprecated.*:FutureWarning",
)

STEPS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"  # generation pads prompts on the left
    build_policy(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def fastppo_calls(monkeypatch):
    """The calls into fastppo.token_logprobs and fastppo.linear_logprobs, by name (every adapter
    function goes through one of them)."""
    calls = []
    for name in ("token_logprobs", "linear_logprobs"):
        real = getattr(fastppo, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(fastppo, name, counting)
    return calls


def _first_letter_reward(prompts, completions, **kwargs):
    """1 when the completion starts with a letter of the prompt (A2PO wants a binary reward)."""
    return [float(bool(c) and c[0] in p.rstrip(":")) for p, c in zip(prompts, completions, strict=True)]


def _common(tmp_path):
    return dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        seed=0,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )


def _losses(trainer):
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    return losses


def _train_online(trainer_class, args, model_dir):
    """The losses of an online trainer (GRPO, A2PO) on 8 synthetic prompts with the rule reward."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    trainer = trainer_class(
        model=model_dir,
        reward_funcs=_first_letter_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": synthetic_prompts(8, seed=0)}),
        processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"),
    )
    return _losses(trainer)


def _grpo(model_dir, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    # SGD, not Adam: Adam's first steps move every weight by ±lr whatever the size of its gradient,
    # so components whose gradient is at rounding level would take either sign on the two runs.
    args = GRPOConfig(
        **_common(tmp_path),
        num_generations=4,
        max_completion_length=4,
        beta=0.04,
        learning_rate=1e-1,
        optim="sgd",
    )
    return _train_online(GRPOTrainer, args, model_dir)


def _a2po(model_dir, tmp_path):
    from trl.experimental.a2po import A2POConfig, A2POTrainer

    args = A2POConfig(
        **_common(tmp_path),
        max_completion_length=4,
        num_value_samples=2,
        filter_all_incorrect=False,
        beta2=1.0,  # weights the log-prob term of the loss fully (default 1e-3)
        learning_rate=1e-2,
    )
    return _train_online(A2POTrainer, args, model_dir)


def _tpo(model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.tpo import TPOConfig, TPOTrainer

    prompts = synthetic_prompts(8, seed=0)
    data = {
        "prompt": prompts,
        "chosen": [p[:2] for p in prompts],
        "rejected": ["zz"] * len(prompts),
        "reference": [p[:3] for p in prompts],
    }
    trainer = TPOTrainer(
        model=model_dir,
        args=TPOConfig(**_common(tmp_path), learning_rate=1e-2),
        train_dataset=Dataset.from_dict(data),
        processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"),
    )
    return _losses(trainer)


def _dpo(model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    prompts = synthetic_prompts(8, seed=0)
    data = {"prompt": prompts, "chosen": [p[:2] for p in prompts], "rejected": ["zz"] * len(prompts)}
    trainer = DPOTrainer(
        model=model_dir,
        args=DPOConfig(**_common(tmp_path), learning_rate=1e-1, optim="sgd"),  # SGD: see _grpo
        train_dataset=Dataset.from_dict(data),
        processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"),
    )
    return _losses(trainer)


@pytest.mark.parametrize(
    "run, through",
    [
        (_grpo, "linear_logprobs"),
        (_dpo, "linear_logprobs"),
        (_a2po, "token_logprobs"),
        (_tpo, "token_logprobs"),
    ],
    ids=["grpo", "dpo", "a2po", "tpo"],
)
def test_trainer_losses_match_with_fastppo(run, through, model_dir, tmp_path, fastppo_calls):
    base = run(model_dir, tmp_path / "base")
    assert not fastppo_calls
    with adapter.patched():
        patched = run(model_dir, tmp_path / "patched")
    assert fastppo_calls.count(through) >= STEPS  # the loss of every step went through fastppo
    torch.testing.assert_close(torch.tensor(patched), torch.tensor(base), rtol=1e-4, atol=1e-6)
    assert any(loss != 0 for loss in base)
