"""Progressive stacking (Gong et al. 2019): the grown model computes exactly the old blocks run
twice, its copies are tensors of their own, a stacking run trains from the CLI and ends at the
target depth in a model that fine-tunes, resuming before or after a growth ends where an
uninterrupted run does, and a stage plan that cannot run is refused naming the stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from motian.errors import UserError
from motian.model import MaskedLM, preset
from motian.model.io import from_pretrained
from motian.model.stacking import depth, grow, set_depth
from motian.task_training import TaskTraining
from motian.train.recipe import load_recipe
from motian.train.settings import RunSettings
from tests.pretrain_helpers import final_weights, max_difference

# 4 blocks in the end: 1, then 2 (a growth at a stage change of length too), then 4.
STACKING = """\
model:
  preset: tiny
  overrides: {{hidden: 32, layers: 4, heads: 2, ffn: 64, max_positions: 64, dropout: 0.1,
              norm: pre, position: alibi}}
data: {{masking: bert, pair_task: sop}}
objective: {{kind: mlm, weighting: uncertainty}}
optim: {{name: adamw, lr: 0.01}}
stages:
  - {{name: one, fraction: 0.25, seq_len: 32, global_batch: 8, warmup: 0.2, layers: 1}}
  - {{name: two, fraction: 0.5, seq_len: 64, global_batch: 4, warmup: 0.2, layers: 2}}
  - {{name: four, fraction: 0.25, seq_len: 64, global_batch: 4, warmup: 0.5}}
steps: 16
eval: {{every: 8, seq_len: 64, rows: 16, batch: 16}}
checkpoint_every: {checkpoint_every}
keep_last: 0
"""


def write_stacking(directory: Path, checkpoint_every: int = 2) -> Path:
    path = directory / "stacking.yaml"
    path.write_text(STACKING.format(checkpoint_every=checkpoint_every), encoding="utf-8")
    return path


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


RUN = RunSettings(device="cpu", threads=1, progress=False)


def by_hand(model: MaskedLM, blocks: list, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The backbone's computation with `blocks` in place of its own."""
    backbone = model.backbone
    positions = torch.arange(ids.shape[1])[None]
    x = backbone.embeddings(ids, None, positions)
    ctx = backbone._attention_context(mask, None, positions, ids.shape[1])
    for block in blocks:
        x = block(x, ctx)
    return x if backbone.final_norm is None else backbone.final_norm(x)


@pytest.mark.parametrize("norm,position", [("pre", "alibi"), ("post", "absolute"),
                                           ("pre", "t5")])
def test_the_grown_model_runs_the_old_blocks_twice(norm, position):
    torch.manual_seed(0)
    model = MaskedLM(preset("tiny", hidden=48, layers=2, heads=4, ffn=96, vocab_size=300,
                            dropout=0.0, attention_dropout=0.0, norm=norm, position=position))
    with torch.no_grad():  # weights unlike a fresh initialisation, as after training
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    ids = torch.randint(5, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # padding, so the attention mask takes part too
    old = list(model.backbone.blocks)
    pairs = grow(model, 4)
    assert depth(model) == 4 and model.config.layers == 4 == model.backbone.config.layers
    assert [source for _, source in pairs] == old  # blocks 2, 3 copy 0, 1, in order
    with torch.no_grad():
        assert torch.equal(model.backbone(ids, mask), by_hand(model, old + old, ids, mask))
        # not an exact double: 4 -> 6 copies the top two (2, 3), which are copies of 0, 1
        grow(model, 6)
        assert torch.equal(model.backbone(ids, mask), by_hand(model, old * 3, ids, mask))


def test_copies_are_tensors_of_their_own():
    torch.manual_seed(0)
    model = MaskedLM(preset("tiny", hidden=32, layers=1, heads=2, ffn=64, vocab_size=200))
    (twin, source), = grow(model, 2)
    assert twin is not source
    for a, b in zip(twin.parameters(), source.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)  # trains the copy only
    ids = torch.randint(5, 200, (2, 12))
    model(ids, torch.ones_like(ids)).logits.square().mean().backward()
    optimizer.step()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, twin.state_dict()[k]) for k, v in before.items())
    set_depth(model, 1)  # and back: the bottom block stays
    assert list(model.backbone.blocks) == [source] and model.config.layers == 1


def test_a_stacking_run_from_the_cli_ends_at_full_depth_and_fine_tunes(pd98_encoded,
                                                                        tmp_path):
    recipe = write_stacking(tmp_path, checkpoint_every=4)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "motian.cli", "pretrain", "--recipe", str(recipe), "--data",
         str(pd98_encoded), "--out", str(out), "--device", "cpu", "--threads", "1",
         "--no-progress"], env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "stage 2/3 at step 4: grew from 1 to 2 blocks (block 1 copied from the trained " \
           "block 0); optimizer restarted" in said
    assert "grew from 2 to 4 blocks (blocks 2-3 copied from the trained blocks 0-1)" in said
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    depths = {r["stage"]: r["layers"] for r in records if r["kind"] == "train"}
    assert depths == {2: 2, 3: 4}  # logged every 10 steps: stage two at step 10, four at 16
    # a checkpoint of the shallow stage is a 1-block model; the final one has all 4
    early = json.loads((out / "checkpoints" / "step-00000004" / "config.json").read_text())
    assert early["model"]["layers"] == 1
    final = from_pretrained(out / "final")
    assert final.config.layers == 4 and depth(final) == 4

    from motian import finetune  # the normal path: a model directory, its own tokenizer

    result = finetune("reviews-sentiment", tmp_path / "ft", model=out / "final", max_train=32,
                      max_eval=16, seeds=[1], training=TaskTraining(epochs=1, batch_size=8),
                      run=RUN)
    assert result["runs"][0]["seed"] == 1
    tuned = from_pretrained(tmp_path / "ft" / "seed-1" / "model")
    assert depth(tuned) == 4


