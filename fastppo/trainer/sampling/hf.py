"""The ``hf`` engine: transformers' ``generate`` on the trained policy itself, in this process.

It samples from the policy's own weights, so ``sync`` has nothing to push; its log-probs differ
from the trainer's only by numerics (the same model, a cached incremental forward). Under FSDP
every generation step is a collective, so all ranks step until every rank is done.
"""

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from fastppo import packing
from fastppo.trainer import runtime
from fastppo.trainer.sampling.base import Generated, Sampler, SamplingSettings, ends_at_eos


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


class HFSampler(Sampler):
    """``model.generate`` with the warpers placed so that ``SamplerLogprobs`` sees the distribution
    tokens are drawn from (temperature, then top-p)."""

    name = "hf"
    is_policy = True

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model  # possibly DDP-wrapped or FSDP-sharded
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, device) -> Generated:
        batch = packing.collate(prompt_ids, self.pad_id, side="left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        processors = LogitsProcessorList()
        if settings.temperature > 0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1:
                processors.append(TopPLogitsWarper(settings.top_p))
        recorder = SamplerLogprobs() if settings.logprobs else None
        if recorder is not None:
            processors.append(recorder)
        draw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if settings.temperature > 0 else {}
        with runtime.autocast(device):
            sequences = runtime.unwrap(self.model).generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                synced_gpus=runtime.is_sharded(self.model), logits_processor=processors, **draw,
            )  # fmt: skip
        responses = sequences[:, ids.shape[1] :]
        response_mask = ends_at_eos(responses, self.eos_id)
        truncated = ~(responses == self.eos_id).any(1)
        logprobs = recorder.result(responses) if recorder is not None else None
        return Generated(responses, response_mask, truncated, logprobs)
