"""What the vLLM engines share, in this process or behind a server: sampling settings mapped one
to one, completions turned into ``Generated``, and the sync (push, reset the prefix cache, verify
every ``verify_every`` syncs).

    push(policy)          every tensor of the policy (sampling/weights.py), in place in the engine
    reset_prefix_cache()  cached prompt KV was computed with the old weights
    verify(policy)        fingerprints on both sides (sampling/fingerprint.py); a mismatch stops
"""

import time

import torch

from fastppo.trainer.errors import EngineError
from fastppo.trainer.sampling import fingerprint, weights
from fastppo.trainer.sampling.base import Generated, Sampler, SamplingSettings, SyncReport, from_token_lists


def request_seeds(n: int) -> list[int]:
    """One seed per request, drawn from torch's global generator: each rank's own (ranks are seeded
    apart) and restored on resume, so a resumed run samples what the uninterrupted one would."""
    base = int(torch.randint(0, 2**31 - 1, (1,)))
    return [(base + i) % (2**31 - 1) for i in range(n)]


def sampling_fields(settings: SamplingSettings, eos_id: int) -> dict:
    """vLLM ``SamplingParams`` fields of ``settings`` (a per-request ``seed`` is added to them).
    EOS stops a response and is part of it, as with ``hf``; temperature 0 is greedy."""
    return dict(
        max_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p if settings.temperature > 0 else 1.0,
        top_k=-1 if settings.temperature > 0 else 1,
        logprobs=0 if settings.logprobs else None, stop_token_ids=[eos_id], ignore_eos=False,
        skip_special_tokens=False,
    )  # fmt: skip


class EngineSampler(Sampler):
    """A vLLM engine. Subclasses move the data: ``_complete`` (prompts → token ids, log-probs,
    ended at EOS), ``_push`` (the policy's tensors into the engine), ``_rpc`` (a method of
    ``vllm_worker.WorkerExtension``), ``_reset_prefix_cache``."""

    def __init__(self, tokenizer, *, verify_every: int, log=print):
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.verify_every, self.log, self.syncs = verify_every, log, 0
        self.layout: fingerprint.EngineLayout | None = None

    # -- what subclasses provide
    def _complete(
        self, prompt_ids, settings, seeds
    ) -> tuple[list[list[int]], list[list[float]] | None, list[bool]]:
        raise NotImplementedError

    def _push(self, policy) -> int:
        raise NotImplementedError

    def _rpc(self, method: str, **kwargs):
        raise NotImplementedError

    def _reset_prefix_cache(self) -> None:
        raise NotImplementedError

    # -- the seam
    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, device) -> Generated:
        seeds = request_seeds(len(prompt_ids))
        try:
            tokens, logprobs, finished = self._complete(prompt_ids, settings, seeds)
        except EngineError:
            raise
        except Exception as exc:  # the engine died, the server went away
            raise EngineError(
                f"rollout engine {self.name}: generation failed ({one_line_reason(exc)})"
            ) from exc
        return from_token_lists(tokens, logprobs, finished, self.pad_id, device)

    def check_identity(self, policy) -> None:
        """The engine serves the policy's architecture and vocabulary (read once)."""
        self.layout = fingerprint.EngineLayout.from_json(self._rpc("fastppo_layout"))
        config = policy.config if hasattr(policy, "config") else policy.module.config
        want_arch = (getattr(config, "architectures", None) or [self.layout.architecture])[0]
        if self.layout.architecture != want_arch or self.layout.vocab_size != config.vocab_size:
            raise EngineError(
                f"rollout engine {self.name} serves a {self.layout.architecture} with a vocabulary of "
                f"{self.layout.vocab_size}; the policy is a {want_arch} with {config.vocab_size}"
            )

    def sync(self, policy) -> SyncReport:
        start = time.perf_counter()
        if self.layout is None:
            self.check_identity(policy)
        try:
            count = self._push(policy)
            self._reset_prefix_cache()
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(
                f"rollout engine {self.name}: weight sync failed ({one_line_reason(exc)})"
            ) from exc
        self.syncs += 1
        due = self.verify_every > 0 and (self.syncs == 1 or self.syncs % self.verify_every == 0)
        if due:
            self.verify(policy)
        return SyncReport(time.perf_counter() - start, count, due)

    def verify(self, policy) -> None:
        """Raise ``EngineError`` naming every engine tensor whose fingerprint differs from the trainer's."""
        want = fingerprint.expected(weights.full_weights(policy), self.layout)
        got = self._rpc("fastppo_fingerprints", spec=fingerprint.spec_json(want))
        bad = fingerprint.mismatches(want, got, self.layout)
        if bad:
            shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            error = EngineError(f"rollout engine {self.name}: after sync {self.syncs} its weights differ "
                                f"from the trainer's: {shown}")  # fmt: skip
            error.tensors = [entry.split(" (")[0] for entry in bad]
            raise error


def completion_lists(outputs) -> tuple[list[list[int]], list[list[float]] | None, list[bool]]:
    """vLLM ``RequestOutput``s → per response token ids, the log-prob each was drawn with (None
    unless asked), and whether it ended at EOS (else it was cut at max_tokens)."""
    tokens, logprobs, finished = [], [], []
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        tokens.append(ids)
        finished.append(completion.finish_reason == "stop")
        if completion.logprobs is None:
            logprobs = None
        elif logprobs is not None:
            logprobs.append(
                [float(step[t].logprob) for t, step in zip(ids, completion.logprobs, strict=True)]
            )
    return tokens, logprobs, finished


def one_line_reason(exc: BaseException) -> str:
    """The innermost message of an exception chain, on one line."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".strip(": ")
