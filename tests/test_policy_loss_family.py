"""The policy-loss family of ``fastppo.ppo_policy_loss``: GSPO (sequence ratio), CISPO, SAPO,
per-token weights and rollout correction (TIS / MIS at token, sequence and geometric level).

Reference vs an fp64 loop over the formulas (values and hand-derived gradients); kernel vs
reference (loss, every stat, gradients with a non-unit upstream) on odd sizes, rows longer than
one chunk, empty and single-token rows and huge ratios; packed vs padded; determinism; errors.
"""

import itertools
import math

import pytest
import torch

import fastppo
from fastppo import reference
from fastppo.reference import RolloutCorrection

#: (loss, ratio_level) pairs: GMPO (geo_mean) has its own sequence ratio.
MEMBERS = [
    (loss, level) for loss in reference.POLICY_LOSSES for level in reference.RATIO_LEVELS
    if not (loss == "geo_mean" and level == "sequence")
]  # fmt: skip


def level_for(loss, level="sequence"):
    return "token" if loss == "geo_mean" else level


ROLLOUTS = {
    "none": None,
    "token-tis": RolloutCorrection("token", "truncate", 2.0),
    "token-mis": RolloutCorrection("token", "mask", 1.5, 0.6),
    "seq-tis": RolloutCorrection("sequence", "truncate", 1.2, 0.9),
    "seq-mis": RolloutCorrection("sequence", "mask", 2.0, 0.5),
    "geo-mis": RolloutCorrection("geometric", "mask", 1.1, 0.9),
}


