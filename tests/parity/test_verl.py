"""fastppo.integrations.verl against verl 0.9.1's own functions, on the same random inputs.

Forward values and gradients (fp32, atol = rtol = 1e-5 unless a comment says why), metric dicts,
errors, and the swap: patch() makes verl's modules and registries hand out fastppo's functions,
unpatch() puts verl's back (identity), patched() nests. Shapes are small: on CPU the kernels run in
Triton's interpreter.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
import verl.trainer.ppo.core_algos as core  # the parity extra (README set-up); a missing peer fails
import verl.utils.kernel.linear_cross_entropy as verl_linear_ce
import verl.utils.torch_functional as verl_F
from verl.workers.config import ActorConfig

import fastppo
import fastppo.integrations.verl as fastppo_verl

AGG_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
]
KL_NAMES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]
KL_NAMES += [name + "+" for name in KL_NAMES]
B, T = 4, 10


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)  # also checks shape and dtype


def grads(output, inputs, weight=None):
    """Gradients of Σ weight·output (a 0-d output needs no weight) with respect to ``inputs``."""
    total = output.sum() if weight is None else (output * weight).sum()
    return torch.autograd.grad(total, inputs)


def make_mask(device, shape=(B, T), seed=0):
    """0/1 mask with holes (multi-turn style), a padded tail, one full row and one all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(shape, generator=gen) > 0.3).float()
    mask[:, -2:] = 0.0
    mask[0] = 1.0
    mask[2] = 0.0
    return mask.to(device)


def actor_config(**overrides):
    options = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    options.update(overrides)
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **options)


def global_info(mask, mode, dp_size=2):
    """What verl's ppo_loss / value_loss pass for a data-parallel rank of a larger batch."""
    info = {"dp_size": dp_size, "batch_num_tokens": int(mask.sum()) * dp_size, "global_batch_size": 2 * B}
    info["loss_scale_factor"] = 7 if mode == "seq-mean-token-sum-norm" else None
    return info


# --------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("name", KL_NAMES)
def test_kl_penalty_matches_verl(name, device):
    gen = torch.Generator().manual_seed(1)
    logprob = torch.randn(B, T, generator=gen) * 2
    ref = torch.randn(B, T, generator=gen) * 2
    logprob[0, :4] = ref[0, :4] + torch.tensor([-25.0, -15.0, 15.0, 25.0])  # k3's clamps at ±20 and 10
    logprob, ref = logprob.to(device).requires_grad_(), ref.to(device).requires_grad_()
    weight = torch.rand(B, T, generator=gen).to(device)

    expected = core.kl_penalty(logprob, ref, name)
    actual = fastppo_verl.kl_penalty(logprob, ref, name)
    assert_close(actual, expected)
    for g_actual, g_expected in zip(
        grads(actual, (logprob, ref), weight), grads(expected, (logprob, ref), weight), strict=True
    ):
        assert_close(g_actual, g_expected)


def test_kl_penalty_keeps_dtype_and_broadcasts(device):
    logprob = torch.randn(B, T, device=device, dtype=torch.bfloat16)
    ref = torch.randn(1, T, device=device, dtype=torch.bfloat16)
    expected = core.kl_penalty(logprob, ref, "low_var_kl")
    actual = fastppo_verl.kl_penalty(logprob, ref, "low_var_kl")
    # verl computes in bf16, fastppo in fp32 then rounds: one bf16 ulp apart at most
    assert_close(actual, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["full", "full+", "k4"])
def test_kl_penalty_unsupported_raises_like_verl(name):
    logprob, ref = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(NotImplementedError):
        core.kl_penalty(logprob, ref, name)
    with pytest.raises(NotImplementedError, match="kl_penalty"):
        fastppo_verl.kl_penalty(logprob, ref, name)


# --------------------------------------------------------------------------------------------- agg_loss


