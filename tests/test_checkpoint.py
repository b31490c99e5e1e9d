"""Safe resume: ``trainer_state.pt`` holds only tensors and plain data, reads back with
``torch.load(weights_only=True)``, and a file that needs more (a crafted pickle, an old numpy-array
state) is refused without running it. Resume exactness itself: tests/test_trainer.py
(test_resume_equals_uninterrupted, test_offline_resume_equals_uninterrupted)."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from fastppo.trainer import checkpoint
from fastppo.trainer.config import PPOConfig
from fastppo.trainer.ppo import train

pytestmark = pytest.mark.usefixtures("loop_backend")


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """A real (short) PPO run with a checkpoint after its first iteration."""
    out = tmp_path_factory.mktemp("run")
    cfg = PPOConfig(iterations=1, batch_size=16, minibatch_size=16, output_dir=str(out))
    with pytest.MonkeyPatch.context() as mp:  # as loop_backend (function-scoped) does
        mp.setenv("FASTPPO_BACKEND", "torch")
        mp.setenv("TQDM_DISABLE", "1")
        train(cfg, log=lambda *_: None)
    return out, checkpoint.latest_checkpoint(out)


def test_trainer_state_of_a_run_is_plain_data(ppo_run):
    _, last = ppo_run
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    assert set(state) >= {"iteration", "kl_coef", "config", "optimizer", "scheduler", "rng"}
    assert state["iteration"] == 1 and isinstance(state["kl_coef"], float)
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert len(state["rng"]["numpy"]["key"]) == 624 and isinstance(state["rng"]["torch"], torch.Tensor)
    assert checkpoint.load_trainer_state(last)["iteration"] == 1


@pytest.mark.parametrize("write", ["torch.save", "pickle.dump"])
def test_crafted_pickle_is_refused_and_not_run(ppo_run, tmp_path, write):
    out, last = ppo_run
    marker = tmp_path / "ran"
    payload = {"iteration": 1, "rng": Payload(marker)}
    path = last / "trainer_state.pt"
    original = path.read_bytes()
    try:
        if write == "torch.save":
            torch.save(payload, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(payload, f)
        with pytest.raises(ValueError, match="refused to load") as refused:
            checkpoint.load_trainer_state(last)
        message = str(refused.value)
        assert str(path) in message and "not loaded" in message and "written by fastppo" in message
        if write == "torch.save":
            assert "system" in message  # names what it asked for (posix.system)
        resume = PPOConfig(iterations=2, batch_size=16, minibatch_size=16, output_dir=str(out), resume=True)
        with pytest.raises(ValueError, match="refused to load"):  # the trainer stops before iterating
            train(resume, log=lambda *_: None)
        assert not marker.exists()
    finally:
        path.write_bytes(original)
    with open(tmp_path / "live.pkl", "wb") as f:  # the payload is live: a plain unpickle runs it
        pickle.dump(Payload(tmp_path / "live"), f)
    with open(tmp_path / "live.pkl", "rb") as f:
        pickle.load(f)  # noqa: S301 (on purpose)
    assert (tmp_path / "live").exists()


def test_old_numpy_array_state_is_refused_with_a_hint(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    old = {"iteration": 3, "rng": {"python": random.getstate(), "numpy": np.random.get_state()}}  # noqa: NPY002
    torch.save(old, tmp_path / "checkpoint-3" / "trainer_state.pt")
    with pytest.raises(ValueError, match="refused to load.*numpy.*before safe resume"):
        checkpoint.load_trainer_state(tmp_path / "checkpoint-3")


def test_state_a_safe_load_would_refuse_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint-2 not saved.*numpy"):
        checkpoint.save_checkpoint(tmp_path, 2, {}, None, {"kl_coef": np.float64(0.1)})
    assert checkpoint.latest_checkpoint(tmp_path) is None and not (tmp_path / "checkpoint-2.tmp").exists()


def draws():
    return (
        [random.random() for _ in range(5)] + [random.gauss(0, 1) for _ in range(3)],
        np.random.standard_normal(5).tolist() + np.random.randint(0, 1000, 5).tolist(),  # noqa: NPY002
        torch.randn(5).tolist() + torch.randint(0, 1000, (5,)).tolist(),
    )


def test_rng_states_restore_exactly(tmp_path):
    random.seed(7)
    np.random.seed(7)  # noqa: NPY002
    torch.manual_seed(7)
    draws()  # an odd number of Gaussian draws leaves one cached in python and numpy
    order_rng = random.Random(3)
    order_rng.random()
    state = {"rng": checkpoint.rng_state(), "order_rng": order_rng.getstate()}
    assert state["rng"]["python"]["gauss_next"] is not None and state["rng"]["numpy"]["has_gauss"] == 1
    checkpoint.save_checkpoint(tmp_path, 1, {}, None, state)
    expected, expected_order = draws(), [order_rng.random() for _ in range(3)]

    random.seed(1)
    np.random.seed(1)  # noqa: NPY002
    torch.manual_seed(1)
    loaded = checkpoint.load_trainer_state(tmp_path / "checkpoint-1")
    checkpoint.set_rng_state(loaded["rng"])
    restored_order = random.Random()
    restored_order.setstate(loaded["order_rng"])
    assert draws() == expected
    assert [restored_order.random() for _ in range(3)] == expected_order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_restores_exactly(tmp_path):
    torch.cuda.init()
    torch.cuda.manual_seed_all(7)
    checkpoint.save_checkpoint(tmp_path, 1, {}, None, {"rng": checkpoint.rng_state()})
    expected = torch.randn(5, device="cuda").tolist()
    torch.cuda.manual_seed_all(1)
    checkpoint.set_rng_state(checkpoint.load_trainer_state(tmp_path / "checkpoint-1")["rng"])
    assert torch.randn(5, device="cuda").tolist() == expected
