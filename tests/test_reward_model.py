"""Reward models as users run them (``--reward <folder>``): the model reads its own tokenizer's ids
and its own chat template, scores do not depend on the micro-batching, the model and its inputs go
to the training device, a folder without a tokenizer falls back to the policy's, and a PPO-family
run trains against a reward model that ``fastppo train rm`` saved."""

import json
import logging
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from fastppo.trainer import checkpoint, data, evaluate, offline, ppo, rewards, tiny
from fastppo.trainer.config import PPOConfig, RMConfig
from fastppo.trainer.errors import UsageError
from fastppo.trainer.evaluate import EvalConfig
from fastppo.trainer.reward_model import RewardModel

CPU = torch.device("cpu")
PROMPTS = ["abc:", "qfkd:", "zy:", "mnopq:", "a:"]
RESPONSES = ["abca", "q", "zzzzyyyzz", "m on", "aaaaaaaaaaaaaa"]  # 5 lengths, a space
#: A template whose every special token is in the text: rendered exactly, tokenized once.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
)


def reward_tokenizer(template: str | None = None) -> PreTrainedTokenizerFast:
    """A character tokenizer unlike the policy's: other special tokens first, the letters in reverse
    order, role tokens, and a post-processor that adds <s> ... </s> (which a chat template already
    holds, so encoding must not add them again)."""
    roles = ["<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *roles, *reversed(tiny.CHARS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=roles,
    )  # fmt: skip
    tokenizer.chat_template = template
    return tokenizer


def save_reward_model(folder, tokenizer, *, seed: int = 0, with_tokenizer: bool = True) -> str:
    """A tiny randomly initialised one-label classifier (Qwen2) saved as a reward model folder,
    without a pad token id in its config."""
    config = tiny.model_config(tokenizer)
    config.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = None  # as many checkpoints leave it: the loader sets the tokenizer's
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return str(folder)


