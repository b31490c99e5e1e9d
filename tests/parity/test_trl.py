"""fastppo.integrations.trl against TRL 1.16.0's own functions, on the same inputs.

On CPU TRL takes its PyTorch fallback, which returns ``logits.dtype`` and computes bf16/fp16 inputs
in that precision; fastppo computes in fp32 and the adapter casts to ``logits.dtype``. So:

- fp32/fp64: the two agree to a few fp32 (fp64) units of the values' magnitude.
- bf16/fp16: the adapter is the exact value correctly rounded to the dtype (at most half a unit,
  ``u·|exact|``, plus fp32 noise), while TRL's fallback rounds its intermediates (``logits /
  temperature``, the log-softmax, ``p·log p``) to the dtype, an error of a few ``u`` times the
  logits' magnitude. Its measured worst case over 720 random cases (scales 0.5-8, V up to 32000,
  temperature 1 and 0.7) is 1.1·u·(|logp| + 2·max|z|) for log-probs and
  3.3·u·(H + 2·max|z| + log V) for entropies (z = logits / temperature); the tests allow twice
  (log-probs) and four times (entropies) that, plus the adapter's own half unit.

On CUDA TRL runs its Triton kernel and returns fp32; the ``gpu`` tests compare the adapter with it.
"""

import importlib
import math

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")

from transformers.utils import is_triton_available  # noqa: E402

from fastppo.integrations import trl as adapter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

HALF = (torch.bfloat16, torch.float16)


def _unit(dtype) -> float:
    """Unit roundoff of dtype: half the distance from 1 to the next value."""
    return torch.finfo(dtype).eps / 2


def _exact(logits, index, temperature=1.0, row_mask=None):
    """fp64 log-probs at ``index`` ((...) or (..., K)) and per-row entropies, masked like TRL."""
    z = logits.detach().double() / temperature
    logp_all = torch.log_softmax(z, -1)
    top_k = index.dim() == logits.dim()
    logp = logp_all.gather(-1, index.long() if top_k else index.long().unsqueeze(-1))
    logp = logp if top_k else logp.squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1)
    if row_mask is not None:
        logp = logp.masked_fill(row_mask == 0, 0.0)
        entropy = entropy.masked_fill(row_mask == 0, 0.0) if not top_k else entropy
    zmax = z.abs().amax(-1)
    return logp, entropy, zmax


def _check_logp(ours, theirs, logits, index, temperature=1.0, row_mask=None):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    exact, _, zmax = _exact(logits, index, temperature, row_mask)
    ours, theirs = ours.double(), theirs.double()
    if logits.dtype in HALF:
        u = _unit(logits.dtype)
        zmax = zmax.unsqueeze(-1) if index.dim() == logits.dim() else zmax
        # fastppo: the exact value correctly rounded (fp32 noise aside)
        assert ((ours - exact).abs() <= u * exact.abs() + 1e-5 * (1 + zmax)).all()
        # TRL's half-precision fallback: within its own rounding error of ours
        tol = 2 * 1.1 * u * (exact.abs() + 2 * zmax) + u * exact.abs() + 1e-5
        assert ((ours - theirs).abs() <= tol).all(), (ours - theirs).abs().max()
    else:
        eps = torch.finfo(logits.dtype).eps
        torch.testing.assert_close(ours, theirs, rtol=16 * eps, atol=16 * eps * (1 + zmax.max().item()))


def _check_entropy(ours, theirs, logits, temperature=1.0, row_mask=None, index=None):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if index is None:
        index = torch.zeros(logits.shape[:-1], dtype=torch.long)
    _, exact, zmax = _exact(logits, index, temperature, row_mask)
    ours, theirs = ours.double(), theirs.double()
    if logits.dtype in HALF:
        u = _unit(logits.dtype)
        assert ((ours - exact).abs() <= u * exact.abs() + 1e-5 * (1 + zmax)).all()
        tol = 4 * 3.3 * u * (exact + 2 * zmax + math.log(logits.shape[-1])) + u * exact + 1e-5
        assert ((ours - theirs).abs() <= tol).all(), (ours - theirs).abs().max()
    else:
        eps = torch.finfo(logits.dtype).eps
        torch.testing.assert_close(ours, theirs, rtol=16 * eps, atol=16 * eps * (1 + zmax.max().item()))


