"""fastppo.integrations.verl_policy_losses against verl 0.9.1's own policy losses (vanilla, gspo,
cispo, sapo) on the same random inputs, and their swap into verl's policy-loss registry.

Loss values and gradients w.r.t. log_prob (fp32, atol = rtol = 1e-5), metric dicts (same keys in the
same order, Python floats, 1e-5). The inputs hold a full row, rows with holes and a padded tail, an
all-zero row and a single-token row. Shapes are small: on CPU the kernels run in Triton's interpreter.
"""

import math

import pytest
import torch
import verl.trainer.ppo.core_algos as core  # the parity extra (README set-up); a missing peer fails
import verl.utils.torch_functional as verl_F
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config.actor import PolicyLossConfig

import fastppo
import fastppo.integrations.verl as fastppo_verl
from fastppo.integrations import verl_policy_losses

from .test_verl import AGG_MODES, B, T, actor_config, assert_close, global_info, make_mask

NAMES = ["vanilla", "gspo", "cispo", "sapo", "geo_mean"]
#: verl's own functions (the registry before any patch).
VERL = {name: core.POLICY_LOSS_REGISTRY[name] for name in NAMES}
assert all(fn.__module__ == core.__name__ for fn in VERL.values())


def ours(name):
    return getattr(verl_policy_losses, verl_policy_losses.POLICY_LOSSES[name])


def policy_inputs(device, seed=11, huge=False):
    """(old_log_prob, log_prob (requires grad), advantages, mask), each (B, T).

    Row 0 is full, with dual-clip tokens (negative advantage, ratio e² > clip_ratio_c = 3); row 2
    is empty; row 3 holds one token. ``huge``: log-ratios of ±30 on some tokens (past verl's ±20
    clamp and, for a row mean, past GSPO's clamp at 10).
    """
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen) * 3
    log_prob = old + 0.4 * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, T, generator=gen) * 2
    log_prob[0, :3] = old[0, :3] + 2.0
    advantages[0, :3] = -torch.tensor([0.5, 1.0, 2.0])
    mask = make_mask(device)
    mask[3] = 0.0
    mask[3, 4] = 1.0
    if huge:
        log_prob[0, 3:8] = old[0, 3:8] + torch.tensor([30.0, -30.0, 25.0, 30.0, 30.0])
        log_prob[1, :4] = old[1, :4] - 30.0
        log_prob[3, 4] = old[3, 4] + 30.0
    return old.to(device), log_prob.to(device).requires_grad_(), advantages.to(device), mask


def is_weights(device, shape=(B, T)):
    """IcePop-style rollout IS weights: positive, with zeros where tokens were masked out."""
    weights = torch.rand(shape, generator=torch.Generator().manual_seed(12)) + 0.5
    weights[..., ::3] = 0.0
    return weights.to(device)


def run_both(name, config, mode, weights, inputs):
    """verl's and fastppo's ((loss, metrics), grad of upstream·loss w.r.t. log_prob)."""
    old, log_prob, advantages, mask = inputs
    upstream = torch.rand((), generator=torch.Generator().manual_seed(13)).item() + 0.5  # not 1
    results = []
    for fn in (VERL[name], ours(name)):
        loss, metrics = fn(old, log_prob, advantages, mask, mode, config, weights)
        (grad,) = torch.autograd.grad(loss * upstream, log_prob)
        results.append((loss, metrics, grad))
    return results


