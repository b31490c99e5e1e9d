"""The compile gate: every kernel launch the tests make, compiled for real GPUs on a machine without one.

Triton's interpreter runs the kernels on CPU tensors and accepts code the compiler rejects (a
global that is not a ``tl.constexpr``, a block configuration that crashes a compiler pass). So:

1. **Record.** While the tests run in the interpreter, ``LaunchRecorder`` notes every distinct
   launch: the kernel, each argument as the compiler sees it (pointer dtype and 16-byte alignment,
   integer width and the divisibility the JIT specializes on, constexpr values) and the launch
   options (``num_warps``, ``num_stages``). ``tests/conftest.py`` turns it on when
   ``FASTPPO_RECORD_LAUNCHES=<file>`` is set.
2. **Compile.** Each recorded launch goes through the same specialization as a real launch and
   ``triton.compile`` for ``cuda:90`` and ``cuda:80``, all the way to a cubin (ptxas ships with
   Triton). Compiling needs no GPU and no interpreter: worker processes load the kernel files by
   path, so another environment's Python (``--python``, e.g. one with the oldest supported Triton)
   compiles the same recording without fastppo installed there.

Usage (from a source checkout)::

    python -m fastppo.kernels.compile_check                       # record the kernel tests, compile
    python -m fastppo.kernels.compile_check --launches F.json     # compile a recording
    python -m fastppo.kernels.compile_check --launches F.json --python other-env/bin/python
    python -m fastppo.kernels.compile_check --launches F.json --report report.md

It prints one line per failed (launch, target) and a count, and exits 1 on any failure. With
``--report`` it also writes registers, spilled bytes, shared memory and the widths of the global
loads of every compiled launch, after a summary per kernel (the most registers and spills, and how
many launches have 16-byte loads): the compiler's report to read before spending GPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

TARGETS = ("cuda:90", "cuda:80")
#: The kernel tests (tests/test_<module>.py for each kernel module) plus these: the launch
#: configurations the launchers can choose, and the training loops through the kernels.
EXTRA_TEST_FILES = ("test_launch_configs.py", "test_loops_through_kernels.py")

# --- 1. recording (in the interpreter) -----------------------------------------------------------


def _is_constexpr_annotation(annotation) -> bool:
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    return "constexpr" in str(name)


def _canonical_int(value: int) -> int:
    """A stand-in for ``value`` that the JIT specializes the same way: its width (i32, i64, u64),
    whether it is 1 and whether it is divisible by 16. Recordings then dedupe across sizes."""
    if value == 1:
        return 1
    step = 16 if value % 16 == 0 else 17
    if -(2**31) <= value < 2**31:
        base = 0
    elif -(2**63) <= value < 2**63:
        base = 2**32
    else:
        base = 2**63
    return base + step if value >= 0 else -(base + step)


def _describe_arg(value, constexpr: bool) -> dict:
    if constexpr:
        if type(value).__name__ == "dtype":  # triton.language.dtype, e.g. tl.float32
            return {"constexpr_dtype": str(value)}
        if value is not None and not isinstance(value, bool | int | float | str):
            raise TypeError(f"cannot record constexpr value {value!r}")
        return {"constexpr": value}
    if value is None:
        return {"none": True}
    if hasattr(value, "data_ptr"):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": _canonical_int(value)}
    if isinstance(value, float):
        return {"float": True}  # floats are never specialized on their value
    raise TypeError(f"cannot record kernel argument of type {type(value).__name__}")


def describe_launch(fn, args: tuple, kwargs: dict) -> dict:
    """The compiler's view of one launch ``fn[grid](*args, **kwargs)`` of a @triton.jit ``fn``."""
    py_fn = fn.fn
    signature = inspect.signature(py_fn)
    params = {k: v for k, v in kwargs.items() if k in signature.parameters}
    bound = signature.bind(*args, **params)
    bound.apply_defaults()
    described = {
        name: _describe_arg(value, _is_constexpr_annotation(signature.parameters[name].annotation))
        for name, value in bound.arguments.items()
    }
    return {
        "file": str(Path(inspect.getsourcefile(py_fn)).resolve()),
        "module": py_fn.__module__,
        "kernel": py_fn.__qualname__,
        "args": described,
        "options": {k: v for k, v in sorted(kwargs.items()) if k not in signature.parameters},
    }


def launch_key(launch: dict) -> str:
    return json.dumps({k: launch[k] for k in ("module", "kernel", "args", "options")}, sort_keys=True)


