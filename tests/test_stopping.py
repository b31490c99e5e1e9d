"""Stopping a run with a real signal (SIGINT, as Ctrl-C sends, and SIGTERM, as schedulers send):
the current iteration finishes, a checkpoint is saved (all ranks together under torchrun), the plot
is written, the command to resume is printed and the exit status is 128 + the signal; resuming
with that command goes on from the checkpoint."""

import json
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
from processes import CLI, TORCHRUN_CLI, Group, run, wait_for_lines

from fastppo.trainer import checkpoint

SMALL = ["--batch_size", "16", "--minibatch_size", "8", "--max_tokens_per_microbatch", "256"]
STOPPED = re.compile(r"interrupted by (SIG\w+): saved (\S+); resume with\n  (.+)")


def iterations(path) -> list[int]:
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]


def check_stopped(proc, out, signum, *, torchrun=False):
    """The checkpoint, metrics and plot of a stopped run; returns (its step, the resume command).
    No traceback, but torchrun's own (its agent reports the signal it received by raising)."""
    found = STOPPED.search(proc.stderr)
    assert found, proc.stderr[-2000:]
    assert found.group(1) == signal.Signals(signum).name
    assert proc.stderr.count("Traceback") == (1 if torchrun else 0), proc.stderr[-3000:]
    if torchrun:
        assert proc.stderr.rstrip().endswith("got signal: 2")  # SignalException, the last line
    step = int(found.group(2).rsplit("-", 1)[1])
    assert iterations(out / "metrics.jsonl") == list(range(1, step + 1)) and step >= 2
    assert (out / f"checkpoint-{step}" / "policy" / "model.safetensors").exists()
    assert (out / f"checkpoint-{step}" / "trainer_state.pt").exists()
    assert (out / "metrics.png").exists()
    return step, found.group(3)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_one_process_cleanly_and_it_resumes(signum, tmp_path):
    cmd = [*CLI, "train", "grpo", "--iterations", "400", *SMALL, "--output_dir", "run"]
    group = Group(cmd, tmp_path)
    wait_for_lines(tmp_path / "run" / "metrics.jsonl", 2, group)
    group.proc.send_signal(signum)
    proc = group.wait(timeout=300)
    assert proc.returncode == 128 + signum
    step, resume = check_stopped(proc, tmp_path / "run", signum)
    if signum != signal.SIGINT:
        return
    # The printed command, asked for one more iteration, goes on from the checkpoint.
    args = shlex.split(resume)
    assert args[:3] == ["fastppo", "train", "grpo"] and args[-2:] == ["--resume", "true"]
    args[args.index("--iterations") + 1] = str(step + 1)
    resumed = run([*CLI, *args[1:]], tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from run/checkpoint-{step}" in resumed.stdout + resumed.stderr
    assert iterations(tmp_path / "run" / "metrics.jsonl") == list(range(1, step + 2))


AT_ONCE = re.compile(
    r"stopped by SIGINT without saving the current iteration; newest checkpoint (\S+); resume with\n  (.+)"
)


def wait_for_output(group: Group, text: str, timeout: float = 120) -> None:
    """Until the child's stdout holds ``text`` (it runs unbuffered), or fail if it ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and group.proc.poll() is None:
        if text in group._read()[0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the output: {group._read()[1][-2000:]}")


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    """The first SIGINT asks for a stop after the iteration; a second one during it stops the
    process at once: no traceback, one line saying the iteration was not saved and the command
    that resumes from the newest checkpoint (which exists), exit status 130."""
    cmd = [*CLI, "train", "grpo", "--iterations", "400", *SMALL, "--save_every", "1", "--output_dir", "run"]
    group = Group(cmd, tmp_path, env={"PYTHONUNBUFFERED": "1"})
    wait_for_lines(tmp_path / "run" / "metrics.jsonl", 1, group)
    while checkpoint.latest_checkpoint(tmp_path / "run") is None and group.proc.poll() is None:
        time.sleep(0.05)  # the signals come in the next iteration, not while the first one is saved
    group.proc.send_signal(signal.SIGINT)
    wait_for_output(group, "SIGINT: stopping after this step (again to stop at once")
    group.proc.send_signal(signal.SIGINT)
    proc = group.wait(timeout=300)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    found = AT_ONCE.search(proc.stderr)
    assert found, proc.stderr[-2000:]
    newest = checkpoint.latest_checkpoint(tmp_path / "run")
    assert found.group(1) == str(Path("run") / newest.name)
    assert not STOPPED.search(proc.stderr)  # it did not finish the iteration and save it
    args = shlex.split(found.group(2))
    assert args[:3] == ["fastppo", "train", "grpo"] and args[-2:] == ["--resume", "true"]


def test_stopped_at_once_before_any_checkpoint_says_so(tmp_path):
    from fastppo.cli import _stopped_at_once
    from fastppo.trainer.errors import StoppedAtOnce

    said = _stopped_at_once("grpo", [], str(tmp_path / "run"), StoppedAtOnce("SIGINT", signal.SIGINT))
    none = f"no checkpoint in {tmp_path / 'run'} to resume from"
    assert said == f"stopped by SIGINT without saving the current iteration; {none}"


def test_ctrl_c_stops_two_processes_together(tmp_path):
    """Ctrl-C signals the terminal's whole process group: torchrun and both workers (torchrun then
    forwards it again). Both ranks stop after the same iteration, save one checkpoint together and
    check that their weights agree; no process outlives the run."""
    cmd = [*TORCHRUN_CLI, "train", "ppo", "--device", "cpu", "--iterations", "400", *SMALL]
    group = Group([*cmd, "--output_dir", "run"], tmp_path)
    wait_for_lines(tmp_path / "run" / "metrics.jsonl", 2, group)
    group.signal_group(signal.SIGINT)
    proc = group.wait(timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "rank 0: 2 ranks in sync" in output and "rank 1: 2 ranks in sync" in output
    check_stopped(proc, tmp_path / "run", signal.SIGINT, torchrun=True)


def test_an_offline_loop_stops_mid_epoch_and_resumes_exactly(tmp_path):
    """SFT stopped by SIGINT mid-epoch saves a checkpoint at that step (with the epoch's batch
    order and how far it got); the printed command resumes it, and the result equals an
    uninterrupted run bit for bit. A second start into the folder is refused."""
    args = ["train", "sft", "--epochs", "2", "--n_synthetic", "384", "--batch_size", "8"]
    straight = run([*CLI, *args, "--output_dir", "a"], tmp_path, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    group = Group([*CLI, *args, "--output_dir", "b"], tmp_path)
    wait_for_lines(tmp_path / "b" / "metrics.jsonl", 3, group)
    group.proc.send_signal(signal.SIGINT)
    proc = group.wait(timeout=300)
    assert proc.returncode == 130
    found = STOPPED.search(proc.stderr)
    assert found and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    resumed = run([*CLI, *shlex.split(found.group(3))[1:]], tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = lambda d: [
        json.loads(line)["step"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
    ]  # noqa: E731
    assert steps("b") == steps("a")
    final = sorted((tmp_path / "a").glob("checkpoint-*"))[-1].name
    weights = [(tmp_path / d / final / "policy" / "model.safetensors").read_bytes() for d in ("a", "b")]
    assert weights[0] == weights[1]
    again = run([*CLI, *args, "--output_dir", "a"], tmp_path, timeout=300)
    assert again.returncode == 2 and "output_dir: a holds a run; pass --resume" in again.stderr
