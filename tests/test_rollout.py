"""The rollout and the one model-to-log-probs path: padding-free (packed) equals padded, the
stand-in lm_head equals full logits + token_logprobs, dropout is off, attention choice, and the
offline loops' sequence log-probs."""

import numpy as np
import pytest
import torch

import fastppo
from fastppo.trainer import algorithms, data, layout, offline, passes, ppo, rollout, runtime, sampling, tiny
from fastppo.trainer.config import PPOConfig

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("loop_backend")


def generate(model, tokenizer, prompts, device, *, max_new_tokens, temperature, top_p=1.0, logprobs=False):
    """The hf engine on ``model``: one response per prompt."""
    settings = sampling.SamplingSettings(max_new_tokens, temperature, top_p, logprobs)
    return sampling.sample(sampling.HFSampler(model, tokenizer), tokenizer, prompts, settings, device)


def collect(cfg, models, prompts, seed=1):
    tokenizer, policy, reference, critic = models
    torch.manual_seed(seed)
    settings = sampling.SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    return rollout.collect(
        policy, reference, critic, sampling.HFSampler(policy, tokenizer), tokenizer, prompts,
        tiny.echo_reward, CPU, group_size=cfg.group_size, settings=settings, padding_free=cfg.padding_free,
    )  # fmt: skip


