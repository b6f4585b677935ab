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

FSDP2 (``--parallel fsdp``) is the other wrapper in `wrap_model` (`shard_model`); its
checkpoints are `motian.train.sharded`. Nothing else in the loop assumes DDP.
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


def wrap_model(module: nn.Module, info: DistInfo, parallel: str = "ddp",
               precision: str = "fp32") -> nn.Module:
    """DDP across processes (gradients all-reduced and averaged in backward), or FSDP2
    (`shard_model`) for ``parallel="fsdp"``; unchanged alone."""
    if not info.distributed:
        return module
    if parallel == "fsdp":
        return shard_model(module, info, precision)
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def shard_model(module: nn.Module, info: DistInfo, precision: str = "fp32") -> nn.Module:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`), in place: one FSDP unit per Transformer
    block (its parameters all-gathered just before its forward and backward, freed after),
    then the root (`module`: embeddings, heads, task weights). Each process keeps 1/N of every
    parameter, gradient and optimizer moment (dim-0 shards, DTensors).

    Mixed precision on a GPU with bf16: blocks compute with bf16 copies of the parameters and
    gradients are reduced in fp32 (`MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)`); the sharded master weights stay fp32. On CPU (and in fp32) no policy:
    gloo reduces fp32. Activation recomputation (`checkpoint_activations`) runs inside each
    block's forward, so it composes: the recomputed forward all-gathers the block again.
    A module built on meta (`motian.train.meta_init`) is sharded on meta; `materialise`
    then gives each rank its shards."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from motian.model.transformer import Block

    if isinstance(module, FSDPModule):  # sharded already (fit shards before the optimizer)
        return module
    policy = MixedPrecisionPolicy()
    if info.device.type == "cuda" and precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for sub in list(module.modules()):
        if isinstance(sub, Block):
            fully_shard(sub, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def sync_gradients(step_model: nn.Module, last: bool):
    """The context of one micro-step's backward: gradients are reduced across processes on
    the step's last micro-batch only (DDP `no_sync`; FSDP `set_requires_gradient_sync`, which
    keeps unsharded gradients between micro-steps: memory for fewer reduce-scatters).

    FSDP also keeps the root unit (embeddings, heads, task weights) gathered from one
    micro-step's backward to the next one's forward (`set_reshard_after_backward(False)` on
    the root only): its all-gather, the largest single one (the word embeddings), runs once per
    optimizer step instead of once per micro-step, for the root's parameters held whole during
    accumulation. The blocks still reshard after every backward: keeping them too would hold
    the whole model's parameters between micro-steps, the memory FSDP exists to save."""
    inner = getattr(step_model, "_orig_mod", step_model)  # under torch.compile
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(last)
        inner.set_reshard_after_backward(last, recurse=False)
        return contextlib.nullcontext()
    if last or not hasattr(step_model, "no_sync"):
        return contextlib.nullcontext()
    return step_model.no_sync()


@contextlib.contextmanager
def gathered(step_model: nn.Module, blocks: bool = True) -> Iterator[None]:
    """FSDP: every parameter whole on every process while the block runs (held-out evaluation),
    then sharded again. Evaluation lets each rank read its own number of batches; with shards
    that would hang in the per-block all-gathers, so the units stay unsharded after their
    forward (`set_reshard_after_forward(False)`) until the end. Memory: the whole model per
    process for that time, as DDP holds always. `blocks=False`: only the root's parameters
    (embeddings, heads, task weights: what the logged task weights read). A no-op without
    FSDP."""
    from torch.distributed.fsdp import FSDPModule

    root = getattr(step_model, "_orig_mod", step_model)
    if not isinstance(root, FSDPModule):
        yield
        return
    # The root must know it is the root before a block's own forward could claim it (the
    # untrained evaluation runs before the first training forward); the first forward does
    # the same, so this is a no-op afterwards.
    root._get_fsdp_state()._lazy_init()
    units = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root
             and blocks]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in [root, *units]:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in [root, *units]:
            unit.reshard()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of an FSDP-sharded `model` on rank 0 ({} on the others; every
    rank must call it: the shards are gathered), None when nothing in it is sharded."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


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
