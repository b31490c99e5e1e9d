"""The rollout: sample responses, score them, and read from the models what the update needs.

One path from a model to per-token outputs serves every loop (PPO and its presets, evaluation,
SFT, DPO):

- ``TokenBatch`` lays a batch out once — padded rows, or the attended tokens of all rows packed
  into one row with position ids restarting at each sequence — and names the positions that
  predict a label. The policy, reference and critic passes of that batch share it.
- ``token_logprobs_of`` runs the model on it and applies the lm_head to the label-predicting
  positions only: the model's own forward computes them (``logits_to_keep``) and its lm_head
  is stood in for by ``ResponseHead``, which turns the body's hidden states there into log-probs:
  ``fastppo.linear_logprobs`` with the lm_head's weight (fused: the logits never exist beyond
  one chunk of rows), or the lm_head then ``fastppo.token_logprobs`` (``fused=False``). DDP and
  FSDP see an ordinary forward, with the head's weight gathered inside it.
- ``values_of`` reads a critic (a token-classification model) at the same positions.

Shapes: B sequences of P prompt positions (left-padded) and R response positions (right-padded);
n response tokens over the batch, listed row by row.
"""

import contextlib
import importlib
import inspect
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

import fastppo
from fastppo import packing
from fastppo.trainer import runtime, tiny
from fastppo.trainer.data import apply_template
from fastppo.trainer.errors import UsageError

# --------------------------------------------------------------------------------------------
# One batch laid out once for every model pass.


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class TokenBatch:
    """A batch laid out for the model passes.

    inputs: keyword arguments of the models' forward (padded rows, or one packed row).
    positions: (k,) int64, positions along the sequence whose outputs are read.
    rows: (n,) int64, which of the read outputs (flattened over (rows, k)) predict a label.
    labels: (n,) int64, those labels, row by row.
    row_of: (n,) int64, the batch row of each label.
    n_rows: B.
    """

    inputs: dict
    positions: torch.Tensor
    rows: torch.Tensor
    labels: torch.Tensor
    row_of: torch.Tensor
    n_rows: int

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        next_labels: torch.Tensor,
        *,
        padding_free: bool,
    ) -> "TokenBatch":
        """``input_ids``, ``attention_mask`` (B, T); ``next_labels`` (B, T): the token that position
        t predicts, -100 where it predicts none. Reads the label positions to the host once."""
        B, T = input_ids.shape
        if padding_free:
            layout = packing.unpad(attention_mask)
            packed_labels = packing.pack(next_labels, layout)
            positions = (packed_labels != -100).nonzero().squeeze(1)
            inputs = dict(
                input_ids=packing.pack(input_ids, layout)[None], position_ids=layout.position_ids[None]
            )
            rows = torch.arange(positions.numel(), device=input_ids.device)
            return cls(inputs | {"use_cache": False}, positions, rows, packed_labels[positions],
                       layout.indices[positions] // T, B)  # fmt: skip
        predicts = next_labels != -100
        columns = predicts.any(0).nonzero().squeeze(1)
        first, last = (int(columns[0]), int(columns[-1])) if columns.numel() else (0, -1)
        positions = torch.arange(first, last + 1, device=input_ids.device)
        kept = predicts[:, first : last + 1].reshape(-1)
        rows = kept.nonzero().squeeze(1)
        inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        )
        labels = next_labels[:, first : last + 1].reshape(-1)[rows]
        return cls(
            inputs | {"use_cache": False}, positions, rows, labels, rows // max(positions.numel(), 1), B
        )

    def select(self, outputs: torch.Tensor) -> torch.Tensor:
        """(n, ...) label-predicting rows of a model output over every position, (B or 1, T, ...)."""
        return outputs[:, self.positions].reshape(-1, *outputs.shape[2:])[self.rows]

    def row_sums(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) sums of per-label ``values`` (n,) over each row."""
        out = torch.zeros(self.n_rows, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.row_of, values)


def response_tokens(
    sequences: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, *, padding_free: bool
) -> TokenBatch:
    """The layout of prompt + response rows (B, P + R) whose labels are the response tokens
    (``response_mask`` (B, R)): position P − 1 + r predicts response token r."""
    P = sequences.shape[1] - response_mask.shape[1]
    next_labels = torch.full_like(sequences, -100)
    next_labels[:, P - 1 : -1] = torch.where(response_mask, sequences[:, P:], -100)
    return TokenBatch.build(sequences, attention_mask, next_labels, padding_free=padding_free)


def to_padded(flat: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Response-token values listed row by row (n,), back to (B, R) with zeros after each response."""
    out = torch.zeros(response_mask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(response_mask, flat)


# --------------------------------------------------------------------------------------------
# Model -> per-token log-probs (the one path) and values.


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
            out = model(**tokens.inputs, logits_to_keep=tokens.positions).logits
        return out[..., 0], (out[..., 1] if entropy else None)
    logits = tokens.select(model(**tokens.inputs).logits)
    result = fastppo.token_logprobs(logits, tokens.labels, temperature=temperature, return_entropy=entropy)
    return result if entropy else (result, None)


def values_of(critic, tokens: TokenBatch) -> torch.Tensor:
    """(n,) fp32 values of a token-classification critic (num_labels=1) at the label positions."""
    return tokens.select(critic(**tokens.inputs).logits)[..., 0].float()


# --------------------------------------------------------------------------------------------
# Generation and scoring.


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (for generation), with BOS when the tokenizer has one and
    its chat template when it has one."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = [bos + tokenizer(apply_template(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]
    batch = packing.collate(ids, tokenizer.pad_token_id, side="left")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def ends_at_eos(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """A response ends at its first EOS (included); what generate writes after it is padding."""
    eos = (responses == eos_token_id).long()
    return (eos.cumsum(1) - eos) == 0


@dataclass
class Samples:
    """Generated responses of one batch of prompts."""

    prompts: list[str]  # (B,) the prompt of each response
    texts: list[str]  # (B,) the responses, decoded up to their EOS
    sequences: torch.Tensor  # (B, P + R) int64, left-padded prompt then response
    prompt_mask: torch.Tensor  # (B, P) bool
    response_mask: torch.Tensor  # (B, R) bool, response tokens up to and including EOS
    truncated: torch.Tensor  # (B,) bool, no EOS within the token limit
    sampler_logp: torch.Tensor | None = None  # (B, R) fp32, what the sampler gave each token

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], 1)

    def tokens(self, padding_free: bool) -> TokenBatch:
        return response_tokens(
            self.sequences, self.attention_mask, self.response_mask, padding_free=padding_free
        )


