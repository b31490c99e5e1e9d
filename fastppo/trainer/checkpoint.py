"""Atomic checkpoints in Hugging Face format (safetensors) plus the trainer's own state.

A checkpoint is written into ``checkpoint-<step>.tmp`` and renamed to ``checkpoint-<step>`` only
when complete (a rename is atomic on POSIX), so a crash mid-save never leaves a checkpoint that
loads half-written; ``latest_checkpoint`` only ever sees complete ones.

    checkpoint-<step>/
        policy/      config.json, model.safetensors, tokenizer files (AutoModelForCausalLM-loadable)
        reference/   the frozen reference policy (PPO)
        critic/      the value model (PPO with a critic)
        reward_model/  (reward-model training)
        trainer_state.pt  step, optimizer and scheduler states, KL coefficient, RNG states
"""

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    numpy_state = np.random.get_state()  # noqa: NPY002 (libraries draw from the global generator)
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    models: dict,
    tokenizer,
    trainer_state: dict,
    state_dicts: dict | None = None,
) -> Path:
    """Write ``models`` (name → HF model) and ``trainer_state`` as checkpoint ``step``, atomically.
    ``state_dicts`` (name → full state dict) replaces a model's own, e.g. for sharded models."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        if model is not None:  # each folder loads on its own: the tokenizer goes with every model
            state_dict = (state_dicts or {}).get(name)
            model.save_pretrained(tmp / name, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(tmp / name)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step: move the old one aside first, then drop it
        old = output_dir / f"checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(steps)]


def keep_newest(output_dir: str | Path, limit: int) -> None:
    """Delete all but the ``limit`` newest checkpoints (``limit`` 0: keep all)."""
    if limit > 0:
        for old in checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old)


def holds_a_run(output_dir: str | Path) -> bool:
    output_dir = Path(output_dir)
    return (output_dir / "metrics.jsonl").exists() or bool(checkpoints(output_dir))


def clear_run(output_dir: str | Path) -> None:
    """Remove what a run writes into ``output_dir`` (metrics, plot, TensorBoard, checkpoints, config)."""
    output_dir = Path(output_dir)
    for name in ("metrics.jsonl", "metrics.png", "config.json"):
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / "tensorboard", ignore_errors=True)
    for path in checkpoints(output_dir):
        shutil.rmtree(path)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict:
    # Our own file (optimizer states, RNG states and numpy arrays inside): not weights_only.
    return torch.load(checkpoint / "trainer_state.pt", weights_only=False)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
