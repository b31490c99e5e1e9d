"""A stuck process names where it is stuck: the tests' process groups print every thread's stack
before they are killed, and a finished ``fastppo`` command that cannot exit prints its stacks and
exits 1 instead of hanging (issue 15: a torchrun test once hung at teardown with nothing to show
where)."""

import sys
import textwrap
import time

import processes
import pytest


def test_a_timeout_shows_the_stuck_stack(tmp_path):
    hung = "import time\ndef waiting_forever():\n    time.sleep(600)\nwaiting_forever()\n"
    with pytest.raises(AssertionError, match="timed out after 2 s") as failure:
        processes.run([sys.executable, "-c", hung], tmp_path, timeout=2)
    assert "line 3 in waiting_forever" in str(failure.value), str(failure.value)


def test_processes_that_outlive_the_leader_show_their_stacks(tmp_path):
    orphan = "import time\ndef orphaned():\n    time.sleep(600)\norphaned()\n"
    leader = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {orphan!r}])\n"
    leader += "import time; time.sleep(1)\n"  # the orphan is running when the leader exits
    started = time.time()
    with pytest.raises(AssertionError, match="outlived it") as failure:
        processes.run([sys.executable, "-c", leader], tmp_path, timeout=60)
    assert "line 3 in orphaned" in str(failure.value), str(failure.value)
    assert time.time() - started < 30


def test_a_command_that_cannot_exit_prints_its_stacks_and_exits_1(tmp_path):
    """An exit handler that never returns stands in for a stuck teardown (a process group's
    threads): ``entry`` bounds the exit, so the process ends with status 1 and shows where."""
    script = textwrap.dedent("""
        import atexit, time
        from fastppo import cli

        def stuck_teardown():
            time.sleep(600)

        atexit.register(stuck_teardown)
        cli.EXIT_LIMIT_S = 1
        cli.main = lambda: 0  # the command itself succeeded
        cli.entry()
    """)
    started = time.time()
    proc = processes.run([sys.executable, "-c", script], tmp_path, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Timeout (0:00:01)!" in proc.stderr and "in stuck_teardown" in proc.stderr, proc.stderr
    assert time.time() - started < 30


def test_a_command_that_exits_keeps_its_status(tmp_path):
    proc = processes.run([*processes.CLI, "env"], tmp_path, timeout=120)
    assert proc.returncode == 0 and "fastppo" in proc.stdout, proc.stderr
    proc = processes.run([*processes.CLI, "train", "ppo", "--iteratons", "3"], tmp_path)
    assert proc.returncode == 2 and "--iterations" in proc.stderr, proc.stderr
