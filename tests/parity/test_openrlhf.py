"""fastppo.integrations.openrlhf against OpenRLHF 0.11.2's own functions, on the same inputs.

Each test runs the peer's original function and the adapter on identical random inputs (masks
with holes and all-zero rows) and compares forward values and gradients. ``fast_path`` makes any
fallback to the peer an error, so a match proves fastppo's kernels computed it; ``fallback``
records the fallbacks the unsupported configurations must take.
"""

import inspect
from types import SimpleNamespace

import pytest
import torch

from . import openrlhf_loader

_modules = openrlhf_loader.load()
peer_utils = _modules["openrlhf.models.utils"]
peer_loss = _modules["openrlhf.models.loss"]
peer_maker = _modules["openrlhf.trainer.ppo_utils.experience_maker"]

import fastppo.integrations.openrlhf as adapter  # noqa: E402

Maker = peer_maker.RemoteExperienceMaker
# OpenRLHF's own objects, taken before any test patches anything.
ORIGINAL = {
    "compute_approx_kl": peer_utils.compute_approx_kl,
    "log_probs_from_logits": peer_utils.log_probs_from_logits,
    "policy_forward": peer_loss.PolicyLoss.forward,
    "value_forward": peer_loss.ValueLoss.forward,
    "gae": vars(Maker)["get_advantages_and_returns"],
    "cumulative": vars(Maker)["get_cumulative_returns"],
}
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _unpatched():
    adapter.unpatch()
    yield
    adapter.unpatch()


@pytest.fixture
def fast_path(monkeypatch):
    def no_fallback(module_name, attribute):
        raise AssertionError(f"fell back to OpenRLHF's {module_name}.{attribute}")

    monkeypatch.setattr(adapter, "_original", no_fallback)


@pytest.fixture
def fallback(monkeypatch):
    calls = []
    original = adapter._original

    def spy(module_name, attribute):
        calls.append(attribute)
        return original(module_name, attribute)

    monkeypatch.setattr(adapter, "_original", spy)
    return calls


def _close(actual, expected, **tol):
    assert (actual is None) == (expected is None)
    if actual is not None:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, equal_nan=True, **(tol or TOL))


def _run(fn, *args, grad_of=(), **kwargs):
    """fn's outputs (a tuple) and the gradients of a weighted sum of its differentiable ones."""
    out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    diff = [o for o in outs if o is not None and o.requires_grad]
    weights = [torch.linspace(0.5, 1.5, o.numel(), device=o.device).view_as(o) for o in diff]
    total = sum((o * w).sum() for o, w in zip(diff, weights, strict=True))
    grads = torch.autograd.grad(total, grad_of, allow_unused=True) if diff else ()
    return outs, grads


def _masked_batch(device, B=4, T=23, seed=0):
    gen = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(B, T, generator=gen) * 3
    old = log_probs + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.25).float()
    mask[1] = 0  # an all-zero row
    mask[2, T // 2 :] = 0  # right padding after holes
    to = lambda x: x.to(device)  # noqa: E731
    return to(log_probs).requires_grad_(True), to(old), to(adv), to(mask)


# ── compute_approx_kl ───────────────────────────────────────────────────────────────────────


def _log_ratio_inputs(device, dtype=torch.float32):
    # Log-ratios spanning every clamp (|d| > 10, k3's pre-exp clamp at -10, the 20 of fastppo's).
    extremes = torch.tensor([-1e6, -100.0, -30.0, -15.0, -9.5, -3.0, -0.4, 0.0, 0.7, 4.0, 9.0, 25.0, 1e3])
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, extremes.numel(), generator=gen) - 2
    log_ratio = torch.cat([extremes[None], torch.randn(2, extremes.numel(), generator=gen) * 2])
    log_probs = (base + log_ratio).to(device, dtype).requires_grad_(True)
    return log_probs, base.to(device, dtype).requires_grad_(True)


