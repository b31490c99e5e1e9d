"""The prepared GPU pass (``python -m fastppo.bench.gpu_pass``), run as its ``--dry-run`` on CPU so
that it cannot rot between GPU sessions: every phase runs and reports, the results fit in 8
files, a phase that fails or runs out of time loses nothing that ran before it, and none of it
needs ``datasets`` (blocked here in every process the pass starts)."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fastppo import cli
from fastppo.bench import gpu_pass, gpu_pass_phases

#: Put first on PYTHONPATH: every Python the pass starts finds ``datasets`` blocked.
NO_DATASETS = 'import sys\nsys.modules["datasets"] = None  # import datasets: ImportError\n'


def pass_run(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``python -m fastppo.bench.gpu_pass --dry-run ARGS`` from ``tmp``, ``datasets`` blocked;
    (the process, its output folder)."""
    (tmp / "block").mkdir(exist_ok=True)
    (tmp / "block" / "sitecustomize.py").write_text(NO_DATASETS)
    path = os.pathsep.join(filter(None, [str(tmp / "block"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("OUT", None)
    cmd = [sys.executable, "-m", "fastppo.bench.gpu_pass", "--dry-run", "--out", str(tmp / "out"), *args]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1200)
    return proc, tmp / "out"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole dry run, once: (process, output folder, summary.json, {phase: its entry})."""
    proc, out = pass_run(tmp_path_factory.mktemp("gpu_pass"))
    summary = json.loads((out / "summary.json").read_text())
    return proc, out, summary, {p["name"]: p for p in summary["phases"]}


def test_every_phase_runs_and_reports(dry_run):
    proc, out, summary, phases = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(phases) == list(gpu_pass.PHASE_NAMES)
    for phase in phases.values():
        assert phase["status"] == "ok" and phase["headline"] and not phase["error"], phase
        assert 0 < phase["seconds"] <= phase["limit_s"] + 1, phase
    # The one-screen summary comes last: a line per phase, then the files.
    tail = proc.stdout[proc.stdout.index("fastppo GPU pass (dry run)") :]
    assert len(tail.splitlines()) <= 40
    for name in gpu_pass.PHASE_NAMES:
        assert any(line.startswith(f"{name} ") and " ok " in line for line in tail.splitlines()), name
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_pass.FILES) and len(gpu_pass.FILES) <= 8
    assert phases["install"]["results"]["datasets_installed"] is False  # the block reached the phases


def test_benchmarks_and_ppo_step_in_one_results_file(dry_run):
    _, out, _, phases = dry_run
    bench = json.loads((out / "bench.json").read_text())
    assert {"device", "torch", "triton", "commit", "date", "copy_gbps"} <= set(bench)
    assert bench["copy_gbps"] > 0
    ops = {r["op"] for r in bench["records"]}
    assert ops == {*gpu_pass_phases.DRY_BENCH_OPS, "ppo_step"}, ops
    assert not bench["skipped"], bench["skipped"]
    assert phases["bench"]["results"]["done"] == phases["bench"]["results"]["cases"] > 0
    steps = [r for r in bench["records"] if r["op"] == "ppo_step"]
    assert {r["provider"] for r in steps} == {"torch", "fastppo"}
    for r in steps:
        assert r["repeats"] >= 5 and r["ms_min"] <= r["ms_p20"] <= r["ms"] <= r["ms_p80"] <= r["ms_max"]
    table = (out / "bench.md").read_text()
    assert "| ppo_step |" in table and "| token_logprobs |" in table


def test_invariance_rollout_grpo_and_tests(dry_run):
    _, out, _, phases = dry_run
    checks = phases["invariance"]["results"]["checks"]
    assert len(checks) == 7 and all(c["equal"] for c in checks.values())
    rollout = json.loads((out / "rollout.json").read_text())
    assert [(r["model"], r["engine"]) for r in rollout["records"]] == [("tiny", "hf")]
    assert rollout["records"][0]["tokens_per_s"] > 0 and "| tiny |" in (out / "rollout.md").read_text()
    grpo = phases["grpo"]["results"]
    assert len(grpo["iterations"]) == 2 and grpo["final_line"].startswith("mean reward")
    assert set(grpo["steady_state_seconds"]) >= {"time/generate", "time/logprobs", "time/update"}
    cases = list(ET.parse(out / "tests.xml").getroot().iter("testcase"))
    assert len(cases) == phases["tests"]["results"]["passed"] > 0
    assert phases["tests"]["results"]["failed"] == phases["tests"]["results"]["errors"] == 0


def test_a_failed_phase_loses_nothing_before_it(tmp_path):
    """An injected failure in ppo_step and a rollout phase out of time: invariance's results
    stay, and the phases after the failure still run."""
    proc, out = pass_run(
        tmp_path, "--phases", "invariance,ppo_step,rollout", "--inject-failure", "ppo_step",
        "--limits", "rollout=4",
    )  # fmt: skip
    assert proc.returncode == 1
    phases = {p["name"]: p for p in json.loads((out / "summary.json").read_text())["phases"]}
    assert [phases[n]["status"] for n in phases] == ["ok", "error", "timeout"]
    assert len(phases["invariance"]["results"]["checks"]) == 7
    assert "RuntimeError: injected failure (--inject-failure ppo_step)" == phases["ppo_step"]["error"]
    assert "ppo_step    error" in proc.stdout and "rollout     timeout" in proc.stdout
    assert {p.name for p in out.iterdir()} <= set(gpu_pass.FILES)


def test_unreached_bench_cases_are_listed(tmp_path):
    """A bench phase stopped by its limit: what it measured is kept, what it did not reach is
    listed as skipped with the reason; a line cut off by the kill is dropped."""
    case = {"op": "gae", "provider": "fastppo", "mode": "fwd", "dtype": "float32", "shape": {"B": 4, "T": 8}}
    other = case | {"provider": "torch"}
    lines = [{"meta": {"device": "gpu-x", "copy_gbps": 100.0}}, {"plan": [case, other]},
             {"record": case | {"ms": 1.0, "ms_p20": 1.0, "ms_p80": 1.0, "gbps": 1.0, "peak_bytes": 0}},
             ]  # fmt: skip
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"record": {"op"')
    result = gpu_pass.assemble_bench(path, "abc123")
    assert result["device"] == "gpu-x" and result["commit"] == "abc123"
    assert [r["provider"] for r in result["records"]] == ["fastppo"]
    assert result["skipped"] == [other | {"reason": "not reached: the bench phase's time limit"}]


def test_bad_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_pass.main(["--phases", "install,gae2", "--dry-run"])
    assert exc.value.code == 2 and "unknown ['gae2']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_pass.main(["--limits", "bench"])
    assert "--limits: 'bench': NAME=SECONDS" in capsys.readouterr().err


def test_data_without_datasets_is_one_line(tmp_path, monkeypatch, capsys):
    """``datasets`` is imported only to read --data; without it, --data fails at start with one
    line naming the flag (what the GPU machine, which lacks it, would show)."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "abc:"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)
    args = ["train", "grpo", "--prompts", str(tmp_path / "p.jsonl"), "--output_dir", str(tmp_path / "r")]
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "prompts: reading" in err and "needs the datasets library (pip install datasets)" in err