def _inputs(shape, dtype, *, scale=3.0, seed=0, k=None, masked=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * scale).to(dtype)
    lead = shape[:-1] if k is None else (*shape[:-1], k)
    index = torch.randint(0, shape[-1], lead, generator=g)
    row_mask = torch.randint(0, 2, lead, generator=g) if masked else None
    if masked and row_mask.numel() > 1:
        row_mask.view(-1)[:2] = torch.tensor([0, 1])  # at least one row on and one off
    return logits, index, row_mask


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(37, 1031), (3, 5, 257), (2, 3, 1), (4, 50257)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "row_mask"])
def test_selective_log_softmax(dtype, shape, temperature, masked):
    logits, index, row_mask = _inputs(shape, dtype, masked=masked)
    ours = adapter.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
    theirs = trl_utils.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
    _check_logp(ours, theirs, logits, index, temperature, row_mask)
    if masked:
        assert (ours[row_mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 257), (37, 1031)], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "row_mask"])
def test_selective_log_softmax_top_k(dtype, shape, masked):
    """index (..., K) gathers K log-probs per row (TRL takes its fallback for it on every device)."""
    logits, index, row_mask = _inputs(shape, dtype, k=6, masked=masked)
    ours = adapter.selective_log_softmax(logits, index, temperature=0.8, row_mask=row_mask)
    theirs = trl_utils.selective_log_softmax(logits, index, temperature=0.8, row_mask=row_mask)
    _check_logp(ours, theirs, logits, index, 0.8, row_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(769,), (37, 1031), (3, 5, 257), (2, 3, 4, 129), (3, 1)], ids=str)
@pytest.mark.parametrize("chunk_size", [1, 16, 128, 10_000])
def test_entropy_from_logits(dtype, shape, chunk_size):
    logits, _, _ = _inputs(shape, dtype)
    ours = adapter.entropy_from_logits(logits, chunk_size=chunk_size)
    theirs = trl_utils.entropy_from_logits(logits, chunk_size=chunk_size)
    _check_entropy(ours, theirs, logits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 1031), (3, 5, 257)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "row_mask"])
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy(dtype, shape, temperature, masked, entropy_requires_grad):
    logits, index, row_mask = _inputs(shape, dtype, masked=masked)
    logits.requires_grad_()
    kwargs = dict(entropy_requires_grad=entropy_requires_grad, temperature=temperature, row_mask=row_mask)
    ours = adapter.selective_log_softmax_and_entropy(logits, index, **kwargs)
    theirs = trl_utils.selective_log_softmax_and_entropy(logits, index, **kwargs)
    _check_logp(ours[0], theirs[0], logits, index, temperature, row_mask)
    _check_entropy(ours[1], theirs[1], logits, temperature, row_mask, index)
    assert ours[0].requires_grad and theirs[0].requires_grad
    assert ours[1].requires_grad == theirs[1].requires_grad == entropy_requires_grad


def _grads(fn, logits, index, temperature, row_mask, weights):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, index, temperature=temperature, row_mask=row_mask)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights[: len(outs)], strict=True))
    loss.backward()
    return x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 1031), (3, 5, 257)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "row_mask"])
@pytest.mark.parametrize("which", ["logp", "logp_and_entropy"])
def test_gradient(dtype, shape, temperature, masked, which):
    """d(Σ w·logp [+ Σ w'·H]) / d logits, with an upstream gradient that is not all ones."""
    logits, index, row_mask = _inputs(shape, dtype, masked=masked)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(index.shape, generator=g, dtype=torch.float64) for _ in range(2)]
    if which == "logp":
        ours_fn, theirs_fn = adapter.selective_log_softmax, trl_utils.selective_log_softmax
    else:
        ours_fn, theirs_fn = (
            adapter.selective_log_softmax_and_entropy,
            trl_utils.selective_log_softmax_and_entropy,
        )
    ours = _grads(ours_fn, logits, index, temperature, row_mask, weights)
    theirs = _grads(theirs_fn, logits, index, temperature, row_mask, weights)
    exact = _grads(
        lambda x, i, **kw: _exact_differentiable(x, i, which=which, **kw),
        logits.double(),
        index,
        temperature,
        row_mask,
        weights,
    )
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    if masked:
        assert (ours[row_mask == 0] == 0).all() and (theirs[row_mask == 0] == 0).all()
    if dtype == torch.bfloat16:
        # The gradient of one row is w·(onehot − p)/T (+ the entropy term): entries of size |w|/T
        # and below. fastppo rounds it once; TRL's bf16 backward a few times.
        u = _unit(dtype)
        scale = (weights[0].abs() + weights[1].abs()).unsqueeze(-1) / temperature
        if row_mask is not None:
            scale = scale * (row_mask != 0).unsqueeze(-1)
        z = logits.double() / temperature
        scale = scale * (1 + (z - z.amax(-1, keepdim=True)).abs())  # entropy term: p·(log p + H)
        assert ((ours.double() - exact).abs() <= 2 * u * scale + 1e-6).all()
        assert ((ours.double() - theirs.double()).abs() <= 16 * u * scale + 1e-6).all()
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(ours, theirs, rtol=64 * eps, atol=64 * eps)
        torch.testing.assert_close(ours.double(), exact, rtol=64 * eps, atol=64 * eps)