def check(name, config, mode, weights=None, inputs=None, device="cpu", kl_unclamped=False):
    inputs = inputs or policy_inputs(device)
    (expected, expected_metrics, expected_grad), (actual, actual_metrics, actual_grad) = run_both(
        name, config, mode, weights, inputs
    )
    assert_close(actual, expected)
    assert_close(actual_grad, expected_grad)
    if kl_unclamped:  # the adapter's one deliberate difference (module docstring)
        old, log_prob, _, mask = inputs
        expected_metrics["actor/ppo_kl"] = verl_F.masked_mean(old - log_prob.detach(), mask).item()
    assert list(actual_metrics) == list(expected_metrics)
    for key, value in expected_metrics.items():
        assert isinstance(actual_metrics[key], float), key
        assert actual_metrics[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key
    return expected_metrics


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("use_global", [False, True])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", NAMES)
def test_policy_loss_matches_verl(name, mode, use_global, with_weights, device):
    config = actor_config()
    if use_global:
        config.global_batch_info.update(global_info(make_mask(device), mode))
    weights = is_weights(device) if with_weights else None
    metrics = check(name, config, mode, weights, device=device)
    if name != "sapo":
        assert 0 < metrics["actor/pg_clipfrac"] < 1  # clipped and unclipped tokens both present
    if name == "vanilla":
        assert metrics["actor/pg_clipfrac_lower"] > 0  # the dual clip is active


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("name", NAMES)
def test_huge_ratios_match_verl(name, mode, device):
    """Log-ratios of ±30: verl's ±20 clamp (vanilla, cispo, sapo) and GSPO's clamp at 10 on a row
    mean (no gradient there). ``ppo_kl`` is the unclamped mean, as the adapter documents; verl's
    gspo does not clamp it either, so there it matches verl's own value."""
    inputs = policy_inputs(device, huge=True)
    if name == "geo_mean":  # keep every row's mean log-ratio under the op's bound of 20 (below)
        inputs[1].data[3, 4] = inputs[0][3, 4] - 30.0
    clamps_kl = name not in ("gspo", "geo_mean")  # verl's gspo and geo_mean do not clamp ppo_kl
    check(name, actor_config(), mode, is_weights(device), inputs, kl_unclamped=clamps_kl)
    if clamps_kl:  # the ±20 clamp makes verl's own ppo_kl differ
        expected = VERL[name](*inputs, mode, actor_config())[1]["actor/ppo_kl"]
        actual = ours(name)(*inputs, mode, actor_config())[1]["actor/ppo_kl"]
        assert actual != pytest.approx(expected, abs=1e-3)


def test_geo_mean_bounds_a_sequence_log_ratio_at_20(device):
    """The adapter's documented difference: a row whose mean clipped log-ratio passes 20 has the
    ratio e^20 (and no gradient) in fastppo, e^mean in verl."""
    old, log_prob, advantages, mask = policy_inputs(device)
    with torch.no_grad():
        log_prob[3, 4] = old[3, 4] + 30.0  # the one-token row
        advantages[3, 4] = -1.0  # GMPO clips a negative advantage's log-ratio from below only
    expected = VERL["geo_mean"](old, log_prob, advantages, mask, "token-mean", actor_config())[0]
    actual = ours("geo_mean")(old, log_prob, advantages, mask, "token-mean", actor_config())[0]
    rows = B
    assert (expected - actual).item() == pytest.approx((math.exp(30) - math.exp(20)) / rows, rel=1e-4)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("vanilla", dict(clip_ratio=0.1, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=1.5)),
        ("gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4)),  # GSPO paper's tight ranges
        ("gspo", dict(clip_ratio=0.1, clip_ratio_low=None, clip_ratio_high=None)),
        ("cispo", dict(clip_ratio_low=10.0, clip_ratio_high=0.28)),  # no lower clip in practice
        ("cispo", dict(clip_ratio_low=0.05, clip_ratio_high=0.5)),
        ("sapo", dict(tau_pos=2.0, tau_neg=0.5)),
    ],
)
def test_config_variants_match_verl(name, overrides, device):
    check(name, actor_config(**overrides), "token-mean", device=device)


@pytest.mark.parametrize("name", NAMES)
def test_sequence_level_weights_broadcast_like_verl(name, device):
    check(name, actor_config(), "seq-mean-token-sum", is_weights(device, (B, 1)) + 0.1, device=device)


