"""The compile gate (fastppo.kernels.compile_check): recording in the interpreter, compiling for
sm_90 and sm_80 without a GPU, and catching the kernels the interpreter runs but the compiler
rejects (tests/compile_fixtures/kernels.py)."""

import json
import os

import pytest
import torch
from compile_fixtures import kernels as fixtures

import fastppo
from fastppo.kernels import INTERPRETED, compile_check
from fastppo.kernels._common import codes
from fastppo.kernels.compile_check import compile_launches, main, recording

pytestmark = pytest.mark.skipif(
    not INTERPRETED, reason="records launches of the interpreter (TRITON_INTERPRET=1)"
)

#: A Python whose Triton is 3.6 (the oldest supported), set by .ci/run; the thread-locality crash
#: exists only there.
TRITON36_PYTHON = os.environ.get("FASTPPO_TRITON36_PYTHON")


def record(kernel, grid, *args, **kwargs) -> list[dict]:
    with recording() as launches:
        kernel[grid](*args, **kwargs)
    return list(launches.values())


def test_recording_keeps_what_the_compiler_specializes_on():
    x, out = torch.arange(48.0), torch.empty(48)
    with recording() as launches:
        fixtures.clamp_below[(3,)](x, out, 48, BLOCK=16, num_warps=2)
        fixtures.clamp_below[(3,)](x, out, 32, BLOCK=16, num_warps=2)  # same class: divisible by 16
        fixtures.clamp_below[(3,)](x[1:], out, 47, BLOCK=16)  # misaligned view, odd size
    assert torch.equal(out[:47], x[1:])  # the interpreter ran them
    first, second = sorted(launches.values(), key=lambda launch: len(launch["options"]))[::-1]
    assert first["kernel"] == "clamp_below" and first["file"].endswith("compile_fixtures/kernels.py")
    assert first["args"] == {
        "x_ptr": {"tensor": "float32", "aligned": True},
        "out_ptr": {"tensor": "float32", "aligned": True},
        "N": {"int": 16},
        "BLOCK": {"constexpr": 16},
    }
    assert first["options"] == {"num_warps": 2}
    assert second["args"]["x_ptr"] == {"tensor": "float32", "aligned": False}
    assert second["args"]["N"] == {"int": 17}


def test_canonical_ints_keep_width_one_and_divisibility():
    canon = compile_check._canonical_int
    assert [canon(v) for v in (1, 0, 32, 33, -100)] == [1, 16, 16, 17, -17]
    assert canon(2**40) == 2**32 + 16 and canon(2**40 + 3) == 2**32 + 17
    assert canon(-(2**40)) == -(2**32 + 16)


def test_compiles_a_good_launch_with_its_resource_report():
    launches = record(fixtures.clamp_below, (1,), torch.zeros(64), torch.empty(64), 64, BLOCK=64)
    results = compile_launches(launches, jobs=1, with_report=True)
    assert [(r["target"], r["ok"]) for r in results] == [("cuda:80", True), ("cuda:90", True)]
    usage = results[1]["usage"]
    assert usage["registers"] > 0 and usage["spill_bytes"] == 0
    assert usage["global_loads"]  # the load of x, by width in bytes