@pytest.mark.parametrize("use_global", [False, True])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_matches_verl(mode, use_global, device):
    mask = make_mask(device)
    loss_mat = torch.randn(B, T, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
    extra = global_info(mask, mode) if use_global else {}
    expected = core.agg_loss(loss_mat, mask, mode, **extra)
    actual = fastppo_verl.agg_loss(loss_mat, mask, mode, **extra)
    assert_close(actual, expected)
    assert_close(grads(actual, loss_mat)[0], grads(expected, loss_mat)[0])


def test_agg_loss_errors_like_verl():
    loss_mat, mask = torch.randn(2, 3), torch.ones(2, 3)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        with pytest.raises(ValueError, match="required when dp_size > 1"):
            core.agg_loss(loss_mat, mask, mode, dp_size=2)
        with pytest.raises(ValueError, match="required when dp_size > 1"):
            fastppo_verl.agg_loss(loss_mat, mask, mode, dp_size=2)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        fastppo_verl.agg_loss(loss_mat, mask, "token-median")


def test_empty_mask_is_nan_as_in_verl():
    """verl divides by the local count: an entirely empty mask gives 0/0, and so does the adapter
    (fastppo's own ops would give 0)."""
    loss_mat, mask = torch.randn(2, 3), torch.zeros(2, 3)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        assert torch.isnan(core.agg_loss(loss_mat, mask, mode))
        assert torch.isnan(fastppo_verl.agg_loss(loss_mat, mask, mode)), mode
    config = actor_config(clip_ratio=0.2)
    logp, old = torch.randn(2, 3), torch.randn(2, 3)
    for fn in (core.compute_policy_loss_vanilla, fastppo_verl.compute_policy_loss_vanilla):
        assert torch.isnan(fn(old, logp, torch.randn(2, 3), mask, "token-mean", config)[0])
    for fn in (core.compute_value_loss, fastppo_verl.compute_value_loss):
        assert torch.isnan(fn(logp, torch.randn(2, 3), old, mask, 0.2)[0])


# --------------------------------------------------------------------------------------------- policy loss


def policy_inputs(device, seed=3):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen) * 3
    log_prob = old + 0.4 * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, T, generator=gen) * 2
    # Dual-clip tokens: negative advantage and a ratio above clip_ratio_c (e² ≈ 7.4 > 3).
    log_prob[0, :3] = old[0, :3] + 2.0
    advantages[0, :3] = -torch.tensor([0.5, 1.0, 2.0])
    mask = make_mask(device)
    return old.to(device), log_prob.to(device).requires_grad_(), advantages.to(device), mask


def check_policy_loss(config, device, mode="token-mean", rollout_is_weights=None):
    old, log_prob, advantages, mask = policy_inputs(device)
    args = (old, log_prob, advantages, mask, mode, config, rollout_is_weights)
    expected, expected_metrics = core.compute_policy_loss_vanilla(*args)
    actual, actual_metrics = fastppo_verl.compute_policy_loss_vanilla(*args)
    assert_close(actual, expected)
    assert_close(grads(actual, log_prob)[0], grads(expected, log_prob)[0])
    assert list(actual_metrics) == list(expected_metrics)
    for key, value in expected_metrics.items():
        assert isinstance(actual_metrics[key], float)
        assert actual_metrics[key] == pytest.approx(value, abs=1e-6), key
    return expected_metrics


@pytest.mark.parametrize("use_global", [False, True])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_matches_verl(mode, use_global, device):
    config = actor_config()
    if use_global:
        config.global_batch_info.update(global_info(make_mask(device), mode))
    metrics = check_policy_loss(config, device, mode)
    assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/pg_clipfrac_lower"] > 0  # both clips active


@pytest.mark.parametrize(
    "overrides",
    [
        dict(
            clip_ratio=0.1, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=1.5
        ),  # symmetric, tight dual
        dict(clip_ratio_low=0.05, clip_ratio_high=0.5, clip_ratio_c=10.0),
    ],
)
def test_policy_loss_clip_variants_match_verl(overrides, device):
    check_policy_loss(actor_config(**overrides), device, "seq-mean-token-mean")


@pytest.mark.parametrize("with_zeros", [False, True])
def test_policy_loss_rollout_is_weights_match_verl(with_zeros, device):
    """Positive weights are folded into the advantages (fused); zero weights (IcePop) take the fallback."""
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) + 0.5
    if with_zeros:
        weights[:, ::3] = 0.0
    check_policy_loss(actor_config(), device, "token-mean", weights.to(device))


def test_policy_loss_bad_config_raises():
    old, log_prob, advantages, mask = policy_inputs("cpu")
    with pytest.raises(ValueError, match="config"):
        fastppo_verl.compute_policy_loss_vanilla(old, log_prob, advantages, mask, "token-mean", None)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        fastppo_verl.compute_policy_loss_vanilla(
            old, log_prob, advantages, mask, "token-mean", actor_config(clip_ratio_c=1.0)
        )


# --------------------------------------------------------------------------------------------- value loss