def _exact_differentiable(x, index, *, which, temperature, row_mask):
    z = x / temperature
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    if row_mask is not None:
        logp = logp.masked_fill(row_mask == 0, 0.0)
    if which == "logp":
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    return logp, entropy


def test_entropy_from_logits_gradient():
    logits, _, _ = _inputs((3, 5, 257), torch.float32)
    g = torch.randn(3, 5)
    grads = []
    for fn in (adapter.entropy_from_logits, trl_utils.entropy_from_logits):
        x = logits.clone().requires_grad_()
        (fn(x) * g).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_raises_like_trl(temperature):
    logits, index, _ = _inputs((2, 7), torch.float32)
    for fn in (trl_utils.selective_log_softmax, adapter.selective_log_softmax):
        with pytest.raises(ValueError, match="temperature must be positive"):
            fn(logits, index, temperature=temperature)
    for fn in (trl_utils.selective_log_softmax_and_entropy, adapter.selective_log_softmax_and_entropy):
        with pytest.raises(ValueError, match="temperature must be positive"):
            fn(logits, index, temperature=temperature)


def test_int32_index_and_float_row_mask():
    logits, index, row_mask = _inputs((3, 5, 257), torch.float32, masked=True)
    index32, mask_f = index.int(), row_mask.float() * 2  # any nonzero counts
    ours = adapter.selective_log_softmax(logits, index32, row_mask=mask_f)
    theirs = trl_utils.selective_log_softmax(logits, index32, row_mask=mask_f)
    _check_logp(ours, theirs, logits, index, 1.0, row_mask)


def test_out_of_range_index_is_not_silently_zero():
    """TRL's fallback raises on an index outside [0, V); a -100 must not read as 'masked' here."""
    logits = torch.randn(2, 7)
    for bad in (7, -100):
        index = torch.tensor([0, bad])
        with pytest.raises(RuntimeError):
            trl_utils.selective_log_softmax(logits, index)
        try:
            out = adapter.selective_log_softmax(logits, index)
        except RuntimeError:
            continue  # the reference path's gather raises like TRL's
        assert torch.isnan(out[1])  # fastppo's kernel returns NaN for an index outside the vocabulary


def test_where_trl_fallback_is_wrong_the_adapter_gives_the_meant_value():
    """1-D logits (TRL's fp32 fallback loops over the vocabulary), -inf logits (TRL: NaN entropy),
    an empty batch (TRL raises)."""
    logits = torch.randn(11)
    out = adapter.selective_log_softmax(logits, torch.tensor(3))
    assert out.shape == () and torch.allclose(out, torch.log_softmax(logits, -1)[3])
    logits = torch.randn(2, 11)
    logits[0, 4] = float("-inf")
    entropy = adapter.entropy_from_logits(logits)
    p = torch.softmax(logits, -1)
    assert torch.allclose(entropy, -(p * torch.log_softmax(logits, -1).nan_to_num(neginf=0.0)).sum(-1))
    assert torch.isnan(trl_utils.entropy_from_logits(logits)[0])
    empty = torch.randn(0, 11)  # TRL's fallback: "stack expects a non-empty TensorList"
    assert adapter.selective_log_softmax(empty, torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_kernel_entry_point_returns_fp32():
    """trl.kernels.selective_log_softmax_and_entropy (TRL's Triton entry) always returns fp32."""
    logits, index, row_mask = _inputs((3, 5, 257), torch.bfloat16, masked=True)
    logp, entropy = adapter.kernel_selective_log_softmax_and_entropy(logits, index, 0.7, row_mask)
    assert logp.dtype == entropy.dtype == torch.float32
    exact_logp, exact_entropy, _ = _exact(logits, index, 0.7, row_mask)
    torch.testing.assert_close(logp.double(), exact_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), exact_entropy, rtol=1e-5, atol=1e-5)


