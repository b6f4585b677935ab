"""Run by tests/test_meta_init.py under torchrun (2 processes, gloo):

    torchrun --nproc_per_node 2 tests/meta_init_check.py RECIPE DATA CHECKPOINT_DIR

Rank 0 prints one line per check:
  init <max diff> rng <0|1>   the recipe's objective built on meta, sharded (FSDP2 per block
                              and root) and materialised, against the same objective built
                              whole on this rank; rng 1 when the global RNG after both builds
                              is the same
  peak-<whole|meta> <peak bytes> <model bytes> <largest parameter bytes>
                              torch's CPU allocator peak on rank 0 while a MaskedLM (vocab 256,
                              hidden 64, 6 layers) is built, sharded and materialised
  load <max diff>             a sharded checkpoint written from the whole-built objective, read
                              back into a meta-built, sharded one
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from benchmarks.fsdp_memory import init_peak
from motian.model.config import preset
from motian.model.heads import MaskedLM
from motian.pretraining import build_objective, fit_config
from motian.train.distributed import process_group, wrap_model
from motian.train.fit import _build_optimizer
from motian.train.meta_init import deferred, materialise
from motian.train.recipe import load_recipe
from motian.train.settings import RunSettings
from motian.train.sharded import load_sharded_checkpoint, save_sharded_checkpoint

RUN = RunSettings(device="cpu", threads=1, parallel="fsdp", checkpoint_activations=True)


def whole_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                 broadcast_from_rank0=False))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def built(spec, data: Path, meta: bool, info):
    objective = build_objective(spec, data, RUN, meta=meta)
    after = torch.rand(4)  # the global RNG as the build left it
    wrap_model(objective, info, "fsdp")
    materialise(objective, info.device)
    return objective, after


def small_model(meta: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=256, hidden=64, layers=6, heads=2, ffn=256,
                    max_positions=64)
    with deferred(meta) as models:
        models.append(MaskedLM(config))
    return models[0]


def main(recipe: str, data: str, checkpoints: str) -> None:
    spec = load_recipe(recipe)
    with process_group("cpu", 60) as info:
        say = print if info.is_main else (lambda *a, **k: None)
        whole, rng_whole = built(spec, Path(data), False, info)
        meta, rng_meta = built(spec, Path(data), True, info)
        say(f"init {max_diff(whole_state(whole), whole_state(meta)):.3g} rng "
            f"{int(torch.equal(rng_whole, rng_meta))}", flush=True)
        for on_meta in (False, True):
            peak, total, largest = init_peak(small_model, on_meta, info)
            say(f"peak-{'meta' if on_meta else 'whole'} {peak:.0f} {total} {largest}",
                flush=True)
        # a checkpoint of other weights than the seed's, read into the meta-built objective
        with torch.no_grad():
            for p in whole.parameters():
                p.to_local().normal_()
        optimizer = _build_optimizer(whole, fit_config(spec))
        path = save_sharded_checkpoint(Path(checkpoints), 1, whole, whole.model, optimizer,
                                       {"tokens_seen": 0}, rng_states=None)
        load_sharded_checkpoint(path, meta, _build_optimizer(meta, fit_config(spec)))
        say(f"load {max_diff(whole_state(whole), whole_state(meta)):.3g}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
