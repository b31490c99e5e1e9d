"""A PNG of a run's curves (reward, KL, entropy, losses, ...) from its metrics.jsonl."""

import json
from pathlib import Path

CURVES = ("reward", "kl", "entropy", "response_length", "policy_loss", "value_loss", "explained_variance",
          "clipfrac", "clipfrac_lower", "approx_kl", "approx_kl_k3", "loss", "accuracy", "eval_loss",
          "eval_accuracy")  # fmt: skip


def plot_metrics(metrics_file: str | Path, png: str | Path) -> Path | None:
    """Draw every known curve present in ``metrics_file`` into ``png``; None (and nothing written)
    when matplotlib is not installed (``pip install matplotlib``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    x_key = "iteration" if records and "iteration" in records[0] else "step"
    present = [k for k in CURVES if any(k in r for r in records)]
    if not present:
        return None
    cols = min(3, len(present))
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present, strict=False):
        points = [(r[x_key], r[key]) for r in records if key in r and r[key] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
