"""The registries of advantage estimators and policy losses (each entry against the op it names),
the loss aggregations, the presets (each trains the embedded default) and their config and CLI."""

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import fastppo
from fastppo.trainer import algorithms, ppo
from fastppo.trainer.algorithms import ADVANTAGES, POLICY_LOSSES, PRESETS, AdvantageInputs, PolicyLossInputs
from fastppo.trainer.config import PPOConfig

pytestmark = pytest.mark.usefixtures("loop_backend")


def batch(seed=0, B=6, R=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(R)[None, :] < torch.tensor([5, 3, 1, 4, 5, 2])[:B, None]
    return AdvantageInputs(
        scores=torch.rand(B, generator=g), mask=mask, group_ids=torch.arange(B) // 3,
        values=torch.randn(B, R, generator=g) * mask, kl=torch.rand(B, R, generator=g) * 0.1 * mask,
        kl_coef=0.2, gamma=0.9, lam=0.8,
    )  # fmt: skip


def test_registries_cover_the_presets():
    """Each preset names registered entries and sets only config fields; each entry's flags are
    config fields; the registries are not empty (the built-ins register when algorithms imports)."""
    assert ADVANTAGES and POLICY_LOSSES and PRESETS
    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    for preset in PRESETS.values():
        assert preset.defaults["advantage"] in ADVANTAGES
        assert preset.defaults.get("policy_loss", "ppo-clip") in POLICY_LOSSES
        assert set(preset.defaults) <= fields, preset.name
    for entry in (*ADVANTAGES.values(), *POLICY_LOSSES.values()):
        assert {p.name for p in entry.params} | set(entry.reads) <= fields, entry.name
    assert any(e.needs_critic for e in ADVANTAGES.values())  # the critic's flags have an owner
    with pytest.raises(ValueError, match="preset bad must set group_size, kl_in, kl_estimator"):
        algorithms.Preset("bad", "no group size", dict(advantage="grpo"))


def test_gae_entry():
    x = batch()
    rewards = fastppo.shape_rewards(x.scores, x.mask, kl=x.kl, kl_coef=0.2)
    want = fastppo.gae(rewards, x.values, x.mask, gamma=0.9, lam=0.8)
    for got, w in zip(ADVANTAGES["gae"].compute(x), want, strict=True):
        torch.testing.assert_close(got, w)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_entries(name):
    x = batch()
    advantages, returns = ADVANTAGES[name].compute(x)
    per_sequence = fastppo.group_advantages(x.scores, x.group_ids, method=name)
    torch.testing.assert_close(advantages, per_sequence[:, None] * x.mask)
    assert returns is None and ADVANTAGES[name].kl_in == "loss" and not ADVANTAGES[name].token_rewards


def test_reinforce_pp_entries():
    """Discounted returns of the KL-shaped rewards, whitened over the batch's tokens; the baseline
    variant subtracts the group mean from the scores first."""
    x = batch()
    for name, scores in (
        ("reinforce++", x.scores),
        ("reinforce++-baseline", fastppo.group_advantages(x.scores, x.group_ids, method="dr_grpo")),
    ):
        returns = fastppo.discounted_returns(
            fastppo.shape_rewards(scores, x.mask, kl=x.kl, kl_coef=0.2), x.mask, gamma=0.9
        )
        got, _ = algorithms.advantages(ADVANTAGES[name], x, whiten=False)
        torch.testing.assert_close(got, fastppo.masked_whiten(returns, x.mask) * x.mask)
        assert got[x.mask].mean().abs() < 1e-6


def test_whitening_statistics_come_from_kept_responses():
    x = batch()
    keep = torch.tensor([True, False, True, True, False, True])
    got, _ = algorithms.advantages(ADVANTAGES["gae"], x, whiten=True, keep=keep)
    kept = got[x.mask & keep[:, None]]
    assert kept.mean().abs() < 1e-6 and (kept.std() - 1).abs() < 1e-3
    assert (got[~x.mask] == 0).all()


#: What each policy loss is: its member of fastppo.ppo_policy_loss's family and the op options its
#: hyperparameters become (at HYPERPARAMETERS' values). A new loss adds its row here.
_CLIPS = dict(clip_low=0.2, clip_high=0.28)
OP_OF_LOSS = {
    "ppo-clip": dict(loss="clip", ratio_level="token", dual_clip=3.0, **_CLIPS),
    "gspo": dict(loss="clip", ratio_level="sequence", dual_clip=3.0, **_CLIPS),
    "cispo": dict(loss="cispo", **_CLIPS),
    "sapo": dict(loss="sapo", sapo_tau=(1.0, 2.0)),  # the clip options do not change sapo (below)
    "geo_mean": dict(loss="geo_mean", **_CLIPS),
}
HYPERPARAMETERS = SimpleNamespace(clip_low=0.2, clip_high=0.28, dual_clip=3.0, sapo_tau_pos=1.0,
                                  sapo_tau_neg=2.0)  # fmt: skip


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
@pytest.mark.parametrize("corrected", [False, True])
def test_policy_loss_entries_are_the_op(name, corrected):
    """Each entry is the op over the packed response tokens (a row per response, by cu_seqlens),
    its hyperparameters given from a config (``bound``)."""
    assert name in OP_OF_LOSS, f"policy loss {name}: add the op member it is to OP_OF_LOSS"
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 0, 3, 1, 7, 4])
    n = int(lengths.sum())
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    logp = (-torch.rand(n, generator=g) * 3).requires_grad_()
    old, adv, ref, roll = (
        logp.detach() + torch.randn(n, generator=g) * 0.2,
        torch.randn(n, generator=g),
        logp.detach() - 0.1,
        logp.detach() + torch.randn(n, generator=g) * 0.1,
    )
    weights, entropy = torch.rand(n, generator=g), torch.rand(n, generator=g) * 2
    rc = fastppo.RolloutCorrection("sequence", "mask", 1.5, 0.5) if corrected else None
    roll = roll if corrected else None
    x = PolicyLossInputs(logp=logp, old_logp=old, advantages=adv, weights=weights, cu_seqlens=cu,
                         ref_logp=ref, kl_coef=0.1, kl_estimator="k2", entropy=entropy, entropy_coef=0.01,
                         rollout_logp=roll, rollout_correction=rc)  # fmt: skip
    loss_value, stats = POLICY_LOSSES[name].bound(HYPERPARAMETERS).compute(x)
    common = dict(agg="token-sum", ref_logp=ref, kl_coef=0.1, kl_estimator="k2", entropy=entropy,
                  entropy_coef=0.01, cu_seqlens=cu, rollout_logp=roll, rollout_correction=rc)  # fmt: skip
    want, want_stats = fastppo.ppo_policy_loss(logp, old, adv, weights, **common, **OP_OF_LOSS[name])
    torch.testing.assert_close(loss_value, want)
    assert stats.keys() == want_stats.keys()
    assert ("is_weight_mean" in stats) == corrected
    if name == "sapo":  # the trainer once passed the clips to sapo too: the same loss and stats
        clipped, clipped_stats = fastppo.ppo_policy_loss(logp, old, adv, weights, **common, **_CLIPS,
                                                         **OP_OF_LOSS[name])  # fmt: skip
        torch.testing.assert_close(clipped, want)
        for key, value in want_stats.items():
            torch.testing.assert_close(clipped_stats[key], value, msg=key)


