"""The registries write the config: a registered estimator or loss, with its own hyperparameter,
reaches the CLI's choices, --help, the config, its validation and the compute function, with no
other file touched; --help shows each flag a preset uses with its real default, once; and every
preset resolves to the config it had before the registries wrote it."""

import contextlib
import json
import re
from dataclasses import asdict

import pytest

from fastppo import cli
from fastppo.trainer import config
from fastppo.trainer.algorithms import ADVANTAGES, POLICY_LOSSES, PRESETS
from fastppo.trainer.registry import Above, Hyperparameter, register_advantage, register_policy_loss

pytestmark = pytest.mark.usefixtures("loop_backend")

FAST = ["--iterations", "1", "--batch_size", "16", "--minibatch_size", "8", "--report_to", "none"]

# --------------------------------------------------------------------------------------------
# Every preset's config, as it was before the registries wrote the config (captured then).

PPO = {
    "advantage": "gae", "algo": "ppo", "attention": "auto", "batch_size": 128, "clip_high": None,
    "clip_low": 0.2, "critic": None, "critic_lr": 0.003, "data_config": None, "data_split": "train",
    "device": "auto", "drop_truncated": False, "dual_clip": None, "dynamic_sampling": False,
    "entropy_coef": 0.0, "format_regex": "^<think>.*?</think>\\s*<answer>.*?</answer>$", "fsdp": False,
    "fused_lm_head": True, "gamma": 1.0, "gradient_checkpointing": False, "group_size": 1,
    "iterations": 200, "kl_coef": 0.01, "kl_estimator": "k1", "kl_horizon": 10000, "kl_in": "reward",
    "kl_target": None, "lam": 0.95, "lora_alpha": 32, "lora_dropout": 0.0, "lora_r": 0,
    "lora_target_modules": "all-linear", "loss_agg": "token-mean", "lr": 0.003, "lr_scheduler": "constant",
    "max_grad_norm": 1.0, "max_new_tokens": 8, "max_nonfinite_steps": 3, "max_tokens_per_microbatch": 4096,
    "minibatch_size": 64, "output_dir": "fastppo-runs/ppo", "overwrite": False, "padding_free": None,
    "policy": None, "policy_loss": "ppo-clip", "ppo_epochs": 2, "prompt_column": "prompt", "prompts": None,
    "report_to": None, "resume": False, "reward": "echo", "reward_batch_size": 32, "reward_weights": None,
    "rollout_engine": "hf", "rollout_is": "off", "rollout_is_high": 2.0, "rollout_is_low": None,
    "rollout_is_mode": "truncate", "sapo_tau_neg": 1.05, "sapo_tau_pos": 1.0, "save_every": 0,
    "save_total_limit": 0, "seed": 0, "temperature": 1.0, "top_p": 1.0, "value_clip": 0.2,
    "value_coef": 0.5, "verify_sync_every": 50, "vllm_gpu_memory_utilization": 0.3, "vllm_server_url": None,
    "vllm_sleep": True, "warmup_steps": 0, "whiten_advantages": True,
}  # fmt: skip
_GROUPED = {"advantage": "grpo", "group_size": 8, "kl_estimator": "k3", "kl_in": "loss"}
CHANGED = {  # what each preset sets differently from ppo (besides algo and output_dir)
    "ppo": {},
    "grpo": _GROUPED,
    "dr_grpo": _GROUPED | {"advantage": "dr_grpo", "loss_agg": "seq-mean-token-sum-norm"},
    "rloo": _GROUPED | {"advantage": "rloo"},
    "reinforce++": {"advantage": "reinforce++"},
    "dapo": _GROUPED | {"clip_high": 0.28, "drop_truncated": True, "kl_coef": 0.0},
    "gspo": _GROUPED | {"clip_high": 0.0004, "clip_low": 0.0003, "loss_agg": "seq-mean-token-mean",
                        "policy_loss": "gspo"},
    "cispo": _GROUPED | {"clip_high": 4.0, "clip_low": 1.0, "policy_loss": "cispo"},
}  # fmt: skip


@pytest.mark.parametrize("name", list(CHANGED))
def test_every_preset_resolves_as_before(name):
    want = PPO | CHANGED[name] | {"algo": name, "output_dir": f"fastppo-runs/{name}"}
    assert asdict(config.PPOConfig(algo=name)) == want
    assert asdict(cli.parse_train_config(name, [])) == want  # the CLI's defaults are the same values


def test_an_override_keeps_the_rest_of_the_preset():
    """--advantage gae on the grpo preset: the preset's group size and KL placement stay."""
    cfg = cli.parse_train_config("grpo", ["--advantage", "gae", "--clip_high", "0.3"])
    assert asdict(cfg) == PPO | _GROUPED | {"advantage": "gae", "clip_high": 0.3, "algo": "grpo",
                                            "output_dir": "fastppo-runs/grpo"}  # fmt: skip