@pytest.mark.parametrize("unbiased_gradient", [False, True])
@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_compute_approx_kl_matches(device, fast_path, kl_estimator, unbiased_gradient):
    log_probs, base = _log_ratio_inputs(device)
    kwargs = dict(kl_estimator=kl_estimator, unbiased_gradient=unbiased_gradient)
    (want,), want_grads = _run(
        ORIGINAL["compute_approx_kl"], log_probs, base, grad_of=(log_probs, base), **kwargs
    )
    (got,), got_grads = _run(adapter.compute_approx_kl, log_probs, base, grad_of=(log_probs, base), **kwargs)
    for g, w in zip(got_grads, want_grads, strict=True):
        _close(g, w)
    if not unbiased_gradient:
        _close(got, want)
        return
    # OpenRLHF's straight-through value + s − s (s = d²/2) rounds its value by up to ulp(s); fastppo's
    # is the clamped estimator itself, which OpenRLHF's own test asks for (== the legacy value).
    _close(got, ORIGINAL["compute_approx_kl"](log_probs, base, kl_estimator=kl_estimator))
    d = (log_probs - base).detach()
    assert ((got - want).abs() <= 1e-5 + 2 * torch.finfo(torch.float32).eps * d.square() / 2).all()


def test_compute_approx_kl_k2_and_bf16(device, fast_path):
    log_probs, base = _log_ratio_inputs(device)
    (want,), want_grads = _run(
        ORIGINAL["compute_approx_kl"], log_probs, base, grad_of=(log_probs,), kl_estimator="k2"
    )
    (got,), got_grads = _run(
        adapter.compute_approx_kl, log_probs, base, grad_of=(log_probs,), kl_estimator="k2"
    )
    _close(got, want)
    _close(got_grads[0], want_grads[0])
    # bf16 log-probs: both compute in fp32 and return fp32; the gradient comes back in bf16.
    log_probs, base = _log_ratio_inputs(device, torch.bfloat16)
    (want,), want_grads = _run(
        ORIGINAL["compute_approx_kl"], log_probs, base, grad_of=(log_probs,), kl_estimator="k3"
    )
    (got,), got_grads = _run(
        adapter.compute_approx_kl, log_probs, base, grad_of=(log_probs,), kl_estimator="k3"
    )
    _close(got, want)
    _close(got_grads[0], want_grads[0])


@pytest.mark.parametrize("kl_estimator, with_old", [("k3", True), ("k2", False)])
def test_compute_approx_kl_falls_back_for_importance_weights_and_k2_unbiased(
    device, fallback, kl_estimator, with_old
):
    log_probs, base = _log_ratio_inputs(device)
    old = (log_probs.detach() - 0.3) if with_old else None
    kwargs = dict(log_probs_old=old, kl_estimator=kl_estimator, unbiased_gradient=True)
    (want,), want_grads = _run(ORIGINAL["compute_approx_kl"], log_probs, base, grad_of=(log_probs,), **kwargs)
    (got,), got_grads = _run(adapter.compute_approx_kl, log_probs, base, grad_of=(log_probs,), **kwargs)
    _close(got, want)
    _close(got_grads[0], want_grads[0])
    assert fallback == ["compute_approx_kl"]


def test_compute_approx_kl_rejects_unknown_estimator(device):
    log_probs, base = _log_ratio_inputs(device)
    for fn in (ORIGINAL["compute_approx_kl"], adapter.compute_approx_kl):
        with pytest.raises(ValueError, match="kl_estimator"):
            fn(log_probs, base, kl_estimator="k4")


# ── log_probs_from_logits ───────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_from_logits_matches(device, fast_path, temperature):
    gen = torch.Generator().manual_seed(2)
    leaf = (torch.randn(3, 7, 53, generator=gen) * 4).to(device).requires_grad_(True)
    labels = torch.randint(0, 53, (3, 7), generator=gen).to(device)
    results = []
    for fn in (ORIGINAL["log_probs_from_logits"], adapter.log_probs_from_logits):
        logits = leaf * 1.0  # a non-leaf the in-place temperature division may write into
        (logp,), (grad,) = _run(fn, logits, labels, temperature, grad_of=(leaf,))
        results.append((logp, logits.detach(), grad))
    for got, want in zip(
        results[1], results[0], strict=True
    ):  # log-probs, the scaled logits left behind, grad
        _close(got, want)


def test_log_probs_from_logits_falls_back_for_bf16(device, fallback):
    logits = torch.randn(2, 5, 31, device=device).bfloat16()
    labels = torch.randint(0, 31, (2, 5), device=device)
    _close(
        adapter.log_probs_from_logits(logits.clone(), labels),
        ORIGINAL["log_probs_from_logits"](logits, labels),
    )
    assert fallback == ["log_probs_from_logits"]


