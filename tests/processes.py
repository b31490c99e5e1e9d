"""Child processes for the tests: each in its own process group, which a timeout kills whole (a
torchrun's workers included), so a stuck run never outlives its test. Before the kill every
process of the group prints the Python stack of each of its threads (SIGABRT with
``PYTHONFAULTHANDLER=1``), and the failure shows them: a hang names where it is stuck."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "fastppo.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TORCHRUN_CLI = [*TORCHRUN, *CLI[1:]]  # the fastppo command in 2 processes


class Group:
    """A child started in a new session (its own process group); its output goes to temporary files
    (pipes would block a child that writes more than their buffer while nobody reads)."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict | None = None):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **(env or {}))
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=self.out, stderr=self.err, env=env, start_new_session=True
        )

    def signal_group(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill_with_stacks(self) -> str:
        """SIGABRT the group (each process prints its threads' stacks), give them a few seconds,
        SIGKILL what is left; returns the stacks printed."""
        self.signal_group(signal.SIGABRT)
        deadline = time.time() + 10
        while time.time() < deadline and (self.proc.poll() is None or self.group_alive()):
            time.sleep(0.1)  # poll() reaps the leader, so a dead leader leaves the group
        if self.group_alive():
            self.signal_group(signal.SIGKILL)
        self.proc.wait()
        return stacks(self._read()[1])

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for the child; past ``timeout`` kill its whole group and fail with its output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tail = self._read()[1][-3000:]
            raise AssertionError(
                f"timed out after {timeout} s; stderr:\n{tail}\nstacks:\n{self.kill_with_stacks()}"
            ) from None
        time.sleep(0.5)  # the leader is gone; nothing else of its group may linger (orphaned workers)
        if self.group_alive():
            stacks_left = self.kill_with_stacks()
            raise AssertionError(f"processes of the run outlived it; their stacks:\n{stacks_left}")
        stdout, stderr = self._read()
        self.out.close(), self.err.close()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)

    def _read(self) -> tuple[str, str]:
        texts = []
        for f in (self.out, self.err):
            f.flush()
            f.seek(0)
            texts.append(f.read())
        return texts[0], texts[1]


def stacks(stderr: str) -> str:
    """The thread stacks faulthandler printed in ``stderr`` (from its first "Fatal Python error")."""
    start = stderr.find("Fatal Python error")
    return stderr[start:][-12000:] if start >= 0 else "(none printed)"


def run(
    cmd: list[str], cwd: Path, *, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    return Group(cmd, cwd, env).wait(timeout)


def wait_for_lines(path: Path, n: int, group: Group, timeout: float = 300) -> None:
    """Until ``path`` holds ``n`` lines (the run is going), or fail if the run ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if group.proc.poll() is not None:
            raise AssertionError(f"the run ended early ({group.proc.returncode}): {group._read()[1][-2000:]}")
        time.sleep(0.2)
    group.signal_group(signal.SIGKILL)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout} s")