def _run_until(recipe: Path, data: Path, out: Path, resume: bool = False) -> None:
    from motian import pretrain  # the Python API

    pretrain(recipe=str(recipe), data=data, out=out, resume=resume, run=RUN)


def test_resuming_before_and_after_a_growth_equals_an_uninterrupted_run(pd98_encoded,
                                                                        tmp_path, capsys):
    # Stage one is steps 1-4 (1 block), two 5-12 (2 blocks), four 13-16 (4 blocks). Step 4
    # ends stage one, so its resume grows before its first step; 2 is mid-stage at 1 block,
    # 6 just after a growth, 12 the end of stage two. Dropout is on.
    recipe = write_stacking(tmp_path)
    full = tmp_path / "full"
    _run_until(recipe, pd98_encoded, full)
    for step in (2, 4, 6, 12):
        run = tmp_path / f"from-{step}"
        name = f"step-{step:08d}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(full / "checkpoints" / name, run / "checkpoints" / name)
        (run / "checkpoints" / "latest").write_text(name + "\n")
        capsys.readouterr()
        _run_until(recipe, pd98_encoded, run, resume=True)
        said = capsys.readouterr()
        assert f"resumed from {run / 'checkpoints' / name}" in said.err
        if step == 4:  # saved at 1 block; the resumed run grows before its first step
            assert "stage 2/3 at step 4: grew from 1 to 2 blocks" in said.out
        assert max_difference(final_weights(run), final_weights(full)) == 0.0, step


STAGE = "  - {{name: {name}, fraction: {fraction}, seq_len: 32, global_batch: 8{layers}}}\n"


def plan_recipe(directory: Path, model_layers: int, plan: list[int | None]) -> Path:
    stages = "".join(STAGE.format(name=f"s{i + 1}", fraction=1 / len(plan),
                                  layers="" if n is None else f", layers: {n}")
                     for i, n in enumerate(plan))
    path = directory / "plan.yaml"
    path.write_text(f"model: {{preset: tiny, overrides: {{layers: {model_layers}}}}}\n"
                    f"stages:\n{stages}", encoding="utf-8")
    return path


@pytest.mark.parametrize("layers,plan,message", [
    (4, [2, 1, 4], "stage 2 (s2): 1 layers after 2"),
    (4, [1, 4], "stage 2 (s2): grows from 1 to 4 layers; a stage may at most double"),
    (4, [1, 2], "the last stage trains 2 layers but the model has 4"),
    (2, [1, 3], "stage 2 (s2): layers 3 is not between 1 and the model's layers (2"),
    (2, [-1, None], "stage 1 (s1): layers -1"),
])
def test_a_plan_that_cannot_run_is_refused_naming_the_stage(tmp_path, layers, plan, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(plan_recipe(tmp_path, layers, plan))


def test_plans_that_can_run():
    stacking = load_recipe("stacking-demo")
    assert [s.layers for s in stacking.stages] == [1, 2, 0]
    assert stacking.model.build().layers == load_recipe("demo").model.build().layers == 2


def _fit(recipe_path: Path, data: Path, out: Path, policy: str, resume: bool = False) -> dict:
    """The pretraining pieces on the one loop, with the optimizer policy at growth given
    (recipes keep the default, "restart")."""
    from dataclasses import replace

    from motian.pretraining import PretrainBatches, build_objective, fit_config
    from motian.train.distributed import DistInfo
    from motian.train.fit import fit

    recipe = load_recipe(recipe_path)
    objective = build_objective(recipe, data, RUN)
    config = replace(fit_config(recipe), grown_optimizer=policy)
    fit(objective, PretrainBatches(data, recipe), config, RUN, out, DistInfo(), resume=resume)
    return {k: v.detach().clone() for k, v in objective.model.state_dict().items()}


def test_carrying_the_optimizer_state_over_a_growth_also_resumes_exactly(pd98_encoded,
                                                                         tmp_path):
    recipe = write_stacking(tmp_path)
    copied = _fit(recipe, pd98_encoded, tmp_path / "copy", "copy")
    restarted = _fit(recipe, pd98_encoded, tmp_path / "restart", "restart")
    assert max_difference(copied, restarted) > 1e-4  # the policy changes the run
    for step in (4, 6):  # saved at 1 block (the moments are carried on resume), and at 2
        run = tmp_path / f"copy-from-{step}"
        name = f"step-{step:08d}"
        shutil.copytree(tmp_path / "copy" / "checkpoints" / name, run / "checkpoints" / name)
        (run / "checkpoints" / "latest").write_text(name + "\n")
        resumed = _fit(recipe, pd98_encoded, run, "copy", resume=True)
        assert max_difference(resumed, copied) == 0.0, step


def test_two_processes_grow_as_one_does(pd98_encoded, tmp_path):
    # DDP is rebuilt over the grown model at each growth (its hooks cover the parameters it
    # was made with); 2 gloo processes must end with the parameters of 1 process.
    from tests.test_distributed import args, torchrun

    recipe = write_stacking(tmp_path, checkpoint_every=0)
    one = subprocess.run([sys.executable, *args(recipe, pd98_encoded, tmp_path / "one")],
                         env=env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*torchrun(2, tmp_path / "logs"),
                          *args(recipe, pd98_encoded, tmp_path / "two")],
                         env=env(), capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr + two.stdout
    assert "grew from 2 to 4 blocks" in two.stdout + two.stderr
    assert max_difference(final_weights(tmp_path / "one"),
                          final_weights(tmp_path / "two")) < 1e-5
