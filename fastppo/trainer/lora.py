"""LoRA adapters (``peft``) and gradient checkpointing for the models the loops train.

With ``lora_r`` > 0 the trained model becomes a peft ``PeftModel``: its base weights are frozen
and low-rank adapters (``lora_target_modules``: "all-linear", every linear layer but the output
head, or a comma-separated list of module names) are the only parameters trained. The reference
PPO and DPO compare against is then that same model with its adapter disabled
(``AdapterDisabled``, peft's ``disable_adapter()``): no second copy of the weights.

A checkpoint's ``policy/`` (or ``reward_model/``) then holds the adapter
(``adapter_config.json``, ``adapter_model.safetensors``): ``PeftModel.from_pretrained(base,
folder)`` loads it onto the base model, which PPO checkpoints keep beside it as ``reference/``.
"""

import importlib.util
import warnings
from pathlib import Path

import torch

from fastppo.trainer.errors import UsageError


def check_options(cfg) -> None:
    """Raise a ``UsageError`` naming the field for bad LoRA options (any loop's config)."""
    if not (isinstance(cfg.lora_r, int) and cfg.lora_r >= 0):
        raise UsageError(f"lora_r must be an integer >= 0 (0: no LoRA), got {cfg.lora_r}")
    if not cfg.lora_alpha > 0:
        raise UsageError(f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise UsageError(f"lora_dropout must lie in [0, 1), got {cfg.lora_dropout}")
    if not target_modules(cfg.lora_target_modules):
        raise UsageError("lora_target_modules: name at least one module, or 'all-linear'")
    if cfg.lora_r > 0 and importlib.util.find_spec("peft") is None:
        raise UsageError("lora_r: LoRA needs peft (pip install peft), or leave lora_r at 0")


def target_modules(spec: str) -> str | list[str]:
    """ "all-linear" as peft reads it, else the comma-separated module names as a list."""
    if spec.strip().lower() == "all-linear":
        return "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def prepare(model: torch.nn.Module, cfg, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """``model`` with gradient checkpointing on (``cfg.gradient_checkpointing``) and, when
    ``cfg.lora_r`` > 0, wrapped in a peft model of ``task_type`` (CAUSAL_LM, SEQ_CLS: its score
    head is then trained in full beside the adapter)."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora_r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg.lora_target_modules), task_type=task_type,
    )  # fmt: skip
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise UsageError(f"lora_target_modules: {exc}") from None


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (non-reentrant ``torch.utils.checkpoint``: the same gradients, less memory)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class AdapterDisabled:
    """Stands for the reference: ``peft_model``'s forward with its adapter disabled, i.e. the frozen
    base model. Holds no weights of its own; ``passes.token_logprobs_of`` reads log-probs through
    it as through any causal LM (the fused lm_head path included), always without gradients."""

    def __init__(self, peft_model):
        self.peft_model = peft_model  # unwrapped: the reference passes run outside DDP

    @property
    def config(self):
        return self.peft_model.config

    def get_base_model(self) -> torch.nn.Module:
        return self.peft_model.get_base_model()

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    def set_output_embeddings(self, head) -> None:
        self.peft_model.get_base_model().set_output_embeddings(head)

    def __call__(self, *args, **kwargs):
        """The base model's forward, in eval mode (no dropout, as a frozen copy would run)."""
        training = self.peft_model.training
        self.peft_model.eval()
        try:
            with torch.no_grad(), self.peft_model.disable_adapter():
                return self.peft_model(*args, **kwargs)
        finally:
            self.peft_model.train(training)

    def to(self, *args, **kwargs) -> "AdapterDisabled":
        return self  # the weights are the policy's: they move with it

    def eval(self) -> "AdapterDisabled":
        return self

    def save_pretrained(self, folder, **kwargs) -> None:
        """The base model, as ``AutoModelForCausalLM.from_pretrained`` loads it."""
        kwargs["state_dict"] = base_state_dict(self.peft_model)
        self.peft_model.get_base_model().save_pretrained(folder, **kwargs)


def base_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's own state dict (keys as in the model before LoRA was added)."""
    out = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


def load_adapter(peft_model, folder: str | Path) -> None:
    """Load the adapter weights a checkpoint saved (``save_pretrained``) into ``peft_model``."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(folder)))
    if result.unexpected_keys:
        raise RuntimeError(f"{folder}: adapter weights the model has no place for: {result.unexpected_keys}")


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def load_causal_lm(folder: str | Path, base: str | Path | None = None) -> torch.nn.Module:
    """A causal LM from a folder: a full model, or an adapter (``adapter_config.json``) applied
    to ``base`` (default: the base model the adapter was made from, or a ``reference/`` beside it)."""
    from transformers import AutoModelForCausalLM

    if not is_adapter_folder(folder):
        return AutoModelForCausalLM.from_pretrained(folder)
    from peft import PeftModel

    base = adapter_base(folder) if base is None else base
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder))


def adapter_base(folder: str | Path) -> str:
    """The base model of the adapter in ``folder``: a ``reference/`` beside it, else the base the
    adapter was made from."""
    from peft import PeftConfig

    beside = Path(folder).parent / "reference"
    base = str(beside) if beside.is_dir() else PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    if not base:
        raise UsageError(f"{folder} holds a LoRA adapter; name its base model")
    return base
