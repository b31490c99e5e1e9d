"""A run's metrics: ``metrics.jsonl`` always, TensorBoard scalars when tensorboard is installed,
and ``metrics.png`` (curves, when matplotlib is installed) when the run closes."""

import json
from pathlib import Path

from fastppo.trainer import plots


class MetricsWriter:
    def __init__(self, out: Path, *, enabled: bool = True, log=print):
        self.out, self.log = Path(out), log
        self.file = open(self.out / "metrics.jsonl", "a") if enabled else None
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
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
