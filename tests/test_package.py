"""Installation layout, the `fastppo env` command and the report of a missing extension."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **env),
    )


KERNELS_ORIGIN = (
    "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)"
)


def test_top_level_kernels_is_never_ours(tmp_path):
    """The Triton kernels are `fastppo.kernels` only. Hugging Face's `kernels` (which transformers
    >= 5.2x imports) owns the top-level name: from the repository root, where the current folder is
    on sys.path, `kernels` must not resolve to a folder of this repository, or transformers breaks."""
    for cwd, env in ((ROOT, {}), (tmp_path, {"PYTHONPATH": str(ROOT)})):
        proc = run_python(KERNELS_ORIGIN, cwd, **env)
        assert proc.returncode == 0, proc.stderr
        origin = proc.stdout.strip()
        assert origin == "None" or "site-packages" in Path(origin).parts, origin  # installed, not ours
    assert not (ROOT / "kernels").exists()
    proc = run_python("import transformers.modeling_utils", ROOT, PYTHONPATH=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_python("import fastppo.kernels as k; print(k.__file__)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent == ROOT / "fastppo" / "kernels"


def test_wheel_layout_and_import(tmp_path):
    """`pip install .` (a wheel) ships fastppo.kernels and fastppo._C and no top-level kernels."""
    # Build from a clean copy: setuptools would otherwise reuse (and leave behind) ROOT/build.
    src = tmp_path / "src"
    junk = (
        ".venv*",
        "build",
        ".git",
        "*.so",
        "__pycache__",
        ".pytest_cache",
        ".hypothesis",
        ".ruff_cache",
        "*.egg-info",
    )
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*junk))
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q"]
    build = subprocess.run([*pip_wheel, "-w", str(wheels)], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("fastppo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastppo/kernels/token_logprobs.py" in names and "fastppo/kernels/__init__.py" in names
    assert any(n.startswith("fastppo/_C") and n.endswith(".so") for n in names)
    assert not any(n.startswith("kernels/") for n in names)
    # The benchmarks ship in the package; their committed results stay in the repository.
    shipped = {"fastppo/bench/run.py", "fastppo/bench/harness.py", "fastppo/bench/bench_rollout.py"}
    assert shipped <= set(names)
    assert not any(n.startswith("bench/") or n.endswith((".json", ".md")) for n in names)

    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    code = (
        "import fastppo, fastppo.kernels, fastppo._C; print(fastppo.__file__); print(fastppo._C.__file__);"
        + KERNELS_ORIGIN
    )
    proc = run_python(code, tmp_path, PYTHONPATH=str(site))
    assert proc.returncode == 0, proc.stderr
    pkg_file, ext_file, kernels_origin = proc.stdout.split()
    assert pkg_file.startswith(str(site)) and ext_file.startswith(str(site))
    assert kernels_origin == "None" or not kernels_origin.startswith(str(site)), kernels_origin
    # `fastppo bench` of the installed wheel, from a folder of its own: results where it is told.
    work = tmp_path / "work"
    work.mkdir()
    code = "import sys; from fastppo.cli import main; sys.exit(main(sys.argv[1:]))"
    bench = ["bench", "masked_whiten", "--quick", "--device", "cpu", "--providers", "torch", "--output"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *bench, "out"], cwd=work, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(site), TRITON_INTERPRET="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (work / "out").glob("*.json")
    import fastppo

    assert json.loads(result.read_text())["commit"] == f"fastppo-{fastppo.__version__}"
    assert sorted(os.listdir(work)) == ["out"]


def test_env_command(tmp_path):
    exe = shutil.which("fastppo", path=str(Path(sys.executable).parent)) or shutil.which("fastppo")
    assert exe, "the fastppo console script is not installed"
    proc = subprocess.run([exe, "env"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for key in ("python", "torch", "triton", "transformers", "cuda", "backend (cpu)", "fastppo._C"):
        assert key in out, key
    assert "fastppo._C     built" in out


def test_env_reports_the_backend_choice(tmp_path):
    code = "from fastppo.cli import env_report; print(env_report())"
    out = run_python(code, tmp_path, FASTPPO_BACKEND="torch").stdout
    assert "backend (cpu)  torch" in out
    out = run_python(code, tmp_path, TRITON_INTERPRET="1", FASTPPO_BACKEND="auto").stdout
    assert "backend (cpu)  triton-interpreter" in out
    out = run_python(code, tmp_path, FASTPPO_BACKEND="triton", TRITON_INTERPRET="0").stdout
    assert "backend (cpu)  unavailable" in out and "TRITON_INTERPRET=1" in out


def test_missing_extension_is_reported_clearly(tmp_path):
    code = (
        "import sys; sys.modules['fastppo._C'] = None\n"  # as if the build had failed
        "import torch, fastppo\n"
        "assert not fastppo.extension_available()\n"
        "from fastppo.cli import env_report; print(env_report())\n"
        "fastppo.packing.unpad(torch.ones(2, 3, dtype=torch.bool))\n"
    )
    proc = run_python(code, tmp_path)
    assert "fastppo._C     NOT BUILT" in proc.stdout
    assert proc.returncode != 0 and "RuntimeError: fastppo._C, the C++ extension, is not built" in proc.stderr


@pytest.mark.parametrize("argv", [[], ["nonsense"]])
def test_cli_usage_errors(argv, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastppo.cli", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "usage: fastppo" in proc.stderr