@pytest.mark.parametrize("name", NAMES)
def test_empty_mask_is_nan_as_in_verl(name, device):
    """verl's local aggregation over an empty mask is 0/0; with global counts it is 0. Metrics are 0."""
    old, log_prob, advantages, _ = policy_inputs(device)
    mask = torch.zeros(B, T, device=device)
    for mode in ("token-mean", "seq-mean-token-mean"):
        for use_global in (False, True):
            config = actor_config()
            if use_global:
                config.global_batch_info.update(global_info(torch.ones(B, T), mode))
            expected, expected_metrics = VERL[name](old, log_prob, advantages, mask, mode, config)
            actual, actual_metrics = ours(name)(old, log_prob, advantages, mask, mode, config)
            nan = not use_global and name != "geo_mean"  # verl's geo_mean is a plain mean over rows
            assert torch.isnan(actual).item() == torch.isnan(expected).item() == nan
            if not nan:
                assert_close(actual, expected)
            assert actual_metrics == pytest.approx(expected_metrics, abs=1e-6)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", NAMES)
def test_bf16_dtype_follows_verl(name, mode, device):
    """verl's loss is bf16 for bf16 inputs, but fp32 with a float mask or in the seq modes."""
    old, log_prob, advantages, mask = (t.detach().bfloat16() for t in policy_inputs(device))
    for m in (mask.bool(), mask.float()):
        expected = VERL[name](old, log_prob, advantages, m, mode, actor_config())[0]
        actual = ours(name)(old, log_prob, advantages, m, mode, actor_config())[0]
        assert actual.dtype == expected.dtype
        assert_close(actual.float(), expected.float(), atol=5e-2, rtol=5e-2)  # verl computes in bf16


@pytest.mark.parametrize("mode", AGG_MODES)
def test_bf16_agg_and_value_loss_dtype_follow_verl(mode, device):
    """The same dtype rule in the adapter's agg_loss and compute_value_loss (both use _agg_dtype)."""
    gen = torch.Generator().manual_seed(14)
    vpreds, returns, values = (torch.randn(B, T, generator=gen).to(device).bfloat16() for _ in range(3))
    for m in (make_mask(device).bool(), make_mask(device)):
        expected = core.agg_loss(vpreds, m, mode)
        assert fastppo_verl.agg_loss(vpreds, m, mode).dtype == expected.dtype
        expected = core.compute_value_loss(vpreds, returns, values, m, 0.3, mode)[0]
        assert (
            fastppo_verl.compute_value_loss(vpreds, returns, values, m, 0.3, mode)[0].dtype == expected.dtype
        )


def count_op_calls(monkeypatch) -> list:
    calls, real = [], fastppo.ppo_policy_loss

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastppo, "ppo_policy_loss", counting)
    return calls


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("vanilla", dict(clip_ratio_low=0.0)),
        ("gspo", dict(clip_ratio_low=0.0)),
        ("cispo", dict(clip_ratio_high=-0.1)),
        ("sapo", dict(tau_neg=-1.0)),
    ],
)
def test_configs_outside_the_op_run_verls_formula(name, overrides, monkeypatch, device):
    """Clip ratios ≤ 0 (and τ ≤ 0) have no form in the op: vanilla's PyTorch copy or verl's own
    function runs, also while patched (no recursion into the adapter)."""
    calls = count_op_calls(monkeypatch)
    config = actor_config(**overrides)
    check(name, config, "token-mean", is_weights(device), device=device)
    with fastppo_verl.patched():
        check(name, config, "token-mean", device=device)
    assert calls == []


def test_sapo_ignores_loss_agg_mode_like_verl():
    inputs = policy_inputs("cpu")
    expected = VERL["sapo"](*inputs, "no-such-mode", actor_config())[0]
    assert_close(ours("sapo")(*inputs, "no-such-mode", actor_config())[0], expected)


def test_missing_config_raises():
    for name in NAMES:
        with pytest.raises(ValueError, match="config"):
            ours(name)(*policy_inputs("cpu"), "token-mean", None)


# --------------------------------------------------------------------------------------------- registry


def registry_snapshot():
    return dict(core.POLICY_LOSS_REGISTRY), {name: getattr(core, fn.__name__) for name, fn in VERL.items()}


