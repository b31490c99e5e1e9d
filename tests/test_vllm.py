"""The ``vllm`` rollout engine in this process: it follows the trainer through real updates
(greedy responses equal transformers' on the trainer's weights, its log-probs equal the trainer's
fp32 ones), the fingerprint catches a skipped sync and a corrupted tensor, top-p log-probs are the
nucleus-renormalised distribution, LoRA is merged and pushed, and whole runs learn as with ``hf``.

These tests need vLLM (the README's Rollout engines set-up: its own environment, as CI makes it);
without it they are skipped with that reason. One engine serves the in-process tests (it takes
about 20 s to start); whole runs start their own, as a user's would.
"""

import json
import os
import re

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is half the memory

import pytest  # noqa: E402

pytest.importorskip(
    "vllm", reason="vLLM is not installed (README: Rollout engines; CI runs these in .venv-vllm)"
)

import processes  # noqa: E402
import torch  # noqa: E402
from transformers import TopPLogitsWarper  # noqa: E402

from fastppo.trainer import evaluate, lora, passes, tiny  # noqa: E402
from fastppo.trainer.errors import EngineError  # noqa: E402
from fastppo.trainer.sampling import HFSampler, SamplingSettings, sample, vllm_engine, weights  # noqa: E402

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("loop_backend")

#: Engine vs trainer log-probs, both fp32 on CPU: the same model through different kernels (vLLM's
#: oneDNN matmuls and paged attention, transformers' SDPA). Each logit is a sum of 64 products of
#: O(0.1) terms, so each side is within ~64·2⁻²⁴ ≈ 4e-6 of the exact value; 1e-4 bounds their
#: difference with a 10× margin and is 100× below what one update moves (see the test).
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(policy, tokenizer, sampler): the embedded default at vLLM's head size, and an engine built
    from its folder, in step with it."""
    tokenizer = tiny.build_tokenizer()
    policy = tiny.build_policy(tokenizer, seed=0, head_dim=tiny.VLLM_HEAD_DIM)
    folder = tmp_path_factory.mktemp("engine-model")
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    llm = vllm_engine.start_llm(str(folder), gpu=False, seed=0)
    sampler = vllm_engine.VLLMSampler(llm, tokenizer, verify_every=1, sleeps=False)
    sampler.sync(policy)
    yield policy, tokenizer, sampler
    sampler.close()


@pytest.fixture
def in_step(engine):
    """The shared engine, with the policy's weights restored and pushed again after the test."""
    policy, tokenizer, sampler = engine
    saved = {k: v.clone() for k, v in policy.state_dict().items()}
    yield policy, tokenizer, sampler
    policy.load_state_dict(saved)
    sampler.sync(policy)


def draw(sampler, tokenizer, prompts, **settings):
    return sample(sampler, tokenizer, prompts, SamplingSettings(**settings), CPU)


