"""The loops' model passes: padding-free (packed) equals padded in PPO and in the offline loops'
sequence log-probs, dropout is off, attention implementation choice."""

import pytest
import torch

from fastppo.trainer import data, offline, ppo, runtime
from fastppo.trainer.config import PPOConfig

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("loop_backend")


def rollout(cfg, models, prompts, seed=1):
    tokenizer, policy, reference, critic = models
    torch.manual_seed(seed)
    return ppo.rollout(cfg, policy, reference, critic, tokenizer, prompts, ppo.tiny.echo_reward, 0.05, CPU)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_equals_padded(attention, tmp_path):
    """Packed rows (position ids restarting per sequence, no mask) give the rollout and the
    micro-batch losses and gradients of the padded batch: prompts are left-padded and responses
    end at different lengths, so both kinds of padding are exercised."""
    cfg = PPOConfig(output_dir=str(tmp_path), max_new_tokens=6, temperature=0.7)
    models = ppo.load_models(cfg, attention)
    prompts = ppo.tiny.synthetic_prompts(12, seed=3)
    padded = rollout(ppo.replace(cfg, padding_free=False), models, prompts)
    packed = rollout(ppo.replace(cfg, padding_free=True), models, prompts)
    assert padded["prompt_len"] == packed["prompt_len"]
    lengths = padded["response_mask"].sum(1)
    assert lengths.min() < lengths.max(), "responses of one length would not test the padding"
    for key in ("sequences", "response_mask", "scores"):
        assert torch.equal(padded[key], packed[key]), key
    for key in ("old_logp", "ref_logp", "values", "advantages", "returns", "kl"):
        torch.testing.assert_close(packed[key], padded[key], atol=2e-5, rtol=1e-5, msg=key)
    assert (packed["old_logp"][~packed["response_mask"]] == 0).all()

    _, policy, _, critic = models
    results = []
    for padding_free in (False, True):
        policy.zero_grad()
        critic.zero_grad()
        idx = torch.tensor([0, 3, 4, 7, 11])
        loss, *_ = ppo.micro_batch_losses(
            ppo.replace(cfg, padding_free=padding_free), policy, critic, padded, idx, 40, 0.05, CPU
        )
        loss.backward()
        grads = [p.grad.clone() for p in (*policy.parameters(), *critic.parameters())]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_dropout_is_off_in_trained_models(tmp_path):
    """The tiny critic's value head has dropout 0.1 in its config: in training mode the values
    (and a policy's log-probs) must still equal the rollout's, or the first PPO ratio is not 1."""
    cfg = PPOConfig(output_dir=str(tmp_path))
    _, policy, _, critic = ppo.load_models(cfg, "sdpa")
    ids = torch.randint(4, 30, (3, 9))
    for model in (policy, critic):
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        with torch.no_grad():
            train_out = model.train()(input_ids=ids).logits
            eval_out = model.eval()(input_ids=ids).logits
        assert torch.equal(train_out, eval_out)


def test_padding_free_training_run(tmp_path):
    cfg = PPOConfig(
        iterations=3, batch_size=16, minibatch_size=8, padding_free=True, output_dir=str(tmp_path)
    )
    history = ppo.train(cfg, log=lambda *_: None)
    assert [h["iteration"] for h in history] == [1, 2, 3]
    assert all(h["policy_loss"] != 0 and h["value_loss"] > 0 for h in history)
    assert (tmp_path / "checkpoint-3" / "policy" / "model.safetensors").exists()


def test_attention_implementation():
    assert runtime.attention_implementation("auto", CPU) == "sdpa"  # flash-attn needs a GPU
    assert runtime.attention_implementation("eager", CPU) == "eager"
    cfg = PPOConfig(attention="eager")
    _, policy, _, critic = ppo.load_models(cfg, "eager")
    assert policy.config._attn_implementation == critic.config._attn_implementation == "eager"


def test_sequence_logprobs_padding_free_equals_padded():
    """SFT and DPO score rows by summed response log-probs: packed rows give the padded sums and
    gradients (rows of different lengths, so right padding is exercised)."""
    tokenizer = ppo.tiny.build_tokenizer()
    model = ppo.tiny.build_policy(tokenizer, seed=0)
    prompts, responses = ["abc:", "qwertyu:", "x:"], ["aab", "w", "xxxx"]
    batch = data.encode(tokenizer, prompts, responses)
    assert batch["attention_mask"].sum(1).unique().numel() == 3
    assert model.config._attn_implementation == "sdpa"  # so the default is the padded pass
    sums, grads = [], []
    for padding_free in (None, True):
        model.zero_grad()
        logp = offline.sequence_logprobs(model, batch, padding_free=padding_free)
        logp.sum().backward()
        sums.append(logp.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(sums[1], sums[0], atol=1e-5, rtol=1e-6)
    assert (sums[0] < 0).all() and sums[0].shape == (3,)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
