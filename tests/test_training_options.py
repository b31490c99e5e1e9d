"""The options TRL users reach for: LoRA adapters (peft) in the PPO and offline loops, gradient
checkpointing, and ``report_to`` (TensorBoard, wandb), on the embedded tiny default."""

import importlib.util

import processes
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastppo import cli
from fastppo.trainer import checkpoint, lora, offline, ppo, timing, tiny
from fastppo.trainer.config import DPOConfig, PPOConfig, RMConfig, SFTConfig
from fastppo.trainer.errors import UsageError
from fastppo.trainer.layout import response_tokens
from fastppo.trainer.passes import head_runs_last, token_logprobs_of

pytestmark = [
    pytest.mark.usefixtures("loop_backend"),
    # peft's PeftModel reads transformers' deprecated is_gradient_checkpointing (not ours to change).
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
peft = pytest.importorskip("peft")

SMALL = dict(batch_size=16, minibatch_size=8)
TINY_PARAMETERS = 76_352  # the tiny default policy (tied embeddings counted once)


def quiet(*_):
    pass


def fixed_tokens(tokenizer):
    """A TokenBatch of two prompt + response rows to read log-probs on."""
    rows = [tokenizer("abc:").input_ids + tokenizer("aabbc").input_ids, tokenizer("xyzw:").input_ids]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = ids != tokenizer.pad_token_id
    return response_tokens(ids, mask, mask[:, 4:], padding_free=False)


def assert_adapter_trained(folder) -> dict:
    """The adapter saved in ``folder`` moved from its start (lora_B starts at zero); its weights."""
    weights = peft.utils.load_peft_weights(str(folder))
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in weights.items())
    return weights


def logprobs(model, tokens):
    with torch.no_grad():
        return token_logprobs_of(model, tokens, temperature=1.0)[0]