def test_engine_follows_the_trainer_through_updates(in_step):
    """Three real updates (SGD on the mean log-prob of the engine's own samples): after each sync
    the engine's greedy responses equal transformers' generate on the trainer's weights, and the
    log-probs it drew its samples with equal the trainer's fp32 log-probs within LOGPROB_ATOL.
    (The mean, not the sum: at lr 2 the sum's steps moved log-probs by ~400 and collapsed the
    policy to log-probs of exactly 0 by the third, where nothing moves.)"""
    policy, tokenizer, sampler = in_step
    prompts = tiny.synthetic_prompts(16, seed=5)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    greedy_runs = []
    for _ in range(3):
        samples = draw(sampler, tokenizer, prompts, max_new_tokens=8, temperature=1.0, logprobs=True)
        logp, _ = passes.token_logprobs_of(policy, samples.tokens(False), temperature=1.0)
        drawn = samples.sampler_logp[samples.response_mask]
        torch.testing.assert_close(drawn, logp.detach(), atol=LOGPROB_ATOL, rtol=0)
        (-logp.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        moved, _ = passes.token_logprobs_of(policy, samples.tokens(False), temperature=1.0)
        assert (moved.detach() - logp.detach()).abs().max() > 100 * LOGPROB_ATOL  # a real update
        report = sampler.sync(policy)
        assert report.verified and report.tensors == len(policy.state_dict())
        engine = draw(sampler, tokenizer, prompts, max_new_tokens=8, temperature=0.0)
        hf = draw(HFSampler(policy, tokenizer), tokenizer, prompts, max_new_tokens=8, temperature=0.0)
        assert torch.equal(engine.sequences, hf.sequences)
        assert torch.equal(engine.truncated, hf.truncated) and engine.texts == hf.texts
        greedy_runs.append(engine.texts)
    assert greedy_runs[0] != greedy_runs[-1]  # the updates changed what the policy answers


def test_fingerprint_catches_a_skipped_sync_and_corrupted_tensors(in_step):
    policy, _, sampler = in_step
    with torch.no_grad():  # an update that is not pushed
        for p in policy.parameters():
            p.add_(0.01)
    with pytest.raises(EngineError, match="differ from the trainer's") as skipped:
        sampler.verify(policy)
    assert "model.embed_tokens.weight" in str(skipped.value)  # the message names the first few
    assert set(skipped.value.tensors) == set(sampler.layout.params)  # every tensor of the engine
    sampler.sync(policy)
    sampler.verify(policy)  # in step again
    for corrupt, scale in (
        ("model.layers.1.mlp.down_proj.weight", 1 + 1e-4),
        ("model.norm.weight", 1 + 1e-6),
    ):
        bad = [(n, t * scale if n == corrupt else t) for n, t in weights.full_weights(policy)]
        sampler.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(bad)})
        with pytest.raises(EngineError) as caught:
            sampler.verify(policy)
        assert caught.value.tensors == [corrupt], str(caught.value)
    sampler.sync(policy)
    sampler.verify(policy)


def test_top_p_logprobs_are_the_nucleus_renormalised_distribution(in_step):
    """With top_p < 1 the engine reports log-probs of the distribution it drew from: temperature,
    then renormalised over the nucleus, as the hf engine's recorder does. They are higher than the
    trainer's plain log-probs, so the rollout correction's π_old/π_sampler is below 1 there."""
    policy, tokenizer, sampler = in_step
    prompts = tiny.synthetic_prompts(24, seed=6)
    samples = draw(sampler, tokenizer, prompts, max_new_tokens=6, temperature=0.7, top_p=0.8, logprobs=True)
    tokens = samples.tokens(False)
    with torch.no_grad():
        logits = tokens.select(policy(**tokens.inputs).logits).float() / 0.7  # (n, V)
    nucleus = TopPLogitsWarper(0.8)(None, logits.clone())
    want = torch.log_softmax(nucleus, -1).gather(1, tokens.labels[:, None])[:, 0]
    got = samples.sampler_logp[samples.response_mask]
    torch.testing.assert_close(got, want, atol=LOGPROB_ATOL, rtol=0)
    plain = torch.log_softmax(logits, -1).gather(1, tokens.labels[:, None])[:, 0]
    assert (got >= plain - LOGPROB_ATOL).all() and (got > plain + 1e-2).any()


def test_responses_end_at_eos_as_with_hf(in_step):
    """EOS ends a response and belongs to it; a response without one was cut at the limit."""
    policy, tokenizer, sampler = in_step
    samples = draw(sampler, tokenizer, tiny.synthetic_prompts(64, seed=7), max_new_tokens=8, temperature=1.0)
    lengths = samples.response_mask.sum(1)
    last = samples.responses.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    ended = last == tokenizer.eos_token_id
    assert torch.equal(~ended, samples.truncated) and ended.any() and samples.truncated.any()
    assert (lengths[samples.truncated] == 8).all()


