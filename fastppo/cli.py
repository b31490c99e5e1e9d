"""The ``fastppo`` command.

- ``fastppo env``: versions, devices, the active backend and whether fastppo._C is built.
- ``fastppo train PRESET|dpo|rm|sft [FILE] [--field value ...]``: train (FILE: a JSON or YAML
  config; flags override it). ``fastppo train --help`` lists the presets.
- ``fastppo eval --policy DIR [...]``: reward, KL, length and diversity on held-out prompts.
"""

import argparse
import importlib.metadata
import os
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> str:
    """The text that ``fastppo env`` prints."""
    import torch

    import fastppo
    from fastppo import _backend, packing

    lines = [
        f"fastppo        {fastppo.__version__} ({os.path.dirname(fastppo.__file__)})",
        f"python         {platform.python_version()} ({sys.executable})",
        f"torch          {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"triton         {_version('triton') if _backend.TRITON_AVAILABLE else 'not installed'}"
        f" (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})",
        f"transformers   {_version('transformers')}",
        f"numpy          {_version('numpy')}",
        f"flash-attn     {_version('flash-attn')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(
                f"cuda:{i}         {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs"
            )
    else:
        lines.append("cuda           no CUDA device")
    lines.append(f"FASTPPO_BACKEND {os.environ.get('FASTPPO_BACKEND', 'auto (unset)')}")
    lines.append(f"backend (cpu)  {fastppo.active_backend('cpu')}")
    if torch.cuda.is_available():
        lines.append(f"backend (cuda) {fastppo.active_backend('cuda')}")
    if packing.extension_available():
        lines.append(f"fastppo._C     built ({packing._C.__file__})")
    else:
        lines.append(f"fastppo._C     NOT BUILT: {packing.EXTENSION_ERROR}")
    return "\n".join(lines)


OFFLINE = {
    "sft": "supervised fine-tuning, the loss on response tokens only (rows: prompt, response)",
    "rm": "reward model, −log σ(r_chosen − r_rejected) (rows: prompt, chosen, rejected)",
    "dpo": "direct preference optimisation against a frozen reference (rows: prompt, chosen, rejected)",
}


def presets():
    from fastppo.trainer.algorithms import PRESETS

    return PRESETS


def train_usage() -> str:
    """What ``fastppo train --help`` prints: every preset and offline loop, one line each."""
    lines = ["usage: fastppo train NAME [CONFIG.json|yaml] [--field value ...]", "", "online presets:"]
    lines += [f"  {name:<12} {preset.summary}" for name, preset in presets().items()]
    lines += ["", "offline loops:"] + [f"  {name:<12} {summary}" for name, summary in OFFLINE.items()]
    lines += ["", "`fastppo train NAME --help` lists NAME's flags."]
    return "\n".join(lines)


def _group_flags(parser) -> None:
    """Move the flags of PPOConfig's fields into the help sections of ``config.SECTIONS``."""
    from fastppo.trainer.config import SECTIONS

    section_of = {name: section for section, names in SECTIONS.items() for name in names}
    groups = {section: parser.add_argument_group(section) for section in SECTIONS}
    default = parser._action_groups[1]  # argparse's "options" section
    for action in list(default._group_actions):
        if action.dest in section_of:
            default._group_actions.remove(action)
            groups[section_of[action.dest]]._group_actions.append(action)


def parse_train_config(name: str, argv: list[str]):
    """The config of ``name`` from an optional JSON/YAML file and command-line flags (flags win)."""
    import json

    import yaml
    from transformers import HfArgumentParser

    from fastppo.trainer import config

    classes = {"dpo": config.DPOConfig, "rm": config.RMConfig, "sft": config.SFTConfig}
    dataclass_type = classes.get(name, config.PPOConfig)
    description = OFFLINE.get(name) or presets()[name].summary
    parser = HfArgumentParser(dataclass_type, prog=f"fastppo train {name}", description=description)
    if name not in OFFLINE:
        parser.set_defaults(algo=name)
        _group_flags(parser)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        path, argv = argv[0], argv[1:]
        with open(path) as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        fields = {a.dest for a in parser._actions}
        unknown = sorted(set(values or {}) - fields)
        if unknown:
            raise SystemExit(f"{path}: unknown config fields {unknown}")
        parser.set_defaults(**(values or {}))
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


def train_command(algo: str, argv: list[str]) -> int:
    try:
        cfg = parse_train_config(algo, argv)
    except ValueError as exc:  # a bad value, named by the config's checks
        print(f"fastppo train {algo}: {exc}", file=sys.stderr)
        return 2
    if algo not in OFFLINE:
        import torch.distributed as dist

        from fastppo.trainer.ppo import train

        history = train(cfg)
        if dist.is_initialized():  # launched by torchrun
            dist.destroy_process_group()
        if history:
            first, last = history[0]["reward"], history[-1]["reward"]
            print(
                f"mean reward {first:.3f} → {last:.3f} over {len(history)} iterations; "
                f"saved in {cfg.output_dir}"
            )
        return 0
    from fastppo.trainer import offline

    run = {"dpo": offline.train_dpo, "rm": offline.train_reward_model, "sft": offline.train_sft}[algo]
    history = run(cfg)
    evals = [r for r in history if any(k.startswith("eval_") for k in r)]
    summary = (
        ", ".join(f"{k} {v:.3f}" for k, v in evals[-1].items() if k.startswith("eval_")) if evals else ""
    )
    print(f"{algo}: {history[-1]['step'] if history else 0} steps; {summary}; saved in {cfg.output_dir}")
    return 0


def eval_command(argv: list[str]) -> int:
    import json

    from transformers import HfArgumentParser

    from fastppo.trainer.evaluate import EvalConfig, evaluate

    try:
        (cfg,) = HfArgumentParser(EvalConfig, prog="fastppo eval").parse_args_into_dataclasses(args=argv)
    except ValueError as exc:
        print(f"fastppo eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(evaluate(cfg), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastppo", description="fastppo: fused RL fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, devices, the active backend and the extension's status")
    train = sub.add_parser("train", help="train a policy (see `fastppo train --help`)", add_help=False)
    train.add_argument("algo", nargs="?", choices=[*presets(), *OFFLINE])
    sub.add_parser("eval", help="evaluate a policy (see `fastppo eval --help`)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "eval":
        return eval_command(rest)
    if args.command == "env":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        print(env_report())
        return 0
    if args.algo is None:
        print(train_usage())
        return 0 if rest and rest[0] in ("-h", "--help") else 2
    return train_command(args.algo, rest)


if __name__ == "__main__":
    sys.exit(main())
