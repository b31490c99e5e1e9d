"""The phases of the GPU pass (``fastppo.bench.gpu_pass``), each run in a process of its own by
``python -m fastppo.bench.gpu_pass --child NAME``: ``CHILDREN[NAME](ctx, report)`` fills a
``Report`` (``work/<NAME>.json``, saved as it goes) and appends benchmark rows to ``work/*.jsonl``.
Only the standard library is imported at the top: torch loads inside each phase.
"""

import contextlib
import datetime
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FIRST_TESTS = tuple(
    f"tests/test_{name}.py"
    for name in (
        "token_logprobs linear_logprobs kl_penalty ppo_policy_loss value_loss policy_loss_family gae "
        "group_advantages masked_whiten shape_rewards dpo_loss launch_configs loops_through_kernels "
        "op_host_reads host_reads packing"
    ).split()
)
#: The dry run's test selection: short kernel and bench tests (the invariance phase checks more).
DRY_TESTS = (
    "tests/test_linear_logprobs.py::test_bad_input_names_the_argument",
    "tests/test_gae.py::test_carry_semantics_by_hand",
    "tests/test_gae.py::test_bad_input",
    "tests/test_bench.py::test_failures_are_reported_not_dropped",
)
#: Each op's shape that its README target is stated at: measured first.
TARGET_SHAPES = {
    "token_logprobs": {"N": 16384, "V": 151936},
    "linear_logprobs": {"N": 16384, "H": 896, "V": 151936},
    "kl_penalty": {"B": 512, "T": 8192},
    "ppo_policy_loss": {"B": 512, "T": 8192},
    "value_loss": {"B": 512, "T": 8192},
    "gae": {"B": 256, "T": 4096},
    "masked_whiten": {"B": 256, "T": 4096},
    "group_advantages": {"B": 8192, "group": 8},
}
#: The dry run's bench: these ops at their first quick shape, without torch.compile (minutes on CPU).
DRY_BENCH_OPS = ("token_logprobs", "linear_logprobs", "kl_penalty", "gae", "collate")
PACKING_OPS = ("collate", "unpad", "plan_microbatches", "balanced_partition")
PPO_STEPS = 7  # timed steps per ppo_step case (>= 5), after a warm-up step


