"""fastppo.token_logprobs: kernel vs reference, reference vs an fp64 hand computation."""

import math

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import fastppo
from fastppo import reference
from fastppo.kernels import can_address
from fastppo.kernels.token_logprobs import (
    _row_addressing,
    _token_logprobs_bwd_kernel,
    _token_logprobs_fwd_kernel,
)

# (dtype, atol, rtol) for the logits' gradient, which comes back in the logits' dtype.
GRAD_TOLS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float64, 1e-12, 1e-12),
    (torch.bfloat16, 2e-2, 1.6e-2),
    (torch.float16, 2e-3, 2e-3),
]
# Outputs are fp32 whatever the input: kernel and reference see the same values, so they agree
# to fp32 rounding (fp64 inputs stay fp64).
OUT_TOL = {torch.float64: (1e-12, 1e-12)}
OUT_TOL_DEFAULT = (1e-4, 1e-5)

# (leading shape, V): a single row, the odd vocabulary 1271, several vocabulary tiles, V = 1,
# T = 1 under three leading dimensions.
SHAPES = [((1,), 1271), ((3, 7), 1271), ((2, 5), 9000), ((4,), 1), ((2, 1, 3), 50)]


def make_inputs(lead, V, dtype, device, *, ignore_frac=0.25, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = ignore_index
    return logits.to(device), labels.to(device)


def run_both(logits, labels, *, upstream_seed=1, **kwargs):
    """Forward and backward through the kernel and the reference with random upstream gradients."""
    xk = logits.detach().clone().requires_grad_()
    xr = logits.detach().clone().requires_grad_()
    lk, ek = fastppo.token_logprobs(xk, labels, return_entropy=True, **kwargs)
    lr, er = reference.token_logprobs(xr, labels, return_entropy=True, **kwargs)
    g = torch.Generator().manual_seed(upstream_seed)
    gl = torch.randn(lk.shape, generator=g, dtype=lk.dtype).to(lk.device)
    ge = torch.randn(ek.shape, generator=g, dtype=ek.dtype).to(ek.device)
    ((lk * gl).sum() + (ek * ge).sum()).backward()
    ((lr * gl).sum() + (er * ge).sum()).backward()
    return (lk, ek, xk.grad), (lr, er, xr.grad)


def assert_outputs_close(kernel, ref, dtype):
    atol, rtol = OUT_TOL.get(dtype, OUT_TOL_DEFAULT)
    torch.testing.assert_close(kernel, ref, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------
# Reference vs an independent fp64 computation, written out with the math module.


def hand_row(row, y, tau):
    """logp, entropy and both gradients for one row of raw logits, in plain fp64 Python."""
    z = [v / tau for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    p = [math.exp(v - lse) for v in z]
    H = lse - sum(pj * zj for pj, zj in zip(p, z, strict=True))
    dlogp = [((1.0 if j == y else 0.0) - p[j]) / tau for j in range(len(z))]
    dH = [-p[j] * ((z[j] - lse) + H) / tau for j in range(len(z))]
    return z[y] - lse, H, dlogp, dH


@pytest.mark.parametrize("tau", [1.0, 0.6, 2.5])
def test_reference_matches_hand_computation(tau):
    rows = [[0.5, -1.0, 2.0, 0.0, 3.5], [10.0, 10.0, -5.0, 0.1, 0.2], [-2.0, -2.5, -3.0, -0.5, -8.0]]
    labels = [2, 0, 4]
    logits = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    logp, H = reference.token_logprobs(logits, torch.tensor(labels), temperature=tau, return_entropy=True)
    for i, (row, y) in enumerate(zip(rows, labels, strict=True)):
        h_logp, h_H, h_dlogp, h_dH = hand_row(row, y, tau)
        assert logp[i].item() == pytest.approx(h_logp, abs=1e-12)
        assert H[i].item() == pytest.approx(h_H, abs=1e-12)
        (g_logp,) = torch.autograd.grad(logp[i], logits, retain_graph=True)
        (g_H,) = torch.autograd.grad(H[i], logits, retain_graph=True)
        assert g_logp[i].tolist() == pytest.approx(h_dlogp, abs=1e-12)
        assert g_H[i].tolist() == pytest.approx(h_dH, abs=1e-12)
        others = [j for j in range(len(rows)) if j != i]
        assert not g_logp[others].any() and not g_H[others].any()


def test_kernel_matches_hand_computation(device):
    row = [0.3, -1.7, 2.2, 0.0, 5.1, -0.4, 1.9]
    logits = torch.tensor([row, row], dtype=torch.float64, device=device)
    labels = torch.tensor([4, -100], device=device)
    logp, H = fastppo.token_logprobs(logits, labels, temperature=0.8, return_entropy=True)
    h_logp, h_H, _, _ = hand_row(row, 4, 0.8)
    assert logp.tolist() == pytest.approx([h_logp, 0.0], abs=1e-12)
    assert H.tolist() == pytest.approx([h_H, 0.0], abs=1e-12)


# --------------------------------------------------------------------------------------------
# Kernel vs reference.


@pytest.mark.parametrize("dtype, atol, rtol", GRAD_TOLS)
@pytest.mark.parametrize("lead, V", SHAPES)
def test_forward_backward_match_reference(lead, V, dtype, atol, rtol, device):
    logits, labels = make_inputs(lead, V, dtype, device)
    (lk, ek, gk), (lr, er, gr) = run_both(logits, labels, temperature=0.7)
    assert lk.dtype == ek.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lk.shape == labels.shape and ek.shape == labels.shape
    assert_outputs_close(lk, lr, dtype)
    assert_outputs_close(ek, er, dtype)
    assert gk.dtype == dtype
    torch.testing.assert_close(gk, gr, atol=atol, rtol=rtol)


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_backward_through_one_output(which, device):
    logits, labels = make_inputs((4, 6), 1271, torch.float32, device)
    grads = []
    for fn in (fastppo.token_logprobs, reference.token_logprobs):
        x = logits.clone().requires_grad_()
        logp, H = fn(x, labels, temperature=1.3, return_entropy=True)
        out = logp if which == "logp" else H
        (out * torch.linspace(-1, 2, out.numel(), device=device).view(out.shape)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_logp_only_matches_reference(device):
    logits, labels = make_inputs((5,), 300, torch.float32, device)
    torch.testing.assert_close(
        fastppo.token_logprobs(logits, labels, temperature=0.5),
        reference.token_logprobs(logits, labels, temperature=0.5),
    )


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("ignore_index", [-100, -1, 0])
def test_temperature_and_ignore_index(temperature, ignore_index, device):
    logits, labels = make_inputs(
        (3, 4), 517, torch.float32, device, ignore_index=ignore_index, ignore_frac=0.4
    )
    (lk, ek, gk), (lr, er, gr) = run_both(logits, labels, temperature=temperature, ignore_index=ignore_index)
    torch.testing.assert_close(lk, lr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ek, er, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gk, gr, atol=1e-5, rtol=1e-5)


def test_ignored_rows_give_zero_and_no_gradient(device):
    logits, labels = make_inputs((3, 5), 1000, torch.float32, device, ignore_frac=0.0)
    labels[0, :] = -100
    labels[2, 3] = -100
    (lk, ek, gk), _ = run_both(logits, labels)
    ignored = labels == -100
    assert torch.equal(lk[ignored], torch.zeros_like(lk[ignored]))
    assert torch.equal(ek[ignored], torch.zeros_like(ek[ignored]))
    assert not gk[ignored].any()
    assert (lk[~ignored] < 0).all() and (ek[~ignored] > 0).all() and gk[~ignored].abs().sum(-1).min() > 0


def test_all_rows_ignored(device):
    logits, labels = make_inputs((2, 3), 64, torch.float32, device, ignore_frac=1.0)
    (lk, ek, gk), _ = run_both(logits, labels)
    assert not lk.any() and not ek.any() and not gk.any()


def test_negative_infinite_logits(device):
    """Masked-out vocabulary entries (−inf logits) get probability 0 and never produce NaN."""
    logits, labels = make_inputs((4,), 700, torch.float32, device, ignore_frac=0.0)
    logits[:, 100:400] = float("-inf")
    labels = labels % 100
    (lk, ek, gk), (lr, er, gr) = run_both(logits, labels, temperature=0.9)
    assert torch.isfinite(lk).all() and torch.isfinite(ek).all() and torch.isfinite(gk).all()
    torch.testing.assert_close(lk, lr)
    torch.testing.assert_close(ek, er)
    torch.testing.assert_close(gk, gr)
    assert not gk[:, 100:400].any()


def test_gradcheck_fp64(device):
    logits, labels = make_inputs((3, 2), 7, torch.float64, device, ignore_frac=0.3, seed=3)
    logits.requires_grad_()
    fn = lambda x: fastppo.token_logprobs(x, labels, temperature=0.8, return_entropy=True)
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def test_gradcheck_fp64_top_k(device):
    logits, _ = make_inputs((4,), 9, torch.float64, device, seed=4)
    labels = torch.tensor([[1, 1, 8], [0, -100, 3], [-100, -100, -100], [5, 6, 7]], device=device)
    logits.requires_grad_()
    fn = lambda x: fastppo.token_logprobs(x, labels, temperature=1.4, return_entropy=True)
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def test_top_k_labels(device):
    logits, _ = make_inputs((2, 3), 333, torch.float32, device)
    labels = torch.randint(0, 333, (2, 3, 4), device=device)
    labels[0, 1, 2] = labels[0, 1, 0]  # a repeated label: its gradients add up
    labels[1, 0, 1] = -100
    labels[1, 2, :] = -100  # a fully ignored row
    (lk, ek, gk), (lr, er, gr) = run_both(logits, labels, temperature=0.9)
    assert lk.shape == (2, 3, 4) and ek.shape == (2, 3)
    torch.testing.assert_close(lk, lr)
    torch.testing.assert_close(ek, er)
    torch.testing.assert_close(gk, gr)
    single = fastppo.token_logprobs(logits, labels[..., 3].clamp(min=0), temperature=0.9)
    torch.testing.assert_close(lk[..., 3][labels[..., 3] >= 0], single[labels[..., 3] >= 0])


# --------------------------------------------------------------------------------------------
# Precision against fp64, in bf16 and fp16.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_pytorch(dtype, device):
    logits, labels = make_inputs((16,), 4096, dtype, device, ignore_frac=0.0, seed=7)
    truth = logits.double().requires_grad_()
    t_logp, t_H = reference.token_logprobs(truth, labels, return_entropy=True)
    g_logp = torch.randn(t_logp.shape, dtype=torch.float64, device=device)
    g_H = torch.randn(t_H.shape, dtype=torch.float64, device=device)
    ((t_logp * g_logp).sum() + (t_H * g_H).sum()).backward()

    # PyTorch in the input's dtype: log_softmax, gather and entropy computed in bf16 / fp16.
    xt = logits.clone().requires_grad_()
    logp_all = torch.log_softmax(xt, -1)
    p_logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    p_H = -(logp_all.exp() * logp_all).sum(-1)
    ((p_logp * g_logp.to(dtype)).sum() + (p_H * g_H.to(dtype)).sum()).backward()

    xk = logits.clone().requires_grad_()
    k_logp, k_H = fastppo.token_logprobs(xk, labels, return_entropy=True)
    ((k_logp * g_logp.float()).sum() + (k_H * g_H.float()).sum()).backward()

    err = lambda a, b: (a.double() - b.double()).abs().max().item()
    assert err(k_logp, t_logp) <= 2 * err(p_logp, t_logp)
    assert err(k_H, t_H) <= 2 * err(p_H, t_H)
    assert err(xk.grad, truth.grad) <= 2 * err(xt.grad, truth.grad)


# --------------------------------------------------------------------------------------------
# In-place backward.


def test_inplace_backward_equals_out_of_place(device):
    logits, labels = make_inputs((3, 5), 1271, torch.float32, device)
    x1 = logits.clone().requires_grad_()
    lp, H = fastppo.token_logprobs(x1, labels, temperature=0.7, return_entropy=True)
    (lp.sum() + 0.3 * H.sum()).backward()

    storage = logits.clone()
    x2 = storage.clone().requires_grad_()
    lp2, H2 = fastppo.token_logprobs(x2, labels, temperature=0.7, return_entropy=True, inplace_backward=True)
    assert torch.equal(lp, lp2) and torch.equal(H, H2)
    (lp2.sum() + 0.3 * H2.sum()).backward()
    assert torch.equal(x1.grad, x2.grad)
    # The gradient was written over the logits themselves: no N×V buffer was allocated.
    assert torch.equal(x2.detach(), x1.grad)


def test_inplace_backward_into_a_sliced_view(device):
    base = torch.randn(2, 6, 301, device=device)
    labels = torch.randint(0, 301, (2, 5), device=device)
    ref = base.clone().requires_grad_()
    fastppo.token_logprobs(ref[:, :-1], labels).sum().backward()
    x = base.clone().requires_grad_()
    fastppo.token_logprobs(x[:, :-1], labels, inplace_backward=True).sum().backward()
    assert torch.equal(x.grad, ref.grad)


def test_inplace_backward_refuses_to_feed_stale_logits_to_others(device):
    logits, labels = make_inputs((4,), 100, torch.float32, device)
    x = logits.clone().requires_grad_()
    y = x * 1.0  # a non-leaf the kernel may overwrite
    other = (y**2).sum()  # saves y for its own backward, which runs after ours
    loss = fastppo.token_logprobs(y, labels, inplace_backward=True).sum() + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --------------------------------------------------------------------------------------------
# Layouts: non-contiguous views, row addressing, empty input.


def _row_starts(view: torch.Tensor, base: torch.Tensor) -> list[int]:
    return (view[..., 0].flatten() - base.flatten()[0]).long().tolist()


@pytest.mark.parametrize(
    "make_view",
    [
        lambda b: b,
        lambda b: b[:, :-1],
        lambda b: b.transpose(0, 1),
        lambda b: b[1:, 2:5],
        lambda b: b[:1, :1],
        lambda b: b[0],
        lambda b: b.unsqueeze(1)[:, :, :-1],
    ],
)
def test_row_addressing_matches_storage(make_view):
    base = torch.arange(4 * 6 * 8, dtype=torch.float64).view(4, 6, 8)
    view = make_view(base)
    rows_inner, s_outer, s_inner = _row_addressing(view)
    n_rows = view.numel() // view.shape[-1]
    formula = [(r // rows_inner) * s_outer + (r % rows_inner) * s_inner for r in range(n_rows)]
    offset = view.storage_offset()
    assert [f + offset for f in formula] == _row_starts(view, base)


def test_three_stride_views_are_not_addressed():
    base = torch.randn(3, 4, 5, 8)
    assert _row_addressing(base.permute(0, 2, 1, 3)) is None and not can_address(base.permute(0, 2, 1, 3))
    assert can_address(base.permute(2, 0, 1, 3))  # the last two leading dims merge back
    assert not can_address(base[..., ::2])


@pytest.mark.parametrize(
    "make_view",
    [
        lambda b: b.flatten(1, 2)[:, :-1],  # the shifted logits of a causal LM: read in place
        lambda b: b.flatten(1, 2).transpose(0, 1),  # two row strides: read in place
        lambda b: b.permute(2, 0, 1, 3)[:, :, :-1],  # three row strides: copied first
        lambda b: b[..., ::2],  # strided vocabulary: copied first
    ],
)
def test_non_contiguous_logits(make_view, device):
    view = make_view(torch.randn(4, 5, 3, 258, device=device))
    labels = torch.randint(0, view.shape[-1], view.shape[:-1], device=device)
    (lk, ek, gk), (lr, er, gr) = run_both(view, labels, temperature=1.1)
    torch.testing.assert_close(lk, lr)
    torch.testing.assert_close(ek, er)
    torch.testing.assert_close(gk, gr)


def test_empty_input(device):
    logits = torch.randn(0, 17, device=device, requires_grad=True)
    logp, H = fastppo.token_logprobs(
        logits, torch.zeros(0, dtype=torch.long, device=device), return_entropy=True
    )
    assert logp.shape == (0,) and H.shape == (0,)
    (logp.sum() + H.sum()).backward()
    assert logits.grad.shape == (0, 17)


def test_int32_labels(device):
    logits, labels = make_inputs((6,), 211, torch.float32, device)
    torch.testing.assert_close(
        fastppo.token_logprobs(logits, labels.int()), fastppo.token_logprobs(logits, labels)
    )


def test_deterministic(device):
    logits, labels = make_inputs((4, 3), 5000, torch.bfloat16, device)
    first, _ = run_both(logits, labels, temperature=0.9)
    second, _ = run_both(logits, labels, temperature=0.9)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 5),
    V=st.integers(1, 300),
    K=st.sampled_from([None, 1, 3]),
    tau=st.floats(0.25, 4.0),
    ignore_frac=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_cases_match_reference(n, V, K, tau, ignore_frac, seed):
    device = "cuda" if torch.cuda.is_available() and not fastppo._backend.triton_interpreted() else "cpu"
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * 4).to(device)
    shape = (n,) if K is None else (n, K)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    (lk, ek, gk), (lr, er, gr) = run_both(logits, labels.to(device), temperature=tau, upstream_seed=seed)
    torch.testing.assert_close(lk, lr, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ek, er, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gk, gr, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Dispatch, runtime arguments and bad input.


def graph_node_names(out: torch.Tensor) -> set[str]:
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_dispatch_follows_fastppo_backend(monkeypatch, device):
    logits, labels = make_inputs((2,), 50, torch.float32, device)
    x = logits.clone().requires_grad_()
    assert "TokenLogprobsFunctionBackward" in graph_node_names(fastppo.token_logprobs(x, labels))
    monkeypatch.setenv("FASTPPO_BACKEND", "torch")
    names = graph_node_names(fastppo.token_logprobs(x, labels))
    assert "TokenLogprobsFunctionBackward" not in names and "LogSoftmaxBackward0" in names
    monkeypatch.setenv("FASTPPO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTPPO_BACKEND"):
        fastppo.token_logprobs(x, labels)


def test_physical_constants_are_runtime_arguments():
    """temperature and ignore_index must not be constexpr, and ignore_index must not be
    specialised (Triton would otherwise compile a variant for ignore_index == 1)."""
    for kernel in (_token_logprobs_fwd_kernel, _token_logprobs_bwd_kernel):
        if not isinstance(kernel, triton.runtime.jit.JITFunction):  # the interpreter's wrapper
            kernel = triton.runtime.jit.JITFunction(kernel.fn, **kernel.kwargs)
        params = {p.name: p for p in kernel.params}
        assert not params["inv_temperature"].is_constexpr
        assert not params["ignore_index"].is_constexpr and params["ignore_index"].do_not_specialize
        constexprs = {name for name, p in params.items() if p.is_constexpr}
        assert constexprs <= {"BLOCK_V", "BLOCK_K", "HAS_GRAD_LOGP", "HAS_GRAD_ENTROPY", "ACC_DTYPE"}


def test_bad_input_is_rejected_with_the_argument_named(device):
    logits, labels = make_inputs((3,), 10, torch.float32, device, ignore_frac=0.0)
    cases = [
        (dict(logits=logits.long()), TypeError, "logits"),
        (dict(logits=logits.tolist()), TypeError, "logits"),
        (dict(labels=labels.float()), TypeError, "labels"),
        (dict(labels=labels.bool()), TypeError, "labels"),
        (dict(labels=labels[:2]), ValueError, "labels must have shape"),
        (dict(labels=labels[None]), ValueError, "labels must have shape"),
        (dict(labels=labels.to("meta")), ValueError, "one device"),
        (dict(logits=torch.randn(3, 0, device=device)), ValueError, "vocabulary"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(ignore_index=-1.0), TypeError, "ignore_index"),
    ]
    for override, exc, match in cases:
        kwargs = dict(logits=logits, labels=labels) | override
        with pytest.raises(exc, match=match):
            fastppo.token_logprobs(kwargs.pop("logits"), kwargs.pop("labels"), **kwargs)


@pytest.mark.parametrize("bad", [[0, 10, 2], [0, -5, 2]])
def test_out_of_range_labels_fail_without_a_host_read(bad):
    """torch._assert_async: a RuntimeError at once on CPU (on CUDA a device-side assert, fatal to
    the process, so this runs on CPU only)."""
    logits, _ = make_inputs((3,), 10, torch.float32, "cpu", ignore_frac=0.0)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 10\) or equal ignore_index=-100"):
        fastppo.token_logprobs(logits, torch.tensor(bad))


def test_unchecked_out_of_range_labels_give_nan(device):
    logits, _ = make_inputs((3,), 10, torch.float32, device)
    labels = torch.tensor([1, 10, -3], device=device)
    logp = fastppo.token_logprobs(logits, labels, check_labels=False)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()


# --------------------------------------------------------------------------------------------
# Sizes only a GPU holds (compiled kernels; skipped without CUDA).


def _check_rows(logits, labels, rows, **kwargs):
    """Kernel on the whole tensor vs the reference on the given rows only (memory)."""
    x = logits.clone().requires_grad_()
    logp, H = fastppo.token_logprobs(x, labels, return_entropy=True, inplace_backward=True, **kwargs)
    ref_logp, ref_H = reference.token_logprobs(logits[rows], labels[rows], return_entropy=True, **kwargs)
    torch.testing.assert_close(logp[rows], ref_logp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(H[rows], ref_H, atol=1e-4, rtol=1e-5)
    (logp.sum() + H.sum()).backward()
    xr = logits[rows].clone().requires_grad_()
    rl, rh = reference.token_logprobs(xr, labels[rows], return_entropy=True, **kwargs)
    (rl.sum() + rh.sum()).backward()
    torch.testing.assert_close(x.grad[rows], xr.grad, atol=2e-2, rtol=1.6e-2)


@pytest.mark.gpu
def test_int64_offsets_past_2_pow_31():
    N, V = 16384, 151936  # N·V = 2.49e9 > 2^31
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    rows = torch.arange(N - 64, N, device="cuda")  # rows that start past 2^31 elements
    _check_rows(logits, labels, rows, temperature=0.9)


@pytest.mark.gpu
def test_more_than_65535_rows():
    N, V = 70_001, 512
    logits = torch.randn(N, V, device="cuda")
    labels = torch.randint(0, V, (N,), device="cuda")
    _check_rows(logits, labels, torch.arange(N - 300, N, device="cuda"))


@pytest.mark.gpu
def test_vocabulary_of_262144():
    logits = torch.randn(48, 262_144, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 262_144, (48,), device="cuda")
    _check_rows(logits, labels, torch.arange(48, device="cuda"), temperature=1.3)


@pytest.mark.gpu
def test_new_temperature_or_ignore_index_does_not_recompile():
    logits = torch.randn(64, 1000, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device="cuda")

    def call(tau, ignore):
        logp, H = fastppo.token_logprobs(
            logits, labels, temperature=tau, ignore_index=ignore, return_entropy=True
        )
        (logp.sum() + H.sum()).backward()

    call(1.0, -100)
    dev = torch.cuda.current_device()
    compiled = lambda: [
        len(k.device_caches[dev][0]) for k in (_token_logprobs_fwd_kernel, _token_logprobs_bwd_kernel)
    ]
    before = compiled()
    for tau, ignore in [(0.7, -100), (2.0, -1), (1.0, 1), (0.3, 7)]:
        call(tau, ignore)
    assert compiled() == before
