"""What TRL 1.16.0's own tests (``tests/test_kernels.py``, ``tests/test_utils.py``) found, run with
``fastppo.integrations.trl`` patched in, each made a test here (tests/parity/upstream/EXPECTED.md
lists them by TRL's test id).

1. ``ChunkedLogProbFunction.apply`` without ``outputs``: TRL's default asks for all four optional
   outputs (entropy, log_sum_sq_probs, mean_logits, is_top1). The adapter returned None for them;
   it now has TRL's defaults, and returns exactly what TRL's function returns.
2. Half precision: TRL's tests demand bit-equality with TRL's own bf16/fp16 arithmetic
   (``log_softmax`` and ``p·log p`` rounded to the dtype on the way). fastppo computes in fp32 and
   rounds once: against fp64 its outputs are the correctly rounded value in every element, TRL's
   in 0-100% (23-79% typically). Kept: each such case asserts fastppo's is that correctly rounded
   value and at least as close to fp64 as TRL's in every element (strictly closer in sum).
"""

import inspect

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")

from trl.kernels import chunked_logprob  # noqa: E402

from fastppo.integrations import trl as adapter  # noqa: E402

# --- 1. ChunkedLogProbFunction's defaults ------------------------------------------------------


def test_apply_has_the_defaults_of_trls_forward():
    ours = inspect.signature(adapter.ChunkedLogProbFunction.apply).parameters
    theirs = list(inspect.signature(chunked_logprob.ChunkedLogProbFunction.forward).parameters.values())[1:]
    assert [p.name for p in theirs] == list(ours)  # TRL's forward less ctx
    assert {p.name: p.default for p in theirs} == {name: p.default for name, p in ours.items()}
    assert adapter.OPTIONAL_OUTPUTS == chunked_logprob.OPTIONAL_OUTPUTS


def _head(seed=0, n=23, h=16, v=97):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, h, generator=g),
        torch.randn(v, h, generator=g) * 0.5,
        torch.randint(0, v, (n,), generator=g),
    )


def _assert_same(ours, theirs):
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize(
    "extra",
    [(), (None,), (None, 1.0), (30.0, 0.5)],
    ids=["no-optional-args", "softcap-None", "softcap-scale", "softcap-30-scale-0.5"],
)
def test_without_outputs_returns_exactly_trls(extra):
    """TRL's default ``outputs`` asks for every optional output: the adapter runs TRL's function,
    so all five values are TRL's, bit for bit (``test_kernels.py``'s 14 failures: None for them)."""
    hidden, weight, targets = _head()
    ours = adapter.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 32, *extra)
    theirs = chunked_logprob.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 32, *extra)
    assert all(t is not None for t in theirs)
    _assert_same(ours, theirs)


@pytest.mark.parametrize(
    "outputs",
    [
        ("log_sum_sq_probs",),
        ("mean_logits",),
        ("is_top1",),
        ("entropy", "mean_logits"),
        ("log_probs", "is_top1"),
    ],
)
def test_outputs_fastppo_has_no_fused_form_of_run_trls(outputs):
    hidden, weight, targets = _head(1)
    ours = adapter.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32, None, 1.0, outputs)
    theirs = chunked_logprob.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, 32, None, 1.0, outputs
    )
    _assert_same(ours, theirs)


@pytest.mark.parametrize("outputs", [(), ("entropy",), ("log_probs", "entropy"), ("log_probs",)])
def test_log_probs_and_entropy_run_fastppo(outputs, monkeypatch):
    """Outputs within the entropy: fastppo computes them (one call), None where TRL's is None, and
    within fp32 rounding of TRL's (its vocabulary tiles fold in another order)."""
    import fastppo

    calls, real = [], fastppo.linear_logprobs
    monkeypatch.setattr(fastppo, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, targets = _head(2)
    ours = adapter.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 32, None, 1.0, outputs)
    theirs = chunked_logprob.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 0.7, 32, None, 1.0, outputs
    )
    assert calls == [1]
    for a, b in zip(ours, theirs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- 2. half precision: closer to fp64 than TRL's own arithmetic -------------------------------

HALF = [torch.float16, torch.bfloat16]
# TRL's TestEntropyFromLogits::test_entropy_from_logits_2_dims cases (dtype, chunk_size, shape).
ENTROPY_SHAPES = [(768,), (32, 768), (8, 16, 768), (2, 4, 8, 768)]


def _assert_correctly_rounded_and_closer(ours, theirs, exact):
    """``ours`` is ``exact`` (fp64) rounded to its dtype in every element, and no element of TRL's is
    closer to it (where TRL's differs at all, it is farther)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == exact.shape
    assert torch.equal(ours, exact.to(ours.dtype))
    err_ours, err_theirs = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    assert (err_ours <= err_theirs).all()
    assert torch.equal(theirs, ours) or err_ours.sum() < err_theirs.sum()


@pytest.mark.parametrize("shape", ENTROPY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunk_size", [1, 16])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_entropy_from_logits_half_is_closer_to_fp64(dtype, chunk_size, shape):
    g = torch.Generator().manual_seed(len(shape) + chunk_size)
    logits = torch.randn(*shape, generator=g).to(dtype)
    z = logits.double()
    exact = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    ours = adapter.entropy_from_logits(logits, chunk_size=chunk_size)
    theirs = trl_utils.entropy_from_logits(logits, chunk_size=chunk_size)
    _assert_correctly_rounded_and_closer(ours, theirs, exact)


@pytest.mark.parametrize("k", [None, 1, 8], ids=["index", "k1", "k8"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_selective_log_softmax_half_is_closer_to_fp64(dtype, k):
    """TRL's TestSelectiveLogSoftmax cases: (4, 32, 1024) logits, an index per row or K per row."""
    g = torch.Generator().manual_seed(7 if k is None else k)
    logits = torch.randn(4, 32, 1024, generator=g).to(dtype)
    index = torch.randint(0, 1024, (4, 32) if k is None else (4, 32, k), generator=g)
    logp = torch.log_softmax(logits.double(), -1)
    exact = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1) if k is None else logp.gather(-1, index)
    ours = adapter.selective_log_softmax(logits, index)
    theirs = trl_utils.selective_log_softmax(logits, index)
    _assert_correctly_rounded_and_closer(ours, theirs, exact)