def test_token_logprobs_of_equals_full_logits():
    """The stand-in lm_head reads only the response positions; the log-probs and entropies are
    those of fastppo.token_logprobs over the whole logits, packed or padded, fused
    (linear_logprobs) or not, and so are the gradients; the plain path (models whose forward
    cannot take the stand-in) gives them too."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_policy(tokenizer, seed=0)
    torch.manual_seed(1)
    prompts = tiny.synthetic_prompts(12, seed=3)
    samples = generate(model, tokenizer, prompts, CPU, max_new_tokens=6, temperature=0.7)
    mask, P = samples.response_mask, samples.sequences.shape[1] - samples.response_mask.shape[1]
    assert mask.sum(1).unique().numel() > 1  # responses of different lengths: padding is exercised
    full = model(input_ids=samples.sequences, attention_mask=samples.attention_mask,
                 position_ids=layout.position_ids(samples.attention_mask)).logits[:, P - 1 : -1]  # fmt: skip
    labels = torch.where(mask, samples.sequences[:, P:], -100)
    want_logp, want_entropy = fastppo.token_logprobs(full, labels, temperature=0.7, return_entropy=True)
    (want_logp[mask].sum() + want_entropy[mask].sum()).backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    assert passes.head_runs_last(model)
    for padding_free, fused in ((False, True), (True, True), (False, False), (True, False)):
        model.zero_grad()
        tokens = samples.tokens(padding_free)
        logp, entropy = passes.token_logprobs_of(model, tokens, temperature=0.7, entropy=True, fused=fused)
        torch.testing.assert_close(logp, want_logp[mask], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, want_entropy[mask], atol=2e-5, rtol=1e-5)
        (logp.sum() + entropy.sum()).backward()
        for got, want in zip((p.grad for p in model.parameters()), want_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    next_labels = torch.nn.functional.pad(labels, (P - 1, 1), value=-100)
    plain = layout.TokenBatch.build(
        samples.sequences, samples.attention_mask, next_labels, padding_free=False
    )
    logits = plain.select(model(**plain.inputs).logits)
    plain_logp = fastppo.token_logprobs(logits, plain.labels, temperature=0.7)
    torch.testing.assert_close(plain_logp, want_logp[mask])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_equals_padded(attention, tmp_path):
    """Packed rows (position ids restarting per sequence, no mask) give the rollout and the
    micro-batch losses and gradients of the padded batch: prompts are left-padded and responses
    end at different lengths, so both kinds of padding are exercised."""
    cfg = PPOConfig(output_dir=str(tmp_path), max_new_tokens=6, temperature=0.7)
    models = ppo.load_models(cfg, attention)
    prompts = tiny.synthetic_prompts(12, seed=3)
    batches = {}
    for padding_free in (False, True):
        c = ppo.replace(cfg, padding_free=padding_free)
        got = collect(c, models, prompts)
        batches[padding_free] = ppo.with_advantages(c, got, ppo.kept_for_update(c, got), kl_coef=0.05)
    padded, packed = batches[False], batches[True]
    lengths = padded.response_mask.sum(1)
    assert lengths.min() < lengths.max(), "responses of one length would not test the padding"
    for key in ("sequences", "response_mask", "scores"):
        assert torch.equal(getattr(padded, key), getattr(packed, key)), key
    for key in ("old_logp", "ref_logp", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(packed, key), getattr(padded, key), atol=2e-5, rtol=1e-5, msg=key)
    n = int(lengths.sum())  # one layout: the response tokens row by row, bounded by cu_seqlens
    assert all(getattr(packed, key).shape == (n,) for key in ("old_logp", "ref_logp", "values", "advantages"))
    assert torch.equal(packed.cu_seqlens, torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int())

    _, policy, _, critic = models
    results = []
    for padding_free in (False, True):
        policy.zero_grad()
        critic.zero_grad()
        micro = padded.select(torch.tensor([0, 3, 4, 7, 11]))
        loss, *_ = ppo.micro_batch_losses(
            ppo.replace(cfg, padding_free=padding_free), policy, critic, micro, kl_coef=0.05, normaliser=40,
            n_tokens=40, device=CPU,
        )  # fmt: skip
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
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_policy(tokenizer, seed=0)
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


def test_sampler_logprobs_are_what_generation_drew_with():
    """generate(logprobs=True) records, per sampled token, the log-prob under the distribution
    it was drawn from: the trainer's log-prob at the same temperature (up to the KV cache's rounding)
    with top_p 1, the nucleus-renormalised one (higher) with top_p < 1. Recording changes no sample."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_policy(tokenizer, seed=0)
    prompts = tiny.synthetic_prompts(10, seed=4)
    for top_p in (1.0, 0.8):
        torch.manual_seed(2)
        options = dict(max_new_tokens=7, temperature=0.7, top_p=top_p)
        samples = generate(model, tokenizer, prompts, CPU, logprobs=True, **options)
        torch.manual_seed(2)
        plain = generate(model, tokenizer, prompts, CPU, **options)
        assert torch.equal(samples.sequences, plain.sequences) and plain.sampler_logp is None
        mask = samples.response_mask
        assert samples.sampler_logp.shape == mask.shape and (samples.sampler_logp[~mask] == 0).all()
        with torch.no_grad():
            trainer, _ = passes.token_logprobs_of(model, samples.tokens(False), temperature=0.7)
        sampler = samples.sampler_logp[mask]
        assert torch.isfinite(sampler).all() and (sampler <= 0).all()
        if top_p == 1.0:
            torch.testing.assert_close(sampler, trainer, atol=1e-5, rtol=1e-5)
        else:
            assert (sampler >= trainer - 1e-5).all() and (sampler > trainer + 1e-3).any()


