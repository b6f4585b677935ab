"""Shared by the pretraining tests: a tiny two-stage recipe written as YAML, and the final
weights of a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = """\
model:
  preset: tiny
  overrides: {{hidden: 32, layers: 2, heads: 2, ffn: 64, max_positions: 64, dropout: 0.1}}
data: {data}
objective: {objective}
optim: {{name: {optim}, lr: 0.01}}
stages:
  - {{fraction: 0.75, seq_len: 32, global_batch: 8, warmup: 0.2}}
  - {{fraction: 0.25, seq_len: 64, global_batch: 4, warmup: 0.5}}
steps: {steps}
eval: {{every: {eval_every}, seq_len: 64, rows: 32, batch: 16}}
checkpoint_every: {checkpoint_every}
max_bad_steps: 3
"""


def write_recipe(directory: Path, steps: int = 16, checkpoint_every: int = 4,
                 eval_every: int = 8, pair_task: str = "sop", optim: str = "lamb",
                 data: str | None = None, objective: str | None = None) -> Path:
    """`data` / `objective`: the recipe's YAML flow mappings for those sections, replacing
    the defaults ({masking: motian, pair_task: ...} and uncertainty weighting)."""
    path = directory / "tiny.yaml"
    path.write_text(TINY.format(
        steps=steps, checkpoint_every=checkpoint_every, eval_every=eval_every, optim=optim,
        data=data or f"{{masking: motian, pair_task: {pair_task}}}",
        objective=objective or "{kind: mlm, weighting: uncertainty}"), encoding="utf-8")
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run_then_resume(recipe, settings, data: Path, root: Path, step: int) -> tuple[Path, Path]:
    """A whole run under root/full, then a run that stopped after its step-`step` checkpoint
    (only that checkpoint copied) resumed under root/resumed; returns the two run dirs."""
    from motian.model.artifact import checkpoint_name
    from motian.pretraining import pretrain_recipe

    full, resumed = root / "full", root / "resumed"
    pretrain_recipe(recipe, settings, data, full)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / checkpoint_name(step),
                    resumed / "checkpoints" / checkpoint_name(step))
    pretrain_recipe(recipe, settings, data, resumed, resume=True)
    return full, resumed