@pytest.mark.parametrize("use_global", [False, True])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_matches_verl(mode, use_global, device):
    gen = torch.Generator().manual_seed(5)
    vpreds, returns, values = (torch.randn(B, T, generator=gen).to(device) for _ in range(3))
    vpreds.requires_grad_()
    mask = make_mask(device)
    extra = global_info(mask, mode) if use_global else {}
    expected = core.compute_value_loss(vpreds, returns, values, mask, 0.3, mode, **extra)
    actual = fastppo_verl.compute_value_loss(vpreds, returns, values, mask, 0.3, mode, **extra)
    assert_close(actual, expected)
    assert 0 < expected[1].item() < 1  # some tokens clipped, some not
    assert_close(grads(actual[0], vpreds)[0], grads(expected[0], vpreds)[0])


def test_value_loss_zero_cliprange_matches_verl(device):
    gen = torch.Generator().manual_seed(6)
    vpreds, returns, values = (torch.randn(B, T, generator=gen).to(device) for _ in range(3))
    vpreds.requires_grad_()
    mask = make_mask(device)
    expected = core.compute_value_loss(vpreds, returns, values, mask, 0.0)
    actual = fastppo_verl.compute_value_loss(vpreds, returns, values, mask, 0.0)
    assert_close(actual, expected)
    assert_close(grads(actual[0], vpreds)[0], grads(expected[0], vpreds)[0])


# --------------------------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 0.7)])
def test_gae_matches_verl(gamma, lam, device):
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(B, T, generator=gen).to(device)  # non-zero under the mask's holes as well
    values = torch.randn(B, T, generator=gen).to(device)
    mask = make_mask(device)
    expected = core.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    actual = fastppo_verl.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    assert_close(actual, expected)


def test_gae_tensor_coefficients_and_whitening_errors(device):
    rewards, values = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    mask = make_mask(device)
    gamma, lam = torch.tensor(0.9), torch.tensor(0.8)
    expected = core.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    assert_close(fastppo_verl.compute_gae_advantage_return(rewards, values, mask, gamma, lam), expected)
    one_token = torch.zeros(B, T, device=device)
    one_token[1, 3] = 1.0
    for bad_mask in (torch.zeros(B, T, device=device), one_token):
        with pytest.raises(ValueError):
            core.compute_gae_advantage_return(rewards, values, bad_mask, 1.0, 1.0)
        with pytest.raises(ValueError, match="response_mask"):
            fastppo_verl.compute_gae_advantage_return(rewards, values, bad_mask, 1.0, 1.0)


def group_inputs(device):
    """Groups of 4, 3, 2 and 1 responses with string uids, interleaved; one group of equal scores."""
    index = np.array(["p0", "p1", "p2", "p0", "solo", "p1", "p0", "p3", "p2", "p1", "p0", "p3"], dtype=object)
    gen = torch.Generator().manual_seed(8)
    mask = make_mask(device, (len(index), 6), seed=9)
    mask[2] = 1.0  # the all-zero row of make_mask sits in group p2: keep one
    rewards = torch.randn(len(index), 6, generator=gen).to(device) * mask
    rewards[index == "p3"] = 0.0
    rewards[index == "p3", 0] = 1.0  # equal scores: std 0, advantage 0
    return rewards, mask, index


@pytest.mark.parametrize("norm_by_std,epsilon", [(True, 1e-6), (True, 0.1), (False, 1e-6)])
def test_grpo_matches_verl(norm_by_std, epsilon, device):
    rewards, mask, index = group_inputs(device)
    expected = core.compute_grpo_outcome_advantage(rewards, mask, index, epsilon, norm_by_std)
    actual = fastppo_verl.compute_grpo_outcome_advantage(rewards, mask, index, epsilon, norm_by_std)
    assert_close(actual, expected)
    assert actual[0] is actual[1] and expected[0] is expected[1]


def test_rloo_matches_verl(device):
    rewards, mask, index = group_inputs(device)
    int_index = np.array([hash(uid) % 97 for uid in index], dtype=np.int64)
    for uids in (index, int_index):
        expected = core.compute_rloo_outcome_advantage(
            rewards, mask, uids, config=None, reward_baselines=None
        )
        actual = fastppo_verl.compute_rloo_outcome_advantage(
            rewards, mask, uids, config=None, reward_baselines=None
        )
        assert_close(actual, expected)
        assert actual[0] is actual[1]


def test_group_index_too_short_raises(device):
    rewards, mask, index = group_inputs(device)
    with pytest.raises(ValueError, match="index"):
        fastppo_verl.compute_grpo_outcome_advantage(rewards, mask, index[:-1])


# --------------------------------------------------------------------------------------------- log-probs


