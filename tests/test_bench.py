"""The benchmark harness: a quick CPU run writes a results file in the schema of DESIGN §7;
`fastppo bench` runs from any directory and writes only where it is told."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastppo.bench import bench_ppo_step, harness

ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "fastppo.cli", "bench"]
QUICK = ["--quick", "--device", "cpu", "--cpu-budget-s", "0.05"]


def bench(cwd: Path, *args, cmd=BENCH) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_bench(tmp_path, *args):
    """A quick CPU run from ``tmp_path``, its results in ``tmp_path/out``: (process, the JSON)."""
    proc = bench(tmp_path, *QUICK, "--output", "out", *args)
    assert proc.returncode == 0, proc.stderr
    (json_path,) = (tmp_path / "out").glob("*.json")
    return proc, json.loads(json_path.read_text())


def bench_spots() -> set[str]:
    """Where a run from the clone would write: the clone's top level, bench/ (the committed
    results) and the package's bench/ folder (which, installed, is site-packages)."""
    spots = [*ROOT.iterdir(), *(ROOT / "bench").rglob("*"), *(ROOT / "fastppo" / "bench").rglob("*")]
    return {str(p.relative_to(ROOT)) for p in spots if "__pycache__" not in p.parts}


def test_fastppo_bench_runs_anywhere_and_writes_where_told(tmp_path):
    """From a folder outside the clone: `--output DIR` gets the JSON and its table, no output
    flag means ./bench-results, and nothing is written into the repository or the package."""
    before = bench_spots()
    _, result = run_bench(tmp_path, "masked_whiten", "--providers", "torch")
    assert {r["op"] for r in result["records"]} == {"masked_whiten"} and not result["skipped"]
    assert result["commit"] and result["commit"] != "unknown"
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".json", ".md"]
    proc = bench(tmp_path, *QUICK, "masked_whiten", "--providers", "torch")
    assert proc.returncode == 0, proc.stderr
    (default,) = (tmp_path / "bench-results").glob("*.json")
    assert f"wrote {Path('bench-results') / default.name}" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-results", "out"]
    assert bench_spots() - before == set()


