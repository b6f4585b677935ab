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
    decay: Literal["linear", "cosine", "constant", "stlr"] = field(default="linear", metadata={
        "help": "learning-rate decay after the warm-up; stlr = ULMFiT's slanted triangular "
                "rate (its own rise over cut_frac, floor peak / ratio; needs warm-up 0)"})
    min_ratio: float = field(default=0.0, metadata={
        "help": "final learning rate as a fraction of the peak"})
    cut_frac: float = field(default=0.1, metadata={
        "help": "decay stlr only: fraction of training the learning rate rises for"})
    ratio: float = field(default=32.0, metadata={
        "cli": "stlr_ratio", "help": "decay stlr only: peak learning rate / the rate at both "
                                     "ends"})

    def __post_init__(self) -> None:
        if self.decay == "stlr":
            check_stlr(self.cut_frac, self.ratio, min_ratio=self.min_ratio, where="optim")


def check_stlr(cut_frac: float, ratio: float, warmup: float = 0.0, min_ratio: float = 0.0,
               where: str = "schedule") -> None:
    """UserError unless the slanted triangular settings make a schedule: 0 < cut_frac < 1,
    ratio >= 1, and no warm-up or min_ratio on top of its own rise and floor."""
    for name, value in (("cut_frac", cut_frac), ("ratio", ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: decay stlr needs a number for {name}, got {value!r}")
    if not 0.0 < cut_frac < 1.0:
        raise UserError(f"{where}: cut_frac is the fraction of training the stlr learning rate "
                        f"rises for, in (0, 1) (ULMFiT: 0.1), got {cut_frac}")
    if ratio < 1.0:
        raise UserError(f"{where}: ratio is how much smaller the stlr learning rate is at its "
                        f"ends than at its peak, >= 1 (ULMFiT: 32), got {ratio}")
    if warmup > 0.0:
        raise UserError(f"{where}: decay stlr rises over its first cut_frac ({cut_frac}) "
                        f"itself; set the warm-up to 0 (got {warmup}) or choose another decay")
    if min_ratio > 0.0:
        raise UserError(f"{where}: decay stlr ends at peak / ratio (1/{ratio:g}); set min_ratio "
                        f"to 0 (got {min_ratio}) and choose the floor with ratio")


@dataclass(frozen=True)
class Stage:
    """A part of the run: `fraction` of all steps (or of the time budget) at `seq_len` tokens
    with `global_batch` rows per optimizer step, after its own warm-up (fraction of the stage).
    `layers` > 0 trains that many Transformer blocks in this stage (progressive stacking, see
    `depth_plan`); 0 = the model's full depth. `tasks` (pretraining only) names the stage's
    tasks with their sampling weights, ERNIE 2.0's continual multi-task schedule
    (`motian.train.continual`); empty = the recipe's objective as it stands."""

    fraction: float = 1.0
    seq_len: int = 128
    global_batch: int = 32
    warmup: float = 0.06
    name: str = ""
    layers: int = 0
    tasks: dict = field(default_factory=dict)


def stage_bounds(stages: tuple[Stage, ...]) -> list[tuple[float, float]]:
    """[(start, end)] of each stage as fractions of the whole run."""
    bounds, start = [], 0.0
    for s in stages:
        bounds.append((start, start + s.fraction))
        start += s.fraction
    return bounds


def depth_plan(stages: tuple[Stage, ...], layers: int, where: str) -> list[int] | None:
    """The number of blocks each stage trains, or None when no stage sets `layers` (the whole
    run at the model's depth).

    Progressive stacking (Gong et al. 2019, "Efficient Training of BERT by Progressively
    Stacking", ICML): train a shallow model, then stack copies of its trained blocks on top and
    go on training. `layers` (the model's) is the depth the run ends at; a stage's `layers`
    (0 = that full depth) may only grow from one stage to the next, and at most double: from
    L to M blocks, blocks L..M-1 are copies of the top M-L trained ones (M = 2L: all of them,
    in order, as the paper stacks 3 -> 6 -> 12). More than doubling would copy blocks that
    were never trained apart from their source; shrinking would throw trained blocks away.
    UserError naming the stage otherwise."""
    if not any(s.layers for s in stages):
        return None
    plan: list[int] = []
    for i, s in enumerate(stages):
        name = f"{where}: stage {i + 1}" + (f" ({s.name})" if s.name else "")
        depth = s.layers or layers
        if s.layers < 0 or s.layers > layers:
            raise UserError(f"{name}: layers {s.layers} is not between 1 and the model's "
                            f"layers ({layers}, the depth the run ends at); 0 or no layers "
                            "means the full depth")
        if plan and depth < plan[-1]:
            raise UserError(f"{name}: {depth} layers after {plan[-1]} in the stage before; "
                            "stacking only grows a model (it copies trained blocks on top), so "
                            "give each stage at least the layers of the one before")
        if plan and depth > 2 * plan[-1]:
            raise UserError(f"{name}: grows from {plan[-1]} to {depth} layers; a stage may at "
                            "most double the depth (the new blocks copy the trained ones, as "
                            f"3 -> 6 -> 12 in Gong et al. 2019); add a stage at {2 * plan[-1]} "
                            "layers between them")
        plan.append(depth)
    if plan[-1] != layers:
        raise UserError(f"{where}: the last stage trains {plan[-1]} layers but the model has "
                        f"{layers}: the model's layers is the depth the run ends at, so the "
                        f"last stage must reach it (layers: {layers}, or leave it out)")
    return plan


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
    parallel: Literal["ddp", "fsdp"] = field(default="ddp", metadata={
        "help": "under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: "
                "parameters, gradients and optimizer state sharded over the processes, "
                "distributed checkpoints; pretrain only, docs/scale.md)"})
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