class _Like:
    """Stands in for a tensor on any device: what TRL's kernel predicate reads."""

    def __init__(self, shape, dtype, device="cuda", last_stride=1):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device(device)
        self._last = last_stride

    @property
    def ndim(self):
        return len(self.shape)

    def stride(self, dim):
        assert dim == -1
        return self._last


def _predicate_cases():
    for device in ("cuda", "xpu", "cpu"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            for shape in [(5,), (4, 5), (2, 4, 5), (2, 2, 4, 5), (4, 0)]:
                for last in (1, 2):
                    logits = _Like(shape, dtype, device, last)
                    yield logits, None, None
                    lead = shape[:-1]
                    for index in (
                        _Like(lead, torch.int64, device),
                        _Like(lead, torch.int32, device),
                        _Like(lead, torch.int16, device),
                        _Like((*lead, 3), torch.int64, device),
                        _Like(lead, torch.int64, "cpu"),
                    ):
                        yield logits, index, None
                        for mask in (
                            _Like(lead, torch.bool, device),
                            _Like(lead, torch.int32, device),
                            _Like(lead, torch.float32, device),
                            _Like((*lead, 1), torch.bool, device),
                            _Like(lead, torch.bool, "cpu"),
                        ):
                            yield logits, index, mask


def test_fp32_output_exactly_where_trl_runs_its_kernel():
    """The adapter returns fp32 in exactly the cases TRL 1.16.0 routes to its Triton kernel."""
    triton = is_triton_available()
    n = 0
    for logits, index, mask in _predicate_cases():
        expected = triton and trl_utils._supports_trl_loss_kernel(logits, index, mask)
        assert adapter._trl_runs_kernel(logits, index, mask) == expected, (logits.shape, index, mask)
        n += expected
    assert n > 0 or not triton


# --- patch / unpatch ---------------------------------------------------------------------------

# Modules of trl 1.16.0 that bind these functions by name (grep trl/ for the imports).
BINDERS = {
    "selective_log_softmax": [
        "trl.trainer.utils",
        "trl.experimental.a2po.a2po_trainer",
        "trl.experimental.cpo.cpo_trainer",
        "trl.experimental.orpo.orpo_trainer",
        "trl.experimental.sdft.sdft_trainer",
        "trl.experimental.sdft.loss_utils",
        "trl.experimental.sdpo.sdpo_trainer",
        "trl.experimental.sdpo.loss_utils",
    ],
    "entropy_from_logits": ["trl.trainer.utils"],
    "selective_log_softmax_and_entropy": ["trl.trainer.utils", "trl.experimental.tpo.tpo_trainer"],
}
KERNEL_BINDERS = [
    ("trl.kernels.logprob_entropy", "selective_log_softmax_and_entropy"),
    ("trl.kernels", "selective_log_softmax_and_entropy"),
    ("trl.trainer.utils", "_fused_logprob_entropy"),
]
ADAPTER = {
    "selective_log_softmax": adapter.selective_log_softmax,
    "entropy_from_logits": adapter.entropy_from_logits,
    "selective_log_softmax_and_entropy": adapter.selective_log_softmax_and_entropy,
}


def _bindings():
    out = {}
    for name, modules in BINDERS.items():
        for module in modules:
            out[module, name] = getattr(importlib.import_module(module), name)
    if is_triton_available():
        for module, name in KERNEL_BINDERS:
            out[module, name] = getattr(importlib.import_module(module), name)
    return out


@pytest.fixture
def originals():
    adapter.unpatch()
    before = _bindings()
    yield before
    adapter.unpatch()
    assert _bindings() == before


def _assert_patched(bindings):
    for (module, name), value in bindings.items():
        kernel_entry = module.startswith("trl.kernels") or name == "_fused_logprob_entropy"
        expected = adapter.kernel_selective_log_softmax_and_entropy if kernel_entry else ADAPTER[name]
        assert value is expected, (module, name)


def test_patch_swaps_every_binding_and_unpatch_restores(originals):
    assert all(getattr(v, "__module__", "").startswith("trl.") for v in originals.values())
    adapter.patch()
    _assert_patched(_bindings())
    adapter.patch()  # a second call changes nothing
    _assert_patched(_bindings())
    adapter.unpatch()
    assert _bindings() == originals


def test_patched_context(originals):
    with adapter.patched():
        _assert_patched(_bindings())
        assert trl_utils.selective_log_softmax is adapter.selective_log_softmax
    assert _bindings() == originals
    adapter.patch()
    with adapter.patched():  # inside an active patch: leaves it on
        pass
    _assert_patched(_bindings())


def test_patched_trl_calls_route_through_fastppo(originals):
    """TRL's own combined function, patched, and a trainer module's bound name both give fastppo's."""
    tpo = importlib.import_module("trl.experimental.tpo.tpo_trainer")
    logits, index, row_mask = _inputs((3, 5, 257), torch.bfloat16, masked=True)
    with adapter.patched():
        got = tpo.selective_log_softmax_and_entropy(logits, index, temperature=0.7, row_mask=row_mask)
    want = adapter.selective_log_softmax_and_entropy(logits, index, temperature=0.7, row_mask=row_mask)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_module_imported_while_patched_is_restored(originals):
    """``patch(); import trainer`` binds fastppo's function at import; ``unpatch`` restores it too."""
    import sys

    name = "trl.experimental.a2po.a2po_trainer"
    module = importlib.import_module(name)
    with adapter.patched():
        del sys.modules[name]
        fresh = importlib.import_module(name)
        assert fresh.selective_log_softmax is adapter.selective_log_softmax
    assert fresh.selective_log_softmax is originals["trl.trainer.utils", "selective_log_softmax"]
    sys.modules[name] = module
    sys.modules["trl.experimental.a2po"].a2po_trainer = module


def test_main_trainers_do_not_call_these_functions():
    """In trl 1.16.0 GRPO, RLOO, DPO, KTO and SFT score completions through the fused LM head
    (trl.kernels.ChunkedLogProbFunction), never through these functions: patch() cannot speed them
    up. This pins that fact so a TRL upgrade that changes it is noticed."""
    for module in ("grpo_trainer", "rloo_trainer", "dpo_trainer", "kto_trainer", "sft_trainer"):
        mod = importlib.import_module(f"trl.trainer.{module}")
        for name in (*ADAPTER, "_fused_logprob_entropy"):
            assert not hasattr(mod, name), (module, name)
        assert hasattr(mod, "add_fused_lm_head")


# --- CUDA: TRL's Triton kernel path ---------------------------------------------------------------


def fp32_gradient_bound(logits, index, weights, temperature):
    """What fp32 can promise, per element, for ∂/∂logits of Σ w·logp + Σ w_H·entropy (K = 1):
    ∂_j = (1[j = y]·w − p_j·w − w_H·p_j·(log p_j + H)) / τ. Each term is good to a few eps of its
    own size times the size of what it is computed from: p_j = exp(z_j − lse) carries the error
    of z_j − lse, and lse and H are sums over V terms, whose fp32 summation error grows like
    √V·eps (PyTorch's CPU log_softmax in fp32 reaches 6·eps·scale at V = 50,257; fastppo's
    tile-tree sums 1.5). A wrong term (a sign, the temperature, the entropy part) is off by its
    own size, ~1e3 times this bound."""
    z = logits.double() / temperature
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1, keepdim=True)
    lse = torch.logsumexp(z, -1, keepdim=True)
    w, w_h = weights[0].double()[..., None].abs(), weights[1].double()[..., None].abs()
    onehot = torch.nn.functional.one_hot(index, logits.shape[-1]).double()
    size = 1 + z.abs() + lse.abs() + entropy
    scale = onehot * w + p * (w + w_h * ((logp_all + entropy).abs() + 1)) * size
    return math.sqrt(logits.shape[-1]) * torch.finfo(torch.float32).eps * scale / temperature


