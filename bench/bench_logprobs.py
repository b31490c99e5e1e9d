"""token_logprobs: per-token log-probs + entropy from bf16 logits.

Providers: ``torch`` (eager log_softmax + gather + entropy, i.e. ``fastppo.reference``),
``compile`` (torch.compile of the same), ``trl`` (``selective_log_softmax`` and
``entropy_from_logits`` from ``trl.trainer.utils``, when trl is installed) and ``fastppo``
(out of place, and with ``inplace_backward`` as shape key ``inplace=1``).

Bytes floor: forward reads the logits once (N·V·s); forward+backward reads them twice and
writes their gradient once (3·N·V·s); labels and per-row outputs are O(N).
"""

import functools
import importlib.util

import torch

import fastppo
from bench.harness import Benchmark

OP = "token_logprobs"
OPS = (OP,)
FULL_SHAPES = [(n, v) for n in (4096, 16384, 65536) for v in (32000, 151936)]
QUICK_SHAPES = [(16, 1000), (64, 4096)]
TEMPERATURE = 0.9


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


def _fastppo(inplace: bool):
    return lambda logits, labels: fastppo.token_logprobs(
        logits, labels, temperature=TEMPERATURE, return_entropy=True, inplace_backward=inplace
    )


def _providers(names, log):
    table = {
        "torch": lambda: _reference,
        "compile": _compiled,
        "trl": _trl,
        "fastppo": lambda: _fastppo(False),
    }
    for name in names:
        if name == "trl" and importlib.util.find_spec("trl") is None:
            log("token_logprobs: trl is not installed, provider 'trl' left out")
            continue
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