def read_jsonl(path: Path) -> list[dict]:
    """The lines of ``path``; a last line cut off by a killed writer is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


@dataclass
class Context:
    dry_run: bool
    work: Path
    out: Path
    limit_s: float
    commit: str
    started: float = field(default_factory=time.monotonic)

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry_run or not torch.cuda.is_available() else "cuda")

    def left_s(self) -> float:
        return self.limit_s - (time.monotonic() - self.started)


class Report:
    """``work/<phase>.json``, rewritten by ``save`` so that a phase killed later keeps what it had."""

    def __init__(self, ctx: Context, phase: str):
        self.path = ctx.work / f"{phase}.json"
        self.status, self.headline, self.error, self.results = "running", "", "", {}

    def save(self) -> None:
        data = {
            "status": self.status,
            "headline": self.headline,
            "error": self.error,
            "results": self.results,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.path)


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def phase_install(ctx: Context, report: Report) -> None:
    """Install the project (no registry on the device: --no-deps), then ``fastppo env``."""
    import torch
    import transformers
    import triton

    pip = python("-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
    if ctx.dry_run:
        pip.insert(4, "--dry-run")
    done = subprocess.run(pip, cwd=ROOT, capture_output=True, text=True, timeout=max(ctx.left_s() - 15, 5))
    print(done.stdout[-3000:], done.stderr[-3000:], flush=True)
    env = subprocess.run(
        python("-m", "fastppo.cli", "env"), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    print(env.stdout, env.stderr, flush=True)
    cuda = torch.cuda.is_available() and not ctx.dry_run
    report.results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)" if ctx.dry_run else "cpu",
        "python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "pip_returncode": done.returncode,
        "datasets_installed": importlib.util.find_spec("datasets") is not None, "env": env.stdout,
    }  # fmt: skip
    built = next((line for line in env.stdout.splitlines() if line.startswith("fastppo._C")), "fastppo._C ?")
    built = " ".join(built.split("(")[0].split())  # "fastppo._C built", without its path
    report.status = "ok" if done.returncode == 0 and env.returncode == 0 else "failed"
    report.headline = f"pip {'ok' if done.returncode == 0 else 'FAILED'}; {built}; {report.results['device']}"
    report.error = "" if report.status == "ok" else (done.stderr or env.stderr).strip()[-300:]


def phase_invariance(ctx: Context, report: Report) -> None:
    """A row's log-prob, entropy and hidden-gradient from ``linear_logprobs`` are bitwise the same
    whatever rows share its call (the same call run twice: also the weight's gradient)."""
    import torch

    import fastppo

    device = ctx.device
    N, H, V = (10, 16, 64) if ctx.dry_run else (4096, 896, 151936)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, device=device, generator=g) / H**0.5).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    up = torch.randn(2, N, device=device, generator=g)

    def call(rows, chunk):
        h = hidden[rows].clone().requires_grad_()
        logp, ent = fastppo.linear_logprobs(h, weight, labels[rows], return_entropy=True, chunk_size=chunk)
        weight.grad = None
        ((logp * up[0, rows]).sum() + (ent * up[1, rows]).sum()).backward()
        return logp.detach(), ent.detach(), h.grad, weight.grad

    checks = {}
    for chunk in (4,) if ctx.dry_run else (1000, None):  # a padded last chunk; the default size
        full = call(slice(None), chunk)
        again = call(slice(None), chunk)
        names = ("logp", "entropy", "grad_hidden", "grad_weight")
        checks[f"chunk={chunk} run to run"] = compare(full, again, names)
        parts = [slice(0, 1), slice(N // 2, N // 2 + 1), slice(N - 1, N), slice(7, 7 + N // 3), slice(5, N)]
        for rows in [*parts, torch.randperm(N, generator=torch.Generator().manual_seed(1)).to(device)]:
            alone = call(rows, chunk)
            label = f"rows {rows.start}:{rows.stop}" if isinstance(rows, slice) else "rows permuted"
            checks[f"chunk={chunk} {label}"] = compare([t[rows] for t in full[:3]], alone[:3], names[:3])
        report.results = {"shape": {"N": N, "H": H, "V": V}, "dtype": "bfloat16", "checks": checks}
        report.save()
    bad = [name for name, c in checks.items() if not c["equal"]]
    report.status = "failed" if bad else "ok"
    report.headline = f"{len(checks) - len(bad)}/{len(checks)} bitwise equal (N={N} H={H} V={V} bf16)"
    report.error = f"not batch-invariant: {', '.join(bad)}" if bad else ""


def compare(want, got, names) -> dict:
    diffs = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(names, want, got, strict=True)}
    equal = all(w.dtype == g.dtype and bool(w.eq(g).all()) for w, g in zip(want, got, strict=True))
    return {"equal": equal, "max_abs_diff": diffs}


def phase_ppo_step(ctx: Context, report: Report) -> None:
    """bench_ppo_step's cases, each timed over PPO_STEPS steps after its warm-up step (the bench's
    do_bench gives one step at this size): median, 20/80 quantiles, min and max."""
    import torch

    from fastppo.bench import bench_ppo_step, harness

    device = ctx.device
    cases = bench_ppo_step.benchmarks(
        device=device, quick=ctx.dry_run, providers=["torch", "fastppo"], modes=["fwd_bwd"]
    )
    said = []
    for case in cases:
        try:
            step = case.setup()
            peak = harness.peak_extra_bytes(step, device)
            times = [timed_ms(step, device) for _ in range(PPO_STEPS)]
        except Exception as exc:  # out of memory above all: said, and the next case runs
            oom = isinstance(exc, torch.cuda.OutOfMemoryError)
            reason = "out of memory" if oom else f"{type(exc).__name__}: {str(exc)[:200]}"
            append_jsonl(ctx.work / "bench.jsonl", {"skipped": {**case_row(case), "reason": reason}})
            said.append(f"{shape_text(case.shape)} {case.provider} {'OOM' if oom else type(exc).__name__}")
            step = None
            harness._free(device)
            continue
        q = statistics.quantiles(times, n=10, method="inclusive")
        record = {**case_row(case), "ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7],
                  "ms_min": min(times), "ms_max": max(times), "repeats": len(times), "gbps": None,
                  "peak_bytes": peak}  # fmt: skip
        append_jsonl(ctx.work / "bench.jsonl", {"record": record})
        said.append(f"{shape_text(case.shape)} {case.provider} {record['ms']:.0f} ms [{q[1]:.0f}-{q[7]:.0f}]")
        report.results.setdefault("records", []).append(record)
        report.headline = "; ".join(said)
        report.save()
        step = None
        harness._free(device)
    report.status = "ok" if report.results.get("records") else "failed"
    report.headline = "; ".join(said)


def timed_ms(fn, device) -> float:
    from fastppo.bench import harness

    harness.synchronize(device)
    start = time.perf_counter()
    fn()
    harness.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def case_row(case) -> dict:
    return {"op": case.op, "provider": case.provider, "mode": case.mode, "dtype": case.dtype,
            "shape": dict(case.shape)}  # fmt: skip


def shape_text(shape: dict) -> str:
    return "(" + ",".join(str(v) for v in shape.values()) + ")"


def phase_rollout(ctx: Context, report: Report) -> None:
    """``fastppo bench rollout --engines hf`` (vLLM is not on the device), a line per cell."""
    import torch

    from fastppo.bench import bench_rollout, run

    device = ctx.device
    path = ctx.work / "rollout.jsonl"
    meta = {"device": run.device_name(device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "prompt_tokens": bench_rollout.PROMPT_TOKENS}  # fmt: skip
    append_jsonl(path, {"meta": meta})
    models, batches, new_tokens = (
        (["tiny"], [4], [8]) if ctx.dry_run else (["tiny", "0.5b"], [32, 128], [64, 256])
    )
    said = []
    for name in models:
        with torch.device(device):  # initialised on the GPU: seconds, not tens of them at 0.5B
            model, tokenizer = bench_rollout.build_model(name, device)
        tokenizer = tokenizer or bench_rollout._Ids(model.config)
        sampler = bench_rollout.engine("hf", model, tokenizer, ctx.work, device)
        for batch in batches:
            ids = bench_rollout.prompts(batch, model.config.vocab_size, 4)
            for n in new_tokens:
                got = bench_rollout.measure(sampler, ids, n, device)
                record = {"model": name, "engine": "hf", "batch": batch, "new_tokens": n, **got}
                append_jsonl(path, {"record": record})
                said.append(f"{name} {batch}x{n} {got['tokens_per_s']:.0f} tok/s")
                report.headline = "hf: " + ", ".join(said)
                report.save()
        sampler.close()
        del model, sampler
    report.status = "ok"


def phase_grpo(ctx: Context, report: Report) -> None:
    """``fastppo train grpo`` on a Qwen2-0.5B-shaped policy with random weights (the tiny
    character tokenizer: no hub), a few iterations; the time split from its metrics.jsonl."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastppo.bench.bench_ppo_step import qwen2_config
    from fastppo.trainer import tiny

    folder, run_dir = ctx.work / "grpo-policy", ctx.work / "grpo-run"
    tokenizer = tiny.build_tokenizer()
    config = qwen2_config(quick=ctx.dry_run)
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.device(ctx.device):  # initialised where it will train: seconds, not tens of them
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    settings = ["--iterations", "2", "--batch_size", "8", "--group_size", "4", "--max_new_tokens", "8"]
    if not ctx.dry_run:
        settings = ["--iterations", "4", "--batch_size", "64", "--max_new_tokens", "128"]
    cmd = python("-m", "fastppo.cli", "train", "grpo", "--policy", str(folder), "--output_dir", str(run_dir),
                 "--overwrite", "--report_to", "none", "--lr", "1e-6", *settings)  # fmt: skip
    print(" ".join(cmd), flush=True)
    returncode, said = run_until(cmd, ctx.work / "grpo.log", ctx.left_s() - 10)
    print(said[-5000:], flush=True)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    timings = [{k: v for k, v in r.items() if k.startswith(("time/", "generate/"))} for r in rows]
    report.results = {
        "command": cmd[2:],
        "parameters": parameters,
        "iterations": timings,
        "returncode": returncode,
    }
    report.results["final_line"] = next(
        (s for s in reversed(said.splitlines()) if s.startswith("mean reward")), ""
    )
    if not rows:
        report.status, report.error = "failed", (said.strip().splitlines() or ["no metrics"])[-1][:300]
        return
    steady = rows[1:] or rows  # the first iteration compiles the kernels
    phases = [k for k in rows[0] if k.startswith("time/")]
    mean = {k: statistics.mean(r[k] for r in steady) for k in phases}
    whole = sum(mean.values()) or 1.0
    report.results["steady_state_seconds"] = mean
    split = ", ".join(f"{k[5:]} {100 * v / whole:.0f}%" for k, v in mean.items())
    report.headline = f"{parameters / 1e6:.1f} M params, {whole:.2f} s/iteration (its 2-{len(rows)}): {split}"
    report.status = "ok" if returncode == 0 else "failed"
    report.error = "" if returncode == 0 else f"train: {returncode} after {len(rows)} iterations"


def run_until(cmd: list[str], log: Path, seconds: float) -> tuple[int | str, str]:
    """(return code or 'stopped at the limit', output) of ``cmd`` run for at most ``seconds``."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=max(seconds, 5))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # our limit, or the driver's SIGINT
            proc.kill()
            proc.wait()
            returncode = "stopped at the limit"
    return returncode, log.read_text()


def phase_tests(ctx: Context, report: Report) -> None:
    """pytest over the suite (kernel tests first) or, dry, ``DRY_TESTS``; stopped (SIGINT: it
    still writes tests.xml) 15 s before the phase's limit. Counts and failures from the JUnit XML."""
    import torch

    xml = ctx.out / "tests.xml"
    if ctx.dry_run:
        selection, jobs = list(DRY_TESTS), 0  # xdist loaded, no workers: their start costs most
    else:
        rest = sorted(
            {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")} - set(FIRST_TESTS)
        )
        selection = [t for t in FIRST_TESTS if (ROOT / t).exists()] + [t for t in rest if "gpu_pass" not in t]
        jobs = max(1, min(8, (os.cpu_count() or 2) // 2))
    cmd = python("-m", "pytest", *selection, "-n", str(jobs), "-p", "no:cacheprovider", "-q", "-rfE",
                  "--tb=short", "--continue-on-collection-errors", f"--junitxml={xml}")  # fmt: skip
    if importlib.util.find_spec("pytest_timeout"):
        cmd.append("--timeout=120")
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        returncode = proc.wait(timeout=max(ctx.left_s() - 30, 5))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # our limit, or the driver's SIGINT
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        proc.kill()
        returncode = "stopped at the phase's limit"
    report.results = junit_counts(xml) | {
        "returncode": returncode,
        "workers": jobs,
        "cuda": torch.cuda.is_available(),
    }
    r = report.results
    report.headline = (
        f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
        + ("" if isinstance(returncode, int) else f" ({returncode})")
    )
    report.status = "ok" if returncode == 0 else "failed"
    report.error = "; ".join(r["failures"][:3])[:300]


def junit_counts(xml: Path) -> dict:
    """passed/failed/errors/skipped and the first 20 failures ('node id: first line') of a JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if not xml.exists():
        return counts
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        kind = {"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[
            getattr(outcome, "tag", None)
        ]
        counts[kind] += 1
        if kind in ("failed", "errors") and len(counts["failures"]) < 20:
            message = (outcome.get("message") or "").strip().splitlines()[:1]
            counts["failures"].append(
                f"{case.get('classname')}::{case.get('name')}: {''.join(message)[:200]}"
            )
    return counts


def tier(case) -> int:
    """0: an op at its target shape; 1: a variant of such an op (family member, packed) there;
    2: other shapes; 3: Python-loop baselines off the target shape, host-side packing."""
    base = case.op.split(":")[0].removesuffix("+packed")
    if case.op in PACKING_OPS:
        return 3
    target = TARGET_SHAPES.get(base)
    at_target = target is not None and all(case.shape.get(k) == v for k, v in target.items())
    if at_target:
        return 0 if base == case.op else 1
    return 3 if case.provider == "python_loop" else 2


def planned_cases(ctx: Context) -> list:
    """Every bench module's cases (ppo_step has its own phase), in tiers; the dry run's subset."""
    import importlib

    import torch

    from fastppo.bench import harness, run

    cases = []
    for name in run.BENCH_MODULES:
        module = importlib.import_module(name)
        ops = tuple(op for op in module.OPS if op != "ppo_step")
        every = {"providers": list(harness.PROVIDERS), "modes": list(harness.MODES), "dtype": torch.bfloat16}
        cases += list(module.benchmarks(device=ctx.device, quick=ctx.dry_run, ops=ops, **every))
    if ctx.dry_run:
        first = {}
        for c in cases:
            first.setdefault(c.op, c.shape)
        cases = [
            c for c in cases if c.op in DRY_BENCH_OPS and c.shape == first[c.op] and c.provider != "compile"
        ]
    # The Python GAE loop at (1024, 8192) takes about 7 s a call, 50 s for do_bench's calls.
    too_slow = lambda c: c.provider == "python_loop" and c.op == "gae" and c.shape["B"] * c.shape["T"] > 2**20  # noqa: E731
    return sorted((c for c in cases if not too_slow(c)), key=tier)


def phase_bench(ctx: Context, report: Report) -> None:
    """The cases of ``planned_cases`` one at a time, each record appended as it is measured."""
    import torch
    import triton

    import fastppo
    from fastppo.bench import harness, run

    device, path = ctx.device, ctx.work / "bench.jsonl"
    copy = harness.copy_bandwidth_gbps(device)
    meta = {"device": run.device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "copy_gbps": copy,
            "fastppo_backend": fastppo.active_backend(device), "quick": ctx.dry_run}  # fmt: skip
    cases = planned_cases(ctx)
    append_jsonl(path, {"meta": meta})
    append_jsonl(path, {"plan": [case_row(c) for c in cases]})
    done = 0
    for case in cases:
        on = torch.device("cpu") if case.op in PACKING_OPS else device  # host-side: CPU targets
        records, skipped = harness.run_cases([case], on, cpu_budget_s=0.05 if ctx.dry_run else 1.0)
        for r in records:
            append_jsonl(path, {"record": r})
        for s in skipped:
            append_jsonl(path, {"skipped": s})
        done += 1
        report.results = {"cases": len(cases), "done": done, "table": headline_rows(path, copy)}
        report.headline = f"{done}/{len(cases)} cases, copy {copy:.0f} GB/s"
        report.save()
    report.status = "ok"


def headline_rows(path: Path, copy: float) -> list[str]:
    """For each op and mode measured at its target shape: fastppo's ms, % of copy, and each other
    provider's ms (a line each, for the summary)."""
    rows = [r["record"] for r in read_jsonl(path) if "record" in r]
    lines = []
    for op, target in TARGET_SHAPES.items():
        for mode in ("fwd", "fwd_bwd"):
            here = [r for r in rows if r["op"] == op and r["mode"] == mode
                    and all(r["shape"].get(k) == v for k, v in target.items())]  # fmt: skip
            if not here:
                continue
            cells = []
            for r in here:
                variant = ",".join(f"{k}={v}" for k, v in r["shape"].items() if k not in target)
                frac = f" {100 * r['gbps'] / copy:.0f}%" if r["gbps"] and copy else ""
                cells.append(f"{r['provider']}{'[' + variant + ']' if variant else ''} {r['ms']:.3g}{frac}")
            lines.append(f"{op} {mode}: " + ", ".join(cells))
    return lines


CHILDREN = {
    "install": phase_install,
    "invariance": phase_invariance,
    "ppo_step": phase_ppo_step,
    "rollout": phase_rollout,
    "grpo": phase_grpo,
    "tests": phase_tests,
    "bench": phase_bench,
}


def run_child_phase(args) -> int:
    """``--child NAME``: run one phase, its report saved however it ends."""
    ctx = Context(args.dry_run, Path(args.work), Path(args.out), args.limit_s, args.commit)
    report = Report(ctx, args.child)
    report.save()
    try:
        if args.inject_failure == args.child:
            raise RuntimeError(f"injected failure (--inject-failure {args.child})")
        CHILDREN[args.child](ctx, report)
    except BaseException as exc:
        report.status, report.error = "error", f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        report.save()
        raise
    report.save()
    return 0 if report.status == "ok" else 1