def test_logprobs_and_entropy_match_verl_fp32(device):
    gen = torch.Generator().manual_seed(10)
    logits = (torch.randn(3, 7, 64, generator=gen) * 3).to(device).requires_grad_()
    labels = torch.randint(0, 64, (3, 7), generator=gen).to(device)
    weight = torch.rand(3, 7, generator=gen).to(device)
    for verl_fn, fastppo_fn, args in [
        (verl_F.logprobs_from_logits, fastppo_verl.logprobs_from_logits, (logits, labels)),
        (verl_F.entropy_from_logits, fastppo_verl.entropy_from_logits, (logits,)),
    ]:
        expected, actual = verl_fn(*args), fastppo_fn(*args)
        assert_close(actual, expected)
        assert_close(grads(actual, logits, weight)[0], grads(expected, logits, weight)[0])
    flat = logits.reshape(-1, 64)
    expected = verl_F.entropy_from_logits_with_chunking(flat, chunk_size=8)
    actual = fastppo_verl.entropy_from_logits_with_chunking(flat, chunk_size=8)
    assert_close(actual, expected)
    assert_close(grads(actual, logits, weight.reshape(-1))[0], grads(expected, logits, weight.reshape(-1))[0])


# --------------------------------------------------------------------------------------------- patching

TARGETS = [(core, name) for name in fastppo_verl._FUNCTIONS[fastppo_verl._CORE]]
TARGETS += [(verl_F, name) for name in fastppo_verl._FUNCTIONS[fastppo_verl._TORCH_FUNCTIONAL]]
TARGETS += [(verl_linear_ce, "linear_cross_entropy")]


def snapshot():
    import verl.workers.utils.losses as worker_losses  # binds agg_loss, kl_penalty, ... by `from` import

    bindings = {(module.__name__, name): getattr(module, name) for module, name in TARGETS}
    for name in ("agg_loss", "kl_penalty", "compute_value_loss"):
        bindings[(worker_losses.__name__, name)] = getattr(worker_losses, name)
    return bindings, dict(core.POLICY_LOSS_REGISTRY), dict(core.ADV_ESTIMATOR_REGISTRY)


def assert_restored(before):
    bindings, policy_losses, estimators = before
    for (module_name, name), original in bindings.items():
        assert getattr(sys.modules[module_name], name) is original, (module_name, name)
    assert core.POLICY_LOSS_REGISTRY.keys() == policy_losses.keys()
    assert all(core.POLICY_LOSS_REGISTRY[key] is fn for key, fn in policy_losses.items())
    assert core.ADV_ESTIMATOR_REGISTRY.keys() == estimators.keys()
    assert all(core.ADV_ESTIMATOR_REGISTRY[key] is fn for key, fn in estimators.items())


def assert_patched():
    import verl.workers.utils.losses as worker_losses

    for module, name in TARGETS:
        assert getattr(module, name) is getattr(fastppo_verl, name), name
    assert worker_losses.agg_loss is fastppo_verl.agg_loss
    assert worker_losses.compute_value_loss is fastppo_verl.compute_value_loss
    for loss_name in ("vanilla", "fastppo_vanilla"):
        assert core.get_policy_loss_fn(loss_name) is fastppo_verl.compute_policy_loss_vanilla
    for estimator in ("gae", "grpo", "rloo"):
        assert core.get_adv_estimator_fn(estimator).__module__ == fastppo_verl.__name__


def test_import_does_not_import_verl():
    code = "import sys, fastppo.integrations.verl; assert 'verl' not in sys.modules, 'verl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def count_token_logprobs_calls(fn) -> int:
    real, calls = fastppo.token_logprobs, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    fastppo.token_logprobs = counting
    try:
        fn()
    finally:
        fastppo.token_logprobs = real
    return len(calls)


def test_patch_swaps_verl_and_unpatch_restores():
    before = snapshot()
    assert "fastppo_vanilla" not in core.POLICY_LOSS_REGISTRY
    fastppo_verl.patch()
    try:
        assert_patched()
        # verl's own code now runs fastppo's: compute_entropy_loss looks up entropy_from_logits
        # at call time, and the adapter's entropy is fastppo.token_logprobs's.
        logits, mask = torch.randn(2, 3, 8), torch.ones(2, 3)
        calls = count_token_logprobs_calls(lambda: core.compute_entropy_loss(logits, mask))
        assert calls == 1
    finally:
        fastppo_verl.unpatch()
    assert_restored(before)
    assert count_token_logprobs_calls(lambda: core.compute_entropy_loss(logits, mask)) == 0
    assert "fastppo_vanilla" not in core.POLICY_LOSS_REGISTRY


