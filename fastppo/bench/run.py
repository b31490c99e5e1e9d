"""Run fastppo's benchmarks; write <device>-<date>.json and a markdown table into --output.

    fastppo bench                                  # every op, full shapes, on CUDA when available
    fastppo bench --quick --device cpu             # tiny shapes (a smoke run of the harness)
    fastppo bench token_logprobs --providers torch,fastppo --modes fwd --output results/
    fastppo bench rollout --models tiny            # the rollout engines (bench_rollout)

Results go to ``--output`` (default ``./bench-results``, in the current directory), never into
the installed package; ``python -m bench`` from the repository root writes to its
``bench/results``. The JSON follows DESIGN §7; cases that ran out of memory or could not run are
kept under "skipped" with the reason.
"""

import argparse
import datetime
import importlib
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

import fastppo
from fastppo.bench import harness

#: Each module serves the ops in its OPS tuple.
BENCH_MODULES = (
    "fastppo.bench.bench_logprobs",
    "fastppo.bench.bench_linear_logprobs",
    "fastppo.bench.bench_losses",
    "fastppo.bench.bench_advantages",
    "fastppo.bench.bench_packing",
    "fastppo.bench.bench_ppo_step",
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-" + (platform.processor() or platform.machine())
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    """The project's commit (``-dirty`` with uncommitted changes) when fastppo runs from its git
    checkout (an editable install), whatever the current directory; else the installed version."""
    root = Path(__file__).resolve().parents[2]
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)  # noqa: E731
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:  # a wheel in site-packages
            return f"fastppo-{fastppo.__version__}"
        commit = git("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:  # no git
        return f"fastppo-{fastppo.__version__}"
    return commit + ("-dirty" if dirty else "")


def markdown_table(result: dict) -> str:
    """One row per measurement, with the speed-ups over eager PyTorch and over the Python loop."""
    copy = result["copy_gbps"]
    lines = [
        f"**{result['device']}** · torch {result['torch']} · triton {result['triton']}"
        f" · commit {result['commit']} · {result['date']} · copy bandwidth {copy:.0f} GB/s",
        "",
        "| op | mode | dtype | shape | provider | ms (p20–p80) | GB/s | % of copy | peak extra MiB"
        " | vs torch | vs python loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    baselines = {"torch": {}, "python_loop": {}}
    for r in result["records"]:
        if r["provider"] in baselines:
            baselines[r["provider"]][(r["op"], r["mode"], r["dtype"], _shape_key(r["shape"]))] = r["ms"]
    for r in result["records"]:
        key = (r["op"], r["mode"], r["dtype"], _shape_key(r["shape"]))
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        gbps = _num(r["gbps"])
        frac = f"{100 * r['gbps'] / copy:.0f}%" if r["gbps"] is not None else "–"
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "–"
        speedups = [f"{b[key] / r['ms']:.2f}×" if key in b else "–" for b in baselines.values()]
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['dtype']} | {shape} | {r['provider']} | "
            f"{r['ms']:.3f} ({r['ms_p20']:.3f}–{r['ms_p80']:.3f}) | {gbps} | {frac} | {peak} | "
            + " | ".join(speedups)
            + " |"
        )
    for s in result.get("skipped", []):
        shape = " ".join(f"{k}={v}" for k, v in s["shape"].items())
        lines.append(
            f"| {s['op']} | {s['mode']} | {s['dtype']} | {shape} | {s['provider']} | {s['reason']} | | | | |"
        )
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _shape_key(shape: dict) -> tuple:
    return tuple((k, v) for k, v in shape.items() if k != "inplace")


#: Where results go when ``--output`` is not given: a folder of the current directory.
DEFAULT_OUTPUT = "bench-results"


def known_ops() -> list[str]:
    """Every op the bench modules serve, in module order."""
    return [op for name in BENCH_MODULES for op in importlib.import_module(name).OPS]


