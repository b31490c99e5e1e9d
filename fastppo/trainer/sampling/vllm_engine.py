"""The ``vllm`` engine: a vLLM ``LLM`` in each training process.

It is built from the policy's folder or model id (the embedded default, or a run that starts from
weights not on disk, writes ``<output_dir>/rollout-engine/`` first), then synced from the trainer
at start and after every update: every tensor pushed in place through vLLM's ``reload_weights``
(in this process: a Python iterator, one tensor at a time; FSDP2 gathers each in its turn; LoRA
merged per layer), the prefix cache reset, and the fingerprint checked (``engine.py``).

Under torchrun every rank has its own engine and samples its own prompts with its own seeds. On a
GPU the engine takes ``--vllm_gpu_memory_utilization`` of the device and sleeps during the update
(``--vllm_sleep``: KV cache freed, weights offloaded; woken before the push, and the push and the
fingerprint come after the wake, so a wake that restores stale weights is overwritten and would
be caught). On CPU sleep is a no-op: vLLM's CPU backend has no sleep mode.
"""

import os
from pathlib import Path

import torch

from fastppo.trainer import lora, runtime
from fastppo.trainer.errors import UsageError
from fastppo.trainer.sampling import weights
from fastppo.trainer.sampling.engine import EngineSampler, completion_lists, one_line_reason, sampling_fields

WORKER_EXTENSION = "fastppo.trainer.sampling.vllm_worker.WorkerExtension"


class VLLMSampler(EngineSampler):
    name = "vllm"

    def __init__(self, llm, tokenizer, *, verify_every: int, sleeps: bool, log=print):
        super().__init__(tokenizer, verify_every=verify_every, log=log)
        self.llm, self.sleeps, self.asleep = llm, sleeps, False

    def _complete(self, prompt_ids, settings, seeds):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        fields = sampling_fields(settings, self.eos_id)
        params = [SamplingParams(seed=seed, **fields) for seed in seeds]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        return completion_lists(self.llm.generate(prompts, params, use_tqdm=False))

    def _push(self, policy) -> int:
        count = 0

        def counted():
            nonlocal count
            for item in weights.full_weights(policy):
                count += 1
                yield item

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        return count

    def _rpc(self, method: str, **kwargs):
        return self.llm.collective_rpc(method, kwargs=kwargs)[0]

    def _reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down now (it also tears down the process group vLLM made for itself),
        not from a finalizer at interpreter exit, after the trainer's teardown."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def engine_model(cfg, run) -> str:
    """The folder or model id the engine loads: the policy's own (its base under LoRA), else a
    folder this run writes from the policy as it starts (rank 0 writes, every rank waits)."""
    if cfg.policy is not None:
        return cfg.policy
    folder = Path(run.out) / "rollout-engine"
    state = runtime.full_state_dict(run.policy)  # a collective under FSDP; None otherwise
    if run.distributed.main:
        model = runtime.unwrap(run.policy)
        if lora.is_peft(model):
            lora.AdapterDisabled(model).save_pretrained(folder)
        else:
            model.save_pretrained(folder, state_dict=state)
        run.tokenizer.save_pretrained(folder)
    if run.distributed.enabled:
        torch.distributed.barrier()
    return str(folder)


def start_llm(model: str, *, gpu: bool, seed: int, gpu_memory_utilization: float = 0.3, sleep: bool = False):
    """A vLLM ``LLM`` in this process from ``model`` (a folder or model id), with fastppo's worker
    extension and log-probs of the distribution sampled from; fp32 on CPU, bf16 on a GPU."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not a line per sync
    try:
        from vllm import LLM
    except ImportError as exc:
        raise UsageError(
            f"rollout_engine vllm: vLLM does not import ({exc}); see the README's Rollout engines"
        ) from None
    options = dict(
        model=model, tokenizer=model, dtype="bfloat16" if gpu else "float32", seed=seed,
        enforce_eager=not gpu,
        logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
        gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=gpu and sleep,
    )  # fmt: skip
    if not gpu:
        # A prompt prefilled in chunks rewinds its request's generator when the chunk's sample is
        # dropped, and a CPU generator cannot rewind ("CPU Generator does not use offset"): whole
        # prefills keep seeded requests working on CPU.
        options["enable_chunked_prefill"] = False
    llm = None
    try:
        llm = LLM(**options)
        warm_up(llm)
    except Exception as exc:  # an architecture or head size vLLM does not take, a bad folder
        if llm is not None:  # loaded, failed at its first step: free it now, not at exit
            llm.llm_engine.engine_core.shutdown()
        raise UsageError(f"rollout_engine vllm: vLLM cannot load {model} ({one_line_reason(exc)})") from None
    return llm


def warm_up(llm) -> None:
    """One short generation: some models load but fail at their first step (vLLM's CPU attention
    rejects head sizes under 32 there), and the first step's one-time cost stays out of the first
    iteration's ``time/generate``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=2), use_tqdm=False)


def build(cfg, run, log=print) -> VLLMSampler:
    model = engine_model(cfg, run)
    gpu = run.device.type == "cuda"
    sleeps = gpu and cfg.vllm_sleep
    llm = start_llm(model, gpu=gpu, seed=cfg.seed + run.distributed.rank,
                    gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, sleep=sleeps)  # fmt: skip
    log(
        f"rollout engine: vLLM {vllm_version()} from {model}"
        + (" (sleeps during the update)" if sleeps else "")
    )
    return VLLMSampler(llm, run.tokenizer, verify_every=cfg.verify_sync_every, sleeps=sleeps, log=log)


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")