def test_patched_context_nests_and_double_patch_is_harmless():
    before = snapshot()
    with fastppo_verl.patched():
        with fastppo_verl.patched():
            assert_patched()
        assert_patched()  # the inner block leaves the outer patch in place
    assert_restored(before)
    fastppo_verl.patch()
    fastppo_verl.patch()
    assert_patched()
    fastppo_verl.unpatch()
    assert_restored(before)
    fastppo_verl.unpatch()  # nothing left to restore
    assert_restored(before)


def test_register_alone_and_survives_unpatch():
    before = snapshot()
    fastppo_verl.register()
    try:
        assert core.get_policy_loss_fn("fastppo_vanilla") is fastppo_verl.compute_policy_loss_vanilla
        assert core.get_policy_loss_fn("vanilla") is before[1]["vanilla"]  # register() swaps nothing
        with fastppo_verl.patched():
            assert_patched()
        # registered before patch(): unpatch() leaves the name as it found it
        assert core.POLICY_LOSS_REGISTRY["fastppo_vanilla"] is fastppo_verl.compute_policy_loss_vanilla
    finally:
        for name in fastppo_verl.REGISTERED_NAMES:
            core.POLICY_LOSS_REGISTRY.pop(name, None)
    assert_restored(before)


def test_module_imported_while_patched_is_restored():
    """A verl module first imported under patch() binds fastppo's functions; unpatch() rebinds it."""
    name = "verl.trainer.distillation.losses"
    previous = sys.modules.pop(name, None)
    try:
        with fastppo_verl.patched():
            module = __import__(name, fromlist=["agg_loss"])
            assert module.agg_loss is fastppo_verl.agg_loss and module.kl_penalty is fastppo_verl.kl_penalty
        assert module.agg_loss is core.agg_loss is not fastppo_verl.agg_loss
        assert module.kl_penalty is core.kl_penalty
    finally:
        if previous is not None:
            sys.modules[name] = previous


def test_user_override_of_a_registry_entry_is_left_alone():
    def custom(*args, **kwargs):
        raise AssertionError("not called")

    original = core.ADV_ESTIMATOR_REGISTRY["grpo"]
    core.ADV_ESTIMATOR_REGISTRY["grpo"] = custom
    try:
        with fastppo_verl.patched():
            assert core.get_adv_estimator_fn("grpo") is custom
            assert core.get_adv_estimator_fn("gae") is fastppo_verl.compute_gae_advantage_return
        assert core.get_adv_estimator_fn("grpo") is custom
    finally:
        core.ADV_ESTIMATOR_REGISTRY["grpo"] = original


# --- verl's fused-kernel path: verl.utils.kernel.linear_cross_entropy ------------------------------


def test_linear_cross_entropy_follows_verl():
    """verl's kernel is CUDA-only (the GPU test below compares with it); here the adapter is held
    against verl's definition written out in fp64: log_probs = z_y − logsumexp(z), entropy, z the
    logits over the temperature, flat (N,) fp32 outputs of (B, T, H) hidden states."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(97, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 97, (2, 5), generator=g)
    logp, entropy = fastppo_verl.linear_cross_entropy(hidden, weight, labels, 0.8, "none")
    z = (hidden.double().reshape(-1, 16) @ weight.double().T) / 0.8
    log_softmax = torch.log_softmax(z, -1)
    assert logp.shape == entropy.shape == (10,) and logp.dtype == torch.float32
    torch.testing.assert_close(
        logp.double(), log_softmax.gather(1, labels.reshape(-1, 1))[:, 0], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        entropy.double(), -(log_softmax.exp() * log_softmax).sum(-1), rtol=1e-5, atol=1e-5
    )
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


def test_linear_cross_entropy_reductions_run_verls_own():
    """A reduction fastppo does not return goes to verl's function, which needs CUDA (NVTX ranges,
    CUDA tensors): on CPU it raises from inside verl's module."""
    x = torch.randn(4, 8)
    with pytest.raises((AssertionError, RuntimeError)) as raised:
        fastppo_verl.linear_cross_entropy(x, torch.randn(11, 8), torch.randint(0, 11, (4,)), 1.0, "mean")
    assert any("verl/utils/kernel/linear_cross_entropy.py" in str(entry.path) for entry in raised.traceback)


@pytest.mark.gpu
def test_linear_cross_entropy_matches_verl_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.randn(32000, 256, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    labels = torch.randint(0, 32000, (512,), device="cuda", generator=g)
    results = []
    for fn in (fastppo_verl.linear_cross_entropy, verl_linear_ce.LinearCrossEntropy.apply):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, entropy = fn(h, w, labels, 0.7, "none")
        (logp.sum() + 0.5 * entropy.sum()).backward()
        results.append((logp.float(), entropy.float(), h.grad.float(), w.grad.float()))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