def test_fp32_gradient_bound_holds_on_cpu_and_catches_a_dropped_term():
    """The bound of the CUDA test below, checked where it can be here: the adapter (kernel in the
    interpreter) and TRL's own CPU functions against fp64, and a gradient without its entropy part."""
    logits, index, _ = _inputs((2, 33, 50257), torch.float32)
    logits, index = logits[:, :-1], index[:, :-1]
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(index.shape, generator=g), torch.randn(index.shape, generator=g)
    bound = fp32_gradient_bound(logits, index, weights, 0.7)

    def grad(fn, dtype, entropy_weight=1.0):
        x = logits.detach().to(dtype).clone().requires_grad_()
        logp, entropy = fn(x)
        (
            (logp * weights[0].to(dtype)).sum() + entropy_weight * (entropy * weights[1].to(dtype)).sum()
        ).backward()
        return x.grad.double()

    ours = lambda x: adapter.selective_log_softmax_and_entropy(x, index, temperature=0.7)  # noqa: E731
    theirs = lambda x: (  # noqa: E731
        trl_utils.selective_log_softmax(x / 0.7, index),
        trl_utils.entropy_from_logits(x / 0.7),
    )
    exact = grad(ours, torch.float64)
    for fn in (ours, theirs):
        assert ((grad(fn, torch.float32) - exact).abs() <= bound).all()
    assert ((grad(ours, torch.float32, entropy_weight=0.0) - exact).abs() > 100 * bound).any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "row_mask"])
