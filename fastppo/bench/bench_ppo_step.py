"""One PPO update step of a ~0.5B-parameter causal LM: where the fused ops sit in a whole step.

The model is a Qwen2 built from Qwen2-0.5B's config (494 M parameters, vocabulary 151,936) with
random weights, bf16 autocast on GPU, fp32 weights and AdamW. A step is the trainer's own
``micro_batch_losses`` (``fastppo.trainer.ppo``) on one micro-batch: the model's forward,
log-probs with entropy at the response tokens, ``ppo_policy_loss`` with a k3 KL term and an
entropy bonus (the GRPO form, no critic), backward, gradient clipping and the optimizer step.

Providers: ``fastppo`` (the ops' Triton kernels, log-probs by ``linear_logprobs`` from hidden
states: no logits) and ``torch`` (``FASTPPO_BACKEND=torch`` and ``fused_lm_head=False``: the
lm_head's logits and the ops' eager PyTorch references, i.e. what a trainer without fastppo runs).
Peak memory is measured on a step after a warm-up step, so the optimizer's state is already there
and the difference between providers is the step's own (the logits' temporaries above all).

Shapes: ``B`` sequences of ``P`` prompt and ``R`` response tokens, every response token in the
loss. There is no bytes floor (a model step is compute-bound): no GB/s is reported.
Full shapes need a GPU; ``--quick`` runs a 2-layer model of the same form on any device.
"""

import contextlib
import os

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from fastppo.bench.harness import Benchmark
from fastppo.trainer import ppo
from fastppo.trainer.config import PPOConfig
from fastppo.trainer.rollout import Rollout

OP = "ppo_step"
OPS = (OP,)
FULL_SHAPES = [(8, 256, 768), (16, 512, 1536)]  # (B, P, R): 8 k and 32 k tokens
QUICK_SHAPES = [(4, 8, 24)]
KL_COEF = 0.05


def qwen2_config(quick: bool) -> Qwen2Config:
    """Qwen2-0.5B's architecture (or a 2-layer miniature of it for --quick)."""
    if quick:
        return Qwen2Config(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
    return Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )  # fmt: skip


@contextlib.contextmanager
def backend(name: str):
    """Run the block with ``FASTPPO_BACKEND=name`` (read by every op call)."""
    previous = os.environ.get("FASTPPO_BACKEND")
    os.environ["FASTPPO_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FASTPPO_BACKEND"]
        else:
            os.environ["FASTPPO_BACKEND"] = previous


def rollout_batch(B: int, P: int, R: int, vocab: int, device) -> Rollout:
    """What a rollout hands the update: full sequences, responses of random length (at least
    half of R), and the log-probs and advantages the loss compares against."""
    g = torch.Generator(device=device).manual_seed(0)
    sequences = torch.randint(0, vocab, (B, P + R), device=device, generator=g)
    lengths = torch.randint(R // 2, R + 1, (B,), device=device, generator=g)
    response_mask = torch.arange(R, device=device)[None, :] < lengths[:, None]
    attention_mask = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), response_mask], 1)
    old_logp = -torch.rand(B, R, device=device, generator=g) * 5
    ref_logp = old_logp + 0.1 * torch.randn(B, R, device=device, generator=g)
    advantages = torch.randn(B, 1, device=device, generator=g).expand(B, R)
    packed = lambda x: x[response_mask]  # noqa: E731 (the rollout's layout: response tokens row by row)
    return Rollout(
        sequences=sequences, attention_mask=attention_mask, response_mask=response_mask,
        truncated=torch.zeros(B, dtype=torch.bool, device=device),
        group_ids=torch.arange(B, device=device) // 2, scores=torch.zeros(B, device=device),
        host_attention=attention_mask.cpu().numpy(),
        cu_seqlens=torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
        old_logp=packed(old_logp), ref_logp=packed(ref_logp), values=None, advantages=packed(advantages),
    )  # fmt: skip


def _setup(provider: str, shape: tuple[int, int, int], quick: bool, device):
    def setup():
        B, P, R = shape
        torch.manual_seed(0)
        config = qwen2_config(quick)
        policy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        # fastppo: the fused head (no logits); torch: the lm_head's logits and the eager references.
        cfg = PPOConfig(algo="grpo", group_size=2, kl_coef=KL_COEF, entropy_coef=0.01, padding_free=False,
                        fused_lm_head=provider != "torch")  # fmt: skip
        batch = rollout_batch(B, P, R, config.vocab_size, device)
        n_tokens = int(batch.response_mask.sum())

        def step():
            with backend("torch" if provider == "torch" else "auto"):
                loss, *_ = ppo.micro_batch_losses(
                    cfg,
                    policy,
                    None,
                    batch,
                    kl_coef=KL_COEF,
                    normaliser=n_tokens,
                    n_tokens=n_tokens,
                    device=torch.device(device),
                )
                loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: compiles the kernels and allocates the optimizer's state
        return step

    return setup


def benchmarks(*, device, quick, providers, modes, dtype=None, ops=OPS, log=print):
    del dtype  # the model runs under bf16 autocast on GPU (fp32 on CPU), whatever --dtype says
    if OP not in ops or "fwd_bwd" not in modes:
        return
    if not quick and torch.device(device).type != "cuda":
        log("ppo_step: a 0.5B-parameter step needs a GPU; run it with --quick on CPU")
        return
    for shape in QUICK_SHAPES if quick else FULL_SHAPES:
        for provider in (p for p in ("torch", "fastppo") if p in providers):
            yield Benchmark(
                op=OP,
                provider=provider,
                mode="fwd_bwd",
                dtype="bfloat16-autocast" if torch.device(device).type == "cuda" else "float32",
                shape=dict(zip("BPR", shape, strict=True)),
                bytes_floor=0,
                setup=_setup(provider, shape, quick, device),
            )