def test_loss_aggregations():
    """Per-token weights and the mini-batch normaliser reproduce each aggregation of a (B, R) loss."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    loss = torch.arange(12.0).view(3, 4)
    by_hand = {
        "token-mean": loss[mask].mean(),
        "seq-mean-token-mean": torch.stack([loss[i][mask[i]].mean() for i in range(3)]).mean(),
        "seq-mean-token-sum-norm": torch.stack([loss[i][mask[i]].sum() / 4 for i in range(3)]).mean(),
    }
    assert by_hand.keys() == algorithms.LOSS_AGGREGATIONS.keys()
    lengths = mask.sum(1)  # the packed layout: the (n,) response tokens row by row, their bounds
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    for agg, want in by_hand.items():
        weights = algorithms.token_weights(cu, int(mask.sum()), agg)
        normaliser = algorithms.loss_normaliser(lengths.tolist(), agg, max_new_tokens=4)
        got = (weights * loss[mask]).sum() / normaliser
        torch.testing.assert_close(got, want, msg=agg)


def test_groups_with_spread():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    assert algorithms.groups_with_spread(scores, torch.arange(6) // 3).tolist() == [False] * 3 + [True] * 3


def test_presets_fill_what_is_unset():
    dapo = PPOConfig(algo="dapo")
    assert (dapo.advantage, dapo.clip_high, dapo.kl_coef, dapo.drop_truncated) == ("grpo", 0.28, 0.0, True)
    assert dapo.output_dir == "fastppo-runs/dapo" and dapo.group_size == 8
    assert PPOConfig(algo="dapo", clip_high=0.3, kl_coef=0.05).clip_high == 0.3
    ppo_cfg = PPOConfig()
    assert (ppo_cfg.advantage, ppo_cfg.kl_in, ppo_cfg.kl_estimator, ppo_cfg.kl_coef) == (
        "gae",
        "reward",
        "k1",
        0.01,
    )
    assert PPOConfig(algo="dr_grpo").loss_agg == "seq-mean-token-sum-norm"
    assert (
        PPOConfig(algo="ppo", advantage="reinforce++-baseline", group_size=4).advantage
        == "reinforce++-baseline"
    )
    with pytest.raises(ValueError, match="kl_in: advantage grpo scores whole responses"):
        PPOConfig(algo="grpo", kl_in="reward")
    with pytest.raises(ValueError, match="advantage must be one of"):
        PPOConfig(advantage="a2c")
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        PPOConfig(loss_agg="mean")
    gspo = PPOConfig(algo="gspo")
    assert (gspo.policy_loss, gspo.clip_low, gspo.clip_high, gspo.loss_agg) == (
        "gspo",
        3e-4,
        4e-4,
        "seq-mean-token-mean",
    )
    cispo = PPOConfig(algo="cispo")
    assert (cispo.policy_loss, cispo.clip_low, cispo.clip_high, cispo.advantage) == (
        "cispo",
        1.0,
        4.0,
        "grpo",
    )
    assert PPOConfig(algo="grpo", policy_loss="sapo").policy_loss == "sapo"
    assert PPOConfig().rollout_correction() is None
    rc = PPOConfig(rollout_is="sequence", rollout_is_mode="mask", rollout_is_low=0.5).rollout_correction()
    assert rc == fastppo.RolloutCorrection("sequence", "mask", 2.0, 0.5)
    with pytest.raises(ValueError, match="rollout_is must be one of"):
        PPOConfig(rollout_is="seq")
    with pytest.raises(ValueError, match="rollout_is_low must be None or in"):
        PPOConfig(rollout_is="token", rollout_is_low=3.0)
    with pytest.raises(ValueError, match="policy_loss must be one of"):
        PPOConfig(policy_loss="vanilla")


@pytest.mark.parametrize("algo", list(PRESETS))
def test_every_preset_trains_the_default(algo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's own default folder, fastppo-runs/<algo>
    cfg = PPOConfig(
        algo=algo, iterations=3, batch_size=32, minibatch_size=16, dynamic_sampling=algo == "dapo",
        rollout_is="token" if algo == "cispo" else "off",  # rollout correction rides on any preset
    )  # fmt: skip
    history = ppo.train(cfg, log=lambda *_: None)
    assert [h["iteration"] for h in history] == [1, 2, 3]
    expected = {"reward", "kl", "entropy", "policy_loss", "clipfrac", "clipfrac_lower", "approx_kl",
                "approx_kl_k3", "response_length", "updated_fraction"}  # fmt: skip
    if algo == "ppo":
        expected.add("explained_variance")
    if algo == "cispo":
        expected |= {"is_weight_mean", "is_filtered", "rollout_kl", "rollout_kl_k3"}
    for row in history:
        assert expected <= row.keys()
        assert all(row[k] == row[k] for k in expected)  # no NaN
    assert (tmp_path / "fastppo-runs" / algo / "checkpoint-3" / "policy" / "model.safetensors").exists()
    assert (tmp_path / "fastppo-runs" / algo / "critic").exists() is False
    if algo == "dapo":  # truncated responses and groups of equal scores are left out
        assert all(row["updated_fraction"] < 1 for row in history)


def fastppo_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fastppo.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_lists_presets_and_groups_flags():
    listing = fastppo_cli("train", "--help")
    assert listing.returncode == 0
    for name, preset in PRESETS.items():
        assert f"{name} " in listing.stdout and preset.summary in listing.stdout
    assert "dpo" in listing.stdout and "sft" in listing.stdout
    for entry in (*ADVANTAGES.values(), *POLICY_LOSSES.values()):  # the choices of their flags
        assert f"  {entry.name} " in listing.stdout and entry.summary in listing.stdout
    help_text = fastppo_cli("train", "grpo", "--help").stdout
    sections = [f"\n{g}:" for g in ("model", "data", "rollout", "algorithm", "optimisation", "logging")]
    positions = [help_text.find(s) for s in sections]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    assert help_text.find("\n  --kl_in") > help_text.find("\nalgorithm:")
    data_flags = [
        help_text.find(f"\n  --{name} ") for name in ("prompts", "data_split", "reward", "format_regex")
    ]
    assert data_flags == sorted(data_flags) and data_flags[0] > help_text.find("\ndata:"), data_flags
    eval_help = fastppo_cli("eval", "--help").stdout  # its own flags first, the shared ones after
    assert (
        0
        < eval_help.find("\n  --policy ")
        < eval_help.find("\n  --reward ")
        < eval_help.find("\n  --data_split ")
    )


def test_every_field_has_one_help_section():
    from fastppo.trainer.flags import section_fields

    listed = [name for names in section_fields(PPOConfig).values() for name in names]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(PPOConfig))
    algorithm = section_fields(PPOConfig)["algorithm"]  # the losses' own flags follow --policy_loss
    assert algorithm.index("clip_low") == algorithm.index("policy_loss") + 1
