"""One prepared GPU pass: install, the compiled test suite, every benchmark, the rollout, the 0.5B
iteration and update step, and the batch-invariance check, in one command that fits a lent GPU.

    python -m fastppo.bench.gpu_pass                    # on a GPU machine; results into $OUT or --out
    python -m fastppo.bench.gpu_pass --dry-run          # the same phases on CPU, --quick shapes
    bash bench/gpu_pass.sh                              # what the device tool runs (bench/GPU_PASS.md)

Each phase runs in a process of its own under its own time limit (``PHASES``; ``--limits``
overrides) and the whole pass under ``--deadline-s``: a phase may use its own limit plus whatever
the phases before it left unused, never the later phases' limits. After each phase ``summary.json``
is rewritten, so a phase that fails, crashes or runs out of time loses nothing that ran before it.
Everything lands in ``--out`` as at most 8 files (``FILES``); a one-screen summary is printed last.
"""

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastppo.bench.gpu_pass_phases import ROOT, read_jsonl, run_child_phase


@dataclass(frozen=True)
class Phase:
    """A step of the pass; ``limit_s`` on a GPU, ``dry_limit_s`` under ``--dry-run``, where
    ``interpret`` says whether the kernels run in Triton's interpreter (else, on CPU tensors, the
    ops' PyTorch references: whole-model steps through interpreted kernels take minutes)."""

    name: str
    limit_s: float
    dry_limit_s: float
    what: str
    interpret: bool = True


#: In order. The short phases come first, so that what they leave unused goes to the tests and
#: the benchmarks; the benchmarks come last and record each case as it is measured.
PHASES = (
    Phase("install", 60, 120, "pip install --no-deps --no-build-isolation -e . (dry: --dry-run), env"),
    Phase("invariance", 20, 120, "linear_logprobs rows bitwise equal whatever rows share the call"),
    Phase("ppo_step", 50, 180, "one PPO update step of Qwen2-0.5B, >= 5 timed steps per provider", False),
    Phase("rollout", 35, 120, "the rollout benchmark with the hf engine", False),
    Phase("grpo", 60, 180, "fastppo train grpo on a Qwen2-0.5B shape: the time split per iteration", False),
    Phase("tests", 120, 180, "the whole test suite compiled, CUDA tensors (dry run: a fixed selection)"),
    Phase("bench", 120, 180, "every op benchmark at full shapes, target shapes first"),
)  # fmt: skip
PHASE_NAMES = tuple(p.name for p in PHASES)
#: The whole pass on a GPU: 8 minutes of wall time, 10 s kept for the summary.
DEADLINE_S = 470
#: Every file the pass writes into --out (at most 8: the device tool returns no more).
FILES = ("summary.json", "log.txt", "tests.xml", "bench.json", "bench.md", "rollout.json", "rollout.md")
#: Kernel tests first: a time limit cuts the suite's tail, not its head.
# ---------------------------------------------------------------------------------------------
# The driver: one process per phase, a summary after each.


@dataclass
class PhaseResult:
    """What a phase reported: ``status`` is ok, failed (it ran; a check or test failed), error (it
    raised), timeout or skipped (no time left)."""

    name: str
    status: str
    seconds: float
    limit_s: float
    headline: str = ""
    error: str = ""
    results: dict = field(default_factory=dict)


def phase_limits(dry_run: bool, overrides: dict[str, float]) -> dict[str, float]:
    limits = {p.name: p.dry_limit_s if dry_run else p.limit_s for p in PHASES}
    return limits | overrides


def parse_limits(text: str) -> dict[str, float]:
    """``"tests=200,bench=90"`` → {name: seconds}; an unknown phase is a usage error."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, seconds = item.partition("=")
        if name not in PHASE_NAMES or not seconds:
            raise argparse.ArgumentTypeError(f"--limits: {item!r}: NAME=SECONDS with NAME in {PHASE_NAMES}")
        out[name] = float(seconds)
    return out


def child_env(phase: Phase, dry_run: bool) -> dict[str, str]:
    """Phases run offline; the dry run hides any GPU and runs the kernels in Triton's interpreter
    where ``phase.interpret`` says so."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    env.pop("TRITON_INTERPRET", None)
    if dry_run:
        env |= {"CUDA_VISIBLE_DEVICES": ""} | ({"TRITON_INTERPRET": "1"} if phase.interpret else {})
    return env


