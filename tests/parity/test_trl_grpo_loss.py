"""``GRPOTrainer._compute_loss`` of trl 1.16.0, as shipped and patched (``fastppo.integrations.trl``),
on one stub trainer: the same loss (fp32, atol = rtol = 1e-5), the same gradient for the log-probs
(and the entropies) under a non-unit upstream gradient, the same metrics. Call counts say which
path ran: fastppo's op exactly once (supported), TRL's original (configuration fallback,
half-precision log-probs), or both (data fallback: the op ran, its data left the exact range,
TRL's ran on the same scoring). The scoring call runs once in every case.

Batch: B = 5 rows of T = 7 completion tokens; row 2 has no token, row 3 one. Log-ratios are
N(0, 0.4) (both clip sides are hit) with one token at −30 (the op's ratio is e⁻²⁰ there: a
difference of 2e-9).
"""

import math
import types
from collections import Counter, defaultdict

import pytest
import torch

import fastppo

pytest.importorskip("trl")

from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from fastppo.integrations import trl as adapter  # noqa: E402
from fastppo.integrations import trl_grpo  # noqa: E402
from fastppo.integrations._patching import TRL  # noqa: E402

B, T, P = 5, 7, 3
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
ROW_TOKENS = (7, 4, 0, 1, 6)  # an empty row and a single-token row
TOL = dict(atol=1e-5, rtol=1e-5)


class _Accelerator:
    """Accelerate's calls as one process sees them (gathers and reductions of its own share)."""

    def __init__(self, num_processes=2, sync_gradients=True):
        self.num_processes, self.sync_gradients = num_processes, sync_gradients

    def gather(self, t):
        return t.reshape(-1)  # a 0-d tensor gathers to shape (1,)

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


def _trainer(loss_type="grpo", level="token", beta=0.0, vllm=False, mode="train", **override):
    """A stub with every attribute ``_compute_loss`` reads; ``override`` replaces any of them (an
    ``args_`` prefix addresses ``args``)."""
    args = types.SimpleNamespace(
        delta=None, use_bias_correction_kl=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        steps_per_generation=4, entropy_target=0.5, entropy_coef_delta=0.01, entropy_coef_min=0.0,
        entropy_coef_max=0.1, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
    )  # fmt: skip
    trainer = types.SimpleNamespace(
        loss_type=loss_type, importance_sampling_level=level, beta=beta, args=args,
        epsilon_low=0.2, epsilon_high=1.3 if loss_type == "cispo" else 0.28,
        use_vllm=vllm, vllm_importance_sampling_correction=vllm,
        off_policy_mask_threshold=None, top_entropy_quantile=1.0, aux_loss_enabled=False,
        router_aux_loss_coef=0.001, _entropy_bonus_enabled=False, use_adaptive_entropy=False,
        entropy_coef=0.0, _last_world_entropy=0.0, _entropy_window_stats=None,
        model=types.SimpleNamespace(training=mode == "train"), current_gradient_accumulation_steps=3,
        max_completion_length=T + 1, accelerator=_Accelerator(),
    )  # fmt: skip
    for key, value in override.items():
        target, key = (args, key[5:]) if key.startswith("args_") else (trainer, key)
        setattr(target, key, value)
    trainer.get_gamma_weights = GRPOTrainer.get_gamma_weights
    trainer.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    return trainer


def _mask(row_tokens=ROW_TOKENS):
    return (torch.arange(T)[None, :] < torch.tensor(row_tokens)[:, None]).long()


