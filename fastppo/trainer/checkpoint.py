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

``trainer_state.pt`` holds only tensors and plain data (dicts, lists, tuples, numbers, strings,
bools, None): the RNG states are stored as such (``rng_state``), ``save_checkpoint`` checks that
the file reads back with ``torch.load(weights_only=True)``, and ``load_trainer_state`` reads it
only that way, so resuming from a checkpoint someone else made runs no code from it: a file that
needs anything else (an arbitrary pickle, or numpy arrays as older fastppo versions wrote) is
refused with a ValueError and not loaded.
"""

import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    """The global generators' states (python ``random``, numpy, torch CPU and, once initialized,
    CUDA) as tensors and plain data, which a ``weights_only`` load reads; see ``set_rng_state``."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002 (libraries draw from it)
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(name),
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initializes CUDA itself
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of ``rng_state``. CUDA states are restored for the devices this machine has."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    key = np.asarray(n["key"], dtype=np.uint32)
    np.random.set_state((n["bit_generator"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


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
    try:  # a checkpoint that resume would refuse must not become the latest one (mmap: cheap)
        torch.load(tmp / "trainer_state.pt", weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"checkpoint-{step} not saved: its trainer state holds objects other than tensors and plain"
            f" data{_asks_for(err)}, which resuming (a weights_only load) would refuse"
        ) from None
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


def claim_run_folder(output_dir: str | Path, *, resume: bool, overwrite: bool, clear: bool = True) -> None:
    """Refuse to start into a folder that holds a run unless ``resume`` continues it or
    ``overwrite`` starts over (``clear``: remove the old run here; under torchrun rank 0 does)."""
    from fastppo.trainer.errors import UsageError

    if not holds_a_run(output_dir) or resume:
        return
    if not overwrite:
        raise UsageError(
            f"output_dir: {output_dir} holds a run; pass --resume to continue it, --overwrite to start over, "
            "or another --output_dir"
        )
    if clear:
        clear_run(output_dir)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict:
    """``checkpoint``'s trainer state, read with ``torch.load(weights_only=True)`` only: a file
    that holds anything but tensors and plain data is refused (ValueError) without running it."""
    path = Path(checkpoint) / "trainer_state.pt"
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:  # raised before anything in the file runs
        message = (
            f"{path}: refused to load: it holds objects other than tensors and plain data{_asks_for(err)},"
            " so it was not loaded (weights_only); was it written by fastppo?"
        )
        if "GLOBAL numpy" in str(err):
            message += (
                " Trainer states from fastppo versions before safe resume kept numpy arrays and cannot be"
                " resumed; the model folders beside it still load with transformers."
            )
        raise ValueError(message) from None


def _asks_for(err: pickle.UnpicklingError) -> str:
    """The global that torch's weights_only unpickler refused, as " (it asks for NAME)"."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f" (it asks for {found.group(1)})" if found else ""


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