def test_lora_is_merged_and_pushed(in_step):
    """A LoRA policy's sync pushes W + B·A·alpha/r per layer (its base untouched): the fingerprint
    holds and the engine's greedy responses equal the peft model's."""
    policy, tokenizer, sampler = in_step

    class Options:
        lora_r, lora_alpha, lora_dropout, lora_target_modules, gradient_checkpointing = (
            4,
            32,
            0.0,
            "all-linear",
            False,
        )

    peft_model = lora.prepare(policy, Options())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    base_before = {k: v.clone() for k, v in lora.base_state_dict(peft_model).items()}
    report = sampler.sync(peft_model)
    assert report.verified
    prompts = tiny.synthetic_prompts(16, seed=8)
    engine = draw(sampler, tokenizer, prompts, max_new_tokens=8, temperature=0.0)
    hf = draw(HFSampler(peft_model, tokenizer), tokenizer, prompts, max_new_tokens=8, temperature=0.0)
    assert torch.equal(engine.sequences, hf.sequences)
    assert all(torch.equal(base_before[k], v) for k, v in lora.base_state_dict(peft_model).items())
    peft_model.unload()  # the fixture restores the plain policy


def test_a_model_vllm_cannot_load_is_one_line(tmp_path):
    """As a user meets it, in a process of its own: a second engine in this process would tear
    down the process-wide parallel groups the shared engine runs on when it fails."""
    tokenizer = tiny.build_tokenizer()
    tiny.build_policy(tokenizer, seed=0, head_dim=16).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    proc = processes.run(
        [*processes.CLI, "train", "grpo", "--rollout_engine", "vllm", "--policy", str(tmp_path / "m"),
         "--iterations", "1", "--output_dir", str(tmp_path / "run"), "--report_to", "none"],
        tmp_path, timeout=300, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(r"fastppo train grpo: rollout_engine vllm: vLLM cannot load .*head_dim=16", last), last


def eval_models(folder) -> dict[str, str]:
    """Three models of the embedded default at vLLM's head size: A, B and their reference, with
    their layers' output projections scaled up 10×, so that greedy answers depend on the prompt
    (at init the tied embeddings make every one the prompt's last character, repeated)."""
    tokenizer = tiny.build_tokenizer()
    paths = {}
    for name, seed in (("a", 0), ("b", 1), ("ref", 2)):
        model = tiny.build_policy(tokenizer, seed=seed, head_dim=tiny.VLLM_HEAD_DIM)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if key.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(10.0)
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def test_eval_through_the_engine_answers_as_hf(tmp_path):
    """`fastppo eval --rollout_engine vllm`, greedy: one engine answers for both models (each pushed
    and verified in its turn) with transformers' responses, so the table is hf's: every metric of
    the responses equal, the KL (the same models on the same tokens) to 1e-5."""
    paths = eval_models(tmp_path)
    options = dict(policy=paths["a"], baseline=paths["b"], reference=paths["ref"], temperature=0.0,
                   n_prompts=32, plot="none")  # fmt: skip
    argv = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    proc = processes.run(
        [*processes.CLI, "eval", *argv, "--rollout_engine", "vllm", "--output", str(tmp_path / "vllm.json")],
        tmp_path, timeout=300, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rollout engine: vLLM" in proc.stdout
    got = json.loads((tmp_path / "vllm.json").read_text())
    want = evaluate.evaluate(evaluate.EvalConfig(**options))
    for part in ("policy", "baseline", "difference"):
        kl = got[part].pop("kl_to_reference"), want[part].pop("kl_to_reference")
        assert kl[0] == pytest.approx(kl[1], rel=1e-5, abs=1e-7)
        assert got[part] == want[part], part
    assert got["policy"] != got["baseline"]  # two models, two sets of answers
    assert got["policy"]["distinct_1"] > 0.02  # not one token everywhere (1/256)
    assert got["win_rate"] == want["win_rate"]


# --------------------------------------------------------------------------------------------
# Whole runs, as a user starts them (a process each, its own engine).


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo, group_size", [("grpo", 8), ("ppo", 1)])
def test_runs_learn_as_with_hf(algo, group_size, tmp_path):
    """The threshold of tests/test_trainer.py::test_reward_rises (60 iterations, seed 1): a fresh
    policy under 0.25, then a mean reward 0.25 higher over the last 5 iterations. The engine's
    log-probs are the trainer's (rollout_kl within 1e-5 of 0, no token's ratio outside the band)."""
    out = tmp_path / algo
    proc = processes.run(
        [*processes.CLI, "train", algo, "--rollout_engine", "vllm", "--iterations", "60", "--seed", "1",
         "--group_size", str(group_size), "--output_dir", str(out), "--report_to", "none"],
        tmp_path, timeout=400, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert first < 0.25 and last > first + 0.25, (first, last)
    assert all(abs(r["rollout_kl"]) < 1e-5 and r["is_ratio_outside"] == 0 for r in rows)
    assert all(r["time/sync"] > 0 and r["time/generate"] > 0 for r in rows)
    assert "(time: generate" in proc.stdout


def test_interrupt_then_resume(tmp_path):
    """SIGINT stops a vllm run after the current iteration with a checkpoint; --resume starts a new
    engine, pushes the checkpoint's weights (verified) and finishes the run."""
    import signal

    out = tmp_path / "run"
    cmd = [*processes.CLI, "train", "grpo", "--rollout_engine", "vllm", "--iterations", "40",
           "--output_dir", str(out), "--report_to", "none", "--batch_size", "32",
           "--minibatch_size", "16"]  # fmt: skip
    group = processes.Group(cmd, tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    processes.wait_for_lines(out / "metrics.jsonl", 3, group, timeout=200)
    group.signal_group(signal.SIGINT)
    stopped = group.wait(timeout=120)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    done = len(metrics(out))
    assert (out / f"checkpoint-{done}").is_dir() and done < 40
    resumed = processes.run(
        [*cmd, "--resume", "true"], tmp_path, timeout=300, env={"VLLM_CPU_KVCACHE_SPACE": "1"}
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["iteration"] for r in metrics(out)] == list(range(1, 41))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_each_with_its_engine(parallel, tmp_path):
    """torchrun with 2 processes: each rank builds its own engine from the folder rank 0 wrote and
    samples its own prompts with its own seeds; every sync is verified (FSDP2: each tensor gathered
    in its turn), and under DDP the ranks end with identical weights."""
    out = tmp_path / "run"
    proc = processes.run(
        [*processes.TORCHRUN_CLI, "train", "grpo", "--rollout_engine", "vllm", "--iterations", "3",
         "--output_dir", str(out), "--report_to", "none", "--verify_sync_every", "1",
         "--fsdp", str(parallel == "fsdp").lower()],
        tmp_path, timeout=400, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    if parallel == "ddp":
        assert "rank 0: 2 ranks in sync" in proc.stdout and "rank 1: 2 ranks in sync" in proc.stdout
    assert proc.stdout.count("mean reward") == 1
    assert (out / "rollout-engine" / "config.json").is_file() and len(metrics(out)) == 3


def test_a_batch_longer_than_one_prefill_step(in_step):
    """128 prompts of 60 tokens are more than one scheduler step prefills: on CPU the engine
    prefills each prompt whole, since a chunked prefill rewinds a seeded request's generator and
    a CPU generator cannot ("CPU Generator does not use offset")."""
    policy, tokenizer, sampler = in_step
    ids = torch.randint(4, len(tokenizer), (128, 60), generator=torch.Generator().manual_seed(0)).tolist()
    out = sampler.generate(ids, SamplingSettings(max_new_tokens=8, temperature=1.0, logprobs=True), CPU)
    assert out.responses.shape[0] == 128 and out.response_mask[:, 0].all()