class Recorder:
    """A forward pre-hook keeping the ``input_ids`` and ``attention_mask`` of every forward."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[dict] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask")})

    def rows(self) -> list[list[int]]:
        """Every row fed to the model, its padding dropped, in the order fed."""
        return [
            ids[mask.bool()].tolist()
            for c in self.calls
            for ids, mask in zip(c["input_ids"], c["attention_mask"], strict=True)
        ]


def test_the_model_reads_its_own_tokenizers_ids(tmp_path):
    policy = tiny.build_tokenizer()
    own = reward_tokenizer()
    folder = save_reward_model(tmp_path / "rm", own)
    reward = rewards.load_reward(folder, policy, device=CPU, batch_size=8)
    rm = reward.fn
    seen = Recorder(rm.model)
    assert len(reward(PROMPTS[:2], RESPONSES[:2], {}).values) == 2
    expected = [
        own(p + r).input_ids for p, r in zip(PROMPTS[:2], RESPONSES[:2], strict=True)
    ]  # <s> text </s>
    assert sorted(seen.rows()) == sorted(expected)
    assert expected[0][0] == own.bos_token_id and expected[0][-1] == own.eos_token_id
    assert all(
        row != policy(p + r).input_ids for row, p, r in zip(expected, PROMPTS[:2], RESPONSES[:2], strict=True)
    )


def test_without_a_template_the_layout_is_the_one_train_rm_trains_on(tmp_path):
    """BOS + prompt + response + EOS, as ``data.encode`` builds the rows of ``fastppo train rm``."""
    tokenizer = tiny.build_tokenizer()
    rm = RewardModel.load(save_reward_model(tmp_path / "rm", tokenizer), None, CPU, 4)
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        assert rm.render(prompt, response) == prompt + response
        assert (
            rm.encode(prompt, response)
            == data.encode(tokenizer, [prompt], [response])["input_ids"][0].tolist()
        )


def test_a_chat_template_renders_the_prompt_messages_and_the_response_as_the_assistants_turn(tmp_path):
    own = reward_tokenizer(TEMPLATE)
    rm = RewardModel.load(save_reward_model(tmp_path / "rm", own), tiny.build_tokenizer(), CPU, 4)
    assert rm.render("ab:", "xy") == "<s><|user|>ab:</s><|assistant|>xy</s>"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab:"}]
    text = "<s><|system|>be brief</s><|user|>ab:</s><|assistant|>xy</s>"
    assert rm.render(messages, "xy") == text
    seen = Recorder(rm.model)
    rm([messages], ["xy"])
    ids = own(text, add_special_tokens=False).input_ids
    assert seen.rows() == [ids]
    assert ids.count(own.bos_token_id) == 1 and ids[-1] == own.eos_token_id  # no second <s> ... </s>


def test_batched_scores_equal_one_at_a_time_in_order(tmp_path):
    """batch_size 2 over 5 responses of 5 lengths (right-padded, the longest together) against one
    forward per response. In fp32 the two differ only by the summation order of differently shaped
    matmuls (~1e-7 relative per operation, over 2 layers): rtol 1e-5, atol 1e-6 is far above that
    and far below the spread of the scores, so a score read at a pad, or a misplaced one, fails."""
    folder = save_reward_model(tmp_path / "rm", reward_tokenizer(), seed=3)
    rm = RewardModel.load(folder, None, CPU, 2)
    seen = Recorder(rm.model)
    batched = rm(PROMPTS, RESPONSES)
    assert [c["input_ids"].shape[0] for c in seen.calls] == [2, 2, 1]
    assert any((c["attention_mask"] == 0).any() for c in seen.calls)  # padding was exercised
    alone = [rm([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=1e-5, atol=1e-6)
    assert min(abs(a - b) for i, a in enumerate(alone) for b in alone[i + 1 :]) > 1e-4
    assert all(isinstance(x, float) for x in batched)


class Stop(Exception):
    """Raised by the hook below once it has seen where the inputs are."""


def test_the_model_and_its_inputs_go_to_the_training_device(tmp_path):
    """A device other than the CPU, on a CPU-only machine: "meta" (tensors without data). Loading
    moves every weight there, frozen and in eval mode; a forward sends the batch there (the hook
    stops it before transformers asks a meta tensor for a value)."""
    meta = torch.device("meta")
    rm = RewardModel.load(save_reward_model(tmp_path / "rm", tiny.build_tokenizer()), None, meta, 4)
    assert {p.device for p in rm.model.parameters()} == {meta}
    assert not any(p.requires_grad for p in rm.model.parameters()) and not rm.model.training
    devices = []

    def where(module, args, kwargs):
        devices.extend(kwargs[k].device for k in ("input_ids", "attention_mask"))
        raise Stop

    rm.model.register_forward_pre_hook(where, with_kwargs=True)
    with pytest.raises(Stop):
        rm(PROMPTS[:2], RESPONSES[:2])
    assert devices == [meta, meta]


def test_a_folder_without_a_tokenizer_reads_with_the_policys(tmp_path):
    policy = tiny.build_tokenizer()
    folder = save_reward_model(tmp_path / "rm", policy, with_tokenizer=False)
    with pytest.warns(UserWarning, match=r"holds no tokenizer; reading it with the policy's"):
        rm = RewardModel.load(folder, policy, CPU, 4)
    seen = Recorder(rm.model)
    rm(["abc:"], ["ab"])
    assert seen.rows() == [[policy.bos_token_id, *policy("abc:ab").input_ids, policy.eos_token_id]]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_reward_model_that_does_not_load_is_one_line_naming_it(tmp_path):
    tokenizer = tiny.build_tokenizer()
    lm = tmp_path / "lm"  # a causal LM: no score head in its checkpoint
    AutoModelForCausalLM.from_config(tiny.model_config(tokenizer)).save_pretrained(lm)
    (tmp_path / "empty").mkdir()
    cases = {str(lm): "has no trained score head", str(tmp_path / "empty"): "not a sequence-classification",
             "./not-here": "no such folder"}  # fmt: skip
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers.modeling_utils").addHandler(handler)
    try:
        for spec, what in cases.items():
            with pytest.raises(UsageError) as exc:
                rewards.load_reward(spec, tokenizer, device=CPU, batch_size=4)
            assert one_line(exc).startswith(f"reward {spec}: ") and what in str(exc.value)
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(handler)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]  # the one line, not its table too


@pytest.mark.usefixtures("loop_backend")
def test_grpo_runs_against_a_reward_model_train_rm_saved(tmp_path):
    """`fastppo train rm` on the echo task's pairs, then `train grpo --reward <its reward_model/>`:
    the reward model ranks held-out pairs as it learned to, through the scoring path, and the
    run logs finite rewards every iteration."""
    rm_cfg = RMConfig(output_dir=str(tmp_path / "rm"), epochs=1, n_synthetic=512, eval_fraction=0.0)
    offline.train_reward_model(rm_cfg, log=lambda *_: None)
    folder = str(checkpoint.latest_checkpoint(tmp_path / "rm") / "reward_model")
    pairs = data.synthetic_pairs(64, seed=99)
    rm = RewardModel.load(folder, None, CPU, 16)
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = rm(prompts, [p["chosen"] for p in pairs]), rm(prompts, [p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs) > 0.75  # chance: 0.5
    cfg = PPOConfig(algo="grpo", group_size=4, batch_size=16, minibatch_size=8, iterations=3, reward=folder,
                    reward_batch_size=5, output_dir=str(tmp_path / "run"))  # fmt: skip
    history = ppo.train(cfg, log=lambda *_: None)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in logged] == [1, 2, 3] and len(history) == 3
    assert all(math.isfinite(h["reward"]) and h["reward_invalid"] == 0 for h in logged)
    assert len({round(h["reward"], 6) for h in logged}) > 1  # scores of the sampled responses, not a constant


def test_prompts_that_are_not_text_or_messages_are_one_line(tmp_path):
    folder = save_reward_model(tmp_path / "rm", tiny.build_tokenizer())
    rm = RewardModel.load(folder, None, CPU, 4)
    with pytest.raises(UsageError) as exc:
        rm([[{"content": "no role"}]], ["x"])
    assert one_line(exc).startswith(f"reward {folder}: a prompt is a string or a list of")


def test_chat_prompts_without_a_template_read_the_messages_contents(tmp_path):
    rm = RewardModel.load(save_reward_model(tmp_path / "rm", tiny.build_tokenizer()), None, CPU, 4)
    messages = [{"role": "system", "content": "ab"}, {"role": "user", "content": "cd:"}]
    with pytest.warns(UserWarning, match="no chat template"):
        assert rm.render(messages, "xy") == "ab\n\ncd:xy"


@pytest.mark.usefixtures("loop_backend")
def test_fastppo_eval_scores_with_the_reward_model_on_its_device(tmp_path, monkeypatch):
    """`fastppo eval --reward <folder>`: the reward model is loaded on eval's device with
    --reward_batch_size, and each response's score is the one the reward model gives it on its own
    (its own tokenizer, not the policy's)."""
    tokenizer = tiny.build_tokenizer()
    policy = tmp_path / "policy"
    tiny.build_policy(tokenizer, seed=1).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    folder = save_reward_model(tmp_path / "rm", reward_tokenizer(), seed=2)
    loads = []
    real_load = RewardModel.load.__func__

    def load(cls, spec, policy_tokenizer, device, batch_size):
        loads.append((spec, device, batch_size))
        return real_load(cls, spec, policy_tokenizer, device, batch_size)

    monkeypatch.setattr(RewardModel, "load", classmethod(load))
    cfg = EvalConfig(policy=str(policy), reward=folder, reward_batch_size=3, n_prompts=10, batch_size=5,
                     device="cpu", plot="none")  # fmt: skip
    prompts, runs = evaluate.sample(cfg)
    assert loads == [(folder, CPU, 3)]
    rm = real_load(RewardModel, folder, None, CPU, 1)
    alone = [rm([p], [t])[0] for p, t in zip(prompts, runs["policy"].texts, strict=True)]
    assert len(set(runs["policy"].texts)) > 1
    torch.testing.assert_close(torch.tensor(runs["policy"].scores), torch.tensor(alone), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft
def test_a_lora_reward_model_folder_is_merged_into_its_base(tmp_path):
    """What `fastppo train rm --lora_r N` saves: an adapter (and the trained score head) over the
    base model it names; it scores as the peft model does."""
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny.build_tokenizer()
    base = save_reward_model(tmp_path / "base", tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    )
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.5)  # an adapter and a head that change the scores
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    rm = RewardModel.load(str(tmp_path / "adapter"), None, CPU, 4)
    batch = data.encode(tokenizer, PROMPTS, RESPONSES)
    with torch.no_grad():
        expected = peft_model.eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits[:, 0]
    base_scores = RewardModel.load(base, None, CPU, 4)(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(rm(PROMPTS, RESPONSES)), expected, rtol=1e-5, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(base_scores, expected.tolist(), strict=True)) > 1e-3
