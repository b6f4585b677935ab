"""Distributed checkpoints for ``--parallel fsdp``: every rank writes its own shards, any number
of ranks reads them back, and `consolidate` turns one into an ordinary model directory.

Layout (beside the ordinary checkpoints of `motian.train.checkpoint`, same names and `latest`):

    run_dir/checkpoints/step-00000100/
        sharded/            torch.distributed.checkpoint (DCP): .metadata + one __R_0.distcp
                            per rank: the objective's parameters (model and task weights) and
                            the optimizer state, each rank's dim-0 shards
        model.json          the model's config.json content (head, config, vocab hash)
        rng.pt, state.json  as in an ordinary checkpoint (rank 0 writes them)

**Atomic at run level**, as ordinary checkpoints: all ranks write into ``.tmp-step-...`` (rank
0 creates it and clears leftovers of a killed save first), then, after a barrier, rank 0
fsyncs everything and renames the directory; `latest` and pruning follow
(`checkpoint.commit_checkpoint`). A kill at any moment leaves the previous checkpoint. The run
directory must be one filesystem every rank sees (one machine, or a shared filesystem).

**Another number of processes.** DCP stores each tensor's global shape and which slice every
file holds; `load_sharded_checkpoint` asks for the slices this run's ranks own (or, alone, the
whole tensors), so a run saved by 2 processes resumes on 1 and one saved by 1 resumes on 2.
`get_state_dict` / `set_state_dict` (torch.distributed.checkpoint.state_dict) give the model
and optimizer state keyed by parameter name, so the files do not depend on the wrapping.

The loader's position and every rank's RNG state are in state.json / rng.pt as before; the
loader's position counts global rows, so it does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from motian.errors import UserError
from motian.io import write_text_atomic
from motian.model.artifact import (
    CHECKPOINTS,
    CONFIG,
    SHARDED,
    WEIGHTS,
    checkpoint_name,
    is_sharded_checkpoint,
)
from motian.model.io import model_meta
from motian.train.checkpoint import (
    CorruptCheckpoint,
    _json_or_error,
    _remove_leftovers,
    _restore_rank_rng,
    commit_checkpoint,
    failed_write,
    finish_checkpoint_files,
)

MODEL_META = "model.json"
OBJECTIVE, OPTIMIZER = "objective", "optimizer"  # the two top-level keys in the DCP files


def _inner(e: BaseException) -> Exception:
    """The error behind DCP's CheckpointException (a BaseException holding each failed
    rank's error), or `e`."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))[0]
        if isinstance(inner, Exception):
            return inner
    return e if isinstance(e, Exception) else RuntimeError(str(e))