def _batch(seed=0, *, beta=0.0, is_ratio=None, dtype=torch.float32, old=True, tool_mask=False):
    """(inputs, log-probs leaf (B, T), entropies leaf (B, T))."""
    g = torch.Generator().manual_seed(seed)
    logps = -(torch.rand(B, T, generator=g) * 3 + 0.05)
    log_ratio = 0.4 * torch.randn(B, T, generator=g)
    log_ratio[0, 2] = -30.0
    mask = _mask()
    inputs = {
        "prompt_ids": torch.randint(0, 50, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(0, 50, (B, T), generator=g),
        "completion_mask": mask,
        "advantages": torch.tensor([0.8, -1.3, 0.5, -0.7, 1.1]),
        "num_items_in_batch": mask.sum() * 3.0,  # the generation batch: more than this micro-batch
    }
    if old:
        inputs["old_per_token_logps"] = logps - log_ratio
    if beta:
        inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(B, T, generator=g)
    if is_ratio is not None:
        width = T if is_ratio == "token" else 1
        ratio = torch.exp(0.3 * torch.randn(B, width, generator=g)).clamp(max=2.0)
        ratio[1, 0] = 0.0  # masked out by TRL's MIS mode
        inputs["importance_sampling_ratio"] = ratio
    if tool_mask:
        inputs["tool_mask"] = (torch.rand(B, T, generator=g) > 0.2).long()
    entropies = torch.rand(B, T, generator=g) * 2
    return inputs, logps.to(dtype).requires_grad_(), entropies.requires_grad_()


@pytest.fixture
def calls(monkeypatch):
    """Counts of fastppo.ppo_policy_loss, TRL's original _compute_loss and the scoring calls."""
    adapter.unpatch()
    counts = Counter()
    op, trl_loss = fastppo.ppo_policy_loss, vars(GRPOTrainer)["_compute_loss"]

    def counting_op(*args, **kwargs):
        counts["fastppo"] += 1
        return op(*args, **kwargs)

    def counting_trl(self, model, inputs):
        counts["trl"] += 1
        return trl_loss(self, model, inputs)

    monkeypatch.setattr(fastppo, "ppo_policy_loss", counting_op)
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", counting_trl)
    counts.trl_loss = trl_loss  # TRL's own, uncounted
    yield counts
    adapter.unpatch()


def _run(compute_loss, trainer, inputs, logps, entropies, counts, aux=None):
    """(loss, gradients of (logps, entropies) at upstream 1.7, metrics) of one call."""
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def score(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        counts["score"] += 1
        assert input_ids.shape == attention_mask.shape == (B, P + T) and logits_to_keep == T
        assert kwargs["compute_entropy"] and kwargs["compute_aux_loss"] == trainer.aux_loss_enabled
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = score
    loss = compute_loss(trainer, None, inputs)
    grads = torch.autograd.grad(loss, (logps, entropies), torch.tensor(1.7), allow_unused=True)
    return loss.detach(), grads, {mode: dict(m) for mode, m in trainer._metrics.items()}


def _check(trainer, inputs, logps, entropies, counts, path="fastppo", aux=None):
    """Run TRL's and the patched _compute_loss, compare, and check which path ran."""
    state = dict(vars(trainer))  # the adaptive entropy controller updates its state
    want = _run(counts.trl_loss, trainer, inputs, logps, entropies, counts, aux)
    vars(trainer).update(state)
    counts.clear()
    with adapter.patched():
        got = _run(GRPOTrainer._compute_loss, trainer, inputs, logps, entropies, counts, aux)
    expected = {
        "fastppo": {"fastppo": 1, "score": 1},
        "trl": {"trl": 1, "score": 1},
        "trl-after-op": {"fastppo": 1, "trl": 1, "score": 1},  # one forward pass all the same
    }
    assert dict(counts) == expected[path]
    torch.testing.assert_close(got[0], want[0], **TOL)
    for got_grad, want_grad in zip(got[1], want[1], strict=True):
        assert (got_grad is None) == (want_grad is None)
        if got_grad is not None:
            torch.testing.assert_close(got_grad, want_grad, **TOL)
    assert got[2].keys() == want[2].keys()
    for mode in want[2]:
        assert list(got[2][mode]) == list(want[2][mode])  # same keys, in TRL's order
        for key, values in want[2][mode].items():
            torch.testing.assert_close(torch.tensor(got[2][mode][key]), torch.tensor(values),
                                       equal_nan=True, **TOL)  # fmt: skip
    return want


# --- supported configurations -----------------------------------------------------------------


@pytest.mark.parametrize("is_ratio", [None, "token", "sequence"], ids=["no-is", "is-bt", "is-b1"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl(loss_type, level, beta, is_ratio, calls):
    index = LOSS_TYPES.index(loss_type) + 2 * (level == "sequence") + 3 * (is_ratio is not None)
    mode = ("train", "eval")[index % 2]  # both modes over the grid, without doubling it
    trainer = _trainer(loss_type, level, beta, vllm=is_ratio is not None, mode=mode)
    inputs, logps, entropies = _batch(index, beta=beta, is_ratio=is_ratio, tool_mask=bool(index % 3 == 0))
    # TRL's token-level vLLM ratios vary within a row: the GSPO-token gradient is not TRL's there
    varying = level == "sequence" and is_ratio == "token" and loss_type != "cispo"
    want = _check(trainer, inputs, logps, entropies, calls, "trl-after-op" if varying else "fastppo")
    assert want[0] != 0 and want[1][0].abs().sum() > 0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_without_old_logps(loss_type, level, calls):
    """On-policy: TRL takes the log-probs' detached copy as the old ones (ratio exactly 1)."""
    inputs, logps, entropies = _batch(1, old=False)
    _check(_trainer(loss_type, level), inputs, logps, entropies, calls)


@pytest.mark.parametrize("mode, sync", [("train", True), ("train", False), ("eval", True)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_static_entropy_bonus(loss_type, mode, sync, calls):
    trainer = _trainer(loss_type, mode=mode, _entropy_bonus_enabled=True, entropy_coef=0.02)
    trainer.accelerator.sync_gradients = sync
    inputs, logps, entropies = _batch(2)
    want = _check(trainer, inputs, logps, entropies, calls)
    assert want[1][1] is not None and "policy_loss" in want[2][mode]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_advantages_per_token(loss_type, calls):
    """(B, T) advantages: any values at token level; constant on each row's tokens (padding may
    differ) at sequence level."""
    inputs, logps, entropies = _batch(3)
    inputs["advantages"] = torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    _check(_trainer(loss_type, "token"), inputs, logps, entropies, calls)
    calls.clear()
    per_row = torch.tensor([0.8, -1.3, 0.5, -0.7, 1.1])[:, None].expand(B, T).clone()
    per_row[_mask() == 0] = 9.0
    inputs["advantages"] = per_row
    _check(_trainer(loss_type, "sequence"), inputs, logps, entropies, calls)


def test_all_rows_empty(calls):
    inputs, logps, entropies = _batch(4)
    inputs["completion_mask"] = torch.zeros(B, T, dtype=torch.long)
    inputs["num_items_in_batch"] = torch.tensor(0.0)
    for loss_type in LOSS_TYPES:
        calls.clear()
        _check(_trainer(loss_type, "sequence", beta=0.04), *_with_ref(inputs, logps), entropies, calls)


def _with_ref(inputs, logps):
    return {**inputs, "ref_per_token_logps": logps.detach() + 0.1}, logps


# --- huge log-ratios: exact inside the op's bounds, TRL's own outside -------------------------


@pytest.mark.parametrize("excess", [30.0, 22.0])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_huge_log_ratio(loss_type, level, excess, calls):
    """+30 (or +22) on a 7-token row: token level leaves the op's bound (20) for clip and sapo; the
    row's mean (≈ 4) stays inside the sequence bound (10). CISPO clamps at epsilon_high either way."""
    inputs, logps, entropies = _batch(5)
    inputs["old_per_token_logps"][0, 4] = logps[0, 4].detach() - excess
    outside = level == "token" and loss_type != "cispo"
    _check(
        _trainer(loss_type, level), inputs, logps, entropies, calls, "trl-after-op" if outside else "fastppo"
    )


@pytest.mark.parametrize("excess", [30.0, 12.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_huge_sequence_log_ratio(loss_type, excess, calls):
    """+30 (or +12) on the single-token row: its mean log-ratio passes the op's sequence bound (10)."""
    inputs, logps, entropies = _batch(6)
    inputs["old_per_token_logps"][3, 0] = logps[3, 0].detach() - excess
    path = "fastppo" if loss_type == "cispo" else "trl-after-op"
    _check(_trainer(loss_type, "sequence"), inputs, logps, entropies, calls, path)


@pytest.mark.parametrize("delta, path", [(30.0, "trl-after-op"), (21.0, "trl-after-op"), (-30.0, "fastppo")])
def test_huge_kl_log_ratio(delta, path, calls):
    """ref − logp above 20: TRL's k3 is exponential there, the op's linear (fallback); −30: equal."""
    inputs, logps, entropies = _batch(7, beta=0.04)
    inputs["ref_per_token_logps"][4, 2] = logps[4, 2].detach() + delta
    _check(_trainer("cispo", "token", beta=0.04), inputs, logps, entropies, calls, path)


# --- fallbacks ---------------------------------------------------------------------------------

CONFIG_FALLBACKS = {
    "vespo": dict(loss_type="vespo", vllm=True),
    "luspo": dict(loss_type="luspo", level="sequence"),
    "delta": dict(args_delta=1.5),
    "off-policy-mask": dict(off_policy_mask_threshold=0.3),
    "entropy-quantile": dict(top_entropy_quantile=0.5),
    "bias-correction-kl": dict(beta=0.04, args_use_bias_correction_kl=True),
    "adaptive-entropy": dict(_entropy_bonus_enabled=True, use_adaptive_entropy=True, entropy_coef=0.01),
    "cispo-epsilon-high": dict(loss_type="cispo", epsilon_high=0.9),
    "aux-loss": dict(aux_loss_enabled=True),
}


@pytest.mark.parametrize("override", CONFIG_FALLBACKS.values(), ids=CONFIG_FALLBACKS.keys())
def test_config_fallback_runs_trl(override, calls):
    trainer = _trainer(**override)
    inputs, logps, entropies = _batch(8, beta=trainer.beta, is_ratio="token" if trainer.use_vllm else None)
    aux = torch.tensor(0.3, requires_grad=True) if trainer.aux_loss_enabled else None
    _check(trainer, inputs, logps, entropies, calls, "trl", aux=aux)


def test_delta_applies_to_clip_losses_only(calls):
    """TRL ignores delta for cispo and sapo: the op runs them."""
    inputs, logps, entropies = _batch(9)
    for loss_type in ("cispo", "sapo"):
        calls.clear()
        _check(_trainer(loss_type, args_delta=1.5), inputs, logps, entropies, calls)


def test_half_precision_logps_run_trl_on_the_same_scoring(calls):
    inputs, logps, entropies = _batch(10, dtype=torch.bfloat16, beta=0.04)
    _check(_trainer("grpo", "sequence", beta=0.04), inputs, logps, entropies, calls, "trl")


@pytest.mark.parametrize(
    "loss_type, path", [("grpo", "trl-after-op"), ("sapo", "trl-after-op"), ("cispo", "fastppo")]
)
def test_sequence_level_advantages_varying_in_a_row(loss_type, path, calls):
    inputs, logps, entropies = _batch(11)
    inputs["advantages"] = torch.randn(B, T, generator=torch.Generator().manual_seed(11))
    _check(_trainer(loss_type, "sequence"), inputs, logps, entropies, calls, path)


@pytest.mark.parametrize("override", [dict(loss_type="nope"), dict(importance_sampling_level="nope")])
def test_unknown_options_raise_trl_error(override, calls):
    inputs, logps, entropies = _batch(12)
    trainer = _trainer(**override)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    with pytest.raises(ValueError, match="Unknown"), adapter.patched():
        GRPOTrainer._compute_loss(trainer, None, inputs)
    assert calls["trl"] == 1 and calls["fastppo"] == 0


def test_config_fallback_reasons():
    assert trl_grpo._config_fallback(_trainer()) is None
    assert trl_grpo._config_fallback(_trainer("sapo", args_sapo_temperature_neg=0.0)) is not None
    assert trl_grpo._config_fallback(_trainer("grpo", epsilon_low=0.0)) is not None
    assert trl_grpo._config_fallback(_trainer("cispo", epsilon_high=math.exp(11))) is not None
    assert trl_grpo._config_fallback(_trainer("grpo", beta=-0.1)) is not None


def test_unknown_option_falls_back_and_logs_its_reason_once(calls, caplog, monkeypatch):
    """An option the allow-list has never seen (here one a newer TRL might add) runs TRL's loss,
    whatever its value; the reason is logged the first time only."""
    monkeypatch.setattr(trl_grpo, "_LOGGED", set())
    inputs, logps, entropies = _batch(14)
    trainer = _trainer(args_loss_rescaling_of_a_newer_trl=None)
    with caplog.at_level("WARNING", logger=trl_grpo.__name__):
        _check(trainer, inputs, logps, entropies, calls, "trl")
        calls.clear()
        _check(trainer, inputs, logps, entropies, calls, "trl")
    logged = [r.getMessage() for r in caplog.records if r.name == trl_grpo.__name__]
    assert logged == ["fastppo: TRL's own GRPO loss runs: option 'loss_rescaling_of_a_newer_trl' is not one "
                      "fastppo's GRPO loss knows (trl 1.16.0)"]  # fmt: skip


def test_allow_list_knows_every_grpo_config_option():
    """Every field GRPOConfig adds to TrainingArguments in trl 1.16.0 is listed once, as reaching
    the loss (checked by the rules) or not; a real GRPOConfig has no unknown option."""
    from trl import GRPOConfig

    own = set(trl_grpo._own_fields(GRPOConfig))
    assert trl_grpo._LOSS_OPTIONS | trl_grpo._OTHER_OPTIONS == own
    assert not trl_grpo._LOSS_OPTIONS & trl_grpo._OTHER_OPTIONS
    assert set(trl_grpo._options(GRPOConfig(output_dir="unused", use_cpu=True))) == own


# --- patch / unpatch ---------------------------------------------------------------------------


def test_patch_sets_the_class_entry_and_unpatch_restores_it():
    adapter.unpatch()
    original = vars(GRPOTrainer)["_compute_loss"]
    assert original.__module__ == "trl.trainer.grpo_trainer"
    adapter.patch()
    try:
        assert vars(GRPOTrainer)["_compute_loss"] is trl_grpo.grpo_compute_loss
        assert TRL.original(trl_grpo._MODULE, trl_grpo._METHOD) is original
    finally:
        adapter.unpatch()
    assert vars(GRPOTrainer)["_compute_loss"] is original


def test_data_fallback_restores_the_scoring_method(calls):
    """The data fallback answers TRL's scoring call through an instance attribute, then removes it
    (or puts back the instance's own)."""
    inputs, logps, entropies = _batch(13, dtype=torch.bfloat16)

    class Trainer(types.SimpleNamespace):
        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            calls["score"] += 1
            return logps, entropies, None

    trainer = Trainer(**vars(_trainer()), _metrics={"train": defaultdict(list)})
    with adapter.patched():
        GRPOTrainer._compute_loss(trainer, None, inputs)
        assert "_get_per_token_logps_and_entropies" not in vars(trainer)
        own = lambda *args, **kwargs: (logps, entropies, None)  # noqa: E731
        trainer._get_per_token_logps_and_entropies = own
        GRPOTrainer._compute_loss(trainer, None, inputs)
        assert trainer._get_per_token_logps_and_entropies is own
    assert dict(calls) == {"score": 1, "trl": 2}  # bf16: no op call; one forward for two losses


# --- a real trainer ----------------------------------------------------------------------------


REAL_CONFIGS = {
    "defaults": dict(),  # trl 1.16.0: dapo, token level, beta 0
    "grpo-sequence-kl-entropy": dict(
        loss_type="grpo",
        importance_sampling_level="sequence",
        beta=0.04,
        entropy_coef=0.01,
        use_bias_correction_kl=False,  # TRL's default (True) falls back
    ),  # fmt: skip
}


@pytest.mark.parametrize("config", REAL_CONFIGS.values(), ids=REAL_CONFIGS.keys())
def test_real_grpo_trainer_takes_the_op_path(config, tmp_path, calls, monkeypatch):
    """A short GRPOTrainer run (tiny model, CPU), patched, against the same run with TRL's loss
    put back (the log-prob functions stay patched: only the loss differs). Every loss goes through
    the op (no fallback on a real trainer's attributes), and the logged losses and gradient norms
    are TRL's. (Patched log-prob functions alone move this tiny model's gradient norm by ~0.3%:
    its gradient amplifies fp32 rounding; TRL's fused head and a plain log_softmax differ as much.)"""
    from datasets import Dataset
    from trl import GRPOConfig

    from fastppo.trainer.tiny import build_policy, build_tokenizer, synthetic_prompts

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    build_policy(tokenizer, seed=0).save_pretrained(tmp_path / "model")

    def run(name):
        args = GRPOConfig(
            output_dir=str(tmp_path / name), use_cpu=True, max_steps=2, per_device_train_batch_size=4,
            seed=0, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
            num_generations=4, max_completion_length=4, learning_rate=1e-1, optim="sgd",
            num_iterations=2,  # the second step reuses the completions: ratios differ from 1
            **config,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=str(tmp_path / "model"),
            reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": synthetic_prompts(8, seed=0)}),
            processing_class=tokenizer,
        )
        trainer.train()
        return torch.tensor([(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h])

    with adapter.patched():
        with monkeypatch.context() as m:
            m.setattr(GRPOTrainer, "_compute_loss", calls.trl_loss)
            base = run("base")
        patched = run("patched")
    assert dict(calls) == {"fastppo": 2}, dict(calls)
    assert base.shape == (2, 2) and base[:, 0].abs().max() > 1e-3
    torch.testing.assert_close(patched, base, rtol=1e-5, atol=1e-6)