def run_child(cmd: list[str], limit_s: float, log, env) -> str:
    """Run ``cmd`` in a session of its own, output into ``log``; 'ok', 'error' or 'timeout'. On
    timeout the session gets SIGINT (pytest writes its report), then SIGKILL 10 s later."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        return "ok" if proc.wait(timeout=max(limit_s, 0.1)) == 0 else "error"
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGINT, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                break
        return "timeout"


def run_phase(phase: str, limit_s: float, args, work: Path, log) -> PhaseResult:
    """One phase in a child process; its report is ``work/<phase>.json`` (written as it goes)."""
    cmd = [sys.executable, "-m", "fastppo.bench.gpu_pass", "--child", phase, "--work", str(work)]
    cmd += ["--out", str(args.out), "--limit-s", str(limit_s), "--commit", args.commit]
    cmd += ["--dry-run"] * args.dry_run + ["--inject-failure", args.inject_failure] * bool(
        args.inject_failure
    )
    log.write(f"\n===== phase {phase} (limit {limit_s:.0f} s): {' '.join(cmd)}\n")
    log.flush()
    start = time.monotonic()
    outcome = run_child(cmd, limit_s, log, child_env(PHASES[PHASE_NAMES.index(phase)], args.dry_run))
    seconds = time.monotonic() - start
    report_file = work / f"{phase}.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    status = report.get("status", "error") if outcome == "ok" else outcome
    if outcome == "error" and report.get("status") == "failed":
        status = "failed"
    error = report.get("error", "") if report else f"{outcome}: no report from the phase"
    return PhaseResult(
        phase, status, round(seconds, 1), round(limit_s, 1), report.get("headline", ""), error,
        report.get("results", {}),
    )  # fmt: skip


def run_pass(args) -> int:
    """Every selected phase in order; 0 when each one is ok."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # a rerun into the same folder starts clean
        (out / name).unlink(missing_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-pass-"))
    work.mkdir(parents=True, exist_ok=True)
    limits = phase_limits(args.dry_run, args.limits)
    phases = [p for p in PHASE_NAMES if p in args.phases]
    summary = {"dry_run": args.dry_run, "commit": args.commit, "date": datetime.date.today().isoformat(),
               "deadline_s": args.deadline_s, "phases": []}  # fmt: skip
    start = time.monotonic()
    with open(out / "log.txt", "a") as log:
        for i, name in enumerate(phases):
            later = sum(limits[p] for p in phases[i + 1 :])
            left = args.deadline_s - (time.monotonic() - start)
            limit = left - later  # its own limit, and what the phases before it left unused
            if name in args.limits:  # one given on the command line is the whole limit
                limit = min(limit, args.limits[name])
            print(f"[gpu_pass] {name}: limit {limit:.0f} s ...", flush=True)
            if limit < 3:
                result = PhaseResult(
                    name, "skipped", 0.0, round(limit, 1), error="no time left before the deadline"
                )
            else:
                result = run_phase(name, limit, args, work, log)
            print(
                f"[gpu_pass] {name}: {result.status} in {result.seconds:.0f} s  {result.headline}", flush=True
            )
            summary["phases"].append(asdict(result))
            summary["seconds"] = round(time.monotonic() - start, 1)
            try:
                write_artifacts(summary, work, out)
            except Exception as exc:  # a results file that cannot be written stops no later phase
                log.write(f"[gpu_pass] writing the results failed: {type(exc).__name__}: {exc}\n")
        text = summary_text(summary, out)
        log.write("\n" + text + "\n")
    print(text)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(p["status"] == "ok" for p in summary["phases"]) else 1


def write_artifacts(summary: dict, work: Path, out: Path) -> None:
    """summary.json, and bench.json/.md and rollout.json/.md from what the phases appended so far."""
    from fastppo.bench import bench_rollout, run

    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    bench = assemble_bench(work / "bench.jsonl", summary["commit"])
    if bench is not None:
        (out / "bench.json").write_text(json.dumps(bench, indent=1) + "\n")
        (out / "bench.md").write_text(run.markdown_table(bench))
    rollout = assemble_rollout(work / "rollout.jsonl", summary["commit"])
    if rollout is not None:
        (out / "rollout.json").write_text(json.dumps(rollout, indent=1) + "\n")
        title = f"# Rollout engines, {rollout['device']}, {rollout['date']} (commit {rollout['commit']})"
        (out / "rollout.md").write_text(f"{title}\n\n{bench_rollout.table(rollout)}\n")


def case_key(row: dict) -> tuple:
    return (row["op"], row["provider"], row["mode"], row["dtype"], tuple(sorted(row["shape"].items())))


def assemble_bench(path: Path, commit: str) -> dict | None:
    """DESIGN §7's results object from the bench and ppo_step phases' lines: ``meta`` (device,
    versions, copy bandwidth), ``plan`` (every case the bench phase meant to run), ``record`` and
    ``skipped``; a planned case with neither is listed as skipped, not reached in time."""
    rows = read_jsonl(path)
    if not rows:
        return None
    meta = next((r["meta"] for r in rows if "meta" in r), {})
    records = [r["record"] for r in rows if "record" in r]
    skipped = [r["skipped"] for r in rows if "skipped" in r]
    seen = {case_key(r) for r in records + skipped}
    for plan in (r["plan"] for r in rows if "plan" in r):
        for case in plan:
            if case_key(case) not in seen:
                skipped.append(case | {"reason": "not reached: the bench phase's time limit"})
    return {"device": "unknown", "torch": "", "triton": "", "date": datetime.date.today().isoformat(),
            "copy_gbps": 0.0, "fastppo_backend": "", **meta,
            "commit": commit, "records": records, "skipped": skipped}  # fmt: skip


def assemble_rollout(path: Path, commit: str) -> dict | None:
    """``fastppo bench rollout``'s results object from the rollout phase's lines."""
    rows = read_jsonl(path)
    if not rows:
        return None
    meta = next((r["meta"] for r in rows if "meta" in r), {})
    return {**meta, "commit": commit, "records": [r["record"] for r in rows if "record" in r], "syncs": [],
            "skipped": [r["skipped"] for r in rows if "skipped" in r]}  # fmt: skip


def summary_text(summary: dict, out: Path) -> str:
    """The one-screen summary: a line per phase, the bench's headline rows, the files."""
    phases = summary["phases"]
    env = next((p["results"] for p in phases if p["name"] == "install"), {})
    head = (
        f"fastppo GPU pass{' (dry run)' if summary['dry_run'] else ''} · {env.get('device', '?')} · "
        f"torch {env.get('torch', '?')} · triton {env.get('triton', '?')} · commit {summary['commit']} · "
        f"{summary['date']} · {summary.get('seconds', 0):.0f} s of {summary['deadline_s']:.0f}"
    )  # fmt: skip
    lines = [head, "", f"{'phase':<11} {'status':<8} {'s':>6} {'limit':>6}  result"]
    for p in phases:
        said = p["headline"] or p["error"]
        lines.append(
            f"{p['name']:<11} {p['status']:<8} {p['seconds']:6.0f} {p['limit_s']:6.0f}  {said[:110]}"
        )
    bench = next((p["results"] for p in phases if p["name"] == "bench"), {})
    lines += [""] + bench.get("table", [])[:16]
    files = sorted(p.name for p in out.iterdir() if p.name in FILES)
    lines += ["", f"files in {out}: {', '.join(files)}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastppo.bench.gpu_pass",
        description=__doc__.splitlines()[0],
        epilog="phases (limit on a GPU, dry): "
        + "; ".join(f"{p.name} ({p.limit_s:.0f} s, {p.dry_limit_s:.0f} s): {p.what}" for p in PHASES),
    )
    parser.add_argument("--dry-run", action="store_true", help="on CPU, --quick shapes, kernels interpreted")
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or "gpu-pass",
        help="results folder (default: $OUT, else ./gpu-pass)",
    )
    parser.add_argument(
        "--phases",
        type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
        default=list(PHASE_NAMES),
        help=f"comma-separated, of {', '.join(PHASE_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--limits",
        type=parse_limits,
        default={},
        help="NAME=SECONDS,...: those phases' whole limits (no unused time added)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help=f"the whole pass (default {DEADLINE_S} on a GPU, the sum of the limits dry)",
    )
    parser.add_argument(
        "--commit", default=None, help="the commit measured (default: the checkout's, if git)"
    )
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument(
        "--inject-failure", default="", metavar="PHASE", help="make PHASE raise at start (a test)"
    )
    parser.add_argument("--child", choices=PHASE_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--limit-s", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        return run_child_phase(args)
    unknown = [p for p in args.phases if p not in PHASE_NAMES]
    if unknown or args.inject_failure not in ("", *PHASE_NAMES):
        parser.error(
            f"--phases/--inject-failure: unknown {unknown or [args.inject_failure]}; known: {PHASE_NAMES}"
        )
    if args.commit is None:
        from fastppo.bench.run import git_commit

        args.commit = git_commit()
    if args.deadline_s is None:
        limits = phase_limits(args.dry_run, args.limits)
        args.deadline_s = sum(limits[p] for p in args.phases) if args.dry_run else DEADLINE_S
    return run_pass(args)


if __name__ == "__main__":
    sys.exit(main())
