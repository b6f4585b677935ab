"""Meta-device initialisation (`motian.train.meta_init`), which `pretrain --parallel fsdp` uses
on several processes: the model built on meta, sharded, materialised with the ordinary build's
weights bit for bit, without any rank holding the whole model. One torchrun launch (2
processes, gloo) checks the sharded case (tests/meta_init_check.py); the rest runs in this
process, the FSDP2 cases in a process group of this process alone: the bf16 policy (GPU only)
and gradient accumulation keeping only the root gathered between micro-steps. That a
2-process meta-initialised `pretrain` ends with the weights of 1 process is tests/test_fsdp.py's
equivalence test (several processes always initialise on meta)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from motian.errors import UserError
from motian.pretraining import build_objective
from motian.train.meta_init import deferred, is_deferred, materialise
from motian.train.recipe import load_recipe
from motian.train.settings import RunSettings
from tests.pretrain_helpers import write_recipe
from tests.test_distributed import env, torchrun

CHECK = str(Path(__file__).with_name("meta_init_check.py"))


def test_the_recipe_objective_built_on_meta_has_the_ordinary_weights(pd98_encoded, tmp_path):
    spec = load_recipe(str(write_recipe(tmp_path, steps=4)))
    run = RunSettings(device="cpu", parallel="fsdp")
    whole = build_objective(spec, pd98_encoded, run)
    after_whole = torch.rand(8)
    meta = build_objective(spec, pd98_encoded, run, meta=True)
    after_meta = torch.rand(8)
    assert torch.equal(after_whole, after_meta)  # what follows the build draws the same
    assert is_deferred(meta) and next(meta.model.parameters()).is_meta
    materialise(meta, torch.device("cpu"))  # alone: whole tensors, nothing sharded
    assert not is_deferred(meta)
    a, b = whole.state_dict(), meta.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def build_odd_module() -> nn.Module:
    """Constructor draws, a padding row written through a view, a random creation, an in-place
    op after a creation, a LayerNorm: what replay must repeat in order."""
    return nn.Sequential(nn.Linear(5, 7), nn.Embedding(9, 4, padding_idx=2), nn.LayerNorm(4),
                         nn.ParameterList([nn.Parameter(torch.randn(3)),
                                           nn.Parameter(torch.zeros(2).add_(1.5))]))


def test_partial_writes_random_creations_and_real_tensors_replay_exactly():
    torch.manual_seed(3)
    reference = build_odd_module()
    torch.manual_seed(3)
    with deferred() as built:
        built.append(build_odd_module())
    root = nn.ModuleDict({"odd": built[0], "real": nn.Linear(2, 2)})  # built outside: kept
    kept = root["real"].weight.detach().clone()
    materialise(root, torch.device("cpu"))
    for key, value in reference.state_dict().items():
        assert torch.equal(root["odd"].state_dict()[key], value), key
    assert torch.equal(root["real"].weight, kept)
    assert root["odd"][1].weight[2].abs().sum() == 0  # the padding row


def test_what_cannot_be_replayed_is_refused_naming_the_weight():
    class Derived(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(4))
            self.b = nn.Parameter(self.a.detach() * 2)  # not a creation replay can repeat

    with deferred() as built:
        built.append(Derived())
    with pytest.raises(UserError, match=r"meta-device initialisation: b cannot be rebuilt "
                                        r"\(aten.mul.Tensor computes it from other meta"):
        materialise(built[0], torch.device("cpu"))
    # torch's truncated normal returns at once for a meta tensor: nothing to record or replay
    with deferred() as built:
        built.append(nn.Linear(4, 3))
        nn.init.trunc_normal_(built[0].weight, std=0.02)
    with pytest.raises(UserError, match=r"weight cannot be rebuilt \(torch.nn.init."
                                        r"trunc_normal_ draws nothing for a meta tensor\)"):
        materialise(built[0], torch.device("cpu"))


def test_two_processes_shard_without_the_whole_model(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=4)
    done = subprocess.run([*torchrun(2, tmp_path / "logs"), CHECK, str(recipe),
                           str(pd98_encoded), str(tmp_path / "run")],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    diff, _, rng = lines["init"].split()
    assert float(diff) == 0.0 and rng == "1", lines  # the seed's weights, bit for bit
    assert float(lines["load"]) == 0.0, lines  # a sharded checkpoint loads into it
    peaks = {}
    for kind in ("whole", "meta"):
        peak, model, largest = (float(x) for x in lines[f"peak-{kind}"].split())
        peaks[kind] = peak
    # torch's allocator count on rank 0 (not RSS): built whole, the whole model is held at
    # once; on meta, this rank's half, one whole parameter at a time (the largest, 64 x 256
    # floats, is 1/19 of the model) and FSDP's own transients (~0.1 of the model, also there
    # when built whole): ~0.65 of the model
    assert largest < 0.06 * model and peaks["whole"] >= model, lines
    assert peaks["meta"] < 0.8 * model, lines


@contextlib.contextmanager
def world_of_one(backend: str, directory: Path):
    """A process group of this process alone: enough for fully_shard to apply."""
    import torch.distributed as dist

    dist.init_process_group(backend, rank=0, world_size=1,
                            store=dist.FileStore(str(directory / "store"), 1))
    try:
        yield
    finally:  # later tests in this process must not see a group
        dist.destroy_process_group()


def small_sharded(device: str, precision: str = "fp32") -> nn.Module:
    from motian.model.config import preset
    from motian.model.heads import MaskedLM
    from motian.train.distributed import DistInfo, shard_model

    with deferred() as built:
        built.append(MaskedLM(preset("tiny", vocab_size=64, hidden=32, layers=2, heads=2,
                                     ffn=64, max_positions=16)))
    model = shard_model(built[0], DistInfo(device=torch.device(device)), precision)
    materialise(model, torch.device(device))
    return model


# MaskedLM's output holds views; the FSDP2 warning about in-place ops on them does not apply
VIEWS = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")


@VIEWS
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (bf16 compute, fp32 reduction)"))])
def test_the_bf16_policy_applies_on_a_gpu_only(device, tmp_path):
    with world_of_one("nccl" if device == "cuda" else "gloo", tmp_path):
        model = small_sharded(device, "bf16")
        logits = model(input_ids=torch.randint(0, 64, (2, 8), device=device)).logits
        logits.float().sum().backward()
        # bf16 copies for the compute on the GPU, fp32 on the CPU (no policy); the sharded
        # weights and their gradients stay fp32 on both
        assert logits.dtype == (torch.bfloat16 if device == "cuda" else torch.float32)
        weight = next(m for m in model.modules() if isinstance(m, nn.Linear)).weight
        assert weight.dtype == weight.grad.dtype == torch.float32


@VIEWS
def test_accumulation_keeps_the_root_gathered_between_micro_steps(tmp_path):
    from torch.distributed.tensor import DTensor

    from motian.train.distributed import sync_gradients

    with world_of_one("gloo", tmp_path):
        model = small_sharded("cpu")
        block = model.backbone.blocks[0].attention.qkv
        for last in (False, True):
            with sync_gradients(model, last):
                model(input_ids=torch.randint(0, 64, (2, 8))).logits.sum().backward()
            # FSDP2 registers the unsharded tensors while a unit is gathered, DTensors else
            root = next(model.backbone.embeddings.parameters())
            assert isinstance(root, DTensor) == last  # gathered until the last micro-step
            assert isinstance(block.weight, DTensor)  # the blocks reshard every time
            assert isinstance(block.weight.grad, DTensor) == last  # reduced on the last only
