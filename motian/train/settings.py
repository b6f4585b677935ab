"""The settings every training verb shares, as one set of dataclasses.

`OptimSettings` (optimiser and learning-rate shape) decides the result; `RunSettings` (device,
precision, micro-batch, compile, recomputation, threads, progress) decides only speed and
memory, so changing it must not change the result beyond floating-point noise (cramming's split
of `train` and `impl`). `Stage` is a part of a run at one sequence length and global batch.

`motian pretrain` reads `OptimSettings` and its stages from a recipe; `motian finetune`,
`motian distill` and `motian distill-corpus` take the same dataclasses as parameters (the CLI
turns their fields into options), and all of them hand them to the one loop,
`motian.train.fit.fit`. Field metadata ``cli`` names the command-line option where the field's
own name would be ambiguous (``OptimSettings.name`` is ``--optimizer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from motian.errors import UserError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class OptimSettings:
    """The optimiser and the shape of the learning-rate schedule."""

    name: Literal["lamb", "adamw"] = field(default="adamw", metadata={
        "cli": "optimizer", "help": "lamb (layer-wise trust ratio) or adamw"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "decoupled weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={
        "help": "Adam moment decay rates"})
    eps: float = field(default=1e-6, metadata={"help": "Adam epsilon"})
    clip_norm: float = field(default=1.0, metadata={
        "help": "global gradient-norm clipping; 0 = off"})
    grad_normalization: Literal["clip", "block", "global", "none"] = field(
        default="clip", metadata={
            "help": "lamb only: how LAMB rescales gradients before its moments. clip = divide "
                    "by max(1, global norm) (a no-op after clip_norm 1); block = every tensor's "
                    "gradient to norm 1, always (LANS); global = the whole gradient to norm 1, "
                    "always; none. adamw accepts only clip"})
    decay: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={
        "help": "learning-rate decay after the warm-up"})
    min_ratio: float = field(default=0.0, metadata={
        "help": "final learning rate as a fraction of the peak"})


@dataclass(frozen=True)
class Stage:
    """A part of the run: `fraction` of all steps (or of the time budget) at `seq_len` tokens
    with `global_batch` rows per optimizer step, after its own warm-up (fraction of the stage)."""

    fraction: float = 1.0
    seq_len: int = 128
    global_batch: int = 32
    warmup: float = 0.06
    name: str = ""


def stage_bounds(stages: tuple[Stage, ...]) -> list[tuple[float, float]]:
    """[(start, end)] of each stage as fractions of the whole run."""
    bounds, start = [], 0.0
    for s in stages:
        bounds.append((start, start + s.fraction))
        start += s.fraction
    return bounds


@dataclass(frozen=True)
class RunSettings:
    """How a run executes; none of it changes the result beyond floating-point noise."""

    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    precision: Precision = field(default="auto", metadata={
        "help": "auto (bf16 on a capable GPU, else fp32), fp32, bf16, or fp16 (CUDA only, "
                "with a loss scaler)"})
    micro_batch: int = field(default=0, metadata={
        "help": "rows per forward pass per process; gradient accumulation is derived from the "
                "global batch. 0 = no accumulation"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    checkpoint_activations: bool = field(default=False, metadata={
        "help": "recompute activations in backward (less memory, more time)"})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads per process; 0 = torch's default"})
    dist_timeout_s: float = field(default=300.0, metadata={
        "cli": "dist_timeout", "help": "seconds a rank waits for the others before reporting "
                                       "them dead"})
    progress: bool = field(default=True, metadata={"help": "show the progress bar"})


def accumulation(stage: Stage, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(micro-batch rows per process, micro-steps per optimizer step) for `stage`."""
    if stage.global_batch % world_size:
        raise UserError(f"global batch {stage.global_batch} of stage {stage.name or stage.seq_len}"
                        f" is not divisible by {world_size} processes; choose a global batch "
                        f"that is a multiple of {world_size}")
    share = stage.global_batch // world_size
    micro = micro_batch or share
    if share % micro:
        raise UserError(f"stage {stage.name or stage.seq_len}: each of {world_size} processes "
                        f"gets {share} rows per step, which micro-batch {micro} does not divide; "
                        f"use a micro-batch that divides {share}")
    return micro, share // micro
