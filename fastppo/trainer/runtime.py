"""Where the loops run: device, bf16 autocast, seeding, and multi-process (torchrun) set-up.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process joins the default group (NCCL on GPUs, gloo
on CPU), the trained models are wrapped in DistributedDataParallel, every rank samples its own
prompts, and rank 0 alone writes logs and checkpoints.
"""

import contextlib
import importlib.util
import os
import random
import signal
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from fastppo.trainer.errors import StoppedAtOnce, UsageError


def resolve_device(name: str) -> torch.device:
    """ "auto" is the local CUDA device when there is one (under torchrun: LOCAL_RANK's), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device: {name!r} is not a device ('auto', 'cpu', 'cuda' or 'cuda:I')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device: {name} was asked for but CUDA is not available")
    return device


def autocast(device: torch.device):
    """bf16 autocast on GPUs; a no-op on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def attention_implementation(requested: str, device: torch.device) -> str:
    """transformers' ``attn_implementation`` for ``requested``: 'auto' is flash-attn's
    ``flash_attention_2`` on a GPU where flash-attn is installed, else ``sdpa``."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def varlen_attention(attn_implementation: str) -> bool:
    """Whether attention runs flash-attn's varlen kernels, the only kind for which packed rows cost
    nothing extra (sdpa and eager need a block-diagonal mask over the whole packed row)."""
    return attn_implementation.startswith("flash")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (libraries draw from the global generator)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this run created the process group, so it tears it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the default process group when launched by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(), owns_group=True)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def finish_distributed(distributed: Distributed) -> None:
    """Destroy the process group this run created, once every rank is done with it: a group still
    alive at interpreter exit can abort the process ("terminate called without an active
    exception") while its peer is mid-shutdown."""
    if distributed.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device, distributed: Distributed) -> torch.nn.Module:
    if not distributed.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def mean_over_ranks(
    values: dict[str, float], device: torch.device, distributed: Distributed
) -> dict[str, float]:
    if not distributed.enabled:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / distributed.world_size).tolist(), strict=True))


def check_in_sync(model: torch.nn.Module, device: torch.device, distributed: Distributed) -> None:
    """Raise if the ranks' copies of ``model`` differ (a fingerprint of every parameter)."""
    if not distributed.enabled:
        return
    fingerprint = torch.stack([p.detach().double().sum() for p in unwrap(model).parameters()]).to(device)
    gathered = [torch.empty_like(fingerprint) for _ in range(distributed.world_size)]
    dist.all_gather(gathered, fingerprint)
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("the ranks' models have diverged")


def shard(model: torch.nn.Module, device: torch.device, distributed: Distributed) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the whole model, over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (distributed.world_size,))
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"fsdp: {type(model).__name__} has no base_model.layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(models: list[torch.nn.Module], enabled: bool):
    """Within the block, backward passes reduce gradients across ranks only if ``enabled``
    (DDP: ``no_sync``; FSDP2: ``set_requires_gradient_sync``)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
                stack.enter_context(model.no_sync())
            elif is_sharded(model):
                model.set_requires_gradient_sync(enabled)
                stack.callback(model.set_requires_gradient_sync, True)
        yield


def full_state_dict(model: torch.nn.Module) -> dict | None:
    """The unsharded state dict of an FSDP2 model on CPU (a collective: call on every rank), or
    None for an unsharded model (``save_pretrained`` reads it directly)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> dict | None:
    """What a checkpoint keeps of the optimizer: its own state dict, or for FSDP2 models the
    unsharded state keyed by parameter name (a collective: call on every rank; rank 0 gets it)."""
    if not any(is_sharded(m) for m in models.values()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # One container so that the policy's and the critic's parameter names stay apart.
    container = torch.nn.ModuleDict(models)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(container, optimizer, options=options)


def load_optimizer_state(
    models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Inverse of ``optimizer_state``: every rank reads the full state and keeps its shards."""
    if not any(is_sharded(m) for m in models.values()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    container = torch.nn.ModuleDict(models)
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(container, optimizer, optim_state_dict=state, options=options)


def same_count_on_all_ranks(
    groups: list[list[int]], device: torch.device, distributed: Distributed
) -> list[list[int]]:
    """Split the largest groups until every rank has as many as the rank with the most.

    With FSDP every micro-batch's forward and backward are collectives, so all ranks must run the
    same number. Each rank holds as many sequences per mini-batch, so splitting always gets there.
    """
    if not distributed.enabled:
        return groups
    count = torch.tensor([len(groups)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    groups, target = [list(g) for g in groups], int(count)  # one read per mini-batch
    while len(groups) < target:
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        if len(groups[largest]) < 2:
            raise RuntimeError("cannot split micro-batches to match the other ranks")
        half = len(groups[largest]) // 2
        groups[largest : largest + 1] = [groups[largest][:half], groups[largest][half:]]
    return groups


class NonFiniteSteps:
    """Counts optimizer steps skipped for a non-finite loss or gradient; ``limit`` in a row stop the run."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def ok(self, finite: bool, where: str) -> bool:
        """True when the step may be taken; False (with a warning) when it is skipped."""
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        warnings.warn(f"{where}: non-finite gradient, step skipped", stacklevel=2)
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.in_a_row} non-finite steps in a row: stopping")
        return False


class StopOnSignal:
    """SIGINT and SIGTERM ask the run to stop at the end of the current step instead of killing it
    mid-update: a signal sets a flag, and ``requested`` tells every rank the same answer. In a single
    process (``repeat_stops``) a second signal stops it at once: the handler raises
    ``errors.StoppedAtOnce`` (a ``KeyboardInterrupt``) wherever the main thread is, and the CLI
    prints one line and the resume command for the newest checkpoint, no traceback. Under torchrun
    the agent forwards the terminal's signal again, so every one is caught (the agent kills the
    workers after its own timeout). Handlers live in the main thread and are put back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log=print, *, repeat_stops: bool = True):
        self.log, self.repeat_stops, self.received, self._previous = log, repeat_stops, 0, {}

    def _handle(self, signum, frame) -> None:
        if self.received and self.repeat_stops:
            raise StoppedAtOnce(signal.Signals(signum).name, signum)
        first = not self.received
        self.received = signum
        if first:
            again = " (again to stop at once, without saving it)" if self.repeat_stops else ""
            self.log(f"{signal.Signals(signum).name}: stopping after this step{again}")

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self, device: torch.device, distributed: "Distributed") -> int:
        """The signal number if any rank received one (0 if none): a collective under torchrun."""
        if not distributed.enabled:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)