class SamplerLogprobs(LogitsProcessor):
    """Last of generate's processors: the log-prob the sampler gave each token it sampled (after
    temperature and top-p), as a vLLM-style sampler reports it. A step's log-softmax (B, V) is kept
    only until the next step shows which token was drawn."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None

    def _take(self, tokens: torch.Tensor) -> None:
        if self._pending is not None:
            self.steps.append(self._pending.gather(1, tokens[:, None]).squeeze(1))
            self._pending = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self._pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, responses: torch.Tensor) -> torch.Tensor:
        """(B, R) fp32 for the generated ``responses`` (B, R)."""
        self._take(responses[:, len(self.steps)])
        return (
            torch.stack(self.steps, 1)
            if self.steps
            else responses.new_zeros(responses.shape, dtype=torch.float32)
        )


@torch.no_grad()
def generate(
    policy,
    tokenizer,
    prompts: list[str],
    device,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    sampler_logprobs: bool = False,
) -> Samples:
    """Sample one response per prompt (``temperature`` 0: greedy); ``sampler_logprobs``: also keep
    the log-prob the sampler drew each token with (``Samples.sampler_logp``)."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    # The warpers are ours, so that the recorder sees the distribution tokens are drawn from.
    processors = LogitsProcessorList()
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1:
            processors.append(TopPLogitsWarper(top_p))
    recorder = SamplerLogprobs() if sampler_logprobs else None
    if recorder is not None:
        processors.append(recorder)
    sample = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if temperature > 0 else {}
    with runtime.autocast(device):
        # Sharded weights: every generation step is a collective, so all ranks step until all are done.
        sequences = runtime.unwrap(policy).generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            synced_gpus=runtime.is_sharded(policy), logits_processor=processors, **sample,
        )  # fmt: skip
    responses = sequences[:, prompt_ids.shape[1] :]
    response_mask = ends_at_eos(responses, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(
        torch.where(response_mask, responses, tokenizer.pad_token_id), skip_special_tokens=True
    )
    truncated = ~(responses == tokenizer.eos_token_id).any(1)
    sampler_logp = None
    if recorder is not None:
        sampler_logp = torch.where(response_mask, recorder.result(responses), 0.0)
    return Samples(prompts, texts, sequences, prompt_mask.bool(), response_mask, truncated, sampler_logp)


def load_reward(spec: str, tokenizer):
    """A function (prompts, responses) -> list of float scores: "echo" (the built-in task),
    "module:function", or a sequence-classification reward model (a folder or a Hugging Face id)."""
    if spec == "echo":
        return tiny.echo_reward
    if Path(spec).exists() or ":" not in spec:
        model = AutoModelForSequenceClassification.from_pretrained(spec, num_labels=1).eval()

        @torch.no_grad()
        def model_reward(prompts, responses):
            batch = tokenizer(
                [p + r for p, r in zip(prompts, responses, strict=True)], return_tensors="pt", padding=True
            )
            return model(**batch).logits[:, 0].float().tolist()

        return model_reward
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise UsageError(f"reward: cannot import module {module!r} ({exc})") from None
    except AttributeError:
        raise UsageError(f"reward: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise UsageError(f"reward: {spec} is not a function")
    return fn


# --------------------------------------------------------------------------------------------
# The rollout.


@dataclass
class Rollout:
    """One batch of sampled responses and everything the update reads from it."""

    sequences: torch.Tensor  # (B, P + R) int64
    attention_mask: torch.Tensor  # (B, P + R) bool
    response_mask: torch.Tensor  # (B, R) bool
    truncated: torch.Tensor  # (B,) bool, cut at the token limit
    group_ids: torch.Tensor  # (B,) int64, which prompt each response answers
    scores: torch.Tensor  # (B,) fp32
    old_logp: torch.Tensor  # (B, R) fp32, the sampling policy's log-probs; 0 after each response
    ref_logp: torch.Tensor  # (B, R) fp32, the reference's
    values: torch.Tensor | None  # (B, R) fp32, the critic's; None without one
    rollout_logp: torch.Tensor | None = None  # (B, R) fp32, the sampler's own; kept for rollout correction
    advantages: torch.Tensor | None = None  # (B, R), set by the advantage estimator
    returns: torch.Tensor | None = None  # (B, R), the critic's targets (estimators with a critic)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The sequences ``idx`` (a 1-D index or bool tensor over B)."""
        kept = {f.name: getattr(self, f.name) for f in fields(self)}
        return Rollout(**{k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in kept.items()})

    def tokens(self, padding_free: bool) -> TokenBatch:
        return response_tokens(
            self.sequences, self.attention_mask, self.response_mask, padding_free=padding_free
        )

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) the response tokens of a (B, R) tensor, row by row."""
        return x[self.response_mask]


@torch.no_grad()
def collect(
    policy,
    reference,
    critic,
    tokenizer,
    prompts: list[str],
    reward_fn,
    device,
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    padding_free: bool,
    fused: bool = True,
    sampler_logprobs: bool = False,
) -> Rollout:
    """Generate ``group_size`` responses per prompt, score them, and read the policy's and the
    reference's log-probs (at the sampling temperature; ``fused``: see ``token_logprobs_of``) and
    the critic's values, all through one layout of the batch; ``sampler_logprobs``: also the
    log-probs generation drew the tokens with (``Rollout.rollout_logp``)."""
    repeated = [p for p in prompts for _ in range(group_size)]
    policy.eval()
    if critic is not None:
        critic.eval()
    samples = generate(policy, tokenizer, repeated, device, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, sampler_logprobs=sampler_logprobs)  # fmt: skip
    scores = torch.tensor(reward_fn(repeated, samples.texts), dtype=torch.float32, device=device)
    tokens = samples.tokens(padding_free)
    with runtime.autocast(device):
        old_logp, _ = token_logprobs_of(policy, tokens, temperature=temperature, fused=fused)
        ref_logp, _ = token_logprobs_of(reference, tokens, temperature=temperature, fused=fused)
        values = values_of(critic, tokens) if critic is not None else None
    mask = samples.response_mask
    return Rollout(
        sequences=samples.sequences, attention_mask=samples.attention_mask, response_mask=mask,
        truncated=samples.truncated, group_ids=torch.arange(len(repeated), device=device) // group_size,
        scores=scores, old_logp=to_padded(old_logp, mask), ref_logp=to_padded(ref_logp, mask),
        values=to_padded(values, mask) if values is not None else None, rollout_logp=samples.sampler_logp,
    )  # fmt: skip