# --------------------------------------------------------------------------------------------
# A toy estimator and a toy loss, registered here only.

TOY_SHIFT = Hyperparameter("toy_shift", float, 0.5, "Toy: the advantages are multiplied by it.", Above(0))
TOY_TEMP = Hyperparameter("toy_temp", float, 3.0, "Toy: the policy loss is multiplied by it.", Above(0))


@contextlib.contextmanager
def toy_entries():
    """Register toy_adv (grpo's advantages times toy_shift) and toy_loss (ppo-clip times toy_temp);
    yield the hyperparameter values their compute functions receive; unregister them."""
    received = []

    @register_advantage("toy_adv", "toy: grpo's advantages times toy_shift", needs_groups=True,
                        token_rewards=False, kl_in="loss", params=(TOY_SHIFT,))  # fmt: skip
    def toy_adv(x, *, toy_shift):
        received.append(("toy_shift", toy_shift))
        advantages, returns = ADVANTAGES["grpo"].compute(x)
        return advantages * toy_shift, returns

    @register_policy_loss("toy_loss", "toy: ppo-clip times toy_temp", params=(TOY_TEMP,))
    def toy_loss(x, *, toy_temp):
        received.append(("toy_temp", toy_temp))
        loss, stats = POLICY_LOSSES["ppo-clip"].compute(x, clip_low=0.2, clip_high=None, dual_clip=None)
        return loss * toy_temp, stats

    try:
        yield received
    finally:
        del ADVANTAGES["toy_adv"], POLICY_LOSSES["toy_loss"]