# ── PolicyLoss / ValueLoss ──────────────────────────────────────────────────────────────────

POLICY_CASES = {
    "token-mean": (dict(), dict()),
    "asymmetric-clip": (dict(clip_eps_low=0.1, clip_eps_high=0.28), dict()),
    "dual-clip": (dict(dual_clip=1.5), dict()),
    "seq-mean-token-mean": (dict(token_level_loss=False), dict()),
    "seq-dual-clip": (dict(token_level_loss=False, dual_clip=2.0, clip_eps_high=0.3), dict()),
    "token-global-dp": (dict(), dict(dp_size=2, batch_num_tokens=torch.tensor(61.0))),
    "seq-global-dp": (dict(token_level_loss=False), dict(dp_size=4, global_batch_size=torch.tensor(7.0))),
}


@pytest.mark.parametrize("case", POLICY_CASES)
def test_policy_loss_matches(device, fast_path, case):
    init, call = POLICY_CASES[case]
    module = peer_loss.PolicyLoss(**init)
    log_probs, old, adv, mask = _masked_batch(device)
    call = {k: v.to(device) if torch.is_tensor(v) else v for k, v in call.items()}
    want, (want_grad,) = _run(
        ORIGINAL["policy_forward"], module, log_probs, old, adv, mask, grad_of=(log_probs,), **call
    )
    got, (got_grad,) = _run(
        adapter.policy_loss_forward, module, log_probs, old, adv, mask, grad_of=(log_probs,), **call
    )
    assert len(got) == len(want) == 5
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    _close(got_grad, want_grad)
    assert 0 < want[1] < 1  # the inputs do clip some tokens


def _nan_gradients_alike(got, want):
    # OpenRLHF's 0/0 reaches every token as a NaN upstream gradient; its where/clamp backwards then
    # zero some of them (clipped tokens), fastppo's scaling keeps NaN everywhere. Both are NaN steps.
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isnan(want).any() and torch.isnan(got).all()
    assert (want[~torch.isnan(want)] == 0).all()


# GSPO and the vLLM IS correction. Rows: 0 and 5–7 plain with holes (mean log-ratios 0.6, −0.5, −0.5,
# 0.4; with the row advantages: dual-clipped at 1.5, unclipped, clipped, clipped), 1 all-zero, 2 one
# token, 3 logp − old alternating ±30 (row mean 0), 4 old − rollout = −30 (an IS ratio of 1e-13).
_ROW_SHIFT = (0.6, 0.0, 0.2, 0.0, 0.0, -0.5, -0.5, 0.4)
_ROW_ADVANTAGE = (-1.3, 0.7, -0.4, 1.1, -0.9, 0.8, -1.0, 0.5)


def _is_batch(device, row_advantage: bool, T=10, seed=11):
    """(log_probs (grad), old, advantages, mask, rollout), ``(8, T)`` fp32; GRPO-like advantages
    (one per row) with ``row_advantage``, else one per token."""
    B = len(_ROW_SHIFT)
    gen = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(B, T, generator=gen) * 3
    log_ratio = 0.3 * torch.randn(B, T, generator=gen) + torch.tensor(_ROW_SHIFT)[:, None]
    log_ratio[3] = 30.0 * (1 - 2 * (torch.arange(T) % 2))
    old = log_probs - log_ratio
    rollout = old - 0.5 * torch.randn(B, T, generator=gen)
    rollout[4] = old[4] + 30.0
    mask = (torch.rand(B, T, generator=gen) > 0.25).float()
    mask[1] = 0
    mask[2] = 0
    mask[2, 3] = 1
    mask[3] = 1
    if row_advantage:
        adv = torch.tensor(_ROW_ADVANTAGE)[:, None].expand(B, T).contiguous()
    else:
        adv = torch.randn(B, T, generator=gen)
    to = lambda x: x.to(device)  # noqa: E731
    return to(log_probs).requires_grad_(True), to(old), to(adv), to(mask), to(rollout)


GLOBAL_COUNTS = {
    "local": {},
    "global": dict(dp_size=2, batch_num_tokens=torch.tensor(61.0), global_batch_size=torch.tensor(7.0)),
}