def build_parser(prog: str, default_output: str) -> argparse.ArgumentParser:
    """The flags of ``fastppo bench`` (and of ``python -m bench``, which only differs in its default
    output folder)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        epilog="`%(prog)s rollout --help`: the rollout engines' benchmark (bench_rollout).",
    )
    parser.add_argument(
        "names", nargs="*", metavar="OP", help=f"ops to run (default: all): {', '.join(known_ops())}"
    )
    parser.add_argument("--ops", default="", help="comma-separated ops, the same as naming them")
    parser.add_argument(
        "--providers",
        default="torch,compile,trl,verl,openrlhf,liger,python_loop,fastppo",
        help="comma-separated providers (those not installed are left out)",
    )
    parser.add_argument("--modes", default="fwd,fwd_bwd", help="fwd, fwd_bwd or both")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not a measurement")
    parser.add_argument("--cpu-budget-s", type=float, default=2.0, help="seconds of repeats per case on CPU")
    parser.add_argument(
        "--output",
        "--out",
        default=default_output,
        help=f"folder for the results <device>-<date>.json and .md (default: {default_output}, "
        "from the current directory)",
    )
    return parser


def selected_ops(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The ops named (positionally or by ``--ops``), all when none; an unknown one is a usage error."""
    known = known_ops()
    ops = [*args.names, *(op.strip() for op in args.ops.split(",") if op.strip())]
    unknown = [op for op in ops if op not in known]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; known: {known}")
    return ops or known


def measure(args: argparse.Namespace, ops: list[str], modes: list[str], device: torch.device) -> tuple:
    """(records, skipped) of every selected op's cases."""
    records, skipped = [], []
    for name in BENCH_MODULES:
        module = importlib.import_module(name)
        selected = tuple(op for op in module.OPS if op in ops)
        if not selected:
            continue
        cases = module.benchmarks(
            device=device,
            quick=args.quick,
            providers=args.providers.split(","),
            modes=modes,
            dtype=DTYPES[args.dtype],
            ops=selected,
        )
        got, missed = harness.run_cases(cases, device, cpu_budget_s=args.cpu_budget_s)
        records += got
        skipped += missed
    return records, skipped


def write_result(result: dict, folder: Path) -> Path:
    """``folder/<device>-<date>[-n].json`` and its markdown table beside it; returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{result['device']}-{result['date']}"
    n = 1
    while (folder / f"{stem}.json").exists():
        n += 1
        stem = f"{result['device']}-{result['date']}-{n}"
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / f"{stem}.md").write_text(markdown_table(result))
    return folder / f"{stem}.json"


def main(
    argv: list[str] | None = None, *, prog: str = "fastppo bench", default_output: str = DEFAULT_OUTPUT
) -> int:
    """Run the benchmarks ``argv`` asks for (``rollout`` first: the rollout engines' benchmark)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["rollout"]:
        from fastppo.bench import bench_rollout

        return bench_rollout.main(argv[1:], prog=f"{prog} rollout", default_output=default_output)
    parser = build_parser(prog, default_output)
    args = parser.parse_args(argv)
    ops = selected_ops(parser, args)
    modes = [m.strip() for m in args.modes.split(",")]
    if any(m not in harness.MODES for m in modes):
        parser.error(f"--modes must be drawn from {harness.MODES}, got {args.modes!r}")
    device = torch.device(args.device)

    copy = harness.copy_bandwidth_gbps(device)
    backend = fastppo.active_backend(device)
    print(
        f"device {device_name(device)}, copy bandwidth {copy:.1f} GB/s, fastppo backend {backend}", flush=True
    )
    records, skipped = measure(args, ops, modes, device)

    import triton

    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "copy_gbps": copy,
        "fastppo_backend": backend,
        "quick": args.quick,
        "records": records,
        "skipped": skipped,
    }
    path = write_result(result, Path(args.output))
    print(f"wrote {path} and .md")
    return 0
