"""fastppo.linear_logprobs: the chunked fused head against its reference and fp64 (values and every
gradient), top-K, ignored rows, softcap, bias, frozen and tied weights, half precision, batch
invariance, determinism, bad input."""

import pytest
import torch

import fastppo
from fastppo import reference


def make(N=37, H=24, V=301, dtype=torch.float32, K=None, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,) if K is None else (N, K), generator=g)
    labels[::ignore_every] = -100
    upstream = torch.randn(labels.shape, generator=g), torch.randn(N, generator=g)
    return hidden, weight, bias, labels, upstream


def run(fn, hidden, weight, bias, labels, upstream, device, **kwargs):
    """Outputs and the gradients of hidden, weight and bias under random upstream gradients."""
    leaves = [
        t.detach().to(device).clone().requires_grad_() if t is not None else None
        for t in (hidden, weight, bias)
    ]
    logp, entropy = fn(leaves[0], leaves[1], labels.to(device), bias=leaves[2], return_entropy=True, **kwargs)
    ((logp * upstream[0].to(device)).sum() + (entropy * upstream[1].to(device)).sum()).backward()
    grads = [t.grad.cpu() if t is not None and t.grad is not None else None for t in leaves]
    return [logp.detach().cpu(), entropy.detach().cpu(), *grads]


def exact(hidden, weight, bias, labels, upstream, *, temperature=1.0, softcap=None):
    """fp64 outputs and gradients by autograd over the full logits."""
    out = run(
        lambda h, w, y, bias, **kw: reference.token_logprobs(
            _softcapped(h @ w.T + (bias if bias is not None else 0), softcap), y, temperature=temperature,
            return_entropy=True,
        ),
        hidden.double(), weight.double(), None if bias is None else bias.double(), labels, upstream, "cpu",
    )  # fmt: skip
    return out