def test_bench_help_names_the_default_output(tmp_path):
    proc = bench(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # as argparse wrapped it, whatever the width
    assert "(default: bench-results, from the current directory)" in text and "token_logprobs" in text


def test_loss_benchmarks(tmp_path):
    _, result = run_bench(
        tmp_path, "--ops", "kl_penalty,ppo_policy_loss,value_loss", "--providers", "torch,fastppo"
    )
    seen = {(r["op"], r["provider"], r["mode"], r["shape"]["B"]) for r in result["records"]}
    ops = ("kl_penalty", "ppo_policy_loss", "value_loss")
    expected = {
        (op, p, m, B) for op in ops for p in ("torch", "fastppo") for m in ("fwd", "fwd_bwd") for B in (4, 8)
    }
    assert seen == expected and not result["skipped"]
    floor = {"kl_penalty": (12, 20), "ppo_policy_loss": (21, 29), "value_loss": (13, 17)}  # bytes per token
    for r in result["records"]:
        per_token = r["gbps"] * 1e6 * r["ms"] / (r["shape"]["B"] * r["shape"]["T"])
        assert per_token == pytest.approx(floor[r["op"]][r["mode"] == "fwd_bwd"])


def test_policy_loss_family_benchmarks(tmp_path):
    """Each member of the family is its own case (the op name, a colon, the member), against verl's
    own function where verl is installed."""
    members = ("gspo", "cispo", "sapo", "geo_mean", "tis")
    ops = ",".join(f"ppo_policy_loss:{m}" for m in members)
    proc, result = run_bench(
        tmp_path, "--ops", ops, "--providers", "torch,verl,fastppo", "--modes", "fwd_bwd"
    )
    providers = {"torch", "fastppo"} | ({"verl"} if "provider 'verl' left out" not in proc.stdout else set())
    seen = {(r["op"], r["provider"], r["shape"]["B"]) for r in result["records"]}
    assert seen == {(f"ppo_policy_loss:{m}", p, B) for m in members for p in providers for B in (4, 8)}
    for r in result["records"]:
        per_token = r["gbps"] * 1e6 * r["ms"] / (r["shape"]["B"] * r["shape"]["T"])
        assert per_token == pytest.approx(21 if r["op"].endswith(":tis") else 17)


def test_advantage_benchmarks(tmp_path):
    _, result = run_bench(
        tmp_path, "--ops", "gae,masked_whiten,group_advantages", "--providers", "torch,fastppo"
    )
    seen = {(r["op"], r["provider"]) for r in result["records"]}
    # The Python loop baseline always runs: the speed-up targets are stated against it.
    assert seen == {
        ("gae", "python_loop"), ("gae", "torch"), ("gae", "fastppo"),
        ("masked_whiten", "torch"), ("masked_whiten", "fastppo"),
        ("group_advantages", "python_loop"), ("group_advantages", "torch"), ("group_advantages", "fastppo"),
    }  # fmt: skip
    assert all(r["mode"] == "fwd" for r in result["records"]) and not result["skipped"]


def test_packing_benchmarks(tmp_path):
    ops = "collate,unpad,plan_microbatches,balanced_partition"
    _, result = run_bench(tmp_path, "--ops", ops, "--providers", "torch,fastppo")
    seen = {(r["op"], r["provider"]) for r in result["records"]}
    assert seen == {
        ("collate", "python_loop"), ("collate", "fastppo"), ("unpad", "torch"), ("unpad", "fastppo"),
        ("plan_microbatches", "fastppo"), ("balanced_partition", "fastppo"),
    }  # fmt: skip
    assert not result["skipped"]


@pytest.mark.parametrize("where", ["fastppo bench", "python -m bench"])
def test_unknown_op_is_refused(where, tmp_path):
    """By `fastppo bench` anywhere, and by the repository's `python -m bench` shim from its root."""
    cmd, cwd = (BENCH, tmp_path) if where == "fastppo bench" else ([sys.executable, "-m", "bench"], ROOT)
    proc = bench(cwd, "--ops", "gae2", "--device", "cpu", "--output", str(tmp_path), cmd=cmd)
    assert proc.returncode == 2 and "--ops: unknown ['gae2']" in proc.stderr
    assert f"usage: {where}" in proc.stderr and not any(tmp_path.iterdir())


def test_ppo_step_benchmark(tmp_path):
    """A whole PPO update step (the trainer's micro_batch_losses, backward, optimizer step) with the
    fastppo ops and with their references: both measured, nothing left out."""
    proc, result = run_bench(
        tmp_path, "--ops", "ppo_step", "--providers", "torch,fastppo", "--modes", "fwd_bwd"
    )
    assert result["skipped"] == [], result["skipped"]
    assert {(r["op"], r["provider"], r["mode"]) for r in result["records"]} == {
        ("ppo_step", "torch", "fwd_bwd"),
        ("ppo_step", "fastppo", "fwd_bwd"),
    }
    assert all(r["shape"] == {"B": 4, "P": 8, "R": 24} and r["gbps"] is None for r in result["records"])
    assert "| ppo_step |" in next((tmp_path / "out").glob("*.md")).read_text()


def test_ppo_step_needs_a_gpu_at_full_size():
    module = bench_ppo_step
    said = []
    cases = list(
        module.benchmarks(
            device="cpu", quick=False, providers=["torch", "fastppo"], modes=["fwd_bwd"], log=said.append
        )
    )
    assert cases == [] and "needs a GPU" in said[0]
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # Qwen2-0.5B's shape, without allocating it
        model = AutoModelForCausalLM.from_config(module.qwen2_config(quick=False))
    assert 490e6 < sum(p.numel() for p in model.parameters()) < 500e6


def test_quick_run_writes_schema(tmp_path):
    proc, result = run_bench(tmp_path, "--ops", "token_logprobs", "--providers", "torch,fastppo,trl,verl")
    (json_path,) = (tmp_path / "out").glob("*.json")
    assert json_path.with_suffix(".md").exists()
    assert json_path.name.startswith(result["device"] + "-" + result["date"])
    for key, typ in [
        ("device", str),
        ("torch", str),
        ("triton", str),
        ("commit", str),
        ("date", str),
        ("copy_gbps", float),
        ("records", list),
    ]:
        assert isinstance(result[key], typ), key
    assert result["copy_gbps"] > 0
    # A peer is measured when it imports, and said to be left out when it does not.
    peers = [p for p in ("trl", "verl") if f"provider {p!r} left out" not in proc.stdout]
    # 2 shapes × (fwd: torch, fastppo, peers; fwd_bwd: the same and fastppo in place)
    assert len(result["records"]) == 2 * (2 + len(peers) + 3 + len(peers))
    for r in result["records"]:
        assert (
            r["op"] == "token_logprobs" and r["provider"] in harness.PROVIDERS and r["mode"] in harness.MODES
        )
        assert r["dtype"] == "bfloat16" and set(r["shape"]) >= {"N", "V"}
        assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["gbps"] > 0 and r["peak_bytes"] is None  # no peak memory on CPU
    assert {r["provider"] for r in result["records"]} == {"torch", "fastppo", *peers}


def test_failures_are_reported_not_dropped():
    def setup_fails():
        raise RuntimeError("provider cannot run this")

    ok = harness.Benchmark("token_logprobs", "torch", "fwd", "float32", {"N": 1}, 8, lambda: lambda: None)
    bad = harness.Benchmark("token_logprobs", "trl", "fwd", "float32", {"N": 1}, 8, setup_fails)
    records, skipped = harness.run_cases(
        [ok, bad], harness.torch.device("cpu"), cpu_budget_s=0.01, log=lambda _: None
    )
    assert [r["provider"] for r in records] == ["torch"]
    assert skipped[0]["provider"] == "trl" and "cannot run" in skipped[0]["reason"]


def test_benchmark_rejects_unknown_provider_or_mode():
    with pytest.raises(ValueError, match="provider"):
        harness.Benchmark("x", "numpy", "fwd", "f32", {}, 0, lambda: None)
    with pytest.raises(ValueError, match="mode"):
        harness.Benchmark("x", "torch", "bwd", "f32", {}, 0, lambda: None)


def test_linear_logprobs_benchmark(tmp_path):
    """Eager, unfused and fused fastppo, and the plain products, all measured (TRL's chunked
    kernel is CUDA-only; Liger is listed as left out where it is not installed)."""
    proc, result = run_bench(
        tmp_path,
        "--ops",
        "linear_logprobs",
        "--providers",
        "torch,fastppo,matmul,liger",
        "--modes",
        "fwd_bwd",
    )
    assert result["skipped"] == [], result["skipped"]
    seen = {(r["provider"], r["shape"].get("fused")) for r in result["records"]}
    assert seen == {("torch", None), ("fastppo", 0), ("fastppo", 1), ("matmul", None)}
    assert all(r["mode"] == "fwd_bwd" and r["peak_bytes"] is None for r in result["records"])
    if importlib.util.find_spec("liger_kernel") is None:
        assert "provider 'liger' left out" in proc.stdout + proc.stderr
