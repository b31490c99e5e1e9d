"""Mistakes in what a user gave (a flag, a file, a row of a file), told apart from bugs.

A ``UsageError`` message names the argument, the file and the row at fault; the ``fastppo``
command prints it on one line and exits with status 2 (``--debug`` shows the traceback instead).
It is a ``ValueError``, so library callers that catch those keep working.
"""


class UsageError(ValueError):
    """A user mistake: the message alone says what is wrong and where."""


class Interrupted(Exception):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint at ``step``."""

    def __init__(self, signal_name: str, signal_number: int, step: int, checkpoint: str):
        super().__init__(f"{signal_name} at step {step}: saved {checkpoint}")
        self.signal_name, self.signal_number = signal_name, signal_number
        self.step, self.checkpoint = step, checkpoint


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM in a single process: the run stopped at once, mid-iteration,
    without saving it (the newest checkpoint is what a resume finds). A ``KeyboardInterrupt``, so
    that nothing that catches ``Exception`` swallows it."""

    def __init__(self, signal_name: str, signal_number: int):
        super().__init__(f"{signal_name} again: stopped at once")
        self.signal_name, self.signal_number = signal_name, signal_number


class EngineError(RuntimeError):
    """The rollout engine failed or its weights do not match the trainer's. ``updated``: the
    iteration's update was done when it happened (the failure was in the sync after it), so the
    checkpoint saved on the way out includes that iteration."""

    def __init__(self, message: str, *, updated: bool = False):
        super().__init__(message)
        self.updated = updated
        self.record: dict | None = None  # the iteration's metrics, when it had any
        self.checkpoint: str | None = None  # where the run was saved on the way out
        self.started = False  # the run had begun its iterations
        self.tensors: list[str] = []  # a failed fingerprint check: every engine tensor that differs
