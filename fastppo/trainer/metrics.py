"""A run's metrics: ``metrics.jsonl`` always, TensorBoard scalars when tensorboard is installed,
and ``metrics.png`` (curves, when matplotlib is installed) when the run closes."""

import json
from pathlib import Path

from fastppo.trainer import plots


def truncate_rows(path: Path, key: str, last: int) -> None:
    """Keep the rows of a metrics.jsonl whose ``key`` is at most ``last`` (a resumed run rewrites
    the rows after its checkpoint instead of appending them twice)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get(key, 0) <= last]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsWriter:
    """``resume_at``: the step the run continues from; rows and TensorBoard events after it, from
    the interrupted run, are dropped (``key`` names the step field of the rows)."""

    def __init__(self, out: Path, *, enabled: bool = True, log=print, resume_at: int | None = None,
                 key: str = "iteration"):  # fmt: skip
        self.out, self.log = Path(out), log
        if enabled and resume_at is not None:
            truncate_rows(self.out / "metrics.jsonl", key, resume_at)
        self.file = open(self.out / "metrics.jsonl", "a") if enabled else None
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_at is None else resume_at + 1
                self.tensorboard = SummaryWriter(str(self.out / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is optional (the `train` extra)
                pass

    def write(self, record: dict, step: int) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "iteration", "epoch"):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if plots.plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png") is None:
            self.log("no metrics.png: install matplotlib for the plot")
