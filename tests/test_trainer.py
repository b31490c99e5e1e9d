"""The training loops on the embedded tiny default (PPO / GRPO / RLOO, SFT, reward model, DPO):
learning, checkpoints, resume, robustness and the `fastppo train` command."""

import json
import logging
import math
import warnings

import processes
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from fastppo.trainer import checkpoint, data, evaluate, offline, ppo, timing, tiny
from fastppo.trainer.config import DPOConfig, PPOConfig, RMConfig, SFTConfig
from fastppo.trainer.ppo import train

pytestmark = pytest.mark.usefixtures("loop_backend")


def quiet(*_):
    pass


def test_echo_reward_by_hand():
    assert tiny.echo_reward(["abc:", "xyz:"], ["aabbccab", "xxqq"]) == [1.0, 2 / 8]
    assert tiny.echo_reward(["abc:"], [""]) == [0.0]


@pytest.mark.parametrize("algo, group_size, iterations", [("ppo", 1, 60), ("grpo", 8, 60), ("rloo", 8, 60)])
def test_reward_rises(algo, group_size, iterations, tmp_path):
    cfg = PPOConfig(algo=algo, group_size=group_size, iterations=iterations, output_dir=str(tmp_path), seed=1)
    history = train(cfg, log=quiet)
    first = sum(h["reward"] for h in history[:5]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert first < 0.25, first  # a fresh policy samples almost uniformly
    assert last > first + 0.25, (first, last)
    assert all(set(h) >= {"reward", "kl", "entropy", "policy_loss", "clipfrac"} for h in history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == list(range(1, iterations + 1))


def test_checkpoint_loads_offline_with_transformers(tmp_path):
    train(PPOConfig(iterations=2, output_dir=str(tmp_path)), log=quiet)
    last = checkpoint.latest_checkpoint(tmp_path)
    assert last == tmp_path / "checkpoint-2"
    model = AutoModelForCausalLM.from_pretrained(last / "policy", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(last / "policy", local_files_only=True)
    assert (last / "policy" / "model.safetensors").exists() and (
        last / "critic" / "model.safetensors"
    ).exists()
    out = model.generate(**tokenizer(["abc:"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_a_saved_tokenizer_reads_back_the_same(tmp_path):
    """The embedded tokenizer, saved beside a Qwen2 config, reads back with its own pre-tokenizer:
    transformers 5's AutoTokenizer would rebuild it as a Qwen2 tokenizer that drops the spaces
    (the --policy, eval and reward model loaders all go through hub.load_tokenizer)."""
    from fastppo.trainer import hub

    tokenizer = tiny.build_tokenizer()
    tiny.build_policy(tokenizer, seed=0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = "ab c: d"
    assert hub.load_tokenizer(str(tmp_path))(text).input_ids == tokenizer(text).input_ids


def test_resume_equals_uninterrupted(tmp_path):
    small = dict(batch_size=32, minibatch_size=16)
    straight = train(PPOConfig(iterations=4, output_dir=str(tmp_path / "a"), **small), log=quiet)
    cfg = dict(output_dir=str(tmp_path / "b"), batch_size=32, minibatch_size=16, save_every=2)
    train(PPOConfig(iterations=2, **cfg), log=quiet)
    resumed = train(PPOConfig(iterations=4, resume=True, **cfg), log=quiet)
    assert [h["iteration"] for h in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed, strict=True):
        assert timing.untimed(a) == timing.untimed(b)
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint-4" / "policy").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "checkpoint-4" / "policy").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    train(PPOConfig(iterations=2, output_dir=str(tmp_path), save_every=1), log=quiet)
    real_save = torch.save

    def dies_mid_save(obj, path, *args, **kwargs):
        if str(path).endswith("trainer_state.pt"):
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_mid_save)
    with pytest.raises(KeyboardInterrupt):
        train(PPOConfig(iterations=3, resume=True, output_dir=str(tmp_path), save_every=1), log=quiet)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint-3.tmp").exists()  # the half-written one
    last = checkpoint.latest_checkpoint(tmp_path)
    assert last == tmp_path / "checkpoint-2"
    AutoModelForCausalLM.from_pretrained(last / "policy")
    assert checkpoint.load_trainer_state(last)["iteration"] == 2


def overflowing_reward(prompts, responses):
    """Finite scores whose squares overflow fp32: the critic's value loss, and so its gradient, is
    inf. (A NaN reward no longer gets there: it scores 0 and is counted, tests/test_rewards.py.)"""
    return [1e30 * (i % 2) for i in range(len(prompts))]


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    cfg = PPOConfig(
        iterations=3, output_dir=str(tmp_path), reward=f"{__name__}:overflowing_reward", max_nonfinite_steps=2
    )
    with (
        pytest.warns(UserWarning, match="non-finite gradient, step skipped"),
        pytest.raises(RuntimeError, match="2 non-finite"),
    ):
        train(cfg, log=quiet)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(clip_low=0.0), "clip_low must be > 0"),
        (dict(gamma=1.5), "gamma must lie in"),
        (dict(algo="a2c"), "algo must be one of"),
        (dict(algo="grpo", group_size=1), "needs group_size >= 2"),
        (dict(policy="/no/such/model"), "policy: no such folder"),
        (dict(prompts="/no/such.jsonl"), "prompts: no such file"),
        (dict(dual_clip=0.5), "dual_clip must be > 1"),
        (
            dict(algo="grpo", batch_size=20),
            r"batch_size 20 is not a multiple of group_size 8 .*: use batch_size 16 or 24",
        ),
        (
            dict(algo="grpo", batch_size=4),
            r"not a multiple of group_size 8 \(responses per prompt\): use batch_size 8$",
        ),
    ],
)
def test_bad_config_fails_at_start(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs)


def test_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["abc:", "qrs:", "xyz:"]))
    cfg = PPOConfig(
        iterations=2, output_dir=str(tmp_path / "out"), prompts=str(prompts), batch_size=3, minibatch_size=3
    )
    history = train(cfg, log=quiet)
    assert len(history) == 2


def fastppo_cli(*args, cwd):
    return processes.run([*processes.CLI, *args], cwd, timeout=600)


def test_cli_config_file_overrides_and_errors(tmp_path):
    (tmp_path / "run.yaml").write_text("iterations: 2\nbatch_size: 16\nminibatch_size: 8\nlr: 0.001\n")
    proc = fastppo_cli("train", "ppo", "run.yaml", "--iterations", "3", "--output_dir", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "over 3 iterations" in proc.stdout
    state = checkpoint.load_trainer_state(tmp_path / "out" / "checkpoint-3")
    assert state["config"]["lr"] == 0.001 and state["config"]["batch_size"] == 16
    help_text = fastppo_cli("train", "ppo", "--help", cwd=tmp_path).stdout
    assert "--kl_coef" in help_text and "KL penalty coefficient" in help_text
    bad = fastppo_cli("train", "ppo", "--lr", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "lr must be > 0" in bad.stderr
    (tmp_path / "typo.json").write_text(json.dumps({"learning_rate": 1.0}))
    typo = fastppo_cli("train", "ppo", "typo.json", cwd=tmp_path)
    assert typo.returncode != 0 and "unknown config fields ['learning_rate']" in typo.stderr
    unknown = fastppo_cli("train", "a2c", cwd=tmp_path)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


# --------------------------------------------------------------------------------------------
# The offline loops: SFT, reward model, DPO.


def last_eval(history):
    return [r for r in history if "eval_loss" in r][-1]


def test_sft_lowers_held_out_loss(tmp_path):
    history = offline.train_sft(SFTConfig(output_dir=str(tmp_path), epochs=2, n_synthetic=1024), log=quiet)
    evals = [r for r in history if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < 0.8 * math.log(len(tiny.build_tokenizer()))  # well below uniform
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint.latest_checkpoint(tmp_path) / "policy")
    assert model.config.vocab_size == len(tiny.build_tokenizer())


def test_sft_loss_covers_responses_only():
    tokenizer = tiny.build_tokenizer()
    batch = data.encode(tokenizer, ["abc:", "qwerty:"], ["xy", "z"])
    # bos + 4 prompt tokens, then "xy" + eos: 3 labelled tokens in row 0, "z" + eos in row 1.
    assert (batch["labels"] != -100).sum(1).tolist() == [3, 2]
    assert batch["labels"][0, 5:8].tolist() == tokenizer("xy", add_special_tokens=False).input_ids + [
        tokenizer.eos_token_id
    ]


def test_reward_model_ranks_held_out_pairs(tmp_path):
    history = offline.train_reward_model(
        RMConfig(output_dir=str(tmp_path), epochs=1, n_synthetic=1024), log=quiet
    )
    assert last_eval(history)["eval_accuracy"] > 0.75  # chance is 0.5
    folder = checkpoint.latest_checkpoint(tmp_path) / "reward_model"
    AutoModelForSequenceClassification.from_pretrained(folder)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_raises_preference_accuracy(loss_type, tmp_path):
    cfg = DPOConfig(output_dir=str(tmp_path), epochs=1, n_synthetic=1024, loss_type=loss_type)
    history = offline.train_dpo(cfg, log=quiet)
    assert last_eval(history)["eval_accuracy"] > 0.75  # chance is 0.5
    assert {"margin", "chosen_reward", "rejected_reward", "accuracy"} <= set(history[0])


def test_offline_resume_equals_uninterrupted(tmp_path):
    small = dict(n_synthetic=256, batch_size=32, eval_fraction=0.25)
    straight = offline.train_reward_model(
        RMConfig(output_dir=str(tmp_path / "a"), epochs=3, **small), log=quiet
    )
    offline.train_reward_model(RMConfig(output_dir=str(tmp_path / "b"), epochs=1, **small), log=quiet)
    resumed = offline.train_reward_model(
        RMConfig(output_dir=str(tmp_path / "b"), epochs=3, resume=True, **small), log=quiet
    )
    assert resumed == [r for r in straight if r["epoch"] > 1]
    a = AutoModelForSequenceClassification.from_pretrained(
        checkpoint.latest_checkpoint(tmp_path / "a") / "reward_model"
    )
    b = AutoModelForSequenceClassification.from_pretrained(
        checkpoint.latest_checkpoint(tmp_path / "b") / "reward_model"
    )
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_parquet_rows_and_tensorboard(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = data.synthetic_sft(64, 0)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft.parquet")
    assert data.read_rows(str(tmp_path / "sft.parquet"), ("prompt", "response")) == rows
    offline.train_sft(SFTConfig(data=str(tmp_path / "sft.parquet"), output_dir=str(tmp_path / "o"), epochs=1),
                      log=quiet)  # fmt: skip
    events = list((tmp_path / "o" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_offline_loops_read_jsonl(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in data.synthetic_pairs(40, 0)))
    history = offline.train_dpo(
        DPOConfig(data=str(pairs), output_dir=str(tmp_path / "o"), epochs=1), log=quiet
    )
    assert history
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a:", "chosen": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1: missing or non-text fields \['rejected'\]"):
        offline.train_reward_model(RMConfig(data=str(bad), output_dir=str(tmp_path / "p")), log=quiet)
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        SFTConfig(eval_fraction=1.0)


def test_cli_offline(tmp_path):
    proc = fastppo_cli(
        "train", "sft", "--epochs", "1", "--n_synthetic", "256", "--output_dir", "sft", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "eval_loss" in proc.stdout and (tmp_path / "sft" / "metrics.jsonl").exists()


def test_two_processes_stay_in_sync(tmp_path):
    """torchrun with 2 processes (gloo on CPU): a few PPO steps, ranks checked identical."""
    run = ["train", "ppo", "--device", "cpu", "--iterations", "3", "--batch_size", "16"]
    opts = ["--minibatch_size", "8", "--max_tokens_per_microbatch", "64", "--output_dir", "out"]
    cmd = [*processes.TORCHRUN_CLI, *run, *opts]
    proc = processes.run(cmd, tmp_path, timeout=180)  # ~20 s; the whole process group dies on timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "rank 0: 2 ranks in sync" in output and "rank 1: 2 ranks in sync" in output
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # written by rank 0 only
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint-3" / "policy")


# --------------------------------------------------------------------------------------------
# fastppo eval and the plot.


def test_diversity_metrics_by_hand():
    responses = [[1, 2, 3, 1, 2, 3], [4, 4]]
    # 1-grams: 8 in all, {1, 2, 3, 4} distinct; 2-grams: 12 23 31 12 23 44 → 4 distinct of 6.
    assert evaluate.distinct_n(responses, 1) == 4 / 8
    assert evaluate.distinct_n(responses, 2) == 4 / 6
    # 3-grams of the first: 123 231 312 123 → one repeat of 4; the second has none.
    assert evaluate.repeated_ngram_rate(responses, 3) == 1 / 4
    assert evaluate.distinct_n([[]], 2) == 0.0


def test_eval_after_training_and_plot(tmp_path):
    train(PPOConfig(iterations=30, output_dir=str(tmp_path), seed=3), log=quiet)
    assert (tmp_path / "metrics.png").stat().st_size > 1000  # matplotlib is in the dev extra
    trained = evaluate.evaluate(
        evaluate.EvalConfig(policy=str(tmp_path / "checkpoint-30" / "policy"), n_prompts=64)
    )
    untrained = evaluate.evaluate(
        evaluate.EvalConfig(policy=str(tmp_path / "checkpoint-30" / "reference"), n_prompts=64)
    )
    assert trained["reward"] > untrained["reward"] + 0.1
    assert trained["kl_to_reference"] > untrained["kl_to_reference"] >= 0  # the reference vs itself: 0
    assert untrained["kl_to_reference"] < 1e-4
    assert 0 < trained["distinct_1"] <= 1 and 0 <= trained["repeated_3gram_rate"] <= 1
    proc = fastppo_cli("eval", "--policy", str(tmp_path / "checkpoint-30" / "policy"), "--n_prompts", "16",
                       "--output", "eval.json", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["prompts"] == 16
    bad = fastppo_cli("eval", "--policy", "/no/such/dir", cwd=tmp_path)
    assert bad.returncode == 2 and "policy: no such folder" in bad.stderr


def test_fsdp_two_processes_learn_and_resume(tmp_path):
    """FSDP2 over 2 gloo processes with a micro-batch budget tight enough that ranks plan different
    counts (they must agree, or the sharded collectives stall): 15 iterations, then a resumed run
    to 30. It learns like DDP, saves full checkpoints, and the resumed optimizer goes on from the
    saved (gathered) state rather than from scratch."""
    run = ["train", "ppo", "--device", "cpu", "--fsdp", "true", "--output_dir", "o"]
    opts = ["--batch_size", "64", "--minibatch_size", "32", "--max_tokens_per_microbatch", "200"]
    for extra in (["--iterations", "15"], ["--iterations", "30", "--resume", "true"]):
        proc = processes.run([*processes.TORCHRUN_CLI, *run, *opts, *extra], tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 31))
    first = sum(r["reward"] for r in records[:5]) / 5
    last = sum(r["reward"] for r in records[-5:]) / 5
    assert last > first + 0.1, (first, last)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "checkpoint-30" / "policy")
    assert type(model).__name__ == "Qwen2ForCausalLM"

    def optimizer(step):
        return checkpoint.load_trainer_state(tmp_path / "o" / f"checkpoint-{step}")["optimizer"]

    half, full = optimizer(15), optimizer(30)
    assert set(half["state"]) == set(full["state"]) and any(k.startswith("critic.") for k in half["state"])
    for name, state in half["state"].items():  # Adam's step count carried on across the resume
        assert int(full["state"][name]["step"]) == 2 * int(state["step"]) > 0, name


def test_fsdp_misuse_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="fsdp needs several processes"):
        train(PPOConfig(fsdp=True, iterations=1, output_dir=str(tmp_path)), log=quiet)


def test_empty_update_batch_is_skipped(tmp_path):
    """Dropping responses without EOS can empty the update batch: the iteration skips its update
    and the run goes on, with no warning per iteration: ``skipped_update`` in the metrics and one
    line at the end. With this seed (2-token responses, 4 per iteration) the first iteration keeps
    none and the second keeps one."""
    small = dict(batch_size=4, minibatch_size=4, max_new_tokens=2, seed=9)
    cfg = PPOConfig(iterations=2, output_dir=str(tmp_path), drop_truncated=True, **small)
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train(cfg, log=said.append)
    assert not [w for w in caught if "no sequence left" in str(w.message)]
    assert [h["updated_fraction"] for h in history] == [0.0, 0.25]
    assert [h["skipped_update"] for h in history] == [1.0, 0.0]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in logged] == [1.0, 0.0]
    skips = [line for line in said if "no sequence left" in line]
    assert skips == [
        "1 of 2 iterations had no sequence left for the update"
        " (all dropped by drop_truncated/dynamic_sampling)"
    ]
    assert history[0]["value_loss"] == 0 and history[1]["value_loss"] > 0  # the critic was updated
    assert all(math.isfinite(h["reward"]) for h in history)


def save_tiny_gpt2(folder) -> None:
    """A 1-layer GPT-2 causal LM with the embedded tokenizer, as a user's --policy folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny.build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=64, **ids)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_critic_on_a_gpt2_says_its_new_head_in_one_line(tmp_path):
    """PPO's critic is the policy's checkpoint under a new value head: transformers' LOAD REPORT
    table of its MISSING keys is not printed; one line says what is new."""
    folder = tmp_path / "gpt2"
    save_tiny_gpt2(folder)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:  # the control: loaded plainly, transformers reports the new head
        AutoModelForTokenClassification.from_pretrained(folder, num_labels=1)
        assert any("LOAD REPORT" in r.getMessage() for r in records)
        records.clear()
        said = []
        cfg = PPOConfig(algo="ppo", policy=str(folder), output_dir=str(tmp_path / "o"))
        critic = ppo.load_models(cfg, "eager", log=said.append)[3]
    finally:
        logger.removeHandler(handler)
    printed = [r.getMessage() for r in records]
    assert not [m for m in printed if "LOAD REPORT" in m or "MISSING" in m], printed
    assert said == [f"critic: a new value head (classifier.bias, classifier.weight) on {folder}'s backbone"]
    assert critic.classifier.out_features == 1


def test_offline_non_finite_steps_stop(tmp_path, monkeypatch):
    real_loss = offline.sft_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(offline, "sft_loss", nan_loss)
    cfg = SFTConfig(output_dir=str(tmp_path), n_synthetic=256, max_nonfinite_steps=2)
    with pytest.warns(UserWarning, match=r"sft step \d: non-finite gradient, step skipped"):
        with pytest.raises(RuntimeError, match="2 non-finite steps in a row"):
            offline.train_sft(cfg, log=quiet)


def test_two_processes_with_uneven_updates(tmp_path):
    """--drop_truncated under DDP: the ranks keep different numbers of sequences, and must still
    take the same number of optimizer steps (or the all-reduce would wait forever)."""
    run = ["train", "ppo", "--device", "cpu", "--iterations", "4", "--batch_size", "16"]
    opts = ["--minibatch_size", "2", "--max_new_tokens", "3", "--drop_truncated", "true", "--output_dir", "o"]
    proc = processes.run([*processes.TORCHRUN_CLI, *run, *opts], tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1: 2 ranks in sync" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and any(0 < r["updated_fraction"] < 1 for r in records)


def test_a_run_folder_is_not_overwritten_by_accident(tmp_path):
    small = dict(iterations=1, batch_size=16, minibatch_size=8, output_dir=str(tmp_path))
    train(PPOConfig(**small), log=quiet)
    with pytest.raises(ValueError, match="holds a run; pass --resume to continue it, --overwrite"):
        train(PPOConfig(**small), log=quiet)
    (tmp_path / "checkpoint-1" / "marker").write_text("old")
    train(PPOConfig(**small, overwrite=True), log=quiet)
    assert not (tmp_path / "checkpoint-1" / "marker").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["overwrite"] is True and saved["advantage"] == "gae" and saved["iterations"] == 1
    with pytest.raises(ValueError, match="resume and overwrite"):
        PPOConfig(resume=True, overwrite=True)


def test_resume_rewrites_the_rows_after_its_checkpoint_and_keeps_the_newest(tmp_path):
    """An interrupted run logged iterations 3-4 but its last checkpoint is 2: the resumed run logs
    them again, once; --save_total_limit keeps the newest checkpoints only."""
    cfg = dict(batch_size=16, minibatch_size=8, output_dir=str(tmp_path), save_every=2, save_total_limit=2)
    train(PPOConfig(iterations=4, **cfg), log=quiet)
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-4")  # as if killed after logging iteration 4
    train(PPOConfig(iterations=6, resume=True, **cfg), log=quiet)
    rows = [json.loads(line)["iteration"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