def one_line_error(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_a_registered_estimator_and_loss_reach_the_cli_config_and_compute(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    before = config.ppo_config()
    with toy_entries() as received:
        listing = cli.train_usage()  # `fastppo train --help`
        assert re.search(r"\n  toy_adv +toy: grpo's advantages times toy_shift \[--toy_shift\]\n", listing)
        assert re.search(r"\n  toy_loss +toy: ppo-clip times toy_temp \[--toy_temp\]\n", listing)

        grpo_help = flat(cli.train_parser("grpo", [], {})[1].format_help())
        assert "--advantage {gae,grpo,dr_grpo,rloo,reinforce++,reinforce++-baseline,toy_adv}" in grpo_help
        assert "--policy_loss {ppo-clip,gspo,cispo,sapo,geo_mean,toy_loss}" in grpo_help
        assert "--toy_shift FLOAT" not in grpo_help  # grpo does not read it: named in the epilog only
        assert "--advantage toy_adv: --toy_shift" in grpo_help
        assert "--policy_loss toy_loss: --toy_temp" in grpo_help
        chosen = ["--advantage", "toy_adv", "--policy_loss", "toy_loss"]
        toy_help = flat(cli.train_parser("grpo", chosen, {})[1].format_help())
        assert "--toy_shift FLOAT Toy: the advantages are multiplied by it. (default: 0.5)" in toy_help
        assert "--toy_temp FLOAT Toy: the policy loss is multiplied by it. (default: 3.0)" in toy_help
        assert "--clip_low FLOAT" not in toy_help  # ppo-clip's flags: toy_loss does not read them

        cfg = cli.parse_train_config("grpo", [*chosen, "--toy_shift", "2"])
        assert (cfg.toy_shift, cfg.toy_temp) == (2.0, 3.0) and asdict(cfg)["toy_temp"] == 3.0
        err = one_line_error(capsys, "train", "grpo", *chosen, "--toy_shift", "-1", *FAST)
        assert err == "fastppo train grpo: toy_shift must be > 0, got -1.0"
        (tmp_path / "toy.yaml").write_text("toy_temp: warm\n")
        err = one_line_error(capsys, "train", "grpo", str(tmp_path / "toy.yaml"))
        assert err.endswith("toy.yaml: toy_temp: 'warm' is not a valid float")

        out = tmp_path / "run"
        argv = ["train", "grpo", *chosen, "--toy_shift", "2", "--toy_temp", "0.25", *FAST]
        argv += ["--output_dir", str(out)]
        assert cli.main(argv) == 0
        saved = json.loads((out / "config.json").read_text())  # what the run was asked, written by it
        assert (saved["advantage"], saved["toy_shift"], saved["policy_loss"], saved["toy_temp"]) == (
            "toy_adv", 2.0, "toy_loss", 0.25)  # fmt: skip
        # one estimator call per iteration; one loss call per micro-batch (2 epochs × 2 mini-batches)
        assert received.count(("toy_shift", 2.0)) == 1 and received.count(("toy_temp", 0.25)) >= 4
        assert {name for name, _ in received} == {"toy_shift", "toy_temp"} and len(set(received)) == 2
    assert config.ppo_config() is before  # unregistered: the built-ins' config class again
    assert "--toy_shift" not in cli.train_parser("grpo", [], {})[1].format_help()
    with pytest.raises(ValueError, match="advantage must be one of"):
        config.PPOConfig(algo="grpo", advantage="toy_adv")


def test_registering_the_same_name_or_a_clashing_hyperparameter_fails():
    with pytest.raises(ValueError, match="policy loss 'sapo' is already registered"):
        register_policy_loss("sapo", "again")(lambda x: None)
    other_clip = Hyperparameter("clip_low", float, 0.1, "another meaning")
    with pytest.raises(ValueError, match="hyperparameter clip_low is declared otherwise elsewhere"):
        register_policy_loss("clip2", "x", params=(other_clip,))(lambda x, clip_low: None)
    with pytest.raises(ValueError, match="hyperparameter default: bad must be > 0, got 0.0"):
        Hyperparameter("bad", float, 0.0, "a default out of its own range", Above(0))
    assert "clip2" not in POLICY_LOSSES


# --------------------------------------------------------------------------------------------
# --help.


def flat(text: str) -> str:
    return " ".join(text.split())


def flag_entries(help_text: str) -> dict[str, str]:
    """{flag: its help, on one line} of each flag --help lists (the epilog left out)."""
    body = help_text.split("\nflags of the other estimators")[0]
    body = "\n".join(line for line in body.splitlines() if line.startswith(" "))  # no section titles
    entries = re.split(r"\n  (?=--)", "\n" + body)[1:]
    return {entry.split()[0]: flat(entry) for entry in entries}


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_help_lists_the_flags_it_uses_each_default_once(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = cli.train_parser(name, [], {})[1].format_help()
    assert text.startswith(f"usage: fastppo train {name} [CONFIG.json|yaml] [--flag value ...]\n\n")
    entries = flag_entries(text)
    resolved = asdict(config.PPOConfig(algo=name))
    for flag, entry in entries.items():
        assert entry.count("(default") <= 1 and "(default: None)" not in entry, entry
        value = resolved[flag[2:]]
        if value is not None:  # the preset's own value, as the run will use it
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            assert entry.endswith(f"(default: {shown})"), entry
    others = re.findall(r"\n  --\w+ \S+: (.*)", text.partition("\nflags of the other estimators")[2])
    epilog = {flag for line in others for flag in re.findall(r"--(\w+)", line)}
    every = set(resolved) - {"algo"}  # the preset is NAME itself
    assert {f[2:] for f in entries} | epilog == every  # each flag listed, or named as another choice's
    listed = {f[2:] for f in entries}
    critic = {"critic", "critic_lr", "value_clip", "value_coef", "lam"}
    estimator = ADVANTAGES[resolved["advantage"]]
    if estimator.needs_critic:
        assert critic <= listed
    else:  # no critic, value or GAE flags
        assert not critic & listed and critic <= epilog
    assert ("gamma" in listed) == ("gamma" in estimator.reads)  # the discount: gae and reinforce++
    assert ("--sapo_tau_pos" in entries) == (resolved["policy_loss"] == "sapo")


def test_help_follows_the_choices_on_the_command_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    gae = flag_entries(cli.train_parser("grpo", ["--advantage=gae"], {})[1].format_help())
    assert {"--critic", "--value_clip", "--lam", "--critic_lr"} <= gae.keys()
    assert gae["--group_size"].endswith("(default: 8)")  # still the grpo preset
    sapo = flag_entries(cli.train_parser("ppo", [], {"policy_loss": "sapo"})[1].format_help())
    assert sapo["--sapo_tau_neg"].endswith("(default: 1.05)") and "--dual_clip" not in sapo
    dapo = flag_entries(cli.train_parser("dapo", [], {})[1].format_help())
    assert dapo["--clip_high"].endswith("(default: 0.28)") and dapo["--kl_coef"].endswith("(default: 0.0)")


def test_ppo_help_is_short(monkeypatch):
    """Grouped flags after a one-line usage (it was 270 lines, 45 of them usage, at 100 columns)."""
    monkeypatch.setenv("COLUMNS", "100")
    text = cli.train_parser("ppo", [], {})[1].format_help()
    assert len(text.splitlines()) < 200
    assert "--padding-free" not in text and "--no_fused_lm_head" not in text  # accepted, not listed
    cfg = cli.parse_train_config("ppo", ["--padding-free", "true", "--no_fused_lm_head", "--resume"])
    assert (cfg.padding_free, cfg.fused_lm_head, cfg.resume) == (True, False, True)


def test_offline_help_and_flags(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = cli.train_parser("dpo", [], {})[1].format_help()
    entries = flag_entries(text)
    assert entries["--beta"].endswith("(default: 0.1)")
    assert entries["--output_dir"].endswith("(default: fastppo-runs/dpo)")
    assert not any("(default: None)" in entry for entry in entries.values())
    cfg = cli.parse_train_config("dpo", ["--beta", "0.2", "--lora_r", "4"])
    assert (cfg.beta, cfg.lora_r, cfg.output_dir) == (0.2, 4, "fastppo-runs/dpo")
