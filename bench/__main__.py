"""Run fastppo's benchmarks and write ``bench/results/<device>-<date>.json`` plus a markdown table.

    python -m bench                      # every op, full shapes, on CUDA when available
    python -m bench --quick --device cpu # tiny shapes (a smoke run of the harness)
    python -m bench --ops token_logprobs --providers torch,fastppo --modes fwd

The JSON follows DESIGN §7; cases that ran out of memory or could not run are kept under
"skipped" with the reason.
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
from bench import harness

#: Each module serves the ops in its OPS tuple.
BENCH_MODULES = (
    "bench.bench_logprobs",
    "bench.bench_linear_logprobs",
    "bench.bench_losses",
    "bench.bench_advantages",
    "bench.bench_packing",
    "bench.bench_ppo_step",
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-" + (platform.processor() or platform.machine())
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="all", help="comma-separated ops to run (default: all)")
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
        "--out", default=str(Path(__file__).parent / "results"), help="folder for the results"
    )
    args = parser.parse_args(argv)

    modules = [importlib.import_module(name) for name in BENCH_MODULES]
    known = [op for module in modules for op in module.OPS]
    ops = known if args.ops == "all" else [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in known]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; known: {known}")
    modes = [m.strip() for m in args.modes.split(",")]
    if any(m not in harness.MODES for m in modes):
        parser.error(f"--modes must be drawn from {harness.MODES}, got {args.modes!r}")
    device = torch.device(args.device)

    copy = harness.copy_bandwidth_gbps(device)
    print(
        f"device {device_name(device)}, copy bandwidth {copy:.1f} GB/s, fastppo backend "
        f"{fastppo.active_backend(device)}",
        flush=True,
    )
    records, skipped = [], []
    for module in modules:
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

    import triton

    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "copy_gbps": copy,
        "fastppo_backend": fastppo.active_backend(device),
        "quick": args.quick,
        "records": records,
        "skipped": skipped,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['device']}-{result['date']}"
    n = 1
    while (out / f"{stem}.json").exists():
        n += 1
        stem = f"{result['device']}-{result['date']}-{n}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown_table(result))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
