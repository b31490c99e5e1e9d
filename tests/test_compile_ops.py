"""Every public op traces under ``torch.compile(fullgraph=True)``, forward and backward, on the
Triton path (the interpreter on CPU, compiled kernels on CUDA) and on the reference path.

The Triton launches are ``torch.library`` custom ops in the ``fastppo`` namespace
(``fastppo/ops/_library.py``): opaque to Dynamo, so it never reaches a launcher's
``data_ptr`` or host-side block-size choice. The compiled function must give the eager values
and gradients bitwise: the same kernels run with the same arguments, and the ``aot_eager``
backend runs the reference path's PyTorch ops one by one, as eager does. (Inductor would fuse
the reference's arithmetic and round differently; it is not what this test is about.)
"""

import dataclasses
from collections.abc import Callable

import pytest
import torch

import fastppo
from fastppo.reference import RolloutCorrection

#: Where the test calls the ops: "triton" is the Triton path (kernels interpreted on CPU),
#: "torch" the PyTorch reference (FASTPPO_BACKEND=torch).
PATHS = ("triton", "torch")


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call: ``make(device)`` builds its inputs (the tensors that require grad get
    gradients compared), ``call(*inputs)`` returns a tensor or a tuple of them. ``paths``: packed
    input runs on the Triton path only, as the reference pads packed rows to the longest one (a
    host read and a data-dependent shape, which fullgraph cannot trace)."""

    make: Callable[[str], tuple]
    call: Callable[..., object]
    paths: tuple[str, ...] = PATHS


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(device, B=3, T=11, seed=0, n=3):
    """``n`` float (B, T) tensors and a bool mask with holes; one row fully masked."""
    g = _gen(seed)
    xs = [torch.randn(B, T, generator=g).to(device) for _ in range(n)]
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False
    return (*xs, mask.to(device))


def _packed(device, lengths=(5, 0, 19, 1), seed=1, n=3):
    """``n`` float (N,) tensors, a bool mask and int32 cu_seqlens (an empty and a 1-token row)."""
    g = _gen(seed)
    N = sum(lengths)
    xs = [torch.randn(N, generator=g).to(device) for _ in range(n)]
    mask = (torch.rand(N, generator=g) < 0.8).to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return (*xs, mask, cu)


def _grad(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def _loss_inputs(device, packed=False):
    if packed:
        logp, old, adv, ref, mask, cu = _packed(device, n=4)
    else:
        (logp, old, adv, ref, mask), cu = _tokens(device, n=4), None
    logp = -logp.abs()
    entropy = (logp.detach() * 0).add(0.5)
    return _grad(logp), -old.abs(), adv, -ref.abs(), mask, _grad(entropy), cu


def _policy_loss(logp, old, adv, ref, mask, entropy, cu, **options):
    return fastppo.ppo_policy_loss(
        logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy=entropy, entropy_coef=0.01,
        cu_seqlens=cu, **options,
    )  # fmt: skip


def _logits(device, V=37):
    g = _gen(2)
    logits = torch.randn(2, 6, V, generator=g).to(device)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, :2] = -100  # ignored rows: no gradient, never read
    return _grad(logits), labels.to(device)


def _head(device, V=41, H=16):
    g = _gen(3)
    hidden = torch.randn(2, 5, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(device)
    bias = (torch.randn(V, generator=g) * 0.1).to(device)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[1, 3:] = -100
    return _grad(hidden), _grad(weight), _grad(bias), labels.to(device)


CASES = {
    "gae": Case(
        lambda d: _tokens(d, n=2),
        lambda r, v, m: fastppo.gae(r, v, m, gamma=0.9, lam=0.8),
    ),
    "gae-openrlhf": Case(
        lambda d: _tokens(d, n=2),
        lambda r, v, m: fastppo.gae(r, v, m, gamma=0.99, lam=0.95, carry_masked=False),
    ),
    "gae-packed": Case(
        lambda d: _packed(d, n=2),
        lambda r, v, m, cu: fastppo.gae(r, v, m, gamma=0.9, lam=0.8, cu_seqlens=cu),
        paths=("triton",),
    ),
    "discounted_returns": Case(
        lambda d: _tokens(d, n=1),
        lambda r, m: fastppo.discounted_returns(r, m, gamma=0.9),
    ),
    "discounted_returns-packed": Case(
        lambda d: _packed(d, n=1),
        lambda r, m, cu: fastppo.discounted_returns(r, m, gamma=0.9, cu_seqlens=cu),
        paths=("triton",),
    ),
    "shape_rewards": Case(
        lambda d: (torch.randn(3, generator=_gen(4)).to(d), *_tokens(d, n=1)),
        lambda s, kl, m: fastppo.shape_rewards(s, m, kl=kl, kl_coef=0.05),
    ),
    "shape_rewards-packed": Case(
        lambda d: (torch.randn(4, generator=_gen(4)).to(d), *_packed(d, n=1)),
        lambda s, kl, m, cu: fastppo.shape_rewards(s, m, kl=kl, kl_coef=0.05, cu_seqlens=cu),
        paths=("triton",),
    ),
    **{
        f"group_advantages-{method}": Case(
            lambda d: (
                torch.randn(10, generator=_gen(5)).to(d),
                torch.tensor([3, 1, 3, 7, 1, 3, 9, 1, 7, 3], device=d),
            ),
            lambda s, ids, method=method: fastppo.group_advantages(s, ids, method=method),
        )
        for method in ("grpo", "dr_grpo", "rloo")
    },
    "masked_whiten": Case(
        lambda d: _tokens(d, n=1),
        lambda x, m: fastppo.masked_whiten(x, m),
    ),
    "masked_whiten-no-shift": Case(
        lambda d: _tokens(d, n=1),
        lambda x, m: fastppo.masked_whiten(x, m, shift_mean=False),
    ),
    "dpo_loss": Case(
        lambda d: tuple(
            (-torch.rand(4, generator=_gen(6 + i)) * 9).to(d).requires_grad_(i < 2) for i in range(4)
        ),
        lambda c, r, rc, rr: fastppo.dpo_loss(c, r, rc, rr, beta=0.2, label_smoothing=0.1),
    ),
    "token_logprobs": Case(
        lambda d: _logits(d),
        lambda logits, labels: fastppo.token_logprobs(logits, labels, temperature=0.7, return_entropy=True),
    ),
    "token_logprobs-logp-only": Case(
        lambda d: _logits(d),
        lambda logits, labels: fastppo.token_logprobs(logits, labels, check_labels=False),
    ),
    "token_logprobs-inplace-backward": Case(
        lambda d: _logits(d),
        lambda logits, labels: fastppo.token_logprobs(logits * 1.0, labels, inplace_backward=True),
    ),
    "linear_logprobs": Case(
        lambda d: _head(d),
        lambda h, w, b, y: fastppo.linear_logprobs(
            h, w, y, bias=b, temperature=0.8, logit_softcap=5.0, return_entropy=True, chunk_size=4
        ),
    ),
    "kl_penalty": Case(
        lambda d: tuple(_grad(x) for x in _tokens(d, n=2)[:2]),
        lambda logp, ref: fastppo.kl_penalty(logp, ref, "k3", clamp=10.0),
    ),
    "kl_penalty-k3+": Case(
        lambda d: tuple(_grad(x) for x in _tokens(d, n=2)[:2]),
        lambda logp, ref: fastppo.kl_penalty(logp, ref, "k3+"),
    ),
    "value_loss": Case(
        lambda d: (lambda v, o, r, m: (_grad(v), o, r, m))(*_tokens(d)),
        lambda v, o, r, m: fastppo.value_loss(v, o, r, m, clip=0.2, agg="seq-mean-token-mean"),
    ),
    "ppo_policy_loss": Case(
        lambda d: _loss_inputs(d),
        lambda *x: _policy_loss(*x, agg="token-mean"),
    ),
    "ppo_policy_loss-gspo": Case(
        lambda d: _loss_inputs(d),
        lambda *x: _policy_loss(*x, agg="seq-mean-token-mean", ratio_level="sequence", clip_low=3e-4),
    ),
    "ppo_policy_loss-packed-gmpo": Case(
        lambda d: (*_loss_inputs(d, packed=True), -_packed(d, seed=7, n=1)[0].abs()),
        lambda *x: _policy_loss(
            *x[:-1],
            agg="seq-mean-token-sum",
            loss="geo_mean",
            rollout_logp=x[-1],
            rollout_correction=RolloutCorrection("geometric", "mask"),
        ),  # fmt: skip
        paths=("triton",),
    ),
}


def _flat_outputs(out) -> list[torch.Tensor]:
    """The tensors of an op's result (a tensor, a tuple, or a tuple holding a stats dict)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for _, v in sorted(out.items())]
    return [t for o in out for t in _flat_outputs(o)]


