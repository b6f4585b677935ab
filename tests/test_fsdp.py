"""FSDP2 (`--parallel fsdp`) and distributed checkpoints, with real torchrun processes (gloo on
CPU): 2 sharded processes give the parameters of 1 process with the same global batch (MLM +
sentence order, LAMB, dropout and activation recomputation on); LAMB and AdamW over shards
equal the unsharded optimisers; a checkpoint written by 2 processes loads on 1 and one written
by 1 loads on 2 with the same tensors; resume is exact; `consolidate` writes the ordinary model
directory; what cannot work is refused with a UserError."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from motian.errors import UserError
from motian.model.artifact import checkpoint_name, resolve_model_dir
from motian.model.io import from_pretrained
from motian.pretraining import pretrain_recipe
from motian.train.recipe import load_recipe
from motian.train.settings import RunSettings
from motian.train.sharded import consolidate
from tests.fsdp_check import loaded_state, max_state_difference
from tests.pretrain_helpers import final_weights, max_difference, write_recipe
from tests.test_distributed import args, env, torchrun

FSDP = RunSettings(device="cpu", threads=1, progress=False, micro_batch=2, parallel="fsdp",
                   checkpoint_activations=True, dist_timeout_s=60)
CHECK = str(Path(__file__).with_name("fsdp_check.py"))


def run_cli(n: int, recipe: Path, data: Path, out: Path, logs: Path, *extra: str
            ) -> subprocess.CompletedProcess:
    """`motian pretrain --parallel fsdp` on `n` torchrun processes."""
    cmd = [*torchrun(n, logs), *args(recipe, data, out), "--parallel", "fsdp",
           "--checkpoint-activations", *extra]  # args: micro-batch 2, as FSDP below
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    return done


@pytest.fixture(scope="module")
def runs(pd98_encoded, tmp_path_factory):
    """One 8-step run on 2 sharded processes and the same run on 1 (checkpoints at 4 and 8)."""
    root = tmp_path_factory.mktemp("fsdp")
    recipe = write_recipe(root, steps=8, checkpoint_every=4, eval_every=4)
    two = root / "two"
    run_cli(2, recipe, pd98_encoded, two, root / "logs")
    one = root / "one"
    pretrain_recipe(load_recipe(str(recipe)), FSDP, pd98_encoded, one)
    return recipe, one, two


def test_two_sharded_processes_equal_one_with_the_same_global_batch(runs):
    recipe, one, two = runs
    # every rank wrote its own shards into the same checkpoint directory
    step = two / "checkpoints" / checkpoint_name(8)
    assert sorted(p.name for p in (step / "sharded").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    assert (step / "model.json").is_file() and not (step / "model.safetensors").exists()
    assert max_difference(final_weights(one), final_weights(two)) < 1e-5


@pytest.fixture(scope="module")
def checks(runs, pd98_encoded, tmp_path_factory) -> dict[str, str]:
    """tests/fsdp_check.py on 2 processes: the optimisers over shards, and both step-4
    checkpoints loaded sharded. {name: the rest of its line}."""
    recipe, one, two = runs
    done = subprocess.run([*torchrun(2, tmp_path_factory.mktemp("logs")), CHECK, str(recipe),
                           str(pd98_encoded), *(str(run / "checkpoints" / checkpoint_name(4))
                                                for run in (one, two))],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


def test_lamb_and_adamw_over_shards_equal_the_unsharded_optimisers(checks):
    lines = {k: v for k, v in checks.items() if k != "load"}
    assert set(lines) == {"lamb", "lamb-block", "adamw"}, checks
    for name, text in lines.items():
        diff, _, moved = text.split()
        # fp32 noise: a shard's squared norms summed over ranks vs one norm of the whole
        # (per-shard norms, the bug this guards against, give differences of ~1e-2)
        assert float(diff) < 1e-5 and float(moved) > 0.05, (name, text)


def test_a_checkpoint_loads_on_another_number_of_processes(runs, checks, pd98_encoded):
    recipe, one, two = runs
    by_one = one / "checkpoints" / checkpoint_name(4)
    by_two = two / "checkpoints" / checkpoint_name(4)
    # 2 -> 1: this process reads both ranks' shards whole; the same tensors as the 1-process
    # run's own checkpoint of the same step (model and every optimizer moment)
    assert max_state_difference(loaded_state(recipe, pd98_encoded, by_two),
                                loaded_state(recipe, pd98_encoded, by_one)) < 1e-5
    # 1 -> 2: two ranks read their halves of the 1-process checkpoint (and of the other)
    assert float(checks["load"]) < 1e-5, checks


def test_resume_is_exact_and_may_change_the_process_count(runs, pd98_encoded, tmp_path):
    recipe, one, two = runs
    spec = load_recipe(str(recipe))
    same = tmp_path / "same"
    (same / "checkpoints").mkdir(parents=True)
    shutil.copytree(one / "checkpoints" / checkpoint_name(4),
                    same / "checkpoints" / checkpoint_name(4))
    pretrain_recipe(spec, FSDP, pd98_encoded, same, resume=True)
    assert max_difference(final_weights(same), final_weights(one)) == 0.0
    # 2 -> 1 process: the loader keeps rows per micro-step over all processes (micro-batch x
    # processes = 4), so 1 process continues with micro-batch 4
    fewer = tmp_path / "fewer"
    (fewer / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / checkpoint_name(4),
                    fewer / "checkpoints" / checkpoint_name(4))
    summary = pretrain_recipe(spec, replace(FSDP, micro_batch=4), pd98_encoded, fewer,
                              resume=True)
    assert summary["steps"] == 8
    state = json.loads((fewer / "checkpoints" / checkpoint_name(8) / "state.json").read_text())
    assert state["step"] == 8 and state["tokens_seen"] > 0


def test_consolidate_writes_the_model_directory_finetune_reads(runs, tmp_path):
    _, _, two = runs
    out = consolidate(two, tmp_path / "model")  # a run: its latest (sharded) checkpoint
    assert max_difference(load_file(str(out / "model.safetensors")), final_weights(two)) == 0
    # an earlier step's shards: other weights (training moved them well beyond the 1e-5 the
    # equivalence test allows)
    earlier = consolidate(two / "checkpoints" / checkpoint_name(4), tmp_path / "step4")
    assert max_difference(load_file(str(earlier / "model.safetensors")),
                          final_weights(two)) > 1e-3
    model = from_pretrained(out)  # strict: every weight of the head it names
    assert type(model).__name__ == json.loads((two / "final" / "config.json").read_text())["head"]
    assert (out / "vocab.txt").is_file() or (out / "tokenizer.json").is_file()
    assert resolve_model_dir(two) == two / "final"  # finished: its final/, not the shards


def test_what_fsdp_cannot_do_is_refused(runs, pd98_encoded, tmp_path):
    recipe, one, two = runs
    spec = load_recipe(str(recipe))
    # a sharded checkpoint resumed as DDP (and the reverse direction's message)
    with pytest.raises(UserError, match="written by a --parallel fsdp run; resume with "
                                        "--parallel fsdp.*consolidate"):
        pretrain_recipe(spec, RunSettings(device="cpu", threads=1, progress=False,
                                          micro_batch=2), pd98_encoded, one, resume=True)
    # another recipe (another learning rate): the fingerprint refuses it
    other = write_recipe(tmp_path, steps=8, checkpoint_every=4, eval_every=4, optim="adamw")
    with pytest.raises(UserError, match="another recipe or other settings"):
        pretrain_recipe(load_recipe(str(other)), FSDP, pd98_encoded, one, resume=True)
    # an unfinished FSDP run is not a model directory until consolidated
    unfinished = tmp_path / "unfinished"
    shutil.copytree(two / "checkpoints", unfinished / "checkpoints")
    with pytest.raises(UserError, match="is sharded.*motian consolidate"):
        resolve_model_dir(unfinished)
    with pytest.raises(UserError, match="not a sharded checkpoint"):
        consolidate(tmp_path / "nothing", tmp_path / "m")
    with pytest.raises(UserError, match="already exists"):
        consolidate(two, two / "final")


def test_what_fsdp_does_not_do_yet_is_refused_before_any_work():
    from motian.train.fit import FitConfig, _check_fsdp
    from motian.train.settings import OptimSettings

    config = FitConfig(optim=OptimSettings(), label="finetune reviews")
    with pytest.raises(UserError, match="finetune reviews saves its model unsharded"):
        _check_fsdp(config, FSDP, "fp32", None, fsdp_ok=False)
    with pytest.raises(UserError, match="fp16's loss scaler"):
        _check_fsdp(config, FSDP, "fp16", None, fsdp_ok=True)
    with pytest.raises(UserError, match="progressive stacking"):
        _check_fsdp(config, FSDP, "fp32", [1, 2], fsdp_ok=True)
    with pytest.raises(UserError, match="--compile"):
        _check_fsdp(config, replace(FSDP, compile=True), "fp32", None, fsdp_ok=True)
    _check_fsdp(config, FSDP, "bf16", None, fsdp_ok=True)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, meant
def test_loading_shards_runs_no_pickled_code(tmp_path):
    # DCP pickles non-tensor entries (step counts, parameter-group settings) and its own
    # planner unpickles them with weights_only=False; ours refuses anything but plain data.
    import datetime

    import torch
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.api import CheckpointException

    from motian.train.sharded import _safe_planner

    save({"w": torch.ones(2), "step": 3, "when": datetime.date(2026, 1, 1)},
         checkpoint_id=str(tmp_path), no_dist=True)
    plain = {"w": torch.zeros(2), "step": 0}
    load(plain, checkpoint_id=str(tmp_path), planner=_safe_planner(), no_dist=True)
    assert plain["step"] == 3 and plain["w"].tolist() == [1.0, 1.0]
    with pytest.raises(UserError, match="when: a non-tensor entry that does not read as plain"):
        try:
            load({"when": None}, checkpoint_id=str(tmp_path), planner=_safe_planner(),
                 no_dist=True)
        except CheckpointException as e:  # DCP's wrapper, a BaseException; the cause inside
            raise next(iter(e.failures.values()))[0] from None
