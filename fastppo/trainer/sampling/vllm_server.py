"""The ``vllm-server`` engine: a vLLM server elsewhere (``fastppo vllm-serve``), over HTTP.

This is how a run outgrows one machine: the trainer on N GPUs under torchrun, vLLM on M others.

- Generation: ``POST /v1/completions`` with token ids in (``prompt``: a list of ids) and token
  ids and log-probs out (``return_token_ids``, ``logprobs: 0`` of the processed distribution), one
  request per response with its own seed, sent concurrently so the server batches them.
- Sync, where NCCL is not available (CPU, tests): the trainer writes the full weights as
  safetensors into ``<output_dir>/rollout-sync/`` (a folder the server can read: the same machine
  or a shared filesystem), then ``/pause`` (generation waits) → ``/collective_rpc``
  ``fastppo_reload_folder`` (``vllm_worker.py``: in place) → ``/reset_prefix_cache`` → ``/resume``.
- Verified as the in-process engine is, through ``/collective_rpc`` (``engine.py``).

A server that cannot be reached, goes away or serves another model (architecture, vocabulary)
stops the run with one line; once the run has started, a checkpoint is saved first.
"""

import json
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fastppo.trainer.errors import EngineError, UsageError
from fastppo.trainer.sampling import weights
from fastppo.trainer.sampling.engine import EngineSampler, one_line_reason, sampling_fields

#: Seconds a request may take: a whole batch's generation, or a reload of the weights.
TIMEOUT_S = 600
#: Bytes of one safetensors file of a sync (the full weights are written a file at a time).
SHARD_BYTES = 1 << 30


class ServerSampler(EngineSampler):
    name = "vllm-server"

    def __init__(
        self, url: str, tokenizer, sync_dir: Path, *, verify_every: int, log=print, main: bool = True
    ):
        super().__init__(tokenizer, verify_every=verify_every, log=log)
        self.url, self.sync_dir, self.main = url.rstrip("/"), Path(sync_dir), main
        self.model = self._get("/v1/models")["data"][0]["id"]

    # -- HTTP
    def _request(self, path: str, body: dict | None = None, method: str = "POST", timeout: float = TIMEOUT_S):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
        return json.loads(text) if text.strip() else None

    def _get(self, path: str):
        try:
            return self._request(path, method="GET", timeout=30)
        except (urllib.error.URLError, OSError) as exc:
            raise EngineError(f"{self.url} does not answer ({one_line_reason(exc)})") from exc

    def _rpc(self, method: str, **kwargs):
        return self._request("/collective_rpc", {"method": method, "kwargs": kwargs})["results"][0]

    def _reset_prefix_cache(self) -> None:
        self._request("/reset_prefix_cache")

    # -- generation
    def _complete(self, prompt_ids, settings, seeds):
        fields = sampling_fields(settings, self.eos_id)
        if fields["logprobs"] is None:
            del fields["logprobs"]
        common = dict(model=self.model, return_token_ids=True, **fields)

        def one(ids_seed):
            ids, seed = ids_seed
            choice = self._request("/v1/completions", dict(common, prompt=ids, seed=seed))["choices"][0]
            logprobs = choice["logprobs"]["token_logprobs"] if settings.logprobs else None
            return choice["token_ids"], logprobs, choice["finish_reason"] == "stop"

        with ThreadPoolExecutor(max_workers=min(64, max(len(prompt_ids), 1))) as pool:
            results = list(pool.map(one, zip(prompt_ids, seeds, strict=True)))
        tokens = [r[0] for r in results]
        logprobs = [r[1] for r in results] if settings.logprobs else None
        return tokens, logprobs, [r[2] for r in results]

    # -- sync
    def _push(self, policy) -> int:
        """Write the full weights a file at a time, then have the server load them in place while
        generation is paused."""
        from safetensors.torch import save_file

        if self.main:
            shutil.rmtree(self.sync_dir, ignore_errors=True)
            self.sync_dir.mkdir(parents=True)
        shard, size, count, files, stored = {}, 0, 0, 0, set()
        for name, tensor in weights.full_weights(policy):  # every rank gathers (FSDP); one writes
            count += 1
            if self.main:
                tensor = tensor.detach().to("cpu").contiguous()
                if tensor.data_ptr() in stored:  # a tied weight (lm_head = embed_tokens): its own copy
                    tensor = tensor.clone()
                stored.add(tensor.data_ptr())
                shard[name] = tensor
                size += tensor.numel() * tensor.element_size()
            if size >= SHARD_BYTES:
                save_file(shard, str(self.sync_dir / f"weights-{files:05d}.safetensors"))
                shard, size, files = {}, 0, files + 1
        if self.main:
            if shard:
                save_file(shard, str(self.sync_dir / f"weights-{files:05d}.safetensors"))
            self._request("/pause?mode=wait")
            try:
                self._rpc("fastppo_reload_folder", folder=str(self.sync_dir.resolve()))
            finally:
                self._request("/resume")
        if torch.distributed.is_initialized():  # no rank samples before the server holds the new weights
            torch.distributed.barrier()
        return count

    def close(self) -> None:
        """The server keeps the weights it loaded; the folder they came through goes (a full copy)."""
        if self.main:
            shutil.rmtree(self.sync_dir, ignore_errors=True)


def build(cfg, run, log=print) -> ServerSampler:
    """A client of the server at ``cfg.vllm_server_url``; one that does not answer stops the run.
    Under torchrun every rank sends its own prompts; rank 0 writes the weights and has them loaded,
    and every rank waits for that before it samples again."""
    return connect(cfg.vllm_server_url, run.tokenizer, Path(run.out) / "rollout-sync",
                   verify_every=cfg.verify_sync_every, log=log, main=run.distributed.main)  # fmt: skip


def connect(url: str, tokenizer, sync_dir: Path, *, verify_every: int, log=print, main: bool = True):
    """A ``ServerSampler`` of the server at ``url``; one that does not answer is a ``UsageError``."""
    try:
        sampler = ServerSampler(url, tokenizer, sync_dir, verify_every=verify_every, log=log, main=main)
    except EngineError as exc:
        raise UsageError(
            f"vllm_server_url: {exc}; start one with `fastppo vllm-serve --model M --port P`"
        ) from None
    log(f"rollout engine: vLLM server at {sampler.url} serving {sampler.model}")
    return sampler
