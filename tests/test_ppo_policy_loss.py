"""fastppo.ppo_policy_loss: kernel vs reference (loss, every stat, gradients), reference vs an
fp64 loop over the formulas, masks from hypothesis, determinism."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastppo
from fastppo import reference

AGGS = reference.AGGREGATIONS


def make_batch(B, T, device, *, seed=0, dtype=torch.float32, density=0.7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    batch = {
        "logp": logp,
        "old_logp": logp + torch.randn(B, T, generator=g) * 0.3,
        "advantages": torch.randn(B, T, generator=g),
        "mask": torch.rand(B, T, generator=g) < density,
        "ref_logp": logp + torch.randn(B, T, generator=g) * 0.2,
        "entropy": torch.rand(B, T, generator=g) * 2,
    }
    return {k: (v.to(dtype) if v.dtype.is_floating_point else v).to(device) for k, v in batch.items()}


def run(fn, batch, upstream=1.7, **kwargs):
    logp = batch["logp"].clone().requires_grad_()
    entropy = batch["entropy"].clone().requires_grad_() if "entropy_coef" in kwargs else None
    loss, stats = fn(logp, batch["old_logp"], batch["advantages"], batch["mask"], entropy=entropy, **kwargs)
    (loss * upstream).backward()
    return loss, stats, logp.grad, None if entropy is None else entropy.grad


def grad_tol(grad, atol, rtol):
    # 16-bit gradients are fp32 values rounded once, along different paths: one ulp apart at most.
    return {} if grad.dtype in (torch.bfloat16, torch.float16) else dict(atol=atol, rtol=rtol)


def assert_match(batch, atol=1e-5, rtol=1e-5, **kwargs):
    k_loss, k_stats, k_grad, k_egrad = run(fastppo.ppo_policy_loss, batch, **kwargs)
    r_loss, r_stats, r_grad, r_egrad = run(reference.ppo_policy_loss, batch, **kwargs)
    assert k_loss.dtype == torch.float32 and k_loss.shape == ()
    torch.testing.assert_close(k_loss, r_loss.float(), atol=atol, rtol=rtol)
    assert k_stats.keys() == r_stats.keys()
    for name in k_stats:
        assert k_stats[name].shape == () and k_stats[name].dtype == torch.float32, name
        torch.testing.assert_close(k_stats[name], r_stats[name].float(), atol=atol, rtol=rtol, msg=name)
    torch.testing.assert_close(k_grad, r_grad, **grad_tol(k_grad, atol, rtol))
    if k_egrad is not None:
        torch.testing.assert_close(k_egrad, r_egrad, **grad_tol(k_egrad, atol, rtol))
    return k_loss, k_stats, k_grad


# --------------------------------------------------------------------------------------------
# Reference vs an independent fp64 computation.


def hand_loss(b, clip_low, clip_high, dual_clip, agg, kl_coef, entropy_coef):
    rows = []
    for i in range(len(b["logp"])):
        row = []
        for t in range(len(b["logp"][i])):
            lp, old, a = b["logp"][i][t], b["old_logp"][i][t], b["advantages"][i][t]
            r = math.exp(min(max(lp - old, -20), 20))
            l = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
            if dual_clip is not None and a < 0:
                l = min(l, -a * dual_clip)
            d = lp - b["ref_logp"][i][t]
            l += kl_coef * (math.exp(-d) + d - 1) - entropy_coef * b["entropy"][i][t]
            row.append((l, b["mask"][i][t]))
        rows.append(row)
    sums = [sum(l * m for l, m in row) for row in rows]
    counts = [sum(m for _, m in row) for row in rows]
    n_rows = max(sum(c > 0 for c in counts), 1)
    if agg == "token-mean":
        return sum(sums) / sum(counts) if sum(counts) else 0.0
    if agg == "token-sum":
        return sum(sums)
    if agg == "seq-mean-token-sum":
        return sum(sums) / n_rows
    return sum(s / c for s, c in zip(sums, counts, strict=True) if c) / n_rows


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 2.5])
def test_reference_matches_hand_loop(agg, dual_clip):
    batch = make_batch(4, 9, "cpu", seed=3, dtype=torch.float64)
    batch["mask"][2] = False
    kwargs = dict(clip_low=0.2, clip_high=0.3, dual_clip=dual_clip, agg=agg, kl_coef=0.05, entropy_coef=0.01)
    lists = {k: v.tolist() for k, v in batch.items()}
    lists["mask"] = batch["mask"].double().tolist()
    expected = hand_loss(lists, **kwargs)
    loss, _ = reference.ppo_policy_loss(
        batch["logp"],
        batch["old_logp"],
        batch["advantages"],
        batch["mask"],
        ref_logp=batch["ref_logp"],
        kl_estimator="k3",
        entropy=batch["entropy"],
        **kwargs,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_reference_gradients_are_the_derivative(agg):
    batch = make_batch(3, 5, "cpu", seed=4, dtype=torch.float64)
    logp = batch["logp"].clone().requires_grad_()
    entropy = batch["entropy"].clone().requires_grad_()
    fn = lambda lp, ent: reference.ppo_policy_loss(  # noqa: E731
        lp,
        batch["old_logp"],
        batch["advantages"],
        batch["mask"],
        dual_clip=3.0,
        agg=agg,
        ref_logp=batch["ref_logp"],
        kl_coef=0.1,
        entropy=ent,
        entropy_coef=0.02,
    )[0]
    assert torch.autograd.gradcheck(fn, (logp, entropy))


# --------------------------------------------------------------------------------------------
# Kernel vs reference.


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("shape", [(6, 45), (2, 5000), (1, 1)])
def test_matches_reference(shape, dual_clip, agg, device):
    batch = make_batch(*shape, device, seed=1)
    assert_match(batch, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=agg)


@pytest.mark.parametrize("estimator", reference.KL_ESTIMATORS)
def test_kl_term_and_entropy_bonus(estimator, device):
    batch = make_batch(5, 33, device, seed=2)
    _, stats, _ = assert_match(
        batch,
        agg="seq-mean-token-mean",
        ref_logp=batch["ref_logp"],
        kl_coef=0.3,
        kl_estimator=estimator,
        entropy_coef=0.05,
    )
    assert set(stats) == {
        "clipfrac",
        "clipfrac_lower",
        "approx_kl",
        "ratio_mean",
        "ratio_max",
        "kl",
        "entropy",
    }


def test_stats_without_optional_terms(device):
    batch = make_batch(4, 20, device, seed=5)
    _, stats, _ = assert_match(batch, dual_clip=2.0)
    assert set(stats) == {"clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max"}
    assert 0 < stats["clipfrac"] < 1 and stats["ratio_max"] >= stats["ratio_mean"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs(dtype, device):
    batch = make_batch(4, 64, device, seed=6, dtype=dtype)
    loss, _, grad = assert_match(batch, atol=1e-5, rtol=1e-4, agg="token-sum", dual_clip=3.0)
    assert loss.dtype == torch.float32 and grad.dtype == dtype


def test_flat_input_is_one_row(device):
    batch = make_batch(1, 50, device, seed=7)
    flat = {k: v.reshape(-1) for k, v in batch.items()}
    for agg in AGGS:
        loss_2d, stats_2d = fastppo.ppo_policy_loss(
            batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"], agg=agg
        )
        loss_1d, stats_1d = fastppo.ppo_policy_loss(
            flat["logp"], flat["old_logp"], flat["advantages"], flat["mask"], agg=agg
        )
        assert torch.equal(loss_2d, loss_1d) and all(torch.equal(stats_2d[k], stats_1d[k]) for k in stats_2d)
        assert_match(flat, agg=agg)


def test_float_mask_weights(device):
    batch = make_batch(3, 17, device, seed=8)
    batch["mask"] = batch["mask"] * torch.rand(3, 17, device=device)
    for agg in AGGS:
        assert_match(batch, agg=agg)


@pytest.mark.parametrize("agg", AGGS)
def test_all_zero_mask_gives_zero(agg, device):
    batch = make_batch(3, 10, device, density=0.0)
    loss, stats, grad, egrad = run(
        fastppo.ppo_policy_loss, batch, agg=agg, ref_logp=batch["ref_logp"], kl_coef=0.1, entropy_coef=0.01
    )
    assert loss.item() == 0 and not grad.any() and not egrad.any()
    assert all(v.item() == 0 for v in stats.values())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN padding, by design
def test_padding_garbage_and_huge_log_ratios(device):
    batch = make_batch(3, 12, device, seed=9)
    batch["logp"][0, :4] = torch.tensor([1e4, -1e4, 60.0, -60.0])
    batch["mask"][0, :4] = True
    batch["logp"][1, ~batch["mask"][1]] = float("nan")
    batch["advantages"][2, ~batch["mask"][2]] = float("inf")
    loss, stats, grad, _ = run(fastppo.ppo_policy_loss, batch, dual_clip=3.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    assert not grad[~batch["mask"]].any()


def test_deterministic(device):
    batch = make_batch(8, 3000, device, seed=10)
    kwargs = dict(agg="seq-mean-token-mean", ref_logp=batch["ref_logp"], kl_coef=0.1, entropy_coef=0.01)
    first = run(fastppo.ppo_policy_loss, batch, **kwargs)
    second = run(fastppo.ppo_policy_loss, batch, **kwargs)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_no_gradient_buffer_without_grad(device):
    batch = make_batch(2, 8, device)
    loss, _ = fastppo.ppo_policy_loss(batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"])
    assert not loss.requires_grad


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.lists(st.booleans(), min_size=1, max_size=40), min_size=1, max_size=6),
    agg=st.sampled_from(AGGS),
    dual_clip=st.sampled_from([None, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_masks(rows, agg, dual_clip, seed):
    """Ragged masks padded to a rectangle: empty rows, single tokens, all zeros."""
    device = "cuda" if torch.cuda.is_available() and not fastppo._backend.triton_interpreted() else "cpu"
    T = max(len(r) for r in rows)
    mask = torch.tensor([r + [False] * (T - len(r)) for r in rows], device=device)
    batch = make_batch(len(rows), T, device, seed=seed)
    batch["mask"] = mask
    assert_match(
        batch, agg=agg, dual_clip=dual_clip, ref_logp=batch["ref_logp"], kl_coef=0.1, entropy_coef=0.01
    )


def test_bad_input(device):
    batch = make_batch(2, 4, device)
    args = (batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"])
    cases = [
        (dict(clip_low=0.0), ValueError, "clip_low"),
        (dict(clip_high=-0.1), ValueError, "clip_high"),
        (dict(dual_clip=1.0), ValueError, "dual_clip"),
        (dict(agg="mean"), ValueError, "agg"),
        (dict(kl_estimator="kl"), ValueError, "kl_estimator"),
        (dict(kl_coef=0.1), ValueError, "needs ref_logp"),
        (dict(kl_coef=-0.1, ref_logp=batch["ref_logp"]), ValueError, "kl_coef"),
        (dict(entropy_coef=0.1), ValueError, "needs entropy"),
        (dict(ref_logp=batch["ref_logp"][:, :3]), ValueError, "ref_logp must have the shape"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            fastppo.ppo_policy_loss(*args, **kwargs)
    with pytest.raises(ValueError, match="advantages must have the shape"):
        fastppo.ppo_policy_loss(args[0], args[1], args[2][:1], args[3])
    with pytest.raises(TypeError, match="old_logp must be a floating-point"):
        fastppo.ppo_policy_loss(args[0], args[1].long(), args[2], args[3])
    with pytest.raises(ValueError, match=r"\(B, T\) or \(N,\)"):
        fastppo.ppo_policy_loss(*(a[None] for a in args))
    with pytest.raises(ValueError, match="one device"):
        fastppo.ppo_policy_loss(args[0], args[1], args[2], args[3].to("meta"))


@pytest.mark.gpu
def test_large_batch_on_gpu():
    batch = make_batch(512, 8192, "cuda", seed=11, dtype=torch.bfloat16)
    assert_match(
        batch,
        atol=1e-4,
        rtol=1e-4,
        agg="seq-mean-token-mean",
        dual_clip=3.0,
        ref_logp=batch["ref_logp"],
        kl_coef=0.1,
        entropy_coef=0.01,
    )