def _policy_parity(device, module, batch, call):
    """The adapter's 5-tuple and gradient against OpenRLHF's own, at fp32 tolerance."""
    call = {k: v.to(device) if torch.is_tensor(v) else v for k, v in call.items()}
    log_probs, old, adv, mask, rollout = batch
    args = (module, log_probs, old, adv, mask, rollout)
    want, (want_grad,) = _run(ORIGINAL["policy_forward"], *args, grad_of=(log_probs,), **call)
    got, (got_grad,) = _run(adapter.policy_loss_forward, *args, grad_of=(log_probs,), **call)
    assert len(got) == len(want) == 5
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    _close(got_grad, want_grad)
    return want


@pytest.fixture
def op_options(monkeypatch):
    """The keyword arguments of every ``fastppo.ppo_policy_loss`` call the adapter makes."""
    calls = []
    real = adapter.fastppo.ppo_policy_loss
    monkeypatch.setattr(adapter.fastppo, "ppo_policy_loss", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


@pytest.mark.parametrize("counts", GLOBAL_COUNTS)
@pytest.mark.parametrize("level", ["off", "token", "seq"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_gspo_matches(device, fast_path, op_options, dual_clip, level, counts):
    # token_level_loss=True is ignored: OpenRLHF forces the per-sequence mean for GSPO.
    module = peer_loss.PolicyLoss(
        policy_loss_type="gspo", dual_clip=dual_clip, token_level_loss=True, is_correction_level=level
    )
    want = _policy_parity(device, module, _is_batch(device, row_advantage=True), GLOBAL_COUNTS[counts])
    assert 0 < want[1] < 1 and want[3] is None and want[4] is None
    assert all(k["ratio_level"] == "sequence" for k in op_options)


# (level, mode, gating, threshold, how the adapter passes it); OpenRLHF allows clip only at token
# level with the ratio gate, and a divergence gate takes an upper bound only.
IS_CASES = {
    "token-clip-ratio": ("token", "clip", "ratio", (0.5, 2.0), "rollout_correction"),
    "token-mask-ratio": ("token", "mask", "ratio", (0.5, 2.0), "rollout_correction"),
    "token-mask-binary_kl": ("token", "mask", "binary_kl", (0.0, 0.05), "weights"),
    "token-mask-tv": ("token", "mask", "tv", (0.0, 0.1), "weights"),
    "seq-mask-ratio": ("seq", "mask", "ratio", (0.5, 2.0), "weights"),
    "seq-mask-binary_kl": ("seq", "mask", "binary_kl", (0.0, 0.05), "weights"),
    "seq-mask-tv": ("seq", "mask", "tv", (0.0, 0.1), "weights"),
    # A lower bound of 0 keeps IS ratios below exp(−20), which fastppo's rollout weight would bound.
    "token-clip-ratio-from-0": ("token", "clip", "ratio", (0.0, 2.0), "weights"),
    "token-mask-ratio-from-0": ("token", "mask", "ratio", (0.0, 3.0), "weights"),
}


@pytest.mark.parametrize("counts", GLOBAL_COUNTS)
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("case", IS_CASES)
def test_ppo_is_correction_matches(device, fast_path, op_options, case, token_level_loss, counts):
    level, mode, gating, threshold, passed_as = IS_CASES[case]
    module = peer_loss.PolicyLoss(
        token_level_loss=token_level_loss,
        dual_clip=2.0 if token_level_loss else None,
        is_correction_level=level,
        is_correction_mode=mode,
        is_correction_gating=gating,
        is_correction_threshold=threshold,
    )
    want = _policy_parity(device, module, _is_batch(device, row_advantage=False), GLOBAL_COUNTS[counts])
    assert 0 < want[1] < 1 and 0 < want[4] < 1  # some tokens clipped, some units filtered
    assert op_options and all(passed_as in k for k in op_options)


def test_gspo_with_per_token_advantages_runs_fastppo_without_a_gradient(device, fast_path):
    # Only the gradient of OpenRLHF's GSPO differs from GSPO-token when advantages vary in a row.
    module = peer_loss.PolicyLoss(policy_loss_type="gspo", dual_clip=1.5)
    *batch, _ = _is_batch(device, row_advantage=False)
    with torch.no_grad():
        want = ORIGINAL["policy_forward"](module, *batch)
        got = adapter.policy_loss_forward(module, *batch)
    for g, w in zip(got, want, strict=True):
        _close(g, w)


POLICY_NAN_CASES = {
    "ppo": dict(dual_clip=3.0),
    "is-token": dict(is_correction_level="token", is_correction_mode="clip"),
    "is-seq": dict(is_correction_level="seq"),
    "gspo": dict(policy_loss_type="gspo", is_correction_level="token"),
}


@pytest.mark.parametrize("case", POLICY_NAN_CASES)
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_policy_loss_all_zero_mask_gives_the_peer_nan(device, fast_path, token_level_loss, case):
    module = peer_loss.PolicyLoss(token_level_loss=token_level_loss, **POLICY_NAN_CASES[case])
    log_probs, old, adv, mask, rollout = _is_batch(device, row_advantage=True)
    args = (module, log_probs, old, adv, torch.zeros_like(mask), rollout)
    want, (want_grad,) = _run(ORIGINAL["policy_forward"], *args, grad_of=(log_probs,))
    got, (got_grad,) = _run(adapter.policy_loss_forward, *args, grad_of=(log_probs,))
    assert torch.isnan(want[0]) and torch.isnan(want[1]) and torch.isnan(want[2])
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    _nan_gradients_alike(got_grad, want_grad)


def _gspo_far_row(batch):
    log_probs, old, adv, mask, rollout = batch
    old = old.clone()
    old[6] -= 12.0  # row 6 (advantage −1): mean log-ratio 11.5, which fastppo would cap at 10
    return log_probs, old, adv, mask, rollout


@pytest.mark.parametrize(
    "init, row_advantage, edit",
    [
        (dict(policy_loss_type="gspo"), False, None),
        (dict(policy_loss_type="gspo", dual_clip=2.0), True, _gspo_far_row),
        (dict(is_correction_level="seq"), False, lambda b: (*b[:4], b[4].bfloat16())),
        (dict(), False, lambda b: (*b[:3], None, b[4])),
    ],
    ids=["gspo-advantage-varies-in-a-row", "gspo-row-log-ratio-above-10", "is-bf16-rollout", "no-mask"],
)
def test_policy_loss_falls_back_where_fastppo_has_no_equivalent(device, fallback, init, row_advantage, edit):
    module = peer_loss.PolicyLoss(**init)
    batch = _is_batch(device, row_advantage=row_advantage)
    args = (module, *(edit(batch) if edit else batch))
    want, (want_grad,) = _run(ORIGINAL["policy_forward"], *args, grad_of=(batch[0],))
    got, (got_grad,) = _run(adapter.policy_loss_forward, *args, grad_of=(batch[0],))
    for g, w in zip(got, want, strict=True):
        _close(g, w, atol=0, rtol=0)
    _close(got_grad, want_grad, atol=0, rtol=0)
    assert fallback == ["PolicyLoss.forward"]


VALUE_CASES = {
    "clip-token": (dict(clip_eps=0.2), dict()),
    "no-clip-token": (dict(clip_eps=None), dict()),
    "clip-seq": (dict(clip_eps=0.2, token_level_loss=False), dict()),
    "no-clip-seq-global": (
        dict(token_level_loss=False),
        dict(dp_size=2, global_batch_size=torch.tensor(5.0)),
    ),
    "clip-token-global": (dict(clip_eps=0.1), dict(dp_size=2, batch_num_tokens=torch.tensor(40.0))),
}


@pytest.mark.parametrize("case", VALUE_CASES)
def test_value_loss_matches(device, fast_path, case):
    init, call = VALUE_CASES[case]
    module = peer_loss.ValueLoss(**init)
    values, old_values, returns, mask = _masked_batch(device, seed=3)
    call = {k: v.to(device) if torch.is_tensor(v) else v for k, v in call.items()}
    args = (module, values, old_values, returns, mask)
    (want,), (want_grad,) = _run(ORIGINAL["value_forward"], *args, grad_of=(values,), **call)
    (got,), (got_grad,) = _run(adapter.value_loss_forward, *args, grad_of=(values,), **call)
    _close(got, want)
    _close(got_grad, want_grad)


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_value_loss_all_zero_mask_gives_the_peer_nan(device, fast_path, token_level_loss):
    module = peer_loss.ValueLoss(clip_eps=0.2, token_level_loss=token_level_loss)
    values, old_values, returns, mask = _masked_batch(device, seed=4)
    args = (module, values, old_values, returns, torch.zeros_like(mask))
    (want,), (want_grad,) = _run(ORIGINAL["value_forward"], *args, grad_of=(values,))
    (got,), (got_grad,) = _run(adapter.value_loss_forward, *args, grad_of=(values,))
    assert torch.isnan(want)
    _close(got, want)
    _nan_gradients_alike(got_grad, want_grad)


def test_value_loss_falls_back_without_a_mask(device, fallback):
    module = peer_loss.ValueLoss(clip_eps=0.2)
    values, old_values, returns, _ = _masked_batch(device, seed=5)
    (want,), (want_grad,) = _run(
        ORIGINAL["value_forward"], module, values, old_values, returns, grad_of=(values,)
    )
    (got,), (got_grad,) = _run(
        adapter.value_loss_forward, module, values, old_values, returns, grad_of=(values,)
    )
    _close(got, want, atol=0, rtol=0)
    _close(got_grad, want_grad, atol=0, rtol=0)
    assert fallback == ["ValueLoss.forward"]


# ── GAE and REINFORCE returns of the experience maker ───────────────────────────────────────


def _rewards_values_mask(device, B=4, T=40, seed=6):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=gen) * 0.1
    values = torch.randn(B, T, generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.2).long()
    mask[0] = 0
    mask[3, 25:] = 0
    return rewards.to(device), values.to(device), mask.to(device)


@pytest.mark.parametrize(
    "gamma, lambd, masked", [(1.0, 1.0, True), (0.99, 0.95, True), (0.9, 0.0, True), (0.95, 1.0, False)]
)
def test_gae_matches(device, fast_path, gamma, lambd, masked):
    rewards, values, mask = _rewards_values_mask(device)
    mask = mask if masked else None
    want = ORIGINAL["gae"](None, values, rewards, mask, gamma, lambd)
    got = adapter.get_advantages_and_returns(None, values, rewards, mask, gamma, lambd)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want, strict=True):
        _close(g, w)


@pytest.mark.parametrize("gamma, masked", [(1.0, True), (0.9, True), (0.97, False)])
def test_cumulative_returns_match(device, fast_path, gamma, masked):
    rewards, _, mask = _rewards_values_mask(device, seed=7)
    mask = mask if masked else None
    _close(
        adapter.get_cumulative_returns(None, rewards, mask, gamma),
        ORIGINAL["cumulative"](None, rewards, mask, gamma),
    )


def test_gae_falls_back_outside_fastppo_range(device, fallback):
    rewards, values, mask = _rewards_values_mask(device)
    want = ORIGINAL["gae"](None, values, rewards, mask, 1.05, 0.9)
    got = adapter.get_advantages_and_returns(None, values, rewards, mask, 1.05, 0.9)
    for g, w in zip(got, want, strict=True):
        _close(g, w, atol=0, rtol=0)
    want = ORIGINAL["cumulative"](None, rewards.double(), mask, 0.9)
    _close(adapter.get_cumulative_returns(None, rewards.double(), mask, 0.9), want, atol=0, rtol=0)
    assert fallback == [
        "RemoteExperienceMaker.get_advantages_and_returns",
        "RemoteExperienceMaker.get_cumulative_returns",
    ]


# ── patch / unpatch ─────────────────────────────────────────────────────────────────────────


def _installed():
    return {
        "compute_approx_kl": peer_utils.compute_approx_kl,
        "log_probs_from_logits": peer_utils.log_probs_from_logits,
        "policy_forward": vars(peer_loss.PolicyLoss)["forward"],
        "value_forward": vars(peer_loss.ValueLoss)["forward"],
        "gae": vars(Maker)["get_advantages_and_returns"],
        "cumulative": vars(Maker)["get_cumulative_returns"],
    }


REPLACEMENT = {
    "compute_approx_kl": adapter.compute_approx_kl,
    "log_probs_from_logits": adapter.log_probs_from_logits,
    "policy_forward": adapter.policy_loss_forward,
    "value_forward": adapter.value_loss_forward,
    "gae": adapter.get_advantages_and_returns,
    "cumulative": adapter.get_cumulative_returns,
}


def test_patch_swaps_every_lookup_and_unpatch_restores_them():
    assert _installed() == ORIGINAL and peer_maker.compute_approx_kl is ORIGINAL["compute_approx_kl"]
    adapter.patch()
    assert all(_installed()[name] is REPLACEMENT[name] for name in ORIGINAL)
    assert peer_maker.compute_approx_kl is adapter.compute_approx_kl  # rebound `from ... import` too
    adapter.unpatch()
    assert all(_installed()[name] is ORIGINAL[name] for name in ORIGINAL)
    assert peer_maker.compute_approx_kl is ORIGINAL["compute_approx_kl"]


def test_patched_context_and_double_patch():
    with adapter.patched():
        adapter.patch()  # a second patch changes nothing
        with adapter.patched():  # nested: leaves the outer patch in place
            pass
        assert all(_installed()[name] is REPLACEMENT[name] for name in ORIGINAL)
    assert all(_installed()[name] is ORIGINAL[name] for name in ORIGINAL)
    adapter.patch()
    adapter.patch()
    adapter.unpatch()
    assert all(_installed()[name] is ORIGINAL[name] for name in ORIGINAL)


def test_patched_modules_route_through_fastppo(device, monkeypatch):
    log_probs, old, adv, mask = _masked_batch(device)
    want = peer_loss.PolicyLoss(dual_clip=2.0)(log_probs, old, adv, action_mask=mask)
    want_value = peer_loss.ValueLoss(0.2)(log_probs, old, adv, action_mask=mask)
    calls = []
    for name in ("ppo_policy_loss", "value_loss"):
        real = getattr(adapter.fastppo, name)
        monkeypatch.setattr(
            adapter.fastppo, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k)
        )
    with adapter.patched():
        got = peer_loss.PolicyLoss(dual_clip=2.0)(log_probs, old, adv, action_mask=mask)
        got_value = peer_loss.ValueLoss(0.2)(log_probs, old, adv, action_mask=mask)
    assert calls == ["ppo_policy_loss", "value_loss"]
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    _close(got_value, want_value)