def test_fails_a_kernel_that_reads_a_plain_global(tmp_path, capsys):
    """The flagship's failure on the H200: the interpreter reads the global, the compiler raises."""
    x, out = torch.tensor([1.0, -2.0]), torch.empty(2)
    launches = record(fixtures.clamp_below_plain_global, (1,), x, out, 2, BLOCK=16)
    assert torch.equal(out, x)
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches))
    assert main(["--launches", str(path), "--jobs", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    failures = [line for line in lines if line.startswith("FAIL")]
    assert len(failures) == 2 and all("clamp_below_plain_global" in line for line in failures)
    assert all("global variable _PLAIN_FLOOR" in line for line in failures)
    assert "1 launches × 2 targets, 0 compiled, 2 failed" in lines[-1]


@pytest.mark.skipif(
    TRITON36_PYTHON is None, reason="FASTPPO_TRITON36_PYTHON (a Python with triton 3.6) unset"
)
def test_fails_the_reduction_that_crashed_triton_36(tmp_path):
    """The loss reduction's crash on the H200: a compiler pass of Triton 3.6 asserts at BLOCK_B = 256,
    BLOCK_C = 4 (the launcher's choice at (512, 8192)); the interpreter computes it correctly."""
    partials = torch.rand(3, 5, 2)
    out = torch.empty(2 + 3)
    launches = record(
        fixtures.row_sums_of_chunk_tiles, (1,), partials, out, 3, 5, BLOCK_B=256, BLOCK_C=4, num_warps=8
    )
    torch.testing.assert_close(out[0], partials[..., 0].sum())
    results = compile_launches(launches, python=TRITON36_PYTHON, jobs=1)
    assert results[0]["triton"].startswith("3.6")
    assert [r["ok"] for r in results] == [False, False]
    assert all("PassManager::run failed" in r["error"] for r in results)


def test_recorder_keeps_only_the_modules_it_is_asked_for():
    """The suite records fastppo's kernels only (conftest): the fixtures here are written to fail."""
    recorder = compile_check.LaunchRecorder(module_prefix="fastppo.")
    recorder.start()
    try:
        fixtures.clamp_below[(1,)](torch.zeros(4), torch.empty(4), 4, BLOCK=16)
        fastppo.kl_penalty(torch.zeros(4), torch.ones(4))
    finally:
        recorder.stop()
    assert [launch["kernel"] for launch in recorder.launches.values()] == ["_kl_penalty_fwd_kernel"]


def test_named_codes_compile_where_a_namedtuple_global_does_not():
    """``_common.codes``: a kernel compares with ``MODE.negate`` in the interpreter and the compiler;
    the same comparison with a plain namedtuple global runs interpreted and fails to compile."""
    x, out = torch.tensor([1.0, -2.0]), torch.empty(2)
    good = record(fixtures.by_code, (1,), x, out, 2, BLOCK=16, M=fixtures.MODE.of("negate", "mode"))
    assert torch.equal(out, -x)
    bad = record(fixtures.by_plain_namedtuple, (1,), x, out, 2, BLOCK=16, M=1)
    assert torch.equal(out, -x)
    results = compile_launches(good + bad, python=TRITON36_PYTHON, jobs=1)
    assert [r["ok"] for r in results] == [True, True, False, False]
    assert all("global variable _PLAIN_MODE" in r["error"] for r in results[2:])


def test_named_codes_on_the_host():
    agg = codes("Agg", ("token-mean", "token-sum"))
    assert (agg.token_mean, agg.token_sum, len(agg), agg.names) == (0, 1, 2, ("token-mean", "token-sum"))
    assert agg.of("token-sum", "agg") == 1
    with pytest.raises(ValueError, match="^agg must be one of token-mean, token-sum; got 'sum'$"):
        agg.of("sum", "agg")


def test_report_summarises_each_kernel_and_block_size(tmp_path):
    """16-byte loads need a size the JIT knows to be a multiple of 16: N = 128 has them (4 lanes of
    a thread's 4 contiguous floats), N = 47 not."""
    x, out = torch.zeros(128), torch.empty(128)
    with recording() as launches:
        fixtures.clamp_below[(1,)](x, out, 128, BLOCK=128, num_warps=1)
        fixtures.clamp_below[(1,)](x, out, 47, BLOCK=128, num_warps=1)
        fixtures.clamp_below[(1,)](x, out, 47, BLOCK=16, num_warps=1)
    launches = list(launches.values())
    results = compile_launches(launches, targets=("cuda:90",), jobs=1, with_report=True)
    summary = {k["kernel"]: k for k in compile_check.kernel_summary(launches, results)}
    assert list(summary) == ["kernels.clamp_below[BLOCK=16]", "kernels.clamp_below[BLOCK=128]"]
    wide = summary["kernels.clamp_below[BLOCK=128]"]
    assert (wide["compiled"], wide["with_16_byte_loads"]) == (2, 1)
    assert summary["kernels.clamp_below[BLOCK=16]"]["with_16_byte_loads"] == 0
    assert all(k["spill_bytes"] == 0 and k["registers"] > 0 for k in summary.values())
    report = tmp_path / "report.md"
    compile_check.write_report(str(report), launches, results)
    assert "| `kernels.clamp_below[BLOCK=128]` | 2 |" in report.read_text()