def test_patch_swaps_the_registry_and_unpatch_restores():
    before, functions = registry_snapshot()
    assert not any(key.startswith("fastppo_") for key in before)
    fastppo_verl.patch()
    try:
        for name in NAMES:
            assert core.get_policy_loss_fn(name) is ours(name)
            assert core.get_policy_loss_fn("fastppo_" + name) is ours(name)
            assert getattr(core, VERL[name].__name__) is ours(name)
        for name in ("clip_cov", "kl_cov", "gpg", "dro", "dppo_tv", "dppo_kl"):
            assert core.get_policy_loss_fn(name) is before[name]  # left to verl
    finally:
        fastppo_verl.unpatch()
    after, functions_after = registry_snapshot()
    assert after.keys() == before.keys()
    assert all(after[key] is fn for key, fn in before.items())
    assert all(functions_after[name] is fn is VERL[name] for name, fn in functions.items())


def test_register_adds_its_names_only():
    before, _ = registry_snapshot()
    fastppo_verl.register()
    try:
        for name in NAMES:
            assert core.get_policy_loss_fn("fastppo_" + name) is ours(name)
            assert core.get_policy_loss_fn(name) is VERL[name]
    finally:
        for key in fastppo_verl.REGISTERED_NAMES:
            core.POLICY_LOSS_REGISTRY.pop(key, None)
    assert core.POLICY_LOSS_REGISTRY == before


def test_user_override_of_a_policy_loss_is_left_alone():
    def custom(*args, **kwargs):
        raise AssertionError("not called")

    core.POLICY_LOSS_REGISTRY["gspo"] = custom
    try:
        with fastppo_verl.patched():
            assert core.get_policy_loss_fn("gspo") is custom
            assert core.get_policy_loss_fn("fastppo_gspo") is ours("gspo")
            assert core.get_policy_loss_fn("cispo") is ours("cispo")
        assert core.get_policy_loss_fn("gspo") is custom
    finally:
        core.POLICY_LOSS_REGISTRY["gspo"] = VERL["gspo"]


def verl_ppo_loss(loss_mode: str, weights: torch.Tensor | None):
    """verl's own actor loss (``verl.workers.utils.losses.ppo_loss``) on a small padded batch:
    returns (loss, gradient w.r.t. the flat log-probs)."""
    import verl.workers.utils.losses as worker_losses

    prompt_len, response_len = 2, T
    old, log_prob, advantages, mask = policy_inputs("cpu")
    data = {"response_mask": mask, "old_log_probs": old, "advantages": advantages}
    if weights is not None:
        data["rollout_is_weights"] = weights
    data = TensorDict(
        {
            **data,
            "prompts": torch.ones(B, prompt_len, dtype=torch.long),
            "responses": torch.ones(B, response_len, dtype=torch.long),
            "attention_mask": torch.ones(B, prompt_len + response_len, dtype=torch.long),
        },
        batch_size=[B],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    # The model's flat output: each response's log-probs sit one position left of its tokens.
    flat = torch.zeros(B, prompt_len + response_len)
    flat[:, prompt_len - 1 : -1] = log_prob.detach()
    flat = flat.flatten().requires_grad_()
    config = actor_config(policy_loss=PolicyLossConfig(loss_mode=loss_mode), loss_agg_mode="token-mean")
    loss, _ = worker_losses.ppo_loss(config, {"log_probs": flat}, data)
    return loss, torch.autograd.grad(loss, flat)[0]


@pytest.mark.parametrize(
    "loss_mode,op_option", [("gspo", ("ratio_level", "sequence")), ("fastppo_cispo", ("loss", "cispo"))]
)
def test_verl_actor_loss_runs_fastppo_while_patched(loss_mode, op_option, monkeypatch):
    """A config naming a policy loss through verl's registry runs fastppo's op once, with verl's result."""
    weights = is_weights("cpu")
    expected = verl_ppo_loss(loss_mode.removeprefix("fastppo_"), weights)  # verl's own, unpatched
    calls = count_op_calls(monkeypatch)
    with fastppo_verl.patched():
        actual = verl_ppo_loss(loss_mode, weights)
    assert len(calls) == 1 and calls[0][op_option[0]] == op_option[1]
    assert_close(actual, expected)
    verl_ppo_loss("gspo", weights)
    assert len(calls) == 1  # unpatched: verl's own again