def make_batch(B, T, *, seed=0, dtype=torch.float32, spread=0.3, row_constant_adv=False):
    """Random inputs with an all-zero row (row 1) and a single-token row (row 2) when B ≥ 3."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, 1 if row_constant_adv else T, generator=g).expand(B, T).contiguous()
    mask = torch.rand(B, T, generator=g) < 0.7
    if B >= 3:
        mask[1] = False
        mask[2] = False
        mask[2, T // 2] = True
    batch = {
        "logp": logp,
        "old_logp": logp + torch.randn(B, T, generator=g) * spread,
        "advantages": adv,
        "mask": mask,
        "rollout_logp": logp + torch.randn(B, T, generator=g) * 0.2,
        "weights": torch.rand(B, T, generator=g) * 2,
        "ref_logp": logp + torch.randn(B, T, generator=g) * 0.2,
    }
    return {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in batch.items()}


def run(fn, batch, *, upstream=1.7, use_weights=False, rollout=None, **kwargs):
    logp = batch["logp"].clone().requires_grad_()
    if use_weights:
        kwargs["weights"] = batch["weights"]
    if rollout is not None:
        kwargs.update(rollout_logp=batch["rollout_logp"], rollout_correction=rollout)
    loss, stats = fn(logp, batch["old_logp"], batch["advantages"], batch["mask"], **kwargs)
    (loss * upstream).backward()
    return loss, stats, logp.grad


def assert_kernel_matches(batch, atol=1e-5, rtol=1e-5, **kwargs):
    k_loss, k_stats, k_grad = run(fastppo.ppo_policy_loss, batch, **kwargs)
    r_loss, r_stats, r_grad = run(reference.ppo_policy_loss, batch, **kwargs)
    torch.testing.assert_close(k_loss, r_loss.float(), atol=atol, rtol=rtol)
    assert k_stats.keys() == r_stats.keys()
    for name in k_stats:
        torch.testing.assert_close(k_stats[name], r_stats[name].float(), atol=atol, rtol=rtol, msg=name)
    if k_grad.dtype in (torch.bfloat16, torch.float16):  # fp32 values rounded once: an ulp apart
        torch.testing.assert_close(k_grad.float(), r_grad.float(), atol=0, rtol=2**-7)
    else:
        torch.testing.assert_close(k_grad, r_grad, atol=atol, rtol=rtol)
    return k_loss, k_stats, k_grad


# --------------------------------------------------------------------------------------------
# The reference against an fp64 loop over the formulas (value and hand-derived gradient).


def hand_rollout_weight(old, roll, m, rc):
    """Per-token rollout weight and filtered flag of one row (plain Python)."""
    d = [o - r for o, r in zip(old, roll, strict=True)]
    total, count = sum(x * w for x, w in zip(d, m, strict=True) if w), sum(m)
    if rc.level == "token":
        rho = [math.exp(min(max(x, -20), 20)) for x in d]
    elif rc.level == "sequence":
        rho = [math.exp(min(max(total, -20), 20))] * len(d)
    else:
        rho = [math.exp(total / max(count, 1))] * len(d)
    if rc.mode == "truncate":
        w = [min(max(x, rc.lower), rc.high) for x in rho]
        return w, [a != b for a, b in zip(w, rho, strict=True)]
    keep = [rc.lower <= x <= rc.high for x in rho]
    return [x if k else 0.0 for x, k in zip(rho, keep, strict=True)], [not k for k in keep]


def hand_token(lp, r, grad_r, a, *, loss, clip_low, clip_high, tau):
    """(l, ∂l/∂logp) of one token, given the ratio r and ∂r/∂logp."""
    cr = min(max(r, 1 - clip_low), 1 + clip_high)
    if loss == "cispo":
        return -cr * a * lp, -cr * a
    if loss == "sapo":
        t = tau[0] if a > 0 else tau[1]
        s = 1 / (1 + math.exp(-t * (r - 1)))
        return -a * s * 4 / t, -a * 4 * s * (1 - s) * grad_r
    if -a * cr > -a * r:
        return -a * cr, 0.0
    return -a * r, -a * grad_r


def hand_geo_mean(lp, old, a, m, clip_low, clip_high):
    """GMPO-token per token of one row: the loss, the gradient of its ratio (plain Python)."""
    x, follows = [], []
    for lr, adv in zip([p - q for p, q in zip(lp, old, strict=True)], a, strict=True):
        x.append(min(lr, clip_high) if adv > 0 else max(lr, -clip_low) if adv < 0 else 0.0)
        follows.append((adv > 0 and lr <= clip_high) or (adv < 0 and lr >= -clip_low))
    count = max(sum(m), 1)
    seq = sum(v * w for v, w in zip(x, m, strict=True)) / count
    mean_adv = sum(v * w for v, w in zip(a, m, strict=True)) / count
    rho = math.exp(min(seq, 20))
    return [(-mean_adv * rho, -mean_adv * rho * f * (seq <= 20)) for f in follows]


def hand_loss(b, *, loss, ratio_level, rc, use_weights, clip_low=0.2, clip_high=0.28, tau=(1.0, 1.05)):
    """seq-mean-token-mean loss and its gradient, fp64 Python."""
    rows, grads, n_rows = [], [], 0
    for i in range(len(b["logp"])):
        lp, old, a = b["logp"][i], b["old_logp"][i], b["advantages"][i]
        m = b["mask"][i]
        lr = [x - y for x, y in zip(lp, old, strict=True)]
        count = sum(m)
        seq = sum(x for x, w in zip(lr, m, strict=True) if w) / max(count, 1)
        w_roll = hand_rollout_weight(old, b["rollout_logp"][i], m, rc)[0] if rc else [1.0] * len(lp)
        geo = hand_geo_mean(lp, old, a, m, clip_low, clip_high) if loss == "geo_mean" else None
        row_l, row_g = 0.0, []
        for t in range(len(lp)):
            if ratio_level == "token":
                r = math.exp(min(max(lr[t], -20), 20))
                grad_r = r if abs(lr[t]) <= 20 else 0.0
            else:
                r = math.exp(min(seq, 10))
                grad_r = r if seq <= 10 else 0.0
            clips = dict(clip_low=clip_low, clip_high=clip_high, tau=tau)
            l_t, g_t = geo[t] if geo else hand_token(lp[t], r, grad_r, a[t], loss=loss, **clips)
            w = w_roll[t] * (b["weights"][i][t] if use_weights else 1.0)
            row_l += l_t * w * m[t]
            row_g.append(g_t * w * m[t])
        if count:
            n_rows += 1
            rows.append(row_l / count)
            grads.append([g / count for g in row_g])
        else:
            grads.append([0.0] * len(lp))
    n_rows = max(n_rows, 1)
    return sum(rows) / n_rows, [[g / n_rows for g in row] for row in grads]


@pytest.mark.parametrize("loss, ratio_level", MEMBERS)
@pytest.mark.parametrize("rollout", ["none", "token-mis", "seq-tis", "geo-mis"])
@pytest.mark.parametrize("use_weights", [False, True])
def test_reference_matches_fp64_loop(loss, ratio_level, rollout, use_weights):
    b = make_batch(4, 9, dtype=torch.float64, spread=0.5)
    rc = ROLLOUTS[rollout]
    expected, expected_grad = hand_loss(
        {k: v.tolist() for k, v in b.items()},
        loss=loss,
        ratio_level=ratio_level,
        rc=rc,
        use_weights=use_weights,
    )
    got, _, grad = run(
        reference.ppo_policy_loss, b, upstream=1.0, use_weights=use_weights, rollout=rc,
        loss=loss, ratio_level=ratio_level, clip_low=0.2, clip_high=0.28, agg="seq-mean-token-mean",
    )  # fmt: skip
    assert got.dtype == torch.float64
    assert abs(got.item() - expected) <= 1e-12 * max(1.0, abs(expected))
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64), atol=1e-12, rtol=1e-12)


def test_reference_rollout_weights_and_stats_match_fp64_loop():
    b = make_batch(4, 9, dtype=torch.float64, spread=0.5)
    for rc in filter(None, ROLLOUTS.values()):
        _, stats, _ = run(reference.ppo_policy_loss, b, rollout=rc)
        weights, filtered, count = 0.0, 0.0, 0.0
        for i in range(4):
            old, roll, m = b["old_logp"][i].tolist(), b["rollout_logp"][i].tolist(), b["mask"][i].tolist()
            w, f = hand_rollout_weight(old, roll, m, rc)
            weights += sum(x for x, k in zip(w, m, strict=True) if k)
            filtered += sum(x for x, k in zip(f, m, strict=True) if k)
            count += sum(m)
        assert abs(stats["is_weight_mean"].item() - weights / count) < 1e-12, rc
        assert abs(stats["is_filtered"].item() - filtered / count) < 1e-12, rc
    m = b["mask"]
    d = (b["rollout_logp"] - b["old_logp"])[m]
    assert abs(stats["rollout_kl"].item() - d.mean().item()) < 1e-12
    assert abs(stats["rollout_kl_k3"].item() - (torch.exp(-d) + d - 1).mean().item()) < 1e-12


@pytest.mark.parametrize("agg", reference.AGGREGATIONS)
def test_gspo_token_form_is_gspo_for_row_constant_advantages(agg):
    """With one advantage per sequence, GSPO-token equals GSPO with the gradient through the mean
    (TRL's and OpenRLHF's form): loss and gradient, any aggregation."""
    b = make_batch(5, 11, dtype=torch.float64, spread=0.6, row_constant_adv=True)
    loss, _, grad = run(reference.ppo_policy_loss, b, ratio_level="sequence", agg=agg, upstream=1.0)

    logp = b["logp"].clone().requires_grad_()
    m = b["mask"].double()
    seq = ((logp - b["old_logp"]) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(seq).expand_as(logp)
    adv = b["advantages"]
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    expected = reference.agg_loss(per_token, m, agg)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(grad, logp.grad, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("agg", reference.AGGREGATIONS)
def test_gmpo_token_form_is_gmpo(agg):
    """GMPO-token equals GMPO (verl's geo_mean: the gradient through each sequence's mean) in loss
    and gradient, any aggregation (each token carrying its sequence's loss)."""
    b = make_batch(5, 11, dtype=torch.float64, spread=0.6)
    b["advantages"][0, 3] = 0.0  # a token with no advantage has no clipped log-ratio
    loss, _, grad = run(reference.ppo_policy_loss, b, loss="geo_mean", agg=agg, upstream=1.0)

    logp = b["logp"].clone().requires_grad_()
    m, adv = b["mask"].double(), b["advantages"]
    lr = logp - b["old_logp"]
    sign = torch.sign(adv)
    x = sign * torch.minimum(sign * lr, sign * torch.clamp(lr, -0.2, 0.2))
    count = m.sum(-1, keepdim=True).clamp(min=1)
    per_row = -(adv * m).sum(-1, keepdim=True) / count * torch.exp((x * m).sum(-1, keepdim=True) / count)
    expected = reference.agg_loss(per_row.expand_as(lr), m, agg)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(grad, logp.grad, atol=1e-13, rtol=1e-13)


# --------------------------------------------------------------------------------------------
# The kernel against the reference.


@pytest.mark.parametrize("T", [1, 37, 2500])  # 2500 > one chunk: the row sums come from a pre-pass
@pytest.mark.parametrize("loss, ratio_level", MEMBERS)
@pytest.mark.parametrize("rollout", list(ROLLOUTS))
def test_kernel_matches_reference(T, loss, ratio_level, rollout):
    b = make_batch(4, T, seed=T)
    assert_kernel_matches(
        b, loss=loss, ratio_level=ratio_level, rollout=ROLLOUTS[rollout], use_weights=rollout == "token-tis",
        clip_high=0.28, agg="seq-mean-token-mean",
    )  # fmt: skip


@pytest.mark.parametrize("agg", reference.AGGREGATIONS)
@pytest.mark.parametrize("loss", reference.POLICY_LOSSES)
def test_kernel_matches_reference_every_aggregation_with_kl(agg, loss):
    b = make_batch(5, 29, seed=3)
    assert_kernel_matches(
        b, agg=agg, loss=loss, ratio_level=level_for(loss), rollout=ROLLOUTS["seq-mis"], use_weights=True,
        ref_logp=b["ref_logp"], kl_coef=0.05,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", reference.POLICY_LOSSES)
def test_kernel_matches_reference_half_precision(dtype, loss):
    b = make_batch(4, 45, seed=5, dtype=dtype)
    assert_kernel_matches(
        b, loss=loss, ratio_level=level_for(loss), rollout=ROLLOUTS["token-tis"], use_weights=True
    )


def test_huge_ratios_are_clamped_and_finite():
    b = make_batch(4, 40, seed=7)
    b["old_logp"][0, :5] = b["logp"][0, :5] - 30.0  # token ratios e^30: clamped at e^20
    b["old_logp"][3] = b["logp"][3] - 12.0  # a sequence ratio beyond e^10: clamped, no gradient
    b["rollout_logp"][0, :5] = b["old_logp"][0, :5] + 30.0  # rollout weights e^-30
    for (loss, level), rollout in itertools.product(MEMBERS, ("token-tis", "seq-mis", "geo-mis")):
        kwargs = dict(loss=loss, ratio_level=level, rollout=ROLLOUTS[rollout])
        k_loss, stats, grad = assert_kernel_matches(b, clip_low=math.inf, clip_high=4.0, **kwargs)
        assert torch.isfinite(k_loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in stats.values())
        if level == "sequence" and loss != "cispo":
            assert (grad[3] == 0).all()  # the clamp at 10 holds the whole row


def test_all_zero_mask_gives_zeros():
    b = make_batch(3, 20)
    b["mask"][:] = False
    for loss in reference.POLICY_LOSSES:
        k_loss, stats, grad = assert_kernel_matches(
            b, loss=loss, ratio_level=level_for(loss), rollout=ROLLOUTS["seq-tis"], use_weights=True
        )
        assert k_loss.item() == 0 and (grad == 0).all()
        assert all(v.item() == 0 for v in stats.values())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN padding, read and masked
def test_nan_and_inf_in_padding_do_not_leak():
    b = make_batch(4, 30, seed=2)
    pad = ~b["mask"]
    for name in ("logp", "old_logp", "advantages", "rollout_logp", "weights"):
        b[name] = b[name].masked_fill(pad, float("nan") if name != "weights" else float("inf"))
    for level in reference.RATIO_LEVELS:
        k_loss, stats, grad = run(
            fastppo.ppo_policy_loss, b, ratio_level=level, rollout=ROLLOUTS["seq-mis"], use_weights=True
        )
        assert torch.isfinite(k_loss) and torch.isfinite(grad).all() and (grad[pad] == 0).all()
        assert all(torch.isfinite(v) for v in stats.values())


def test_kernel_is_deterministic_across_chunks():
    b = make_batch(3, 4500, seed=11)
    kwargs = dict(ratio_level="sequence", rollout=ROLLOUTS["geo-mis"], use_weights=True, agg="token-mean")
    first = run(fastppo.ppo_policy_loss, b, **kwargs)
    second = run(fastppo.ppo_policy_loss, b, **kwargs)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def packed_pair(lengths, seed):
    """A right-padded batch (len(lengths), max length) and the same tokens packed, with cu_seqlens."""
    lengths = torch.tensor(lengths)
    b = make_batch(len(lengths), int(lengths.max()), seed=seed)
    keep = torch.arange(b["mask"].shape[1])[None, :] < lengths[:, None]
    b["mask"] &= keep
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return b, {k: v[keep] for k, v in b.items()}, cu, keep


#: Every option with sequence-level behaviour, and the seq aggregations.
SEQUENCE_OPTIONS = {
    "gspo": dict(ratio_level="sequence", agg="seq-mean-token-mean"),
    "geo_mean": dict(loss="geo_mean", clip_low=0.4, clip_high=0.4, agg="seq-mean-token-sum"),
    "seq-tis": dict(rollout=ROLLOUTS["seq-tis"], use_weights=True, agg="token-mean"),
    "geo-mis": dict(rollout=ROLLOUTS["geo-mis"], agg="seq-mean-token-mean"),
    "sapo-seq-mean": dict(loss="sapo", agg="seq-mean-token-sum"),
}
#: Sequence lengths: empty ones, single tokens and ones longer than a 2048-token block. The first
#: set packs to one program per sequence (its sums in a first loop), the second to several
#: (``_row_sums_kernel``'s partials); their padded twins to the other way round.
LENGTHS = {"one-program": [0, 3000, 37, 1, 0, 2100], "several": [4500, 0, 4200]}


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("options", SEQUENCE_OPTIONS.values(), ids=SEQUENCE_OPTIONS.keys())
def test_packed_equals_padded(options, lengths):
    """The kernels read packed sequences in place: the same loss, statistics and gradient as the
    padded batch, and as the reference on the packed input. Block boundaries fall elsewhere in
    the layouts (other summation orders): fp32 sums of up to 4500 terms of size O(1) agree to
    about √n·ε ≈ 4e-6 relative, so 1e-5."""
    padded, packed, cu, keep = packed_pair(lengths, seed=4)
    padded_loss, padded_stats, padded_grad = run(fastppo.ppo_policy_loss, padded, **options)
    packed_loss, packed_stats, packed_grad = run(fastppo.ppo_policy_loss, packed, cu_seqlens=cu, **options)
    ref_loss, ref_stats, ref_grad = run(reference.ppo_policy_loss, packed, cu_seqlens=cu, **options)
    assert packed_grad.shape == packed["logp"].shape
    for loss, stats, grad in (
        (padded_loss, padded_stats, padded_grad[keep]),
        (ref_loss, ref_stats, ref_grad),
    ):
        torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_grad, grad, atol=1e-5, rtol=1e-5)
        assert packed_stats.keys() == stats.keys()
        for name in stats:
            torch.testing.assert_close(packed_stats[name], stats[name], atol=1e-5, rtol=1e-5, msg=name)


def test_packed_is_deterministic_and_matches_sequence_by_sequence():
    """Each packed sequence's gradient is that of the sequence alone under token-sum (nothing
    leaks across a boundary inside a block), bitwise the same on a second call."""
    _, packed, cu, _ = packed_pair([7, 0, 40, 1, 33], seed=6)
    options = dict(ratio_level="sequence", rollout=ROLLOUTS["geo-mis"], agg="token-sum")
    first = run(fastppo.ppo_policy_loss, packed, cu_seqlens=cu, **options)
    second = run(fastppo.ppo_policy_loss, packed, cu_seqlens=cu, **options)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = run(fastppo.ppo_policy_loss, {k: v[start:end] for k, v in packed.items()}, **options)
        torch.testing.assert_close(first[2][start:end], alone[2], atol=1e-6, rtol=1e-6)


def test_weights_leave_the_kl_term_alone():
    """Zero weights silence the policy term only: what remains is the KL term and its gradient."""
    b = make_batch(3, 17, seed=9)
    b["weights"] = torch.zeros_like(b["weights"])
    loss, _, grad = run(fastppo.ppo_policy_loss, b, use_weights=True, ref_logp=b["ref_logp"], kl_coef=0.1)
    logp = b["logp"].clone().requires_grad_()
    expected = reference.agg_loss(0.1 * reference.kl_penalty(logp, b["ref_logp"], "k3"), b["mask"].float())
    (expected * 1.7).backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, logp.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="ppo"), "loss must be one of"),
        (dict(ratio_level="seq"), "ratio_level must be one of"),
        (dict(loss="cispo", dual_clip=3.0), "dual_clip applies to loss='clip'"),
        (dict(loss="geo_mean", ratio_level="sequence"), "has its own sequence ratio"),
        (dict(sapo_tau=1.0), "sapo_tau must be a pair"),
        (dict(sapo_tau=(1.0, -1.0)), r"sapo_tau\[1\]"),
        (dict(clip_low=math.inf), "clip_high must be finite"),
        (dict(rollout_correction=RolloutCorrection()), "rollout_correction needs rollout_logp"),
        (dict(rollout_logp=torch.zeros(2, 3), rollout_correction="tis"), "must be a RolloutCorrection"),
        (dict(weights=torch.zeros(2, 4)), "weights must have the shape"),
        (dict(cu_seqlens=torch.tensor([0, 3])), r"cu_seqlens needs packed \(N,\) inputs"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    x = torch.zeros(2, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        fastppo.ppo_policy_loss(x, x, x, x, **kwargs)


def test_bad_cu_seqlens_and_rollout_correction_are_refused():
    x = torch.zeros(6)
    # Values are checked by torch._assert_async (no host read): a RuntimeError at once on CPU.
    for bad in ([0, 2, 5], [1, 6], [0, 4, 3, 6]):
        with pytest.raises(
            RuntimeError, match=r"cu_seqlens must start at 0, never decrease and end at .* \(6\)"
        ):
            fastppo.ppo_policy_loss(x, x, x, x, cu_seqlens=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"cu_seqlens must have shape \(S \+ 1,\)"):
        fastppo.ppo_policy_loss(x, x, x, x, cu_seqlens=torch.tensor([[0, 6]]))
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        fastppo.ppo_policy_loss(x, x, x, x, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="rollout_correction.level"):
        RolloutCorrection(level="seq")
    with pytest.raises(ValueError, match="rollout_correction.mode"):
        RolloutCorrection(mode="clip")
    with pytest.raises(ValueError, match="rollout_correction.high"):
        RolloutCorrection(high=0.0)
    with pytest.raises(ValueError, match="rollout_correction.low"):
        RolloutCorrection(high=2.0, low=3.0)
