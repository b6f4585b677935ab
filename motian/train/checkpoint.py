"""Training checkpoints: everything a run needs to continue exactly, written so that a kill at
any moment leaves the previous checkpoint usable.

Layout (one directory per checkpoint, named by the optimizer step):

    run_dir/checkpoints/
        step-00000100/
            config.json, model.safetensors   # motian.model.io.save_pretrained: also loadable
                                             # with from_pretrained / --init-from
            optimizer.pt                     # optimizer.state_dict()
            scaler.pt                        # GradScaler state (fp16 runs only)
            rng.pt                           # python, numpy, torch CPU + CUDA RNG, per rank
            state.json                       # the caller's dict: step, loader position, ...
        latest                               # "step-00000100": the newest complete checkpoint

Atomicity: a checkpoint is written into `.tmp-step-...`, every file and the directory are
fsynced, and only then is it renamed to `step-...` (a rename is atomic on POSIX filesystems);
`latest` is replaced atomically after that, and older checkpoints are deleted last (renamed
to `.trash-...` first, so a half-deleted directory never carries a checkpoint name). A name
`step-...` therefore always means a complete checkpoint. Every `.pt` file is read with
`torch.load(weights_only=True)`, so loading runs no pickled code. One process (rank 0) writes.

The layout's names and the readers that find checkpoints (`latest_checkpoint`,
`complete_checkpoints`) live in `motian.model.artifact`, so a verb that only reads a model needs
no training code; they are re-exported here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from motian.errors import UserError
from motian.io import fsync_dir as _fsync_dir
from motian.io import write_text_atomic
from motian.model.artifact import (  # the layout is read by every verb; re-exported here
    CHECKPOINTS,
    LATEST,
    NAME,
    REQUIRED,
    checkpoint_name,
    complete_checkpoints,
    latest_checkpoint,
)
from motian.model.artifact import is_complete_checkpoint as _is_complete
from motian.model.io import load_weights, read_state_dict, save_pretrained, unwrap_model

EXTRA = "objective.safetensors"  # an objective's trained tensors outside the model


class CorruptCheckpoint(UserError):
    """A checkpoint file that does not read back (truncated, garbled, not what it claims)."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every step-N directory under `run_dir`/checkpoints, complete or not, oldest first."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def read_checkpoint_state(path: Path) -> dict:
    """state.json of checkpoint `path`; `CorruptCheckpoint` when it does not read back."""
    try:
        state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{Path(path) / 'state.json'}: unreadable ({e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptCheckpoint(f"{Path(path) / 'state.json'}: not a checkpoint state")
    return state


def save_checkpoint(run_dir: Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict, scaler=None,
                    keep_last: int = 3, rng_states: list[dict] | None = None,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` under `run_dir`/checkpoints atomically and return its path.

    `state` must be JSON-serialisable (step, loader position, progress, ...); "step" is set to
    `step`. `rng_states` is one `capture_rng_state()` per rank in rank order (gathered by the
    caller in a multi-process run); by default this process's state is saved. Then the
    checkpoint becomes `latest` and all but the newest `keep_last` (by step; < 1 keeps all) are
    removed; the one just written is always kept."""
    directory = Path(run_dir) / CHECKPOINTS
    directory.mkdir(parents=True, exist_ok=True)
    state = {**state, "step": step}
    state_text = _json_or_error(state)
    _remove_leftovers(directory)
    final = directory / checkpoint_name(step)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    try:
        save_pretrained(unwrap_model(model), tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if extra:  # trained tensors outside the model (task weights, projections): safetensors
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()},
                      str(tmp / EXTRA))
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        finish_checkpoint_files(tmp, state_text, rng_states)
    except Exception as e:  # writing failed (a full disk, a quota, a file-size limit): the
        # torch and safetensors writers report it in their own words, so any failure here is
        # reported as a failed write; the last checkpoint is untouched either way
        raise failed_write(e, tmp, final, run_dir) from None
    return commit_checkpoint(tmp, final, keep_last)


def finish_checkpoint_files(tmp: Path, state_text: str, rng_states: list[dict] | None) -> None:
    """rng.pt and state.json into the temporary checkpoint `tmp`, then every file in it (and
    below) and the directories fsynced: what must hold before the rename makes it a checkpoint."""
    torch.save({"ranks": rng_states or [capture_rng_state()]}, tmp / "rng.pt")
    (tmp / "state.json").write_text(state_text, encoding="utf-8")
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            _fsync_file(path)
    for path in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        _fsync_dir(path)


def failed_write(e: Exception, tmp: Path, final: Path, run_dir: Path) -> UserError:
    """Remove the temporary checkpoint and say what failed, how much disk is free, and that the
    latest checkpoint is intact."""
    shutil.rmtree(tmp, ignore_errors=True)
    latest = latest_checkpoint(run_dir)
    kept = f"the latest checkpoint {latest} is intact" if latest else "nothing was lost"
    reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
    free = shutil.disk_usage(final.parent).free / 2**20
    return UserError(f"{final}: could not be written ({type(e).__name__}: {reason}; "
                     f"{free:,.0f} MB free on that disk); {kept}. Free space and run the "
                     "same command again (with --resume for pretrain)")


def commit_checkpoint(tmp: Path, final: Path, keep_last: int) -> Path:
    """Make the complete, fsynced `tmp` the checkpoint `final` (one rename), point `latest` at
    it, and prune all but the newest `keep_last`."""
    directory = final.parent
    if final.exists():  # re-saving a step (e.g. after a resume): retire the old copy first
        _retire(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    write_text_atomic(directory / LATEST, final.name + "\n")
    _prune(directory, keep_last, keep=final)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scaler=None, restore_rng: bool = True, extra: nn.Module | None = None
                    ) -> dict:
    """Load a checkpoint directory (or a run directory: its latest checkpoint) into `model`,
    `optimizer` and `scaler` when given, restore the RNG states of this rank, and return
    state.json's dict. Weights load strictly: resuming into a different architecture is an
    error, not a partial load (use --init-from for that)."""
    path = _resolve(Path(path))
    state = read_checkpoint_state(path)
    load_weights(unwrap_model(model), _read_weights(path / "model.safetensors"),
                 str(path / "model.safetensors"), strict=True)
    if optimizer is not None:
        saved = _torch_load(path / "optimizer.pt")
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as e:
            raise UserError(f"{path / 'optimizer.pt'}: does not fit this optimizer ({e}); "
                            "resume with the optimizer and parameter groups the run used, or "
                            "start a new run with --init-from") from None
    if scaler is not None:
        if (path / "scaler.pt").is_file():
            scaler.load_state_dict(_torch_load(path / "scaler.pt"))
        else:
            print(f"motian: note: {path} has no loss-scaler state (saved without fp16); the "
                  "scaler starts from its initial scale", file=sys.stderr)
    if extra is not None:
        _load_extra(path, extra)
    if restore_rng:
        _restore_rank_rng(path / "rng.pt")
    return state


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(path)
    except UserError:
        raise
    except Exception as e:  # safetensors' own error for a truncated or garbled file
        raise CorruptCheckpoint(f"{path}: unreadable ({e})") from None


def _load_extra(path: Path, module: nn.Module) -> None:
    """Copy the checkpoint's extra tensors into `module`'s parameters of the same names; every
    trained parameter outside the model must be there (the fit loop saves them all)."""
    wanted = dict(module.extra_state()) if hasattr(module, "extra_state") else {}
    saved = _read_weights(path / EXTRA) if (path / EXTRA).is_file() else {}
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise UserError(f"{path}: the checkpoint lacks the objective's trained tensors "
                        f"{', '.join(missing[:4])}; it was made by another objective. Resume "
                        "with the settings it was made with, or start a new run")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in wanted:
            if params[name].shape != saved[name].shape:
                raise UserError(f"{path / EXTRA}: {name} has shape {tuple(saved[name].shape)}, "
                                f"this run's has {tuple(params[name].shape)}")
            params[name].copy_(saved[name])


# --- RNG states in a form `torch.load(weights_only=True)` accepts: tensors, ints, floats ---

def capture_rng_state() -> dict:
    """This process's python, numpy (legacy global), torch CPU and CUDA generator states."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert kind == "MT19937", kind
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state` (CUDA states for as many devices as both sides have)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def _restore_rank_rng(path: Path) -> None:
    ranks = _torch_load(path)["ranks"]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank >= len(ranks):
        print(f"motian: warning: {path} holds RNG states for {len(ranks)} process(es), this is "
              f"rank {rank}: its random numbers (dropout, masking) will differ from an "
              "uninterrupted run", file=sys.stderr)
        return
    restore_rng_state(ranks[rank])


# --- files ---

def _resolve(path: Path) -> Path:
    """A complete training checkpoint (optimizer state included, which a model directory from
    `motian.model.artifact.resolve_model_dir` need not have): `path` or a run's latest one."""
    if (path / "state.json").is_file():
        if not _is_complete(path):
            missing = [f for f in REQUIRED if not (path / f).is_file()]
            raise UserError(f"{path}: incomplete checkpoint (missing {', '.join(missing)})")
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"{path}: not a checkpoint directory and no complete checkpoint under "
                        f"{path / CHECKPOINTS}; give a step-NNNNNNNN directory or a run "
                        "directory that has one")
    return latest


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which and why
        raise CorruptCheckpoint(f"{path}: cannot be read as a motian checkpoint file ({e})"
                                ) from None


def _json_or_error(state: dict) -> str:
    try:
        return json.dumps(state, indent=2, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: state must be JSON-serialisable ({e}); convert "
                        "tensors with .item() / .tolist()") from None


def _remove_leftovers(directory: Path) -> None:
    """Delete temporary and retired directories left by a save that was killed."""
    for p in directory.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name == f"{LATEST}.tmp" or p.name.startswith(f".{LATEST}.tmp-"):
            p.unlink(missing_ok=True)  # (.latest.tmp-PID: the name before motian.io)


def _retire(path: Path) -> None:
    """Rename first (atomic), delete after: a half-deleted checkpoint keeps no valid name."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(directory: Path, keep_last: int, keep: Path) -> None:
    if keep_last < 1:
        return
    found = complete_checkpoints(directory.parent)
    for old in found[:-keep_last]:
        if old != keep:
            _retire(old)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())

