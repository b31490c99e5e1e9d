"""Model -> per-token outputs: the one path from a causal LM to log-probs (and entropies), and
from a critic to values, on a ``layout.TokenBatch``.

``token_logprobs_of`` runs the model on the batch and applies the lm_head to the label-predicting
positions only: the model's own forward computes them (``logits_to_keep``) and its lm_head is
stood in for by ``ResponseHead``, which turns the body's hidden states there into log-probs:
``fastppo.linear_logprobs`` with the lm_head's weight (fused: the logits never exist beyond one
chunk of rows), or the lm_head then ``fastppo.token_logprobs`` (``fused=False``). DDP and FSDP see
an ordinary forward, with the head's weight gathered inside it. ``values_of`` reads a critic (a
token-classification model) at the same positions. ``model_inputs`` hands sdpa and eager models
their attention mask ready-made, so that a pass reads nothing back from the device.
"""

import contextlib
import inspect

import torch

import fastppo
from fastppo.trainer import runtime
from fastppo.trainer.layout import TokenBatch


class ResponseHead(torch.nn.Module):
    """Stands in for a causal LM's lm_head during one forward: from the body's hidden states at
    the kept positions, (n, 2) = log-prob of each label and the entropy at its position."""

    def __init__(
        self, lm_head: torch.nn.Module, tokens: TokenBatch, temperature: float, entropy: bool, fused: bool
    ):
        super().__init__()
        self.lm_head, self.tokens, self.temperature = lm_head, tokens, temperature
        self.entropy, self.fused = entropy, fused and isinstance(lm_head, torch.nn.Linear)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])[self.tokens.rows]  # (n, H): response positions only
        kwargs = dict(temperature=self.temperature, return_entropy=self.entropy)
        if self.fused:
            out = fastppo.linear_logprobs(
                h, self.lm_head.weight, self.tokens.labels, bias=self.lm_head.bias, **kwargs
            )
        else:
            out = fastppo.token_logprobs(self.lm_head(h), self.tokens.labels, **kwargs)
        return torch.stack(out, -1) if self.entropy else out[:, None]


def head_runs_last(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` and ends with its lm_head (no logit
    softcap after it, as Gemma 2 has): then ResponseHead can stand in for the lm_head. A peft
    model (or the reference standing for its base, ``lora.AdapterDisabled``) passes its keyword
    arguments through to its transformers model: that model's forward decides."""
    config = model.config
    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    takes_keep = "logits_to_keep" in inspect.signature(forward).parameters
    return takes_keep and getattr(config, "final_logit_softcapping", None) is None


@contextlib.contextmanager
def head_replaced(model: torch.nn.Module, head: torch.nn.Module):
    original = model.get_output_embeddings()
    model.set_output_embeddings(head)
    try:
        yield
    finally:
        model.set_output_embeddings(original)


#: Attention implementations whose 4-D mask fastppo builds (``TokenBatch.attention_mask_4d``):
#: None for sdpa's boolean mask, True for eager's additive mask in the model's dtype.
_MASK_BUILT = {"sdpa": None, "eager": True}


def model_inputs(model: torch.nn.Module, tokens: TokenBatch) -> dict:
    """``tokens.inputs`` for ``model`` (possibly wrapped): with its 4-D attention mask when it runs
    sdpa or eager attention on full-attention layers only (transformers' mask builder would
    read the mask back to the host to look for shortcuts); otherwise as they are (flash attention
    takes the padding or the packed position ids itself; sliding windows need its own masks)."""
    model = runtime.unwrap(model)
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    layers = set(getattr(config, "layer_types", None) or ["full_attention"])
    if implementation not in _MASK_BUILT or layers != {"full_attention"}:
        return tokens.inputs
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return tokens.inputs
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft, AdapterDisabled
    dtype = base.dtype if _MASK_BUILT[implementation] else None
    return tokens.inputs | {"attention_mask": tokens.attention_mask_4d(dtype)}


def token_logprobs_of(
    model, tokens: TokenBatch, *, temperature: float, entropy: bool = False, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n,) log-probs of ``tokens.labels`` under ``model`` (a causal LM, possibly DDP/FSDP-wrapped)
    at ``temperature``, and the entropy at each position when asked; fp32. ``fused``: through
    ``fastppo.linear_logprobs`` (no logits beyond a chunk), else lm_head + ``token_logprobs``."""
    causal_lm = runtime.unwrap(model)
    if head_runs_last(causal_lm):
        head = ResponseHead(causal_lm.get_output_embeddings(), tokens, temperature, entropy, fused)
        with head_replaced(causal_lm, head):
            out = model(**model_inputs(causal_lm, tokens), logits_to_keep=tokens.positions).logits
        return out[..., 0], (out[..., 1] if entropy else None)
    logits = tokens.select(model(**model_inputs(causal_lm, tokens)).logits)
    result = fastppo.token_logprobs(logits, tokens.labels, temperature=temperature, return_entropy=entropy)
    return result if entropy else (result, None)


def values_of(critic, tokens: TokenBatch) -> torch.Tensor:
    """(n,) fp32 values of a token-classification critic (num_labels=1) at the label positions."""
    return tokens.select(critic(**model_inputs(critic, tokens)).logits)[..., 0].float()
