"""Device-to-host reads in the PPO update, counted on CPU: on a GPU each one stalls the queue (the
ops' own, op by op: test_op_host_reads.py).

A read is a call of one of ``READS`` on a tensor; it is charged to the innermost frame of fastppo's
code that made it (transformers' own reads inside a model pass included: they are charged to the
pass). ``ppo.update`` reads nothing per micro-batch: the rollout keeps one packed layout, and each
micro-batch's index tensors are built on the host from the lengths read once per iteration and
copied to the device. It reads once per optimizer step (the non-finite-gradient guard decides
whether to step) and once per iteration (the losses and statistics, summed on the device). Left out:
reads the optimizer makes of its CPU step counters, and the Triton interpreter's copies of kernel
arguments (it emulates the device on the host), neither of which is a device read.
"""

import collections
import contextlib
import dataclasses
import traceback
from pathlib import Path

import pytest
import torch

from fastppo.trainer import ppo
from fastppo.trainer.config import PPOConfig

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")
PACKAGE = str(Path(ppo.__file__).parents[1])
NOT_DEVICE_READS = (str(Path("torch", "optim", "")), str(Path("triton", "runtime", "interpreter.py")))

#: The update's reads beyond the micro-batch loop: per optimizer step, and per iteration.
PER_OPTIMIZER_STEP = 1  # bool(isfinite(grad_norm)): skip or take the step
PER_ITERATION = 1  # LossTotals.means: every loss and statistic in one read


@dataclasses.dataclass(frozen=True)
class Read:
    file: str
    line: int
    method: str
    in_micro_batch_loop: bool  # made under ppo.accumulate_gradients


@contextlib.contextmanager
def counted_reads():
    """Yields a Counter of ``Read`` for every read made from fastppo's code."""
    reads = collections.Counter()
    with pytest.MonkeyPatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, _counting(getattr(torch.Tensor, name), name, reads))
        yield reads


def _counting(original, name: str, reads: collections.Counter):
    def counting(self, *args, **kwargs):
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if f.filename.startswith(PACKAGE)]
        if ours and not any(part in f.filename for f in stack for part in NOT_DEVICE_READS):
            looping = any(f.name == "accumulate_gradients" for f in ours)
            reads[Read(Path(ours[-1].filename).name, ours[-1].lineno, name, looping)] += 1
        return original(self, *args, **kwargs)

    return counting


def update_reads(run, rollout, max_tokens: int, monkeypatch) -> tuple[collections.Counter, int]:
    """The reads of one ``ppo.update`` of ``rollout`` with micro-batches of ``max_tokens`` tokens,
    and how many micro-batches it ran."""
    run.cfg = dataclasses.replace(run.cfg, max_tokens_per_microbatch=max_tokens)
    micro_batches = []
    original = ppo.micro_batch_losses
    monkeypatch.setattr(
        ppo, "micro_batch_losses", lambda *a, **k: micro_batches.append(1) or original(*a, **k)
    )
    with counted_reads() as reads:
        ppo.update(run, rollout, 0)
    return reads, len(micro_batches)


def check_update_reads(cfg: PPOConfig, few: int, many: int, monkeypatch) -> None:
    """One update with ``few`` tokens per micro-batch and one with ``many`` times more micro-batches
    read the same: nothing in the micro-batch loop, the stated constants outside it."""
    run = ppo.set_up(cfg, log=lambda *_: None)
    rollout = ppo.sample_rollout(run)
    rollout = ppo.with_advantages(cfg, rollout, ppo.kept_for_update(cfg, rollout), run.kl_coef)
    state = {k: v.clone() for k, v in run.policy.state_dict().items()}
    whole, n_whole = update_reads(run, rollout, few, monkeypatch)
    run.policy.load_state_dict(state)
    split, n_split = update_reads(run, rollout, many, monkeypatch)
    steps = cfg.ppo_epochs * -(-cfg.batch_size // cfg.minibatch_size)
    assert n_whole == steps and n_split > 3 * n_whole, (n_whole, n_split)
    for reads in (whole, split):
        looping = {read: n for read, n in reads.items() if read.in_micro_batch_loop}
        assert not looping, f"reads in the micro-batch loop: {looping}"
        assert sum(reads.values()) == PER_OPTIMIZER_STEP * steps + PER_ITERATION, dict(reads)
    ppo.finish(run, log=lambda *_: None, check=False)


@pytest.mark.usefixtures("loop_backend")
@pytest.mark.parametrize("padding_free", [False, True])
def test_the_update_reads_nothing_per_micro_batch(padding_free, tmp_path, monkeypatch):
    """The PyTorch path (the reference ops), padded and packed model inputs."""
    cfg = PPOConfig(algo="ppo", batch_size=32, minibatch_size=16, ppo_epochs=2, device="cpu",
                    padding_free=padding_free, output_dir=str(tmp_path))  # fmt: skip
    check_update_reads(cfg, 4096, 16, monkeypatch)  # 16 tokens: one or two sequences per micro-batch


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_the_update_reads_nothing_per_micro_batch_on_the_triton_path(algo, tmp_path, monkeypatch):
    """The kernels (Triton's interpreter on CPU): the ops read nothing either, with a critic (PPO)
    and with the KL in the loss (GRPO)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    cfg = PPOConfig(algo=algo, batch_size=8, group_size=1 if algo == "ppo" else 4, minibatch_size=4,
                    ppo_epochs=1, max_new_tokens=4, device="cpu", output_dir=str(tmp_path))  # fmt: skip
    check_update_reads(cfg, 4096, 12, monkeypatch)
