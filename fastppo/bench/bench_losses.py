"""kl_penalty, ppo_policy_loss (and its family) and value_loss on fp32 (B, T) token tensors with a
bool mask.

Providers: ``torch`` (the eager reference in ``fastppo.reference``), ``compile`` (torch.compile of
it), ``verl`` (its own ``kl_penalty``, ``compute_policy_loss_vanilla`` + ``agg_loss`` terms and
``compute_value_loss``, when verl is installed) and ``fastppo``. The policy loss runs with
everything on: asymmetric and dual clip, a k3 KL term against ``ref_logp`` and an entropy bonus,
token-mean aggregation. The family, each alone (no KL or entropy term), as the op name with the
member after a colon: ``ppo_policy_loss:gspo`` (sequence ratio, clip 3e-4/4e-4),
``ppo_policy_loss:cispo`` (weights up to 5), ``ppo_policy_loss:sapo`` (seq-mean-token-mean, as verl
forces it), ``ppo_policy_loss:geo_mean`` (GMPO, log-space clip 0.4) and ``ppo_policy_loss:tis``
(PPO clip with token-level TIS at 2 from ``rollout_logp``; verl: its
``compute_rollout_correction_weights`` then the vanilla loss with those weights).

Bytes floor: every input read once and every output written once; forward+backward adds the
upstream gradient's read and each input gradient's write. Per token, fp32:
    kl_penalty       fwd 12 B (logp, ref_logp → kl)                     fwd_bwd 20 B
    ppo_policy_loss  fwd 21 B (5 fp32 inputs + the mask; 0-d outputs)  fwd_bwd 29 B (grad logp, entropy)
    value_loss       fwd 13 B (3 fp32 inputs + the mask)               fwd_bwd 17 B (grad values)
    gspo, cispo,     fwd 13 B (logp, old_logp, advantages, mask)      fwd_bwd 17 B (grad logp)
    sapo, geo_mean
    tis              fwd 17 B (and rollout_logp)                       fwd_bwd 21 B

Packed (``<op>+packed``, fastppo and the eager reference): the same token count in B sequences of
variable length (``packed_lengths``: 1/4 to 7/4 of T, summing to B·T) as ``(N,)`` tensors with
``cu_seqlens`` (B + 1,) int32, the layout the trainer passes; the same bytes floor per token.
"""

import functools

import torch

import fastppo
from fastppo.bench import harness
from fastppo.bench.harness import MODES, Benchmark

#: Members of the policy-loss family: the op's options (verl's loss mode and clip ratios for the peer).
FAMILY = {
    "gspo": dict(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4),
    "cispo": dict(loss="cispo", clip_low=1.0, clip_high=4.0),
    "sapo": dict(loss="sapo", agg="seq-mean-token-mean"),
    "geo_mean": dict(loss="geo_mean", clip_low=0.4, clip_high=0.4, agg="seq-mean-token-mean"),
    "tis": dict(
        clip_low=0.2, clip_high=0.28, rollout_correction=fastppo.RolloutCorrection("token", "truncate", 2.0)
    ),
}
_PADDED_OPS = ("kl_penalty", "ppo_policy_loss", "value_loss", *(f"ppo_policy_loss:{name}" for name in FAMILY))
#: Packed twins of the ops with sequence-level behaviour (and the plain losses).
_PACKED = (
    "ppo_policy_loss",
    "value_loss",
    "ppo_policy_loss:gspo",
    "ppo_policy_loss:geo_mean",
    "ppo_policy_loss:sapo",
)
_PACKED_OPS = tuple(f"{op}+packed" for op in _PACKED)
OPS = (*_PADDED_OPS, *_PACKED_OPS)
FULL_SHAPES = [(64, 1024), (256, 4096), (512, 8192)]
QUICK_SHAPES = [(4, 64), (8, 300)]
FLOOR_BYTES_PER_TOKEN = {
    ("kl_penalty", "fwd"): 12,
    ("kl_penalty", "fwd_bwd"): 20,
    ("ppo_policy_loss", "fwd"): 21,
    ("ppo_policy_loss", "fwd_bwd"): 29,
    ("value_loss", "fwd"): 13,
    ("value_loss", "fwd_bwd"): 17,
    **{(f"ppo_policy_loss:{name}", "fwd"): 17 if name == "tis" else 13 for name in FAMILY},
    **{(f"ppo_policy_loss:{name}", "fwd_bwd"): 21 if name == "tis" else 17 for name in FAMILY},
}
FLOOR_BYTES_PER_TOKEN |= {
    (f"{op}+packed", mode): FLOOR_BYTES_PER_TOKEN[op, mode] for op in _PACKED for mode in MODES
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


def packed_lengths(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """B sequence lengths of about T/4 to 7T/4 (deterministic), summing to B·T exactly."""
    raw = 0.25 + 1.5 * torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lengths = (raw * (B * T / raw.sum())).long()  # rounded down: short of B·T by less than B
    lengths[: B * T - int(lengths.sum())] += 1
    return lengths


def _layout(b) -> dict:
    """``cu_seqlens`` for a packed batch, nothing for a padded one (verl's functions take none)."""
    return {"cu_seqlens": b["cu_seqlens"]} if "cu_seqlens" in b else {}


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
            **_layout(b),
            **POLICY_OPTIONS,
        )[0]

    return run


def _value(module):
    return lambda b: module.value_loss(
        b["values"], b["old_values"], b["returns"], b["mask"], clip=0.2, **_layout(b)
    )[0]


def _member(name):
    options = dict(FAMILY[name])
    uses_rollout = "rollout_correction" in options

    def impl(module):
        def run(b):
            rollout = dict(rollout_logp=b["rollout_logp"]) if uses_rollout else {}
            return module.ppo_policy_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], **rollout,
                                          **_layout(b), **options)[0]  # fmt: skip

        return run

    return impl