def _softcapped(z, cap):
    return z if cap is None else cap * torch.tanh(z / cap)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("K", [None, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_matches_reference_and_fp64(softcap, K, with_bias, device):
    hidden, weight, bias, labels, upstream = make(K=K)
    bias = bias if with_bias else None
    kwargs = dict(temperature=0.7, logit_softcap=softcap, chunk_size=8)
    got = run(fastppo.linear_logprobs, hidden, weight, bias, labels, upstream, device, **kwargs)
    ref = run(reference.linear_logprobs, hidden, weight, bias, labels, upstream, "cpu", **kwargs)
    want = exact(hidden, weight, bias, labels, upstream, temperature=0.7, softcap=softcap)
    for name, a, r, w in zip(("logp", "entropy", "hidden", "weight", "bias"), got, ref, want, strict=True):
        if w is None:
            assert a is None and r is None
            continue
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(a.double(), w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_error_is_that_of_eager(dtype, device):
    """bf16/fp16: the logits are rounded to the dtype either way; the op's error against fp64 is at
    most about twice that of eager PyTorch in the same dtype (matmul, then fp32 log-softmax)."""
    hidden, weight, bias, labels, upstream = make(N=40, H=64, V=1031, dtype=dtype)
    got = run(fastppo.linear_logprobs, hidden, weight, None, labels, upstream, device, chunk_size=16)
    eager = run(
        lambda h, w, y, bias, **_: reference.token_logprobs(h @ w.T, y, return_entropy=True),
        hidden, weight, None, labels, upstream, "cpu",
    )  # fmt: skip
    want = exact(hidden, weight, None, labels, upstream)
    for name, a, e, w in zip(("logp", "entropy", "hidden", "weight"), got, eager, want, strict=False):
        err, eager_err = (a.double() - w).abs().max(), (e.double() - w).abs().max()
        assert err <= 2 * eager_err + 1e-6, (name, float(err), float(eager_err))


def test_head_dtype_fp32_from_bf16_hidden(device):
    """An fp32 head on bf16 hidden states: the projection in fp32, so the error is fp32's."""
    hidden, weight, _, labels, upstream = make()
    got = run(fastppo.linear_logprobs, hidden.bfloat16(), weight, None, labels, upstream, device,
              head_dtype=torch.float32, chunk_size=8)  # fmt: skip
    want = exact(hidden.bfloat16().float(), weight, None, labels, upstream)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=1e-5)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.float32


def test_frozen_weight_gets_no_gradient(device):
    hidden, weight, _, labels, upstream = make()
    h = hidden.to(device).requires_grad_()
    logp = fastppo.linear_logprobs(h, weight.to(device), labels.to(device), chunk_size=8)
    (logp * upstream[0].to(device)).sum().backward()
    want = exact(hidden, weight, None, labels, (upstream[0], torch.zeros_like(upstream[1])))
    torch.testing.assert_close(h.grad.cpu().double(), want[2], atol=1e-5, rtol=1e-5)


def test_tied_embedding_weight(device):
    """The lm_head weight is the embedding's Parameter: both uses' gradients add up in it."""
    hidden, weight, _, labels, upstream = make(V=50, H=16)
    ids = torch.randint(0, 50, (37,))
    results = []
    for fn in (fastppo.linear_logprobs, reference.linear_logprobs):
        w = weight.to(device).clone().requires_grad_()
        h = torch.nn.functional.embedding(ids.to(device), w) + hidden.to(device)
        logp = fn(h, w, labels.to(device), chunk_size=8)
        (logp * upstream[0].to(device)).sum().backward()
        results.append(w.grad.cpu())
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_ignored_rows_give_zero_and_no_gradient(device):
    hidden, weight, _, labels, upstream = make(ignore_every=1)  # every 1st row ... all rows ignored
    labels[:] = -100
    labels[3] = 7
    got = run(fastppo.linear_logprobs, hidden, weight, None, labels, upstream, device, chunk_size=8)
    rows = torch.arange(labels.shape[0]) != 3
    assert (got[0][rows] == 0).all() and (got[1][rows] == 0).all() and (got[2][rows] == 0).all()
    assert got[0][3] < 0


def test_batch_invariance_and_determinism(device):
    """A row's log-prob and entropy are bitwise the same whatever other rows share its call: the
    chunks keep one shape (the last one padded)."""
    hidden, weight, bias, labels, _ = make(N=50, V=513)
    hidden, weight, bias, labels = (t.to(device) for t in (hidden, weight, bias, labels))
    call = lambda h, y: fastppo.linear_logprobs(h, weight, y, bias=bias, return_entropy=True, chunk_size=16)  # noqa: E731
    full = call(hidden, labels)
    assert all(torch.equal(a, b) for a, b in zip(full, call(hidden, labels), strict=True))  # run to run
    for rows in (slice(0, 1), slice(7, 20), slice(33, 50)):
        part = call(hidden[rows], labels[rows])
        for whole, alone in zip(full, part, strict=True):
            assert torch.equal(whole[rows], alone), rows
    shuffled = torch.randperm(50)
    for whole, mixed in zip(full, call(hidden[shuffled], labels[shuffled]), strict=True):
        assert torch.equal(whole[shuffled], mixed)


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_reference_is_batch_invariant(chunk_size):
    """The CPU path without the interpreter (``reference.linear_logprobs``) keeps the same promise:
    with h (301, 64) and W (2000, 64), unpadded GEMMs of different row counts put rows computed in
    different company up to 6e-6 apart."""
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = (
        torch.randn(301, 64, generator=g),
        torch.randn(2000, 64, generator=g),
        torch.randn(2000, generator=g),
    )
    labels = torch.randint(0, 2000, (301,), generator=g)
    call = lambda h, y: reference.linear_logprobs(
        h, weight, y, bias=bias, return_entropy=True, chunk_size=chunk_size
    )  # noqa: E731
    full = call(hidden, labels)
    for rows in (slice(0, 1), slice(150, 151), slice(300, 301), slice(100, 117), slice(5, 300)):
        for whole, alone in zip(full, call(hidden[rows], labels[rows]), strict=True):
            assert torch.equal(whole[rows], alone), rows


def test_bad_input_names_the_argument(device):
    hidden, weight, bias, labels, _ = make()
    with pytest.raises(ValueError, match="weight must be"):
        fastppo.linear_logprobs(hidden, weight[:, :5], labels)
    if hidden.device.type == "cpu":  # torch._assert_async: at once on CPU, fatal on CUDA
        with pytest.raises(RuntimeError, match=r"labels must lie in \[0, "):
            fastppo.linear_logprobs(hidden, weight, torch.full_like(labels, 10_000))
    with pytest.raises(ValueError, match="bias must be"):
        fastppo.linear_logprobs(hidden, weight, labels, bias=bias[:3])
    with pytest.raises(ValueError, match="temperature"):
        fastppo.linear_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fastppo.linear_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        fastppo.linear_logprobs(hidden, weight, labels[:3])


@pytest.mark.gpu
def test_extra_memory_is_one_chunk_on_gpu():
    """N = 8192 rows, V = 151,936, bf16: the logits would be 2.5 GB (5 GB in fp32 for the
    gradient); forward + backward stay within one chunk of logits, the fp32 weight gradient and
    the outputs' size."""
    N, H, V = 8192, 896, 151936
    hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, entropy = fastppo.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=512)
    (logp.sum() + entropy.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    chunk_logits = 512 * V * 2
    bound = 3 * chunk_logits + V * H * 4 + V * H * 2 + N * H * 2 * 2 + (64 << 20)
    assert extra < bound, (extra / 2**30, bound / 2**30)
    assert extra < N * V * 2  # less than the bf16 logits alone
