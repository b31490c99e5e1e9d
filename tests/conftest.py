"""Test set-up. Runs before anything imports triton.

Without a CUDA device the kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1). With one, they are compiled and the tests put their tensors on the GPU;
set TRITON_INTERPRET=1 yourself to interpret there too.
"""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n: the cores shared out, not oversubscribed
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # the processes the tests start

import pytest  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
HAS_CUDA = torch.cuda.is_available()
#: FASTPPO_RECORD_LAUNCHES=<file>: record every launch of fastppo's kernels for the compile gate
#: (``python -m fastppo.kernels.compile_check --launches <file>`` compiles them for sm_90/sm_80);
#: the kernels written to fail in compile_fixtures/ are left out.
RECORD_LAUNCHES = os.environ.get("FASTPPO_RECORD_LAUNCHES")


def pytest_configure(config):
    if RECORD_LAUNCHES and INTERPRET:
        from fastppo.kernels.compile_check import LaunchRecorder

        config._launch_recorder = LaunchRecorder(module_prefix="fastppo.")
        config._launch_recorder.start()


def pytest_unconfigure(config):
    recorder = getattr(config, "_launch_recorder", None)
    if recorder is not None:
        recorder.stop()
        recorder.save(RECORD_LAUNCHES)


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: CUDA when kernels compile, else CPU (interpreter)."""
    return "cuda" if HAS_CUDA and not INTERPRET else "cpu"


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    # A FASTPPO_BACKEND left in the shell would turn kernel tests into reference-vs-reference.
    monkeypatch.delenv("FASTPPO_BACKEND", raising=False)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA and not INTERPRET:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device with compiled Triton kernels")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def loop_backend(monkeypatch):
    """For tests of the training loops, not the kernels (their own tests run them in the
    interpreter, far too slowly for whole training runs): CPU tensors take the PyTorch reference
    path, and no progress bars."""
    monkeypatch.setenv("FASTPPO_BACKEND", "torch")
    monkeypatch.setenv("TQDM_DISABLE", "1")