def test_patched_experience_maker_computes_the_same_advantages(device):
    """compute_advantages_and_returns end to end (shaped rewards, GAE, whitening), as the peer's
    own test_reward_shaping builds the maker."""
    experience_cls = peer_maker.Experience
    rewards, values, mask = _rewards_values_mask(device, B=4, T=9, seed=8)

    def advantages():
        maker = Maker.__new__(Maker)
        maker.advantage_estimator = "gae"
        maker.kl_ctl = SimpleNamespace(value=0.05)
        advantage = SimpleNamespace(estimator="gae", gamma=0.99, lambd=0.95, no_std_norm=False)
        args = SimpleNamespace(
            rollout=SimpleNamespace(n_samples_per_prompt=2),
            reward=SimpleNamespace(clip_range=None),
            algo=SimpleNamespace(advantage=advantage),
        )
        maker.strategy = SimpleNamespace(args=args)
        experience = experience_cls(
            index=list(range(4)),
            rewards=rewards[:, 0].clone(),
            action_mask=mask.bool(),
            kl=rewards.clone() * 0.3,
            values=values.clone(),
            info={"reward": rewards[:, 0].clone()},
        )
        result = maker.compute_advantages_and_returns([experience])[0]
        return result.advantages, result.returns

    want = advantages()
    with adapter.patched():
        got = advantages()
    for g, w in zip(got, want, strict=True):
        _close(g, w)


def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures_are_the_peer_signatures():
    for name, original in ORIGINAL.items():
        assert _parameters(REPLACEMENT[name]) == _parameters(original), name


def test_bad_labels_get_a_clear_error(device):
    logits = torch.randn(2, 3, 11, device=device)
    labels = torch.tensor([[1, 2, 3], [4, 11, 0]], device=device)
    # fastppo's value check reads nothing back: on CPU torch._assert_async raises RuntimeError
    with pytest.raises((ValueError, RuntimeError), match=r"labels must lie in \[0, 11\)"):
        adapter.log_probs_from_logits(logits, labels)