def test_cuda_matches_trl_kernel(dtype, masked):
    logits, index, row_mask = _inputs((4, 33, 50257), dtype, masked=masked)
    logits, index = logits.cuda()[:, :-1], index.cuda()[:, :-1]  # TRL's non-contiguous slice
    row_mask = None if row_mask is None else row_mask.cuda()[:, :-1]
    weights = torch.randn(index.shape, device="cuda"), torch.randn(index.shape, device="cuda")
    results = []
    for fn in (adapter.selective_log_softmax_and_entropy, trl_utils.selective_log_softmax_and_entropy):
        x = logits.detach().clone().requires_grad_()
        logp, entropy = fn(x, index, temperature=0.7, row_mask=row_mask)
        assert logp.dtype == entropy.dtype == torch.float32  # TRL's kernel path
        ((logp * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
        results.append((logp, entropy, x.grad))
    (*ours, ours_grad), (*theirs, theirs_grad) = results
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    if dtype == torch.float32:
        # Each against fp64 (on the CPU reference), within what fp32 can promise; the message says
        # which of the two is closer.
        x64 = logits.detach().cpu().double().requires_grad_()
        logp, entropy = adapter.selective_log_softmax_and_entropy(
            x64, index.cpu(), temperature=0.7, row_mask=None if row_mask is None else row_mask.cpu()
        )
        ((logp * weights[0].cpu()).sum() + (entropy * weights[1].cpu()).sum()).backward()
        bound = fp32_gradient_bound(logits.cpu(), index.cpu(), [w.cpu() for w in weights], 0.7)
        worst = {
            name: ((grad.cpu().double() - x64.grad).abs() / bound).max().item()
            for name, grad in (("fastppo", ours_grad), ("trl", theirs_grad))
        }
        assert max(worst.values()) <= 1.0, f"largest error / fp32 bound: {worst}"
    else:
        # both compute the gradient in fp32 and round it once to the logits' dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=2 * eps, atol=2 * eps * 4 / 0.7)
    for fn in (adapter.selective_log_softmax, trl_utils.selective_log_softmax):
        assert fn(logits, index, row_mask=row_mask).dtype == torch.float32
    for fn in (adapter.entropy_from_logits, trl_utils.entropy_from_logits):
        assert fn(logits).dtype == torch.float32


# --- TRL's fused LM head (trl.kernels.ChunkedLogProbFunction) ------------------------------------


@pytest.mark.parametrize("softcap, scale, with_bias", [(None, 1.0, False), (30.0, 0.5, True)])
def test_chunked_logprob_function_matches_trl(softcap, scale, with_bias):
    """Values and gradients (hidden, weight, bias) of the adapter against TRL's own function, with
    Gemma's softcap and a logit scale; outputs TRL computes and fastppo does not run TRL's."""
    from trl.kernels import ChunkedLogProbFunction as TRLFunction

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(29, 16, generator=g)
    weight = torch.randn(211, 16, generator=g) * 0.5
    bias = torch.randn(211, generator=g) if with_bias else None
    targets = torch.randint(0, 211, (29,), generator=g)
    upstream = torch.randn(29, generator=g), torch.randn(29, generator=g)
    results = []
    for fn in (adapter.ChunkedLogProbFunction, TRLFunction):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
        logp, entropy, *rest = fn.apply(*leaves, targets, 0.7, 64, softcap, scale, ("log_probs", "entropy"))
        assert all(r is None for r in rest)
        ((logp * upstream[0]).sum() + (entropy * upstream[1]).sum()).backward()
        results.append([logp, entropy, *(t.grad for t in leaves if t is not None)])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    extra = adapter.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0,
                                                 ("log_probs", "is_top1"))  # fmt: skip
    assert extra[4] is not None and extra[4].dtype == torch.bool  # TRL's original computed it
