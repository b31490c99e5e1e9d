"""A run's metrics: ``metrics.jsonl`` always, TensorBoard scalars and Weights & Biases as
``report_to`` asks (by default TensorBoard when tensorboard is installed), and ``metrics.png``
(curves, when matplotlib is installed) when the run closes."""

import importlib.util
import json
import os
from pathlib import Path

from fastppo.trainer import plots
from fastppo.trainer.errors import UsageError

#: What ``report_to`` may name (comma-separated), or "none".
REPORTERS = ("tensorboard", "wandb")


def reporters(report_to: str | None) -> tuple[str, ...]:
    """The integrations ``report_to`` asks for: None is tensorboard when it is installed (else
    none), "none" none. A name not in REPORTERS, or one not installed, is a ``UsageError`` naming
    the field (raised when the config is built, before any training)."""
    if report_to is None:
        return ("tensorboard",) if importlib.util.find_spec("tensorboard") is not None else ()
    names = [name.strip().lower() for name in report_to.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    if not names or "none" in names:
        raise UsageError(f"report_to: {report_to!r}; comma-separated {', '.join(REPORTERS)}, or 'none' alone")
    for name in names:
        if name not in REPORTERS:
            raise UsageError(f"report_to: unknown {name!r}; choose from {', '.join(REPORTERS)} or 'none'")
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"report_to: {name} is not installed (pip install {name}), or leave it out")
    return tuple(dict.fromkeys(names))


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
    the interrupted run, are dropped (``key`` names the step field of the rows). ``report_to``:
    as the configs' field (``reporters``); ``config``: the run's settings, given to wandb.

    wandb: one wandb run per start of the loop (a resumed run is a new one), in the project
    ``WANDB_PROJECT`` (default "fastppo"), named after the output folder, its files under
    ``WANDB_DIR`` (default: the output folder); ``WANDB_MODE=offline`` keeps them local."""

    def __init__(self, out: Path, *, enabled: bool = True, log=print, resume_at: int | None = None,
                 key: str = "iteration", report_to: str | None = None,
                 config: dict | None = None):  # fmt: skip
        self.out, self.log = Path(out), log
        if enabled and resume_at is not None:
            truncate_rows(self.out / "metrics.jsonl", key, resume_at)
        self.file = open(self.out / "metrics.jsonl", "a") if enabled else None
        self.tensorboard = self.wandb = None
        names = reporters(report_to) if enabled else ()
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_at is None else resume_at + 1
            self.tensorboard = SummaryWriter(str(self.out / "tensorboard"), purge_step=purge)
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "fastppo"), name=self.out.resolve().name,
                dir=os.environ.get("WANDB_DIR", str(self.out)), config=config,
            )  # fmt: skip

    def write(self, record: dict, step: int) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {
            key: value for key, value in record.items()
            if isinstance(value, (int, float)) and key not in ("step", "iteration", "epoch")
        }  # fmt: skip
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if plots.plot_metrics(self.out / "metrics.jsonl", self.out / "metrics.png") is None:
            self.log("no metrics.png: install matplotlib for the plot")