def _run(fn, inputs):
    """Outputs and the gradients of Σ_i Σ out_i·w_i (fixed weights) w.r.t. the inputs needing grad."""
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in inputs]
    outputs = _flat_outputs(fn(*inputs))
    leaves = [x for x in inputs if torch.is_tensor(x) and x.requires_grad]
    if leaves:
        total = sum(
            (o * torch.linspace(0.5, 1.5, o.numel(), device=o.device).view(o.shape)).sum()
            for o in outputs
            if o.requires_grad
        )
        total.backward()
    return [o.detach() for o in outputs], [x.grad for x in leaves]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("path", "name"), [(path, name) for name in sorted(CASES) for path in CASES[name].paths]
)
def test_fullgraph_compile_matches_eager(path, name, device, monkeypatch, fresh_dynamo):
    if path == "torch":
        monkeypatch.setenv("FASTPPO_BACKEND", "torch")
    elif device == "cpu" and not fastppo.active_backend("cpu").startswith("triton"):
        pytest.fail("the Triton path on CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    case = CASES[name]
    inputs = case.make(device)
    eager_out, eager_grads = _run(case.call, inputs)
    compiled = torch.compile(case.call, fullgraph=True, backend="aot_eager")
    out, grads = _run(compiled, inputs)
    assert len(out) == len(eager_out) and len(grads) == len(eager_grads)
    for got, want in zip(out + grads, eager_out + eager_grads, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert eager_grads == [] or any(g.abs().sum() > 0 for g in eager_grads)
