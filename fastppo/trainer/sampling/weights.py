"""The policy's full weights as an engine loads them: (Hugging Face name, tensor) pairs, one
tensor at a time.

- A plain or DDP-wrapped model: its own tensors (no copy).
- FSDP2: each sharded tensor gathered when its turn comes (a collective: every rank iterates in
  the same order) and dropped after, so no second full copy of the model is ever held.
- LoRA (peft): merge-and-push. Each adapted layer's weight is sent as W + ΔW (peft's
  ``get_delta_weight``: B·A·alpha/r), computed when its turn comes; the base weights are never
  modified (merging in place and unmerging would leave them off by rounding).
"""

from collections.abc import Iterator

import torch

from fastppo.trainer import lora, runtime


def full_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    model = runtime.unwrap(policy)
    if lora.is_peft(model):
        yield from merged_lora_weights(model)
        return
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor)
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


def merged_lora_weights(peft_model) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's tensors with every active LoRA adapter merged in (names as before LoRA)."""
    base = peft_model.get_base_model()
    adapters = {
        name: module
        for name, module in base.named_modules()
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
    }
    active = peft_model.active_adapter
    with torch.no_grad():
        for key, value in lora.base_state_dict(peft_model).items():
            module_name, _, leaf = key.rpartition(".")
            layer = adapters.get(module_name)
            if layer is not None and leaf == "weight" and active in getattr(layer, "lora_A", {}):
                value = value + layer.get_delta_weight(active).to(value.dtype)
            yield key, value.detach()
