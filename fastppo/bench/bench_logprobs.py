"""token_logprobs: per-token log-probs + entropy from bf16 logits.

Providers: ``torch`` (eager log_softmax + gather + entropy, i.e. ``fastppo.reference``),
``compile`` (torch.compile of the same), the peers' own functions when they are installed:
``trl`` (``selective_log_softmax`` and ``entropy_from_logits`` from ``trl.trainer.utils``),
``verl`` (``logprobs_from_logits``, flash-attn's cross-entropy where installed, and
``entropy_from_logits`` from ``verl.utils.torch_functional``), ``openrlhf``
(``log_probs_from_logits`` and ``compute_entropy`` from ``openrlhf.models.utils``), and
``fastppo`` (out of place, and with ``inplace_backward`` as shape key ``inplace=1``).
Each peer provider divides the logits by the temperature itself, as its trainer does.

Bytes floor: forward reads the logits once (N·V·s); forward+backward reads them twice and
writes their gradient once (3·N·V·s); labels and per-row outputs are O(N).
"""

import functools

import torch

import fastppo
from fastppo.bench import harness
from fastppo.bench.harness import Benchmark

OP = "token_logprobs"
OPS = (OP,)
FULL_SHAPES = [(n, v) for n in (4096, 16384, 65536) for v in (32000, 151936)]
QUICK_SHAPES = [(16, 1000), (64, 4096)]
TEMPERATURE = 0.9
PEERS = {
    "trl": "trl.trainer.utils",
    "verl": "verl.utils.torch_functional",
    "openrlhf": "openrlhf.models.utils",
}


def _reference(logits, labels):
    return fastppo.reference.token_logprobs(logits, labels, temperature=TEMPERATURE, return_entropy=True)


@functools.cache
def _compiled():
    return torch.compile(_reference, dynamic=False)


def _trl():
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    def trl_logprobs(logits, labels):
        scaled = logits / TEMPERATURE
        return selective_log_softmax(scaled, labels), entropy_from_logits(scaled)

    return trl_logprobs


def _verl():
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    def verl_logprobs(logits, labels):
        scaled = logits / TEMPERATURE
        return logprobs_from_logits(scaled, labels), entropy_from_logits(scaled)

    return verl_logprobs


def _openrlhf():
    from openrlhf.models.utils import compute_entropy, log_probs_from_logits

    def openrlhf_logprobs(logits, labels):
        scaled = logits / TEMPERATURE  # its own division is in place, which autograd refuses on a leaf
        return log_probs_from_logits(scaled, labels), compute_entropy(scaled)

    return openrlhf_logprobs


def _fastppo(inplace: bool):
    return lambda logits, labels: fastppo.token_logprobs(
        logits, labels, temperature=TEMPERATURE, return_entropy=True, inplace_backward=inplace
    )


def _providers(names, log):
    table = {
        "torch": lambda: _reference,
        "compile": _compiled,
        "trl": _trl,
        "verl": _verl,
        "openrlhf": _openrlhf,
        "fastppo": lambda: _fastppo(False),
    }
    for name in harness.importable_providers(names, PEERS, OP, log):
        if name in table:
            yield name, table[name]


def _setup(make_impl, N, V, dtype, device, mode):
    def setup():
        impl = make_impl()
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(N, V, device=device, dtype=dtype, generator=g)
        labels = torch.randint(0, V, (N,), device=device, generator=g)
        if mode == "fwd":
            return lambda: impl(logits, labels)
        logits.requires_grad_()
        g_logp = torch.randn(N, device=device)
        g_ent = torch.randn(N, device=device)

        def fwd_bwd():
            logits.grad = None
            logp, entropy = impl(logits, labels)
            torch.autograd.backward((logp, entropy), (g_logp.to(logp.dtype), g_ent.to(entropy.dtype)))

        return fwd_bwd

    return setup


def benchmarks(*, device, quick, providers, modes, dtype, ops=OPS, log=print):
    if OP not in ops:
        return
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    available = list(_providers(providers, log))
    for N, V in shapes:
        itemsize = dtype.itemsize
        for mode in modes:
            floor = (1 if mode == "fwd" else 3) * N * V * itemsize + N * (8 + 4 + 4)
            cases = list(available)
            if mode == "fwd_bwd" and "fastppo" in providers:
                cases.append(("fastppo-inplace", lambda: _fastppo(True)))
            for name, make_impl in cases:
                shape = {"N": N, "V": V}
                provider = name
                if name.startswith("fastppo"):
                    provider = "fastppo"
                    shape["inplace"] = int(name.endswith("inplace"))
                yield Benchmark(
                    op=OP,
                    provider=provider,
                    mode=mode,
                    dtype=str(dtype).removeprefix("torch."),
                    shape=shape,
                    bytes_floor=floor,
                    setup=_setup(make_impl, N, V, dtype, device, mode),
                )