def test_lora_ppo_trains_only_the_adapter_against_the_base(tmp_path):
    cfg = PPOConfig(iterations=2, output_dir=str(tmp_path), lora_r=4, **SMALL)
    run = ppo.set_up(cfg, quiet)
    # No second copy: the reference is the policy with its adapter off, and holds no weights.
    assert isinstance(run.reference, lora.AdapterDisabled) and run.reference.peft_model is run.policy
    assert not isinstance(run.reference, torch.nn.Module)
    trainable, total = lora.parameter_counts(run.policy)
    assert total - trainable == TINY_PARAMETERS and trainable == 8_192  # r=4, all linear layers
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in lora.trainable_parameters(run.policy)} <= optimized
    assert not any(id(p) in optimized for p in run.policy.parameters() if not p.requires_grad)
    assert head_runs_last(run.policy) and head_runs_last(run.reference)  # the fused lm_head path
    for iteration in range(2):
        ppo.iterate(run, iteration)
    ppo.save(run, 2)

    base = tiny.build_policy(run.tokenizer, cfg.seed)
    trained_base = lora.base_state_dict(run.policy)
    assert trained_base.keys() == base.state_dict().keys()
    assert all(torch.equal(trained_base[k], v) for k, v in base.state_dict().items())  # frozen
    tokens = fixed_tokens(run.tokenizer)
    policy_logp, base_logp = logprobs(run.policy, tokens), logprobs(base, tokens)
    torch.testing.assert_close(logprobs(run.reference, tokens), base_logp, rtol=0, atol=1e-6)
    assert (policy_logp - base_logp).abs().max() > 1e-4  # the adapter has learned something

    saved = tmp_path / "checkpoint-2"
    assert (saved / "policy" / "adapter_config.json").is_file()
    assert not (saved / "policy" / "model.safetensors").exists()
    reference = AutoModelForCausalLM.from_pretrained(saved / "reference")  # the base model
    loaded = peft.PeftModel.from_pretrained(reference, saved / "policy").eval()
    torch.testing.assert_close(logprobs(loaded, tokens), policy_logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(logprobs(lora.load_causal_lm(saved / "policy"), tokens), policy_logp,
                               rtol=0, atol=1e-6)  # fmt: skip


def test_lora_ppo_resume_equals_uninterrupted(tmp_path):
    common = dict(lora_r=4, algo="grpo", group_size=4, **SMALL)
    straight = ppo.train(PPOConfig(iterations=2, output_dir=str(tmp_path / "a"), **common), log=quiet)
    ppo.train(PPOConfig(iterations=1, output_dir=str(tmp_path / "b"), **common), log=quiet)
    resumed = ppo.train(
        PPOConfig(iterations=2, output_dir=str(tmp_path / "b"), resume=True, **common), log=quiet
    )
    assert timing.untimed(resumed[-1]) == timing.untimed(straight[-1])
    a, b = (peft.utils.load_peft_weights(str(tmp_path / x / "checkpoint-2" / "policy")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_under_ddp_two_processes(tmp_path):
    """torchrun with 2 gloo processes and a LoRA adapter: DDP all-reduces the adapter's gradients
    only (the base is frozen), the ranks end in sync, and the saved adapter trained and loads."""
    run = ["train", "ppo", "--device", "cpu", "--iterations", "3", "--lora_r", "4", "--batch_size", "16"]
    opts = ["--minibatch_size", "8", "--max_tokens_per_microbatch", "64", "--output_dir", "out"]
    proc = processes.run([*processes.TORCHRUN_CLI, *run, *opts], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: 2 ranks in sync" in proc.stdout and "rank 1: 2 ranks in sync" in proc.stdout
    folder = tmp_path / "out" / "checkpoint-3" / "policy"
    assert_adapter_trained(folder)
    model = peft.PeftModel.from_pretrained(tiny.build_policy(tiny.build_tokenizer(), 0), folder)
    assert lora.parameter_counts(model)[1] == TINY_PARAMETERS + 8_192


@pytest.mark.parametrize("loop", ["sft", "dpo", "rm"])
def test_lora_offline_loops(loop, tmp_path):
    classes = {"sft": SFTConfig, "dpo": DPOConfig, "rm": RMConfig}
    train = {"sft": offline.train_sft, "dpo": offline.train_dpo, "rm": offline.train_reward_model}[loop]
    cfg = classes[loop](output_dir=str(tmp_path), lora_r=4, epochs=1, n_synthetic=96, batch_size=32,
                        gradient_checkpointing=True)  # fmt: skip
    history = train(cfg, log=quiet)
    assert all(torch.isfinite(torch.tensor(h.get("loss", 0.0))) for h in history)
    if loop == "dpo":  # the adapter starts at zero: the policy equals its reference, the base model
        assert history[0]["chosen_reward"] == pytest.approx(0, abs=1e-6)
        assert history[0]["rejected_reward"] == pytest.approx(0, abs=1e-6)
    folder = checkpoint.latest_checkpoint(tmp_path) / ("reward_model" if loop == "rm" else "policy")
    assert (folder / "adapter_config.json").is_file()
    weights = assert_adapter_trained(folder)
    if loop == "rm":  # the score head is trained in full and saved beside the adapter
        assert any("score" in k for k in weights)
    else:
        model = peft.PeftModel.from_pretrained(tiny.build_policy(tiny.build_tokenizer(), cfg.seed), folder)
        assert lora.parameter_counts(model)[1] == TINY_PARAMETERS + 8_192


def counted(forward):
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        return forward(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    weights, layer_calls = [], []
    for on in (False, True):
        cfg = PPOConfig(iterations=1, output_dir=str(tmp_path / str(on)), gradient_checkpointing=on, **SMALL)
        run = ppo.set_up(cfg, quiet)
        mlp = run.policy.model.layers[0].mlp
        mlp.forward = counted(mlp.forward)  # module hooks do not run in the recompute
        ppo.iterate(run, 0)
        layer_calls.append(mlp.forward.calls)
        weights.append({name: model.state_dict() for name, model in run.trained.items()})
    assert layer_calls[1] > layer_calls[0]  # the backward recomputed the layer's forward
    for name, state in weights[0].items():
        for key, value in state.items():
            torch.testing.assert_close(weights[1][name][key], value, rtol=0, atol=1e-6)


def test_report_to(tmp_path, monkeypatch):
    none = PPOConfig(iterations=1, output_dir=str(tmp_path / "none"), report_to="none", **SMALL)
    ppo.train(none, log=quiet)
    assert (tmp_path / "none" / "metrics.jsonl").is_file() and not (
        tmp_path / "none" / "tensorboard"
    ).exists()
    if importlib.util.find_spec("wandb") is None:
        for config in (PPOConfig, SFTConfig):
            with pytest.raises(UsageError, match=r"report_to: wandb is not installed \(pip install wandb\)"):
                config(report_to="tensorboard,wandb")
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), epochs=1, n_synthetic=64, batch_size=32,
                    report_to="tensorboard,wandb")  # fmt: skip
    offline.train_sft(cfg, log=quiet)
    assert (tmp_path / "sft" / "tensorboard").is_dir()
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


@pytest.mark.parametrize(
    "config, kwargs, match",
    [
        (PPOConfig, dict(lora_r=-1), "lora_r must be an integer >= 0"),
        (SFTConfig, dict(lora_r=-1), "lora_r must be an integer >= 0"),
        (DPOConfig, dict(lora_r=4, lora_alpha=0), "lora_alpha must be > 0"),
        (PPOConfig, dict(lora_r=4, lora_dropout=0.1), "lora_dropout must be 0 in PPO"),
        (PPOConfig, dict(lora_r=4, fsdp=True), "lora_r with fsdp"),
        (RMConfig, dict(lora_target_modules=" , "), "lora_target_modules: name at least one"),
        (PPOConfig, dict(report_to="tensorboard,mlflow"), "report_to: unknown 'mlflow'"),
        (SFTConfig, dict(report_to="none,tensorboard"), "'none' alone"),
    ],
)
def test_bad_options_fail_at_start(config, kwargs, match):
    with pytest.raises(UsageError, match=match):
        config(**kwargs)


def test_bad_options_on_the_command_line(tmp_path, capsys):
    assert cli.main(["train", "ppo", "--lora_r", "-1", "--output_dir", str(tmp_path)]) == 2
    assert "lora_r must be an integer >= 0" in capsys.readouterr().err
    assert cli.main(["train", "sft", "--report_to", "tensorbord", "--output_dir", str(tmp_path)]) == 2
    assert "report_to: unknown 'tensorbord'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="lora_target_modules"):  # no such module in the model
        ppo.set_up(PPOConfig(lora_r=4, lora_target_modules="no_such_proj", output_dir=str(tmp_path)), quiet)
