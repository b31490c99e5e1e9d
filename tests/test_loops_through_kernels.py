"""The training loops through the Triton kernels (the interpreter on CPU, compiled on a GPU), held
against the same loops on the PyTorch reference path: every other loop test forces the reference
(FASTPPO_BACKEND=torch), which is how the flagship's compile failure hid from the CPU suite.

Tolerances: the two paths differ only in fp32 rounding order inside the ops (relative ~1e-7 per
value), so one update's losses and gradients agree to 1e-5 relative. Whole iterations are compared
by their metrics (the second iteration's come from the updated weights), not by the weights:
Adam's first step moves every weight by ±lr whatever its gradient's size, so a gradient component
at rounding level (~1e-9) can take either sign on the two paths. A wrong kernel (a sign, a missing
term, a dropped row) moves losses, gradients and metrics at the 1e-2 level."""

from dataclasses import replace

import pytest
import torch

from fastppo.kernels import INTERPRETED
from fastppo.kernels.compile_check import recording
from fastppo.trainer import offline, ppo, rollout, sampling, tiny
from fastppo.trainer.config import DPOConfig, PPOConfig
from fastppo.trainer.ppo import train

BACKENDS = ("triton", "torch")
METRICS = ("reward", "kl", "entropy", "policy_loss", "value_loss", "clipfrac")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def launched_kernels(run) -> tuple[object, set[str]]:
    """``run()``'s result and the names of the kernels it launched (interpreter only: compiled
    launches are not recorded; there the backend switch alone decides)."""
    if not INTERPRETED:
        return run(), set()
    with recording() as launches:
        result = run()
    return result, {launch["kernel"] for launch in launches.values()}


@pytest.mark.parametrize("algo, group_size", [("ppo", 1), ("grpo", 4)])
def test_training_iterations_match_the_reference_path(algo, group_size, device, tmp_path, monkeypatch):
    runs = {}
    for backend in BACKENDS:
        cfg = PPOConfig(
            algo=algo, group_size=group_size, iterations=2, batch_size=32, minibatch_size=16,
            kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0, device=device, seed=3,
            output_dir=str(tmp_path / backend),
        )  # fmt: skip
        monkeypatch.setenv("FASTPPO_BACKEND", backend)
        runs[backend] = launched_kernels(lambda cfg=cfg: train(cfg, log=lambda *_: None))
    (history, kernels), (ref_history, ref_kernels) = runs["triton"], runs["torch"]
    if INTERPRETED:
        expected = {"_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_ppo_policy_loss_fwd_kernel"}
        expected |= (
            {"_gae_fwd_kernel", "_value_loss_fwd_kernel"} if algo == "ppo" else {"_group_advantages_kernel"}
        )
        assert expected <= kernels, expected - kernels
        assert not ref_kernels  # the reference path launches nothing
    for row, ref_row in zip(history, ref_history, strict=True):
        for key in METRICS:
            assert row[key] == pytest.approx(ref_row[key], rel=1e-4, abs=1e-6), (row["iteration"], key)


@pytest.mark.parametrize("algo, group_size", [("ppo", 1), ("grpo", 4)])
def test_one_update_matches_the_reference_path(algo, group_size, device, tmp_path, monkeypatch):
    """The rollout's log-probs, values and advantages, then one micro-batch's loss and every
    gradient of the policy and critic."""
    cfg = PPOConfig(
        algo=algo, group_size=group_size, max_new_tokens=6, temperature=0.7, kl_coef=0.05, entropy_coef=0.01,
        device=device, padding_free=False, output_dir=str(tmp_path),
    )  # fmt: skip
    tokenizer, policy, reference, critic = ppo.load_models(cfg, "sdpa")
    for model in (policy, reference, critic):
        if model is not None:
            model.to(device)
    prompts = tiny.synthetic_prompts(12 // group_size, seed=3)
    dev = torch.device(device)
    results = {}
    for backend in BACKENDS:
        monkeypatch.setenv("FASTPPO_BACKEND", backend)
        torch.manual_seed(1)  # the same samples on both paths
        batch = rollout.collect(
            policy, reference, critic, sampling.HFSampler(policy, tokenizer), tokenizer, prompts,
            tiny.echo_reward, dev, group_size=group_size, padding_free=False,
            settings=sampling.SamplingSettings(max_new_tokens=6, temperature=0.7),
        )  # fmt: skip
        batch = ppo.with_advantages(cfg, batch, ppo.kept_for_update(cfg, batch), kl_coef=0.05)
        for model in (policy, critic):
            if model is not None:
                model.zero_grad()
        micro = batch.select(torch.tensor([0, 3, 4, 7, 11], device=dev))
        loss, *_ = ppo.micro_batch_losses(
            cfg, policy, critic, micro, kl_coef=0.05, normaliser=40, n_tokens=40, device=dev
        )
        loss.backward()
        grads = [p.grad.clone() for m in (policy, critic) if m is not None for p in m.parameters()]
        results[backend] = (batch, loss.detach(), grads)
    (batch, loss, grads), (ref_batch, ref_loss, ref_grads) = results["triton"], results["torch"]
    assert torch.equal(batch.sequences, ref_batch.sequences)
    for key in ("old_logp", "ref_logp", "values", "advantages", "returns"):
        if getattr(batch, key) is not None:
            torch.testing.assert_close(
                getattr(batch, key), getattr(ref_batch, key), atol=1e-5, rtol=1e-5, msg=key
            )
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref_g, atol=1e-6, rtol=1e-4)


def offline_models(device):
    cfg = DPOConfig(device=device)
    tokenizer = offline.load_tokenizer(cfg)
    model = offline.load_causal_lm(cfg, tokenizer).to(device)
    reference = offline.load_causal_lm(replace(cfg, seed=cfg.seed + 1), tokenizer).to(device)
    return cfg, tokenizer, model, reference


def loss_and_grads(backend, monkeypatch, model, loss_fn):
    monkeypatch.setenv("FASTPPO_BACKEND", backend)
    model.zero_grad()

    def step():
        loss, _ = loss_fn()
        loss.backward()
        return loss.detach()

    loss, kernels = launched_kernels(step)
    return loss, [p.grad.clone() for p in model.parameters()], kernels


@pytest.mark.parametrize("loop", ["sft", "dpo"])
def test_offline_step_matches_the_reference_path(loop, device, monkeypatch):
    from fastppo.trainer import data

    cfg, tokenizer, model, reference = offline_models(device)
    rows = data.synthetic_pairs(8, seed=2) if loop == "dpo" else data.synthetic_sft(8, seed=2)
    if loop == "dpo":
        dpo = offline.make_dpo_loss(cfg, reference)
        run = lambda: dpo(model, tokenizer, rows, device)  # noqa: E731
    else:
        run = lambda: offline.sft_loss(model, tokenizer, rows, device)  # noqa: E731
    loss, grads, kernels = loss_and_grads("triton", monkeypatch, model, run)
    ref_loss, ref_grads, _ = loss_and_grads("torch", monkeypatch, model, run)
    if INTERPRETED:
        assert {"_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"} <= kernels
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref_g, atol=1e-6, rtol=1e-4)
