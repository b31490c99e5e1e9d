"""Rollout engines behind one seam (``base.Sampler``): ``hf`` (transformers' generate on the policy
itself), ``vllm`` (a vLLM engine in this process, weights pushed in place every iteration) and
``vllm-server`` (a ``fastppo vllm-serve`` server elsewhere, over HTTP). A new engine is one new
module with a ``Sampler`` and one entry in ``ENGINES``.
"""

from fastppo.trainer.sampling.base import (
    Generated,
    Sampler,
    Samples,
    SamplingSettings,
    SyncReport,
    encode_prompts,
    sample,
)
from fastppo.trainer.sampling.hf import HFSampler

#: ``--rollout_engine`` choices.
ENGINES = ("hf", "vllm", "vllm-server")

__all__ = [
    "ENGINES",
    "Generated",
    "HFSampler",
    "Sampler",
    "Samples",
    "SamplingSettings",
    "SyncReport",
    "encode_prompts",
    "sample",
]


def build(cfg, run, log=print) -> Sampler:
    """The sampler ``cfg.rollout_engine`` names, for ``run`` (a ``ppo.Run``: its policy, tokenizer,
    device, ranks and output folder); an engine outside this process starts from the policy's
    current weights (one verified sync)."""
    if cfg.rollout_engine == "hf":
        return HFSampler(run.policy, run.tokenizer)
    if cfg.rollout_engine == "vllm":
        from fastppo.trainer.sampling import vllm_engine

        sampler = vllm_engine.build(cfg, run, log)
    else:
        from fastppo.trainer.sampling import vllm_server

        sampler = vllm_server.build(cfg, run, log)
    sampler.sync(run.policy)
    return sampler