def packed_and_padded_inputs(seed=0):
    """AdvantageInputs of one batch in both layouts: padded (B, R) with its mask, and packed (n,)
    with cu_seqlens (responses of lengths 5, 3, 0, 4, 5, 2: an empty one too)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 0, 4, 5, 2])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    values, kl = torch.randn(6, 5, generator=g) * mask, torch.rand(6, 5, generator=g) * 0.1 * mask
    common = dict(scores=torch.rand(6, generator=g), group_ids=torch.arange(6) // 3, kl_coef=0.2, gamma=0.9,
                  lam=0.8)  # fmt: skip
    padded = algorithms.AdvantageInputs(mask=mask, values=values, kl=kl, **common)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    packed = algorithms.AdvantageInputs(
        mask=torch.ones(int(lengths.sum()), dtype=torch.bool), values=values[mask], kl=kl[mask],
        cu_seqlens=cu, **common,
    )  # fmt: skip
    return padded, packed


@pytest.mark.parametrize("name", sorted(algorithms.ADVANTAGES))
def test_estimators_read_packed_rows(name):
    """Each estimator on the packed rows (the trainer's layout) gives the padded result's response
    tokens, whitened or not, with whitening statistics from kept responses; an update that keeps
    none leaves them unwhitened (and reads nothing to decide so)."""
    padded, packed = packed_and_padded_inputs()
    estimator = algorithms.ADVANTAGES[name]
    nothing = torch.zeros(6, dtype=torch.bool)
    for keep in (None, torch.tensor([True, False, True, True, False, True]), nothing):
        for whiten in (False, True):
            want, want_returns = algorithms.advantages(estimator, padded, whiten=whiten, keep=keep)
            got, returns = algorithms.advantages(estimator, packed, whiten=whiten, keep=keep)
            torch.testing.assert_close(got, want[padded.mask], atol=1e-6, rtol=1e-5)
            assert (returns is None) == (want_returns is None)
            if returns is not None:
                torch.testing.assert_close(returns, want_returns[padded.mask], atol=1e-6, rtol=1e-5)
    plain, _ = estimator.compute(packed)
    none_kept, _ = algorithms.advantages(estimator, packed, whiten=True, keep=nothing)
    torch.testing.assert_close(none_kept, plain)


def synthetic_rollout(B=7, P=3, R=5, seed=0) -> rollout.Rollout:
    """A rollout of left-padded prompts and responses of random lengths (some empty)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.arange(P)[None, :] >= torch.randint(0, P, (B,), generator=g)[:, None]
    lengths = torch.randint(0, R + 1, (B,), generator=g)
    response = torch.arange(R)[None, :] < lengths[:, None]
    attention = torch.cat([prompt, response], 1)
    padded = {k: torch.randn(B, R, generator=g) for k in ("old_logp", "ref_logp", "values", "advantages")}
    return rollout.Rollout(
        sequences=torch.randint(4, 30, (B, P + R), generator=g), attention_mask=attention,
        response_mask=response, truncated=torch.rand(B, generator=g) < 0.5, group_ids=torch.arange(B) // 2,
        scores=torch.rand(B, generator=g), host_attention=attention.numpy(),
        cu_seqlens=torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
        reward_parts={"r": torch.rand(B, generator=g)}, **{k: v[response] for k, v in padded.items()},
    )  # fmt: skip


def test_select_takes_rows_and_their_tokens():
    """select, by host indices (any order, repeats), a host bool mask or a device tensor, keeps each
    row's fields and its packed tokens, with new bounds; its TokenBatch labels are its responses."""
    full = synthetic_rollout()
    lengths = full.cu_seqlens.diff()
    assert lengths.min() == 0 and lengths.max() > 1
    rows = [5, 0, 3, 3, 6]
    for idx in (rows, torch.tensor(rows), torch.isin(torch.arange(7), torch.tensor(rows)).numpy()):
        want = sorted(set(rows)) if isinstance(idx, np.ndarray) else rows  # a bool mask: in order, once
        part = full.select(idx)
        assert torch.equal(part.sequences, full.sequences[want])
        assert torch.equal(part.truncated, full.truncated[want])
        assert torch.equal(part.reward_parts["r"], full.reward_parts["r"][want])
        assert (part.host_attention == full.host_attention[want]).all()
        assert torch.equal(part.cu_seqlens, torch.nn.functional.pad(lengths[want].cumsum(0), (1, 0)).int())
        for key in ("old_logp", "ref_logp", "values", "advantages"):
            by_row = getattr(full, key).split(lengths.tolist())
            assert torch.equal(getattr(part, key), torch.cat([by_row[i] for i in want])), key
        for padding_free in (False, True):
            tokens = part.tokens(padding_free)
            assert torch.equal(tokens.labels, part.sequences[:, 3:][part.response_mask])
            assert torch.equal(tokens.row_of, torch.arange(len(want)).repeat_interleave(lengths[want]))
