"""Configuration of ``fastppo train ppo|grpo``: one dataclass, every field documented.

Parsed by transformers' ``HfArgumentParser``: fields are command-line flags (``--lr 1e-3``) and
can come from a JSON or YAML file (``fastppo train ppo run.yaml``). Bad values fail at start.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

ALGOS = ("ppo", "grpo", "rloo")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PPOConfig:
    # What to train and where.
    policy: str | None = _help(
        "Path of a Hugging Face causal LM to train (loaded offline). "
        "Default: a tiny Qwen2 built from a config.",
        default=None,
    )
    critic: str | None = _help(
        "Path of a token-classification model (num_labels=1) to use as critic. "
        "Default: the policy's backbone with a fresh value head (or a tiny one).",
        default=None,
    )
    reward: str = _help(
        "'echo' (the built-in synthetic task), 'module:function' (a Python function taking "
        "(prompts, responses) and returning scores) or the path of a sequence-classification reward model.",
        default="echo",
    )
    prompts: str | None = _help(
        "JSONL file with a 'prompt' field per line. Default: synthetic prompts of the built-in task.",
        default=None,
    )
    output_dir: str = _help("Where checkpoints, metrics.jsonl and logs go.", default="fastppo-runs/ppo")
    resume: bool = _help("Continue from the latest checkpoint in output_dir.", default=False)
    seed: int = _help("Seed of every random generator.", default=0)
    device: str = _help(
        "'auto' (CUDA when available, bf16 autocast there), 'cpu' or 'cuda[:i]'.", default="auto"
    )
    fsdp: bool = _help(
        "Under torchrun, shard the policy and critic with FSDP2 (fully_shard per decoder layer), not DDP.",
        default=False,
    )
    attention: str = _help(
        "transformers attn_implementation of the policy and critic: 'auto' (flash_attention_2 on a GPU "
        "when flash-attn is installed, sdpa otherwise), 'sdpa', 'eager', 'flash_attention_2', ...",
        default="auto",
    )
    padding_free: bool | None = _help(
        "Run the models on packed sequences (one row, position ids restarting per sequence) instead of "
        "padded batches. Default: on with flash_attention_2, whose varlen kernels skip padding; with sdpa "
        "or eager a packed row needs a block-diagonal mask over all its tokens, "
        "which costs more than padding.",
        default=None,
    )

    # Algorithm.
    algo: str = _help(f"One of {ALGOS}: PPO with a critic, or critic-free group baselines.", default="ppo")
    iterations: int = _help("Rollout-and-update iterations.", default=200)
    batch_size: int = _help("Sequences per iteration (prompts × group_size).", default=128)
    group_size: int = _help("Responses sampled per prompt (grpo/rloo; 1 for ppo).", default=1)
    max_new_tokens: int = _help("Longest response.", default=8)
    temperature: float = _help("Sampling temperature (also used for the training log-probs).", default=1.0)
    top_p: float = _help("Nucleus sampling threshold.", default=1.0)
    ppo_epochs: int = _help("Passes over each rollout batch.", default=2)
    minibatch_size: int = _help("Sequences per optimizer step.", default=64)
    max_tokens_per_microbatch: int = _help(
        "Token budget of a micro-batch (gradient accumulation).", default=4096
    )
    lr: float = _help("Policy learning rate.", default=3e-3)
    critic_lr: float = _help("Critic learning rate.", default=3e-3)
    lr_scheduler: str = _help(
        "A transformers scheduler name (linear, cosine, constant, ...).", default="constant"
    )
    warmup_steps: int = _help("Scheduler warm-up in optimizer steps.", default=0)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)
    clip_low: float = _help("PPO ratio clip below 1.", default=0.2)
    clip_high: float | None = _help("PPO ratio clip above 1 (default: clip_low).", default=None)
    dual_clip: float | None = _help("Dual clip c > 1 for negative advantages (off by default).", default=None)
    value_clip: float = _help("Value loss clip around the old values.", default=0.2)
    value_coef: float = _help("Weight of the value loss (it trains the critic only).", default=0.5)
    gamma: float = _help("Discount.", default=1.0)
    lam: float = _help("GAE lambda.", default=0.95)
    kl_coef: float = _help(
        "KL penalty coefficient (in the reward for ppo, in the loss for grpo/rloo).", default=0.01
    )
    kl_target: float | None = _help("Adaptive KL controller target (off when unset).", default=None)
    kl_horizon: int = _help("Adaptive KL controller horizon in sequences.", default=10000)
    entropy_coef: float = _help("Entropy bonus coefficient.", default=0.0)
    whiten_advantages: bool = _help("Whiten advantages over the batch's response tokens.", default=True)
    drop_truncated: bool = _help(
        "Leave responses without an EOS (cut at max_new_tokens) out of the update.", default=False
    )
    save_every: int = _help("Checkpoint every N iterations (0: only at the end).", default=0)
    max_nonfinite_steps: int = _help("Stop after this many skipped (non-finite) steps in a row.", default=3)

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        positive = [
            "iterations",
            "batch_size",
            "group_size",
            "max_new_tokens",
            "ppo_epochs",
            "minibatch_size",
            "max_tokens_per_microbatch",
            "lr",
            "critic_lr",
            "temperature",
            "max_grad_norm",
            "clip_low",
            "value_clip",
            "kl_horizon",
            "max_nonfinite_steps",
        ]
        for name in positive:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("gamma", "lam", "top_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.clip_high is not None and self.clip_high <= 0:
            raise ValueError(f"clip_high must be > 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.kl_coef < 0 or self.warmup_steps < 0 or self.save_every < 0:
            raise ValueError("kl_coef, warmup_steps and save_every must be >= 0")
        if self.algo != "ppo" and self.group_size < 2:
            raise ValueError(
                f"{self.algo} needs group_size >= 2 (responses per prompt), got {self.group_size}"
            )
        for name in ("policy", "critic", "prompts"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise ValueError(f"{name}: no such file or folder: {path}")


@dataclass
class OfflineConfig:
    """Fields shared by the offline loops (SFT, reward model, DPO)."""

    model: str | None = _help(
        "Path of a Hugging Face model to start from (loaded offline). "
        "Default: a tiny Qwen2 built from a config.",
        default=None,
    )
    data: str | None = _help(
        "JSONL file of the loop's rows. Default: synthetic rows of the built-in task.", default=None
    )
    output_dir: str = _help("Where checkpoints and metrics.jsonl go.", default="fastppo-runs/offline")
    resume: bool = _help(
        "Continue from the latest checkpoint in output_dir (one is saved per epoch).", default=False
    )
    seed: int = _help("Seed of every random generator.", default=0)
    device: str = _help(
        "'auto' (CUDA when available, bf16 autocast there), 'cpu' or 'cuda[:i]'.", default="auto"
    )
    attention: str = _help(
        "transformers attn_implementation: 'auto' (flash_attention_2 on a GPU when flash-attn is "
        "installed, sdpa otherwise), 'sdpa', 'eager', ...",
        default="auto",
    )
    epochs: int = _help("Passes over the training rows.", default=3)
    n_synthetic: int = _help("Rows of the synthetic default data.", default=2048)
    eval_fraction: float = _help("Fraction of rows held out for evaluation.", default=0.1)
    batch_size: int = _help("Rows per optimizer step.", default=64)
    lr: float = _help("Learning rate.", default=3e-3)
    lr_scheduler: str = _help("A transformers scheduler name.", default="constant")
    warmup_steps: int = _help("Scheduler warm-up in optimizer steps.", default=0)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)
    max_nonfinite_steps: int = _help("Stop after this many skipped (non-finite) steps in a row.", default=3)

    def __post_init__(self):
        for name in ("epochs", "n_synthetic", "batch_size", "lr", "max_grad_norm", "max_nonfinite_steps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        for name in ("model", "data"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise ValueError(f"{name}: no such file or folder: {path}")


@dataclass
class SFTConfig(OfflineConfig):
    """Supervised fine-tuning with the loss on response tokens only. Rows: prompt, response."""

    output_dir: str = _help("Where checkpoints and metrics.jsonl go.", default="fastppo-runs/sft")


@dataclass
class RMConfig(OfflineConfig):
    """Reward model on preference pairs, −log σ(r_chosen − r_rejected). Rows: prompt, chosen, rejected."""

    output_dir: str = _help("Where checkpoints and metrics.jsonl go.", default="fastppo-runs/rm")


@dataclass
class DPOConfig(OfflineConfig):
    """Direct preference optimisation against a frozen reference. Rows: prompt, chosen, rejected."""

    output_dir: str = _help("Where checkpoints and metrics.jsonl go.", default="fastppo-runs/dpo")
    beta: float = _help("DPO β.", default=0.1)
    loss_type: str = _help("sigmoid, ipo or hinge.", default="sigmoid")
    label_smoothing: float = _help("Label smoothing ε of the sigmoid loss.", default=0.0)

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.loss_type not in ("sigmoid", "ipo", "hinge"):
            raise ValueError(f"loss_type must be sigmoid, ipo or hinge, got {self.loss_type!r}")
