"""linear_logprobs: per-token log-probs + entropy of ``hidden @ weightᵀ``, forward + backward
(gradients to hidden and weight), bf16.

Providers: ``torch`` (eager: matmul, then fastppo.reference.token_logprobs on the logits),
``fastppo`` with ``fused=0`` (matmul + fastppo.token_logprobs: the logits exist) and ``fused=1``
(fastppo.linear_logprobs: one chunk of logits at a time), ``trl`` (TRL's
``ChunkedLogProbFunction``, log-probs and entropy), ``liger`` (Liger's fused linear
cross-entropy, log-probs only, when installed), and ``matmul``: the three plain N·H·V products
the op cannot avoid (logits, ∂hidden, ∂weight), timed alone as the floor to compare against.

Targets on an H200 at N = 16,384 with (H, V) = (896, 151,936) and (4,096, 128,256): fused time
≤ 1.35× ``matmul`` in the same run, extra peak memory ≤ 1 GiB.
"""

import torch

import fastppo
from fastppo.bench import harness
from fastppo.bench.harness import Benchmark

OP = "linear_logprobs"
OPS = (OP,)
FULL_SHAPES = [(16384, 896, 151936), (16384, 4096, 128256)]
QUICK_SHAPES = [(64, 32, 1000)]
TEMPERATURE = 0.9
PEERS = {"trl": "trl.kernels", "liger": "liger_kernel.transformers"}


def _eager(hidden, weight, labels):
    logits = hidden @ weight.T
    return fastppo.reference.token_logprobs(logits, labels, temperature=TEMPERATURE, return_entropy=True)


def _unfused(hidden, weight, labels):
    logits = hidden @ weight.T
    return fastppo.token_logprobs(logits, labels, temperature=TEMPERATURE, return_entropy=True)


def _fused(hidden, weight, labels):
    return fastppo.linear_logprobs(hidden, weight, labels, temperature=TEMPERATURE, return_entropy=True)


def _trl(hidden, weight, labels):
    from trl.kernels import ChunkedLogProbFunction

    logp, entropy, *_ = ChunkedLogProbFunction.apply(
        hidden, weight, None, labels, TEMPERATURE, 4096, None, 1.0, ("log_probs", "entropy")
    )
    return logp, entropy


def _liger(hidden, weight, labels):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden / TEMPERATURE, labels)
    return -loss, None


def _matmul(hidden, weight, labels):
    """The three products of forward + backward, with a gradient of the logits' shape."""
    del labels
    logits = hidden @ weight.T
    return logits, (logits @ weight, logits.T @ hidden)


PROVIDERS = {
    "torch": _eager,
    "fastppo-unfused": _unfused,
    "fastppo-fused": _fused,
    "trl": _trl,
    "liger": _liger,
    "matmul": _matmul,
}


def _setup(impl, N, H, V, dtype, device):
    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(N, H, device=device, dtype=dtype, generator=g)
        weight = (torch.randn(V, H, device=device, dtype=dtype, generator=g) * H**-0.5).requires_grad_()
        labels = torch.randint(0, V, (N,), device=device, generator=g)
        hidden.requires_grad_()
        if impl is _matmul:
            return lambda: impl(hidden.detach(), weight.detach(), labels)

        def fwd_bwd():
            hidden.grad = weight.grad = None
            logp, entropy = impl(hidden, weight, labels)
            total = logp.float().sum() + (entropy.float().sum() if entropy is not None else 0)
            total.backward()

        return fwd_bwd

    return setup


def benchmarks(*, device, quick, providers, modes, dtype, ops=OPS, log=print):
    if OP not in ops or "fwd_bwd" not in modes:
        return
    wanted = [p for p in ("torch", "fastppo", "trl", "liger", "matmul") if p in providers]
    available = harness.importable_providers(wanted, PEERS, OP, log)
    if torch.device(device).type != "cuda":
        available = [p for p in available if p != "trl"]  # TRL's chunked kernel is Triton on CUDA only
    for N, H, V in QUICK_SHAPES if quick else FULL_SHAPES:
        for name, impl in PROVIDERS.items():
            provider = name.split("-")[0]
            if provider not in available:
                continue
            shape = {"N": N, "H": H, "V": V}
            if provider == "fastppo":
                shape["fused"] = int(name.endswith("-fused"))
            yield Benchmark(
                op=OP,
                provider=provider,
                mode="fwd_bwd",
                dtype=str(dtype).removeprefix("torch."),
                shape=shape,
                bytes_floor=0,  # compute-bound: compare with the matmul provider instead
                setup=_setup(impl, N, H, V, dtype, device),
            )