_IMPLS = {"kl_penalty": _kl, "ppo_policy_loss": _policy, "value_loss": _value}
_IMPLS |= {f"ppo_policy_loss:{name}": _member(name) for name in FAMILY}
_IMPLS |= {op: _IMPLS[op.removesuffix("+packed")] for op in _PACKED_OPS}
_GRAD_INPUTS = {"kl_penalty": ("logp",), "ppo_policy_loss": ("logp", "entropy"), "value_loss": ("values",)}
_GRAD_INPUTS |= {f"ppo_policy_loss:{name}": ("logp",) for name in FAMILY}
_GRAD_INPUTS |= {op: _GRAD_INPUTS[op.removesuffix("+packed")] for op in _PACKED_OPS}


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


def _verl_member(name):
    """verl's own function of the family member (its ActorConfig; TIS: verl's weights, then vanilla)."""
    from verl.trainer.ppo import core_algos, rollout_corr_helper
    from verl.workers.config import ActorConfig

    options = FAMILY[name]
    low, high = options.get("clip_low", 0.2), options.get("clip_high", 0.2)
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=low,
                         clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=3.0)  # fmt: skip
    loss_fn = core_algos.get_policy_loss_fn("vanilla" if name == "tis" else name)
    agg = options.get("agg", "token-mean")

    def run(b):
        mask = b["mask"].float()
        weights = None
        if name == "tis":
            weights, _ = rollout_corr_helper.compute_rollout_correction_weights(
                b["old_logp"] - b["rollout_logp"], mask, "token", 2.0
            )
        return loss_fn(b["old_logp"], b["logp"], b["advantages"], mask, agg, config, weights)[0]

    return run


def _impl(op, provider):
    if provider == "verl":
        return _verl_member(op.split(":")[1]) if ":" in op else _verl(op)
    if provider == "torch":
        return _IMPLS[op](fastppo.reference)
    if provider == "compile":
        return _compiled(op)
    return _IMPLS[op](fastppo)


def _batch(B, T, device, packed=False):
    """Per-token inputs (B, T); packed: the same B·T tokens as (N,) with ``cu_seqlens``."""
    if packed:
        batch = {k: v.reshape(-1) for k, v in _batch(B, T, device).items()}
        cu = torch.nn.functional.pad(packed_lengths(B, T).cumsum(0), (1, 0))
        return batch | {"cu_seqlens": cu.to(device=device, dtype=torch.int32)}
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda: torch.randn(B, T, device=device, generator=g)  # noqa: E731
    logp = -rand().abs()
    values = rand()
    return {
        "logp": logp,
        "old_logp": logp + 0.1 * rand(),
        "ref_logp": logp + 0.1 * rand(),
        "rollout_logp": logp + 0.1 * rand(),
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
        batch = _batch(B, T, device, packed=op.endswith("+packed"))
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
                # Packed: fastppo and the eager reference (the peers and torch.compile take (B, T)).
                allowed = (
                    ("torch", "fastppo")
                    if op.endswith("+packed")
                    else ("torch", "compile", "verl", "fastppo")
                )
                for provider in (p for p in providers if p in allowed):
                    yield Benchmark(
                        op=op,
                        provider=provider,
                        mode=mode,
                        dtype="float32",
                        shape={"B": B, "T": T},
                        bytes_floor=FLOOR_BYTES_PER_TOKEN[op, mode] * B * T,
                        setup=_setup(op, provider, B, T, device, mode),
                    )