class LaunchRecorder:
    """Records the distinct launches of interpreted kernels between ``start()`` and ``stop()``,
    of the kernels whose module name starts with ``module_prefix`` (all by default)."""

    def __init__(self, module_prefix: str = "") -> None:
        self.launches: dict[str, dict] = {}
        self.module_prefix = module_prefix
        self._original = None

    def start(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            if fn.fn.__module__.startswith(recorder.module_prefix):
                launch = describe_launch(fn, args, kwargs)
                recorder.launches.setdefault(launch_key(launch), launch)
            return original(fn, *args, grid=grid, warmup=warmup, **kwargs)

        self._original = original
        InterpretedFunction.run = run

    def stop(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        if self._original is not None:
            InterpretedFunction.run = self._original
            self._original = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the launches as JSON, merged with those already in ``path``; under a lock, since
        parallel test workers (pytest -n) each save theirs into the same file as they finish."""
        import fcntl

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            launches = {launch_key(x): x for x in load_launches(path)} if path.exists() else {}
            launches.update(self.launches)
            path.write_text(json.dumps(sorted(launches.values(), key=launch_key), indent=1))


@contextlib.contextmanager
def recording():
    """``with recording() as launches:`` collects the launches of interpreted kernels."""
    recorder = LaunchRecorder()
    recorder.start()
    try:
        yield recorder.launches
    finally:
        recorder.stop()


def load_launches(path: str | os.PathLike) -> list[dict]:
    return json.loads(Path(path).read_text())


# --- 2. compiling (no interpreter; possibly another environment's Python) -------------------------


def _load_kernel(file: str, name: str):
    """The @triton.jit function ``name`` of ``file``, imported by path under a package named after
    its folder, so that relative imports between kernel files work without fastppo installed."""
    folder = Path(file).parent
    package = "_compile_gate_" + re.sub(r"\W", "_", str(folder))
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(folder)]
        sys.modules[package] = module
    return getattr(importlib.import_module(f"{package}.{Path(file).stem}"), name)


def _rebuild_arg(desc: dict):
    import torch
    import triton.language as tl

    if "constexpr" in desc:
        return desc["constexpr"]
    if "constexpr_dtype" in desc:
        return tl.dtype(desc["constexpr_dtype"])
    if "tensor" in desc:
        buffer = torch.empty(64, dtype=getattr(torch, desc["tensor"]))
        return buffer if desc["aligned"] else buffer[1:]  # CPU allocations are 64-byte aligned
    if "int" in desc:
        return desc["int"]
    if "bool" in desc:
        return desc["bool"]
    if "float" in desc:
        return 0.5
    return None


def compile_launch(launch: dict, target: str):
    """Compile one recorded launch for ``target`` ("cuda:90"), exactly as a launch specializes it.
    Returns Triton's CompiledKernel; raises whatever the compiler raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend_name, arch = target.split(":")
    gpu_target = GPUTarget(backend_name, int(arch), 32)
    backend = make_backend(gpu_target)
    fn = _load_kernel(launch["file"], launch["kernel"])
    kwargs = {name: _rebuild_arg(desc) for name, desc in launch["args"].items()}
    kwargs.update(launch["options"], debug=False)
    # The JIT's own binder and argument packing (the same in Triton 3.6 to 3.9): what a real
    # launch on that GPU would hand to the compiler.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=gpu_target, options=options.__dict__)


def resource_usage(compiled) -> dict:
    """Registers, spilled (local) bytes and shared bytes from the cubin, and the global loads of the
    PTX by width in bytes (16 is the widest: what a memory-bound kernel wants)."""
    import triton

    usage: dict = {}
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run(
            [str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True
        )
    for field, key in (("REG", "registers"), ("LOCAL", "spill_bytes"), ("SHARED", "shared_bytes")):
        found = re.search(rf"\b{field}:(\d+)", dump.stdout)
        usage[key] = int(found.group(1)) if found else None
    widths: dict[int, int] = {}
    for vec, bits in re.findall(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](\d+)", compiled.asm["ptx"]):
        width = int(vec or 1) * int(bits) // 8
        widths[width] = widths.get(width, 0) + 1
    usage["global_loads"] = {str(k): v for k, v in sorted(widths.items())}
    return usage


def _error_line(exc: BaseException) -> str:
    """One line: the exception type and the last line of its message (Triton's CompilationError
    prints the kernel source first and the cause last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


def _worker(tasks_file: str, with_report: bool) -> None:
    """Compile the (index, launch, target) tasks of ``tasks_file``, one JSON line each on stdout;
    a "start" line first, so that the parent can name the task if the compiler kills the process."""
    import triton

    for index, launch, target in json.loads(Path(tasks_file).read_text()):
        print(json.dumps({"index": index, "target": target, "start": True}), flush=True)
        result = {"index": index, "target": target, "triton": triton.__version__}
        try:
            compiled = compile_launch(launch, target)
            result["ok"] = True
            if with_report:
                result["usage"] = resource_usage(compiled)
        except Exception as exc:  # any compiler error is a gate failure, reported per launch
            result["ok"] = False
            result["error"] = _error_line(exc)
        print(json.dumps(result), flush=True)


def _run_worker(python: str, tasks: list, with_report: bool) -> list[dict]:
    """Run one worker over ``tasks``; a worker killed mid-compile fails that task and resumes after it."""
    results: list[dict] = []
    while tasks:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(tasks, fh)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [python, str(Path(__file__).resolve()), "--worker", fh.name] + (
            ["--report", "-"] if with_report else []
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        os.unlink(fh.name)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("start"):
                started = (record["index"], record["target"])
            else:
                results.append(record)
                started = None
        done = {(r["index"], r["target"]) for r in results}
        remaining = [t for t in tasks if (t[0], t[2]) not in done]
        if proc.returncode == 0 and not remaining:
            break
        if started is None:  # the worker failed before compiling anything: report it whole
            raise RuntimeError(
                f"compile worker {python} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
            )
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [""]
        crashed = {"index": started[0], "target": started[1], "ok": False}
        crashed["error"] = f"compiler process died (exit {proc.returncode}): {tail[0][:300]}"
        results.append(crashed)
        tasks = [t for t in remaining if (t[0], t[2]) != started]
    return results


def compile_launches(
    launches: list[dict],
    *,
    targets=TARGETS,
    python: str | None = None,
    jobs: int = 2,
    with_report: bool = False,
) -> list[dict]:
    """Compile every launch for every target in ``jobs`` worker processes of ``python`` (default:
    this one). Returns one result per (launch, target): ``{"index", "target", "ok", "error"?,
    "usage"?, "triton"}``, sorted."""
    from concurrent.futures import ThreadPoolExecutor

    tasks = [(i, launch, target) for i, launch in enumerate(launches) for target in targets]
    shares = [tasks[j::jobs] for j in range(max(1, jobs))]
    with ThreadPoolExecutor(len(shares)) as pool:
        parts = pool.map(lambda share: _run_worker(python or sys.executable, share, with_report), shares)
    return sorted((r for part in parts for r in part), key=lambda r: (r["index"], r["target"]))


_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "float64": "f64", "bool": "i1"}


def launch_label(launch: dict) -> str:
    """``module.kernel(pointer dtypes)[constexprs; options]``, ``~`` marking a pointer off 16 bytes."""
    pointers = ",".join(
        _SHORT_DTYPES.get(d["tensor"], d["tensor"]) + ("" if d["aligned"] else "~")
        for d in launch["args"].values()
        if "tensor" in d
    )
    settings = [
        f"{name}={desc.get('constexpr', desc.get('constexpr_dtype'))}"
        for name, desc in launch["args"].items()
        if "constexpr" in desc or "constexpr_dtype" in desc
    ]
    settings += [f"{k}={v}" for k, v in launch["options"].items()]
    return f"{launch['module'].rsplit('.', 1)[-1]}.{launch['kernel']}({pointers})[{', '.join(settings)}]"


def kernel_summary(launches: list[dict], results: list[dict]) -> list[dict]:
    """Per kernel (``module.kernel``) and block size (its ``BLOCK*`` constexprs) over the compiled
    (launch, target) pairs: how many, the most registers and spilled bytes, the global loads by
    width summed, and how many pairs have at least one 16-byte load (what a memory-bound kernel's
    main streams should all get)."""
    kernels: dict[str, dict] = {}

    def order(r):
        launch = launches[r["index"]]
        sizes = [d.get("constexpr") or 0 for n, d in launch["args"].items() if n.startswith("BLOCK")]
        return launch["module"], launch["kernel"], sizes

    for r in sorted(results, key=order):
        if not r.get("ok"):
            continue
        launch, usage = launches[r["index"]], r["usage"]
        blocks = [f"{n}={d['constexpr']}" for n, d in launch["args"].items() if n.startswith("BLOCK")]
        name = f"{launch['module'].rsplit('.', 1)[-1]}.{launch['kernel']}" + (
            f"[{', '.join(blocks)}]" if blocks else ""
        )
        k = kernels.setdefault(name, {"kernel": name, "compiled": 0, "registers": 0, "spill_bytes": 0,
                                      "loads": {}, "with_16_byte_loads": 0})  # fmt: skip
        k["compiled"] += 1
        k["registers"] = max(k["registers"], usage["registers"] or 0)
        k["spill_bytes"] = max(k["spill_bytes"], usage["spill_bytes"] or 0)
        for width, count in usage["global_loads"].items():
            k["loads"][int(width)] = k["loads"].get(int(width), 0) + count
        k["with_16_byte_loads"] += "16" in usage["global_loads"]
    return list(kernels.values())


def write_report(path: str, launches: list[dict], results: list[dict]) -> None:
    """Markdown: a summary per kernel, then one row per compiled (launch, target)."""
    rows = [
        "| kernel | compiled | max registers | max spilled bytes | global loads (bytes × count) "
        "| with 16-byte loads |",
        "|---|---|---|---|---|---|",
    ]
    for k in kernel_summary(launches, results):
        loads = " ".join(f"{w}×{n}" for w, n in sorted(k["loads"].items()))
        rows.append(
            f"| `{k['kernel']}` | {k['compiled']} | {k['registers']} | {k['spill_bytes']} | {loads} | "
            f"{k['with_16_byte_loads']}/{k['compiled']} |"
        )
    header = "| launch | target | registers | spilled bytes | shared bytes | global loads (bytes × count) |"
    rows += ["", header, "|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("ok"):
            continue
        u = r["usage"]
        loads = " ".join(f"{w}×{n}" for w, n in u["global_loads"].items())
        rows.append(
            f"| `{launch_label(launches[r['index']])}` | {r['target']} | {u['registers']} | "
            f"{u['spill_bytes']} | {u['shared_bytes']} | {loads} |"
        )
    Path(path).write_text("\n".join(rows) + "\n")


# --- 3. the command -------------------------------------------------------------------------------


def _default_test_files(tests_dir: Path) -> list[str]:
    kernel_modules = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    names = [f"test_{m}.py" for m in kernel_modules] + list(EXTRA_TEST_FILES)
    return [str(tests_dir / n) for n in names if (tests_dir / n).exists()]


def record_tests(test_paths: list[str], out: str) -> None:
    """Run pytest on ``test_paths`` in the interpreter with launch recording into ``out``."""
    env = dict(os.environ, TRITON_INTERPRET="1", FASTPPO_RECORD_LAUNCHES=str(Path(out).resolve()))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *test_paths]
    print("recording:", " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        raise SystemExit("compile gate: the tests failed while recording; fix them first")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastppo.kernels.compile_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--launches", help="compile this recording instead of recording the tests")
    parser.add_argument("--record", help="only record the tests' launches into this file")
    parser.add_argument("--tests", nargs="+", help="test paths to record (default: the kernel tests)")
    parser.add_argument("--python", help="compile with this Python (another environment's Triton)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, e.g. cuda:90,cuda:80")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--report", help="write registers, spills, shared memory and load widths here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, with_report=args.report is not None)
        return 0

    launches_file = args.launches
    if launches_file is None:
        launches_file = args.record or str(Path(tempfile.mkdtemp()) / "launches.json")
        Path(launches_file).unlink(missing_ok=True)
        record_tests(args.tests or _default_test_files(Path.cwd() / "tests"), launches_file)
        if args.record:
            print(f"recorded {len(load_launches(launches_file))} distinct launches in {launches_file}")
            return 0
    launches = load_launches(launches_file)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    started = time.perf_counter()
    results = compile_launches(
        launches, targets=targets, python=args.python, jobs=args.jobs, with_report=args.report is not None
    )
    failures = [r for r in results if not r["ok"]]
    for r in failures:
        print(f"FAIL {r['target']} {launch_label(launches[r['index']])}: {r['error']}")
    version = next((r["triton"] for r in results if "triton" in r), "?")
    seconds = time.perf_counter() - started
    print(
        f"compile gate (triton {version}): {len(launches)} launches × {len(targets)} targets, "
        f"{len(results) - len(failures)} compiled, {len(failures)} failed in {seconds:.0f} s"
    )
    if args.report:
        write_report(args.report, launches, results)
    return 1 if failures else 0


if __name__ == "__main__":  # also run by path, as a worker, where fastppo need not be installed
    sys.exit(main())