def _safe_planner():
    """DCP's load planner, except that the non-tensor entries (step counts, parameter-group
    settings) must first unpickle with `torch.load(weights_only=True)`: DCP's own planner
    unpickles them with weights_only=False, and loading a checkpoint must run no pickled code.
    What passes the restricted unpickler holds only plain data, so DCP's load of the same bytes
    after it is harmless."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                torch.load(value, weights_only=True)
            except Exception as e:
                raise UserError(f"{read_item.dest_index.fqn}: a non-tensor entry that does not "
                                "read as plain data (torch.load(weights_only=True): "
                                f"{str(e).split('.')[0][:100]}); not loaded") from None
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeLoadPlanner()


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """DCP warns whenever it runs without a process group; one process (a world of one, or
    `consolidate`) is a case it handles, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_sharded_checkpoint(run_dir: Path, step: int, objective: nn.Module, model: nn.Module,
                            optimizer: torch.optim.Optimizer, state: dict, keep_last: int = 3,
                            rng_states: list[dict] | None = None) -> Path:
    """Write checkpoint `step` of an FSDP run (every rank calls this; each writes its shards)
    and return its path. `model` is the objective's model (its config goes to model.json)."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(run_dir) / CHECKPOINTS
    final = directory / checkpoint_name(step)
    tmp = directory / f".tmp-{final.name}-sharded"  # one name every rank knows
    state_text = _json_or_error({**state, "step": step})
    if _is_main():
        directory.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(directory)
        tmp.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(objective, optimizer)
    error: Exception | None = None
    try:
        with _single_process_is_meant():
            save({OBJECTIVE: model_state, OPTIMIZER: optim_state},
                 checkpoint_id=str(tmp / SHARDED), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # reported after the ranks meet again
        error = _inner(e)
    _barrier()
    if not _is_main():
        if error is not None:
            raise UserError(f"{final}: this rank's shards could not be written ({error})")
        return final
    try:
        if error is not None:
            raise error
        write_text_atomic(tmp / MODEL_META, json.dumps(model_meta(model), indent=2) + "\n")
        finish_checkpoint_files(tmp, state_text, rng_states)
    except Exception as e:  # a full disk, a quota: the last checkpoint is untouched
        raise failed_write(e, tmp, final, run_dir) from None
    return commit_checkpoint(tmp, final, keep_last)


def load_sharded_checkpoint(path: Path, objective: nn.Module,
                            optimizer: torch.optim.Optimizer) -> None:
    """Load an FSDP checkpoint into `objective` (sharded or whole) and `optimizer` on every
    rank, whatever number of processes wrote it, and restore this rank's RNG state."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    # get_state_dict gives this run's tensors (its shards) keyed by name; load fills them
    # from whichever files hold those slices.
    model_state, optim_state = get_state_dict(objective, optimizer)
    wanted = {OBJECTIVE: model_state, OPTIMIZER: optim_state}
    try:
        with _single_process_is_meant():
            load(wanted, checkpoint_id=str(path / SHARDED), planner=_safe_planner(),
                 no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # another objective, other shapes, bad files
        e = _inner(e)
        if isinstance(e, UserError):
            raise e from None
        reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise CorruptCheckpoint(f"{path / SHARDED}: does not load into this run ({reason}); "
                                "resume with the recipe and settings it was made with"
                                ) from None
    set_state_dict(objective, optimizer, model_state_dict=wanted[OBJECTIVE],
                   optim_state_dict=wanted[OPTIMIZER])
    _restore_rank_rng(path / "rng.pt")


def consolidate(checkpoint: Path, out: Path) -> Path:
    """Write a sharded (--parallel fsdp) checkpoint as an ordinary model directory: config.json
    + one model.safetensors, which `motian finetune --model`, `export`, `predict` and
    `--init-from` read. Runs as one process, without torchrun, on any machine that can read the
    checkpoint.

    Args:
        checkpoint: a sharded checkpoint (run/checkpoints/step-NNNNNNNN) or a run directory
            (its latest checkpoint).
        out: the model directory to write (must not exist yet).
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from motian.model.artifact import latest_checkpoint

    path = Path(checkpoint)
    if not is_sharded_checkpoint(path):
        latest = latest_checkpoint(path)
        if latest is None or not is_sharded_checkpoint(latest):
            raise UserError(f"--checkpoint {path}: not a sharded checkpoint (it needs "
                            f"{MODEL_META} and {SHARDED}/.metadata, written by pretrain "
                            "--parallel fsdp) nor a run whose latest checkpoint is one; an "
                            "ordinary checkpoint is already a model directory")
        path = latest
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out}: already exists; choose a new directory")
    prefix = f"{OBJECTIVE}.model."  # the objective's model; task weights etc. are left out
    metadata = FileSystemReader(str(path / SHARDED)).read_metadata()
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not tensors:
        raise UserError(f"{path / SHARDED}: holds no model weights ({prefix}*)")
    with _single_process_is_meant():
        load(tensors, checkpoint_id=str(path / SHARDED), planner=_safe_planner(), no_dist=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    tmp.mkdir(parents=True)
    save_file({k.removeprefix(prefix): v.contiguous() for k, v in tensors.items()},
              str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text((path / MODEL_META).read_text(encoding="utf-8"), encoding="utf-8")
    run = path.parent.parent  # the run's tokenizer copy, as final/ has it
    for name in ("tokenizer.json", "vocab.txt"):
        if (run / name).is_file():
            (tmp / name).write_bytes((run / name).read_bytes())
    os.rename(tmp, out)
    print(f"motian: {path} -> {out} ({len(tensors)} tensors, "
          f"{sum(t.numel() for t in tensors.values()):,} parameters)")
    return out
