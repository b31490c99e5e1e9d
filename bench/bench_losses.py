"""kl_penalty, ppo_policy_loss and value_loss on fp32 (B, T) token tensors with a bool mask.

Providers: ``torch`` (the eager reference in ``fastppo.reference``), ``compile`` (torch.compile of
it), ``verl`` (its own ``kl_penalty``, ``compute_policy_loss_vanilla`` + ``agg_loss`` terms and
``compute_value_loss``, when verl is installed) and ``fastppo``. The policy loss runs with
everything on: asymmetric and dual clip, a k3 KL term against ``ref_logp`` and an entropy bonus,
token-mean aggregation.

Bytes floor: every input read once and every output written once; forward+backward adds the
upstream gradient's read and each input gradient's write. Per token, fp32:
    kl_penalty       fwd 12 B (logp, ref_logp → kl)                     fwd_bwd 20 B
    ppo_policy_loss  fwd 21 B (5 fp32 inputs + the mask; 0-d outputs)  fwd_bwd 29 B (grad logp, entropy)
    value_loss       fwd 13 B (3 fp32 inputs + the mask)               fwd_bwd 17 B (grad values)
"""

import functools

import torch

import fastppo
from bench import harness
from bench.harness import Benchmark

OPS = ("kl_penalty", "ppo_policy_loss", "value_loss")
FULL_SHAPES = [(64, 1024), (256, 4096), (512, 8192)]
QUICK_SHAPES = [(4, 64), (8, 300)]
FLOOR_BYTES_PER_TOKEN = {
    ("kl_penalty", "fwd"): 12,
    ("kl_penalty", "fwd_bwd"): 20,
    ("ppo_policy_loss", "fwd"): 21,
    ("ppo_policy_loss", "fwd_bwd"): 29,
    ("value_loss", "fwd"): 13,
    ("value_loss", "fwd_bwd"): 17,
}
POLICY_OPTIONS = dict(
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    kl_coef=0.1,
    kl_estimator="k3",
    entropy_coef=0.01,
    agg="token-mean",
)


def _kl(module):
    return lambda b: module.kl_penalty(b["logp"], b["ref_logp"], "k3")


def _policy(module):
    def run(b):
        return module.ppo_policy_loss(
            b["logp"],
            b["old_logp"],
            b["advantages"],
            b["mask"],
            ref_logp=b["ref_logp"],
            entropy=b["entropy"],
            **POLICY_OPTIONS,
        )[0]

    return run


def _value(module):
    return lambda b: module.value_loss(b["values"], b["old_values"], b["returns"], b["mask"], clip=0.2)[0]


_IMPLS = {"kl_penalty": _kl, "ppo_policy_loss": _policy, "value_loss": _value}
_GRAD_INPUTS = {"kl_penalty": ("logp",), "ppo_policy_loss": ("logp", "entropy"), "value_loss": ("values",)}


@functools.cache
def _compiled(op):
    return torch.compile(_IMPLS[op](fastppo.reference), dynamic=False)


class _VerlActorConfig(dict):
    """The fields of verl's ActorConfig that its vanilla policy loss reads (attribute and ``get``)."""

    __getattr__ = dict.__getitem__


def _verl(op):
    """verl's functions, composed as its actor composes them for the policy loss: the vanilla
    clipped loss (dual clip on), a low_var_kl (k3) term and an entropy bonus, token-mean each."""
    from verl.trainer.ppo import core_algos

    if op == "kl_penalty":
        return lambda b: core_algos.kl_penalty(b["logp"], b["ref_logp"], "low_var_kl")
    if op == "value_loss":
        return lambda b: core_algos.compute_value_loss(
            b["values"], b["returns"], b["old_values"], b["mask"], 0.2
        )[0]
    o = POLICY_OPTIONS
    config = _VerlActorConfig(
        clip_ratio=o["clip_low"], clip_ratio_low=o["clip_low"], clip_ratio_high=o["clip_high"],
        clip_ratio_c=o["dual_clip"], global_batch_info={},
    )  # fmt: skip

    def run(b):
        mask = b["mask"].float()
        loss, _ = core_algos.compute_policy_loss_vanilla(
            b["old_logp"], b["logp"], b["advantages"], mask, "token-mean", config
        )
        kl = core_algos.kl_penalty(b["logp"], b["ref_logp"], "low_var_kl")
        loss = loss + o["kl_coef"] * core_algos.agg_loss(kl, mask, "token-mean")
        return loss - o["entropy_coef"] * core_algos.agg_loss(b["entropy"], mask, "token-mean")

    return run


def _impl(op, provider):
    if provider == "verl":
        return _verl(op)
    if provider == "torch":
        return _IMPLS[op](fastppo.reference)
    if provider == "compile":
        return _compiled(op)
    return _IMPLS[op](fastppo)


def _batch(B, T, device):
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda: torch.randn(B, T, device=device, generator=g)  # noqa: E731
    logp = -rand().abs()
    values = rand()
    return {
        "logp": logp,
        "old_logp": logp + 0.1 * rand(),
        "ref_logp": logp + 0.1 * rand(),
        "advantages": rand(),
        "entropy": rand().abs(),
        "mask": rand() > -1.0,
        "values": values,
        "old_values": values + 0.1 * rand(),
        "returns": rand(),
    }


def _setup(op, provider, B, T, device, mode):
    def setup():
        impl = _impl(op, provider)
        batch = _batch(B, T, device)
        if mode == "fwd":
            return lambda: impl(batch)
        grads = [batch[name].requires_grad_() for name in _GRAD_INPUTS[op]]
        upstream = torch.randn(B, T, device=device) if op == "kl_penalty" else None

        def fwd_bwd():
            for x in grads:
                x.grad = None
            out = impl(batch)
            out.backward(upstream)

        return fwd_bwd

    return setup


def benchmarks(*, device, quick, providers, modes, dtype=None, ops=OPS, log=print):
    del dtype  # these ops take fp32 log-probs and values whatever the model's dtype
    providers = harness.importable_providers(
        providers, {"verl": "verl.trainer.ppo.core_algos"}, "losses", log
    )
    for B, T in QUICK_SHAPES if quick else FULL_SHAPES:
        for op in ops:
            for mode in modes:
                for provider in (p for p in providers if p in ("torch", "compile", "verl", "fastppo")):
                    yield Benchmark(
                        op=op,
                        provider=provider,
                        mode=mode,
                        dtype="float32",
                        shape={"B": B, "T": T},
                        bytes_floor=FLOOR_BYTES_PER_TOKEN[op, mode] * B * T,
                        setup=_setup(op, provider, B, T, device, mode),
                    )
