"""Run by tests/test_fsdp.py under torchrun (and imported by it for the one-process side).

    torchrun --nproc_per_node 2 tests/fsdp_check.py [RECIPE DATA CHECKPOINT_A CHECKPOINT_B]

1. LAMB and AdamW over FSDP2-sharded parameters (DTensors, uneven dim-0 shards) against the same
   optimiser over a whole, unsharded copy; rank 0 prints "<name> <max diff> moved <x>".
2. (with the arguments) loads two sharded checkpoints into this run's sharded objective and
   optimizer; rank 0 prints "load <max diff of every model and optimizer tensor>".
One launch for both: starting torchrun costs more than either check."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from motian.train.optim import build_optimizer


def optimizers_over_shards(steps: int = 3) -> None:
    torch.manual_seed(0)
    # 7 and 5 rows: shards of 4 + 3 and 3 + 2 rows, so every shard's norm differs from the
    # whole tensor's and a per-shard trust ratio would be wrong on every rank.
    whole = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.LayerNorm(5))
    inputs = torch.randn(steps, 16, 6)
    for name, kwargs in (("lamb", {"grad_normalization": "clip"}),
                         ("lamb-block", {"grad_normalization": "block"}),
                         ("adamw", {})):
        reference, sharded = copy.deepcopy(whole), copy.deepcopy(whole)
        for layer in (sharded[0], sharded[2]):
            fully_shard(layer)
        fully_shard(sharded)
        opts = [build_optimizer(m, name.split("-")[0], lr=0.05, weight_decay=0.01, **kwargs)
                for m in (reference, sharded)]
        for x in inputs:  # every rank the same batch: the averaged gradient is the whole one
            for model, opt in zip((reference, sharded), opts):
                model(x).square().sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        ref = reference.state_dict()
        diff = max(float((p.full_tensor() - ref[k]).abs().max())
                   for k, p in sharded.state_dict().items())
        moved = max(float((ref[k] - v).abs().max()) for k, v in whole.state_dict().items())
        if dist.get_rank() == 0:
            print(f"{name} {diff:.3g} moved {moved:.3g}", flush=True)


def loaded_state(recipe: Path, data: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor of `checkpoint` as this run (1 process, or every rank
    of torchrun, sharded) loads it: whole tensors, keyed by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from motian.pretraining import build_objective, fit_config
    from motian.train import distributed as dist_utils
    from motian.train.distributed import DistInfo
    from motian.train.fit import _build_optimizer  # the loop's own optimizer, as it builds it
    from motian.train.recipe import load_recipe
    from motian.train.settings import RunSettings
    from motian.train.sharded import load_sharded_checkpoint

    spec = load_recipe(str(recipe))
    objective = build_objective(spec, data, RunSettings(device="cpu"))
    world = dist.get_world_size() if dist.is_initialized() else 1
    dist_utils.wrap_model(objective, DistInfo(world_size=world), "fsdp")
    optimizer = _build_optimizer(objective, fit_config(spec))
    load_sharded_checkpoint(checkpoint, objective, optimizer)
    model, optim = get_state_dict(objective, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    flat = {f"model.{k}": v for k, v in model.items()}
    for key, state in optim.get("state", {}).items():
        flat.update({f"optim.{key}.{k}": v for k, v in state.items()
                     if isinstance(v, torch.Tensor)})
    return flat


def max_state_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a, (sorted(a)[:4], sorted(b)[:4])
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(*args: str) -> None:
    dist.init_process_group("gloo")
    optimizers_over_shards()
    if args:
        recipe, data, first, second = map(Path, args)
        a, b = (loaded_state(recipe, data, c) for c in (first, second))
        if dist.get_rank() == 0:
            print(f"load {max_state_difference(a, b):.3g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
