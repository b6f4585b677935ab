"""Running on several processes: torchrun environment, process group, DDP wrapping, collectives.

The same code runs as one plain process or under ``torchrun --nproc_per_node N``: `setup`
reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), picks the backend (gloo on
CPU, NCCL on CUDA) and returns a `DistInfo`; everything else asks it for rank and world size.

**No silent hangs.** A rank that dies leaves the others blocked in their next all-reduce. Two
things end that wait: torchrun's agent notices the dead worker and stops the rest (it prints
which rank failed and its exit code or signal), and every collective has a timeout
(`dist_timeout_s`, default 300 s) after which the survivors raise. `collective` turns that error
into a message that says what probably happened and where to look. Configuration that cannot
work (a global batch that does not divide, a CUDA device missing on a rank) is refused before
any training starts.

FSDP is a different wrapper in `wrap_model`; nothing else in the loop assumes DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from motian.errors import UserError
from motian.runtime import pick_device  # one device choice for every verb
from motian.train.lock import hold_run_dir


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Join the process group when started by torchrun; a single process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise UserError("WORLD_SIZE > 1 but MASTER_ADDR is not set: start several processes "
                            "with `torchrun --nproc_per_node N -m motian.cli pretrain ...`")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, dev)


def teardown(finished: bool = True) -> None:
    """Leave the process group. After a finished run every rank first waits for the others
    (rank 0 is still writing the final model when the rest are done). Once, on a loaded
    machine, rank 1 of a finished 2-process run aborted at exit ("terminate called without an
    active exception", exit -6) after tearing gloo down while rank 0 was still connected; leaving
    together closes that window (not reproduced in 14 reruns, so not proven the only cause).
    After a failure no rank waits: the others may be dead, and the barrier would only hang."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def in_process_group(verb: Callable) -> Callable:
    """Run `verb` inside the process group its `run: RunSettings` argument asks for, passing
    the group as the keyword-only argument `info`, and owning its `out` folder for the run
    (`motian.train.lock`: rank 0 holds the lock). The wrapper has the verb's signature without
    `info`, so the CLI and the Python API see the same parameters."""
    signature = inspect.signature(verb)
    public = signature.replace(parameters=[p for name, p in signature.parameters.items()
                                           if name != "info"])

    @functools.wraps(verb)
    def wrapper(*args, **kwargs):
        bound = public.bind(*args, **kwargs)
        bound.apply_defaults()
        run = bound.arguments["run"]
        out = bound.arguments.get("out")
        with process_group(run.device, run.dist_timeout_s) as info, \
                hold_run_dir(out, enabled=out is not None and info.is_main):
            return verb(*bound.args, **bound.kwargs, info=info)

    wrapper.__signature__ = public
    wrapper.__annotations__ = {k: v for k, v in verb.__annotations__.items() if k != "info"}
    return wrapper


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = 300.0) -> Iterator[DistInfo]:
    """`setup` on entry; on exit leave the group together after a finished run, at once after
    a failure (see `teardown`)."""
    info = setup(device, timeout_s)
    try:
        yield info
    except BaseException:
        teardown(finished=False)
        raise
    teardown()


def wrap_model(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP across processes (gradients all-reduced and averaged in backward); unchanged alone."""
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


@contextlib.contextmanager
def collective(info: DistInfo, what: str, step: int) -> Iterator[None]:
    """Run collectives (DDP's backward all-reduce included) and explain a failure: the usual
    cause is another rank that died (killed, out of memory, an exception in its own log)."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as e:
        if not info.distributed:
            raise
        raise UserError(
            f"rank {info.rank}/{info.world_size}: {what} at step {step} failed while waiting "
            f"for the other ranks ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Another rank most likely died: look for its error above (torchrun names the "
            "failed rank). Resume from the last checkpoint with --resume.") from None


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place) and return it; a no-op alone."""
    if info.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def check_world(global_batches: list[int], micro_batch: int, info: DistInfo) -> None:
    """Refuse, before any work, a world size that cannot split every stage's global batch."""
    from motian.train.recipe import Stage, accumulation

    for gb in global_batches:
        accumulation(Stage(global_batch=gb), micro_batch, info.world_size)
