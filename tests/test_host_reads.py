"""Device-to-host reads in the PPO update, counted on CPU: on a GPU each one stalls the queue.

A read is a call of one of ``READS`` on a tensor; it is charged to the innermost frame of fastppo's
code that made it. The update's own code (ppo.py) reads a constant per mini-batch (its token count
and the non-finite-gradient guard) and once per iteration (the losses and statistics, summed on the
device): never per micro-batch. The reads of the layout, the model passes and the ops below it are
counted too, but not yet held to zero (issue 23: one layout from rollout to loss). Reads the
optimizer makes of its CPU step counters are not device reads and are left out.
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
OPTIMIZERS = str(Path("torch", "optim", ""))


@contextlib.contextmanager
def counted_reads():
    """Yields a Counter of (file, line, method) for every read made from fastppo's code."""
    reads = collections.Counter()
    with pytest.MonkeyPatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, _counting(getattr(torch.Tensor, name), name, reads))
        yield reads


def _counting(original, name: str, reads: collections.Counter):
    def counting(self, *args, **kwargs):
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if f.filename.startswith(PACKAGE)]
        # The optimizer's step counters live on the CPU even beside CUDA parameters (non-capturable
        # AdamW): reading them is no device-to-host read.
        if ours and not any(OPTIMIZERS in f.filename for f in stack):
            reads[(Path(ours[-1].filename).name, ours[-1].lineno, name)] += 1
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


@pytest.mark.usefixtures("loop_backend")
def test_the_update_reads_nothing_per_micro_batch(tmp_path, monkeypatch):
    cfg = PPOConfig(algo="ppo", batch_size=32, minibatch_size=16, ppo_epochs=2, device="cpu",
                    output_dir=str(tmp_path))  # fmt: skip
    run = ppo.set_up(cfg, log=lambda *_: None)
    rollout = ppo.sample_rollout(run)
    rollout = ppo.with_advantages(cfg, rollout, ppo.kept_for_update(cfg, rollout), run.kl_coef)
    state = {k: v.clone() for k, v in run.policy.state_dict().items()}
    whole, n_whole = update_reads(run, rollout, 4096, monkeypatch)
    run.policy.load_state_dict(state)
    split, n_split = update_reads(run, rollout, 16, monkeypatch)  # one or two sequences per micro-batch
    mini_batches = cfg.ppo_epochs * (cfg.batch_size // cfg.minibatch_size)
    assert n_whole == mini_batches and n_split > 10 * n_whole, (n_whole, n_split)
    own = {name: sum(n for (file, _, _), n in reads.items() if file == "ppo.py")
           for name, reads in (("whole", whole), ("split", split))}  # fmt: skip
    # 1 (the sequence count) + per mini-batch 2 (its token count, the finite-gradient guard) + 1 (the
    # totals, once), whatever the number of micro-batches.
    assert own == {"whole": 2 + 2 * mini_batches, "split": 2 + 2 * mini_batches}, (whole, split)
    ppo.finish(run, log=lambda *_: None, check=False)
