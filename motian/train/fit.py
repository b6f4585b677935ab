"""`fit`: the one training loop. Pretraining, fine-tuning and both distillations run here.

What differs between them is an *objective* (an `Objective`: the loss and the statistics of a
micro-batch, optionally an evaluation) and a *batch source* (a `BatchSource`: the micro-batches of
each stage, with a position that can be saved). Everything else is the loop's, written once:

    while not done:
        stage  <- from the run's progress (a later stage switches length and batch, same data)
        lr     <- schedule(progress, stage)                   set on every parameter group
        draw the step's micro-batches; all-reduce how many loss units (tokens, rows) they hold
        for each micro-batch: reseed dropout, forward under autocast, scale, backward
                              (gradients accumulate; DDP all-reduces on the last one only)
        unscale (fp16), clip, skip the step if the gradient is not finite, step the optimizer
        log (progress bar, JSONL, TensorBoard), evaluate, checkpoint (atomic) when due
        stop on SIGTERM/SIGINT: checkpoint this step, say how to resume, raise `Interrupted`

**Intervals.** Evaluations and checkpoints come every N steps, every N minutes of training or
every N% of the run (`motian.train.intervals`); a run keyed to a time budget should use one of
the last two, since its step count is not known in advance.

**Stopping.** SIGTERM (a scheduler's kill, ``timeout``) or SIGINT (Ctrl-C) only sets a flag;
at the next step boundary every rank learns whether any rank got one (a MAX all-reduce under
torchrun, so all stop after the same step), the run is checkpointed at that step and
`Interrupted` (a KeyboardInterrupt) is raised naming the checkpoint; ``--resume`` continues
from it. A second Ctrl-C stops at once (the default handlers are back after the first signal).

**Exactness.** Everything random is a pure function of the position in the run: the batch
source's order and masks of (seed, epoch, row), dropout of (seed, step, first global row of the
micro-batch), reseeded before every micro-batch. So a resumed run continues bit for bit, and a
2-process run draws the same dropout masks as 1 process with the same micro-batch.

**Loss units.** An objective's loss for a micro-batch is ``sum of its unit losses / units per
rank``, units being what the loss averages over (masked tokens, rows, tagged tokens). The
count over the whole global batch is known before the first backward (the micro-batches are
drawn first and the count all-reduced), so the gradient is the same however the global batch is
split into micro-batches and processes; a per-micro-batch mean would not give that.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from motian.errors import UserError
from motian.model import stacking
from motian.model.artifact import is_sharded_checkpoint
from motian.train import distributed as dist_utils
from motian.train.checkpoint import (
    CHECKPOINTS,
    CorruptCheckpoint,
    capture_rng_state,
    checkpoint_dirs,
    checkpoint_name,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from motian.train.distributed import DistInfo
from motian.train.intervals import Every, parse_every
from motian.train.meta_init import materialise
from motian.train.metrics import MetricsLogger
from motian.train.optim import build_optimizer, param_groups
from motian.train.schedule import Progress, lr_multiplier, set_lr
from motian.train.settings import (
    OptimSettings,
    RunSettings,
    Stage,
    accumulation,
    check_stlr,
    depth_plan,
    stage_bounds,
)
from motian.train.sharded import load_sharded_checkpoint, save_sharded_checkpoint

# --------------------------------------------------------------------------- the protocols


class Objective(nn.Module, abc.ABC):
    """What is trained and how a batch becomes a loss. Subclasses set `self.model` (the model
    that checkpoints and final/ hold) and implement `forward` and `units`.

    Every other trained parameter of the objective (learned task weights, distillation
    projections, an auxiliary head) is saved with each checkpoint beside the model and restored
    on resume; frozen parameters (a teacher) are neither optimised nor saved."""

    model: nn.Module

    @abc.abstractmethod
    def forward(self, batch: dict[str, Tensor], units_per_rank: float,
                micro_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss to backpropagate, statistics summed over the micro-batch). The loss is this
        micro-batch's share of the step: unit losses summed / `units_per_rank` (see the module
        docstring); `micro_steps` scales per-step terms (a regulariser) to be added once."""

    @abc.abstractmethod
    def units(self, batch: dict[str, Tensor]) -> float:
        """How many loss units (tokens, rows) `batch` holds."""

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        """Logged values from statistics summed over a logging window and every rank. The
        default: `loss` = loss_sum / units, and X = X_sum / units for every other X_sum."""
        n = max(sums.get("units", 0.0), 1e-12)
        return {k.removesuffix("_sum"): v / n for k, v in sums.items() if k.endswith("_sum")}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups (decay / no decay) over the trained parameters."""
        return param_groups(self, weight_decay)

    def before_step(self, fraction: float) -> None:
        """Called before each step with the run's progress (gradual unfreezing uses it)."""

    def after_backward(self) -> None:
        """Called after the step's last backward, before clipping (freezing drops grads)."""

    def evaluate(self, info: DistInfo, autocast) -> dict | None:
        """A held-out evaluation, run every `eval_every` steps and at the end; None = none."""
        return None

    def extra_state(self) -> dict[str, Tensor]:
        """Trained tensors outside `model` (saved with each checkpoint)."""
        model_ids = {id(p) for p in self.model.parameters()}
        return {name: p.detach() for name, p in self.named_parameters()
                if p.requires_grad and id(p) not in model_ids}

    def log_extra(self) -> dict[str, float]:
        """Values logged with every record besides the statistics (e.g. task weights)."""
        return {}


class BatchSource(Protocol):
    """The micro-batches of each stage, as a position that can be saved and restored."""

    def start(self, stage: int, spec: Stage, micro: int, info: DistInfo,
              state: dict | None) -> Iterator[dict[str, Tensor]]:
        """An endless iterator over this rank's micro-batches of `stage` (rows of length
        `spec.seq_len`, `micro` rows each), continuing from `state` when given."""
        ...

    def state_dict(self) -> dict:
        """The position within the current stage (JSON-serialisable)."""
        ...


@dataclass(frozen=True)
class FitConfig:
    """What decides the result besides the objective and the data. `fingerprint` names the
    experiment: a checkpoint made under another fingerprint is refused on resume."""

    optim: OptimSettings
    stages: tuple[Stage, ...] = (Stage(),)
    steps: int | None = 1000  # optimizer steps over all stages (None: budget only)
    budget_minutes: float = 0.0  # > 0: the schedule is keyed to wall-clock time
    budget_clock: Literal["wall", "cpu"] = "wall"  # the budget's clock: schedule.CLOCKS
    # "stages": peak x one decay over the run x each stage's own warm-up (pretraining);
    # "warmup-decay": warm-up over the first fraction, then decay to the end (fine-tuning).
    schedule: Literal["stages", "warmup-decay"] = "stages"
    seed: int = 0  # dropout (and whatever the caller seeds with it)
    # Between evaluations (and at the start and the end) and checkpoints: steps (0 = only at
    # the end), minutes of training ("2m") or a share of the run ("10%"): intervals.parse_every
    eval_every: int | str = 0
    checkpoint_every: int | str = 500
    keep_last: int = 3
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    log_every: int = 10
    label: str = "train"  # the progress bar's name for this run
    log_kind: str = "train"  # the "kind" of its records in metrics.jsonl
    fingerprint: str = ""
    # Progressive stacking (stages with `layers`): the optimizer state when the model grows.
    # "restart": a new optimizer, as Gong et al. 2019; "copy": every kept tensor keeps its
    # moments and each copied block starts with a copy of its source's (measured in
    # docs/objectives.md).
    grown_optimizer: Literal["restart", "copy"] = "restart"

    def __post_init__(self) -> None:
        if self.optim.decay == "stlr":  # its own rise: a warm-up on top would be a second one
            check_stlr(self.optim.cut_frac, self.optim.ratio,
                       max(s.warmup for s in self.stages), self.optim.min_ratio, self.label)

    def stage_bounds(self) -> list[tuple[float, float]]:
        """[(start, end)] of each stage as fractions of the whole run."""
        return stage_bounds(self.stages)

    def intervals(self) -> tuple[Every, Every]:
        """(evaluation, checkpoint) intervals; UserError for one that does not read."""
        return (parse_every(self.eval_every, f"{self.label}: eval_every"),
                parse_every(self.checkpoint_every, f"{self.label}: checkpoint_every"))


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal after checkpointing the step it had reached."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        saved = (f"checkpoint saved: {checkpoint}; resume=True (--resume) continues from it"
                 if checkpoint is not None else "this run keeps no checkpoints")
        super().__init__(f"stopped by {name} at step {step}; {saved}")


class _StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop reads at step boundaries (installed only
    in the main thread, where Python delivers signals). The first signal restores the previous
    handlers, so a second one acts at once (Ctrl-C twice: KeyboardInterrupt mid-step)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool):
        self.signum = 0
        self.announce = announce
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()
        if self.announce:  # os.write: print() is not safe inside a signal handler
            os.write(2, f"\nmotian: {signal.Signals(signum).name} received: finishing this "
                        "step, then saving a checkpoint (send it again to stop at once)\n"
                     .encode())

    def agreed(self, info: DistInfo) -> int:
        """The signal any rank received (0: none); every rank gets the same answer."""
        if not info.distributed:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag)


# --------------------------------------------------------------------------- schedule


def stage_at(config: FitConfig, fraction: float) -> int:
    bounds = config.stage_bounds()
    for i, (_, end) in enumerate(bounds):
        if fraction < end - 1e-12:
            return i
    return len(bounds) - 1


def learning_rate(config: FitConfig, fraction: float, stage: int) -> float:
    """The learning rate of the step that brings the run to `fraction`.

    "stages": peak x one decay over the whole run x this stage's warm-up (stage 1's warm-up is
    the run's; a later stage re-warms after its change of length and batch). "warmup-decay":
    peak x warm-up over the first `stages[0].warmup`, then the decay to the end."""
    o = config.optim
    if config.schedule == "warmup-decay":
        return o.lr * lr_multiplier(fraction, config.stages[0].warmup, o.decay, o.min_ratio,
                                    o.cut_frac, o.ratio)
    start, end = config.stage_bounds()[stage]
    in_stage = (fraction - start) / max(end - start, 1e-12)
    decay = lr_multiplier(fraction, 0.0, o.decay, o.min_ratio, o.cut_frac, o.ratio)
    warm = lr_multiplier(in_stage, config.stages[stage].warmup, "constant")
    return o.lr * decay * warm


# --------------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"  # on CPU bf16 is far slower than fp32 on most cores
    if precision == "fp16" and device.type != "cuda":
        raise UserError("fp16 with a loss scaler needs CUDA; use --precision fp32 (or bf16) on CPU")
    return precision


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast on CUDA (bf16 also on CPU, for tests); fp32 runs without one."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------- one step


def dropout_seed(seed: int, step: int, first_row: int) -> int:
    return int(np.random.SeedSequence([seed, step, first_row]).generate_state(1)[0])


def accumulate(step_model: nn.Module, objective: Objective, micro_batches: list[dict],
               seeds: list[int], info: DistInfo, autocast, scaler) -> dict[str, float]:
    """Forward and backward over the micro-batches of one optimizer step (gradients accumulate;
    DDP synchronises only on the last). Returns statistics summed over the micro-batches."""
    n_units = torch.tensor([float(sum(objective.units(b) for b in micro_batches))])
    dist_utils.all_reduce_sum(n_units, info)
    units_per_rank = max(float(n_units) / info.world_size, 1e-12)
    totals: dict[str, float] = {}
    for k, (batch, seed) in enumerate(zip(micro_batches, seeds)):
        torch.manual_seed(seed)
        batch = {name: t.to(info.device, non_blocking=True) for name, t in batch.items()}
        last = k == len(micro_batches) - 1
        with dist_utils.sync_gradients(step_model, last):
            with autocast:
                loss, stats = step_model(batch, units_per_rank, len(micro_batches))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for name, value in stats.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        totals["input_tokens"] = totals.get("input_tokens", 0.0) + float(
            batch["attention_mask"].sum())
    return totals


def optimizer_step(trained: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float,
                   scaler=None) -> tuple[float, bool]:
    """Unscale, clip, and step unless the gradient is not finite. Returns (norm, skipped).
    A skipped step leaves weights and optimizer moments untouched."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in trained.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    skipped = not bool(torch.isfinite(norm))
    if scaler is not None:
        scaler.step(optimizer)  # skips by itself on inf/NaN and lowers the scale
        scaler.update()
    elif not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), skipped


# --------------------------------------------------------------------------- the run


@dataclass
class RunState:
    """What the loop carries from step to step (and saves in state.json)."""

    step: int = 0
    stage: int = -1
    bad_steps: int = 0  # non-finite steps in a row
    skipped_total: int = 0
    tokens_seen: int = 0
    data: dict | None = None
    last_eval: dict = field(default_factory=dict)
    last_values: dict = field(default_factory=dict)


@dataclass
class _Parts:
    objective: Objective
    step_model: nn.Module  # the objective, wrapped in DDP / torch.compile as asked
    optimizer: torch.optim.Optimizer
    scaler: object | None
    autocast: object
    progress: Progress
    micro_plan: list[tuple[int, int]]
    depths: list[int] | None = None  # blocks trained in each stage (progressive stacking)
    compile: bool = False  # torch.compile the step model (again after the model grows)
    parallel: str = "ddp"  # RunSettings.parallel: fsdp shards the objective in place
    precision: str = "fp32"


def fit(objective: Objective, source: BatchSource, config: FitConfig, run: RunSettings,
        run_dir: Path | None, info: DistInfo, resume: bool = False,
        open_logger: Callable[[], MetricsLogger | None] | None = None,
        fsdp_ok: bool = False) -> dict:
    """Train `objective` on `source` under `config`; returns a summary (steps, tokens_seen,
    seconds, eval, skipped_steps, last: the last logged values, checkpoint).

    `run.parallel == "fsdp"` shards `objective` in place (`distributed.shard_model`) and
    checkpoints with `motian.train.sharded`; only a caller that saves its final model from the
    gathered shards (`distributed.full_model_state`) passes `fsdp_ok` (pretraining does).

    `run_dir` holds checkpoints/ (none when None). With checkpoints there and not `resume`,
    the run is refused rather than overwritten; with `resume`, it continues exactly from the
    newest checkpoint that reads back (unreadable ones are named and skipped; checkpoints
    that exist but none reads back is an error, never a silent fresh start).

    Nothing is written before everything a resume needs is validated: the checkpoint, its
    settings fingerprint, the run length and the data position. Only then is `open_logger`
    called (rank 0 passes it: it writes the caller's run files and returns the metrics logger,
    which this function closes); records after the resumed step are dropped from the log so a
    resumed run logs every step once. The caller builds the objective with the same seed on
    every rank and saves the final model: this function owns only the loop."""
    if run.threads:
        torch.set_num_threads(run.threads)
    config.intervals()  # an interval that does not read is refused before any work
    precision = resolve_precision(run.precision, info.device)
    found = complete_checkpoints(run_dir) if run_dir is not None else []
    if found and not resume:
        raise UserError(f"{run_dir} already holds checkpoints ({found[-1].name}); pass --resume "
                        "to continue that run, or choose another --out")
    micro_plan = [accumulation(s, run.micro_batch, info.world_size) for s in config.stages]
    # Progressive stacking: the model was built at its final depth; the run starts at the first
    # stage's (the bottom blocks kept), a resume at its checkpoint's (`_restore`).
    depths = (depth_plan(config.stages, stacking.depth(objective.model), config.label)
              if any(s.layers for s in config.stages) else None)
    if depths is not None:
        stacking.set_depth(objective.model, depths[0])
    if run.parallel == "fsdp":  # sharded before the optimizer is built over its parameters,
        # and before the move to the device: each GPU receives its shards only
        _check_fsdp(config, run, precision, depths, fsdp_ok)
        dist_utils.wrap_model(objective, info, "fsdp", precision)
        materialise(objective, info.device)  # built on meta: each rank its shards only
    objective.to(info.device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    budget = config.budget_minutes * 60 if config.budget_minutes > 0 else None
    progress = Progress(None if budget else config.steps, budget, config.budget_clock)
    parts = _Parts(objective, objective, _build_optimizer(objective, config), scaler,
                   autocast_context(precision, info.device), progress, micro_plan, depths,
                   run.compile, run.parallel, precision)
    state = RunState()
    if resume and run_dir is not None:
        _restore_newest_readable(parts, run_dir, config, state, info)
    # The first stage's batches now: a data position that does not fit this data is refused
    # before any file is written.
    first = stage_at(config, progress.fraction())
    _grow_for_stage(config, parts, first, state, info)  # resumed at the end of a shallower stage
    parts.step_model = _wrap(parts, info)
    batches = _start_stage(config, source, first, micro_plan[first][0], info, state,
                           info.is_main)
    logger = open_logger() if open_logger is not None else None
    try:
        if logger is not None and state.step:
            logger.drop_after(state.step)
        with _StopSignals(announce=info.is_main) as stop:
            return _loop(config, run, source, run_dir, info, parts, state, logger, batches,
                         stop)
    finally:
        if logger is not None:
            logger.close()


def _restore_newest_readable(parts: _Parts, run_dir: Path, config: FitConfig,
                             state: RunState, info: DistInfo) -> None:
    """Restore the newest checkpoint that reads back; name the unreadable ones skipped."""
    found = complete_checkpoints(run_dir)
    broken = [p for p in checkpoint_dirs(run_dir) if p not in found]
    for path in reversed(found):
        try:
            _restore(parts, path, config, state, info)
            return
        except CorruptCheckpoint as err:
            broken.append(path)
            if info.is_main:
                print(f"motian: skipping checkpoint {path}: {err}", file=sys.stderr)
    if broken:
        names = ", ".join(p.name for p in sorted(broken))
        raise UserError(f"{run_dir}: no checkpoint could be read back ({names}); nothing was "
                        f"changed. Remove {run_dir / CHECKPOINTS} to start over, or resume from "
                        "a copy of the run that has a good one")
    if info.is_main:
        print(f"motian: no checkpoint under {run_dir}; starting a new run", file=sys.stderr)


def _restore(parts: _Parts, path: Path, config: FitConfig, state: RunState,
             info: DistInfo) -> None:
    saved = read_checkpoint_state(path)
    if saved.get("fingerprint") != config.fingerprint:
        raise UserError(f"{path}: this checkpoint was trained with another recipe or other "
                        f"settings (fingerprint {saved.get('fingerprint')} vs "
                        f"{config.fingerprint}); resume with the ones it was made with, or start "
                        "a new run in another directory (--init-from takes its weights)")
    parts.progress.load_state_dict(saved["progress"])  # refuses another run length
    if parts.depths is not None:  # the model and its optimizer at the checkpoint's depth
        layers = parts.depths[int(saved["stage"])]
        if stacking.depth(parts.objective.model) != layers:
            stacking.set_depth(parts.objective.model, layers)
            parts.optimizer = _build_optimizer(parts.objective, config)
    if is_sharded_checkpoint(path) != (parts.parallel == "fsdp"):
        made, now = ("fsdp", parts.parallel) if is_sharded_checkpoint(path) else ("ddp", "fsdp")
        raise UserError(f"{path}: written by a --parallel {made} run; resume with --parallel "
                        f"{made} (this run asks for {now})" + (
                            ", or write it as a model directory with `motian consolidate` and "
                            "start a new run from it with --init-from" if made == "fsdp" else ""))
    if parts.parallel == "fsdp":
        load_sharded_checkpoint(path, parts.objective, parts.optimizer)
    else:
        load_checkpoint(path, parts.objective.model, parts.optimizer, parts.scaler,
                        extra=parts.objective)
    state.step, state.stage = int(saved["step"]), int(saved["stage"])
    state.bad_steps, state.tokens_seen = int(saved["bad_steps"]), int(saved["tokens_seen"])
    state.skipped_total = int(saved.get("skipped_total", 0))
    state.data, state.last_eval = saved["data"], saved.get("last_eval", {})
    state.last_values = saved.get("last_values", {})
    if info.is_main:
        print(f"motian: resumed from {path} (step {state.step})", file=sys.stderr)


def _loop(config: FitConfig, run: RunSettings, source: BatchSource, run_dir: Path | None,
          info: DistInfo, parts: _Parts, state: RunState, logger: MetricsLogger | None,
          batches: Iterator[dict], stop: _StopSignals) -> dict:
    progress, main, objective = parts.progress, info.is_main, parts.objective
    bar = _progress_bar(config, progress) if main and run.progress else None
    say = (lambda text: print(text, flush=True)) if main and bar is None else None
    window: dict[str, float] = {}
    last_norm, t_window = 0.0, time.monotonic()
    every_eval, every_checkpoint = config.intervals()
    # ranks share the slowest clock whenever the clock decides something
    shared_clock = every_eval.timed or every_checkpoint.timed
    if state.step == 0 and not every_eval.never:
        state.last_eval = _evaluate(parts, info, logger, state.step)  # the untrained baseline
        if say is not None and state.last_eval is not None:
            say(_status_line(config, progress, state, state.last_eval))
    progress.restart_clock()
    objective.train()
    while not progress.done():
        stage = stage_at(config, progress.fraction())
        micro, accum = parts.micro_plan[stage]
        if stage != state.stage:
            if _grow_for_stage(config, parts, stage, state, info):
                parts.step_model = _wrap(parts, info)
            batches = _start_stage(config, source, stage, micro, info, state, main)
        lr = learning_rate(config, progress.fraction(ahead=1), stage)
        set_lr(parts.optimizer, lr)
        objective.before_step(progress.fraction())
        micro_batches = [next(batches) for _ in range(accum)]
        seeds = [dropout_seed(config.seed, state.step, (k * info.world_size + info.rank) * micro)
                 for k in range(accum)]
        with dist_utils.collective(info, "the gradient all-reduce", state.step):
            stats = accumulate(parts.step_model, objective, micro_batches, seeds, info,
                               parts.autocast, parts.scaler)
            objective.after_backward()
            last_norm, skipped = optimizer_step(objective, parts.optimizer,
                                                config.optim.clip_norm, parts.scaler)
        state.step += 1
        n_in = stats.pop("input_tokens")
        state.tokens_seen += int(n_in) * info.world_size
        state.bad_steps = state.bad_steps + 1 if skipped else 0
        state.skipped_total += skipped
        if skipped:
            _report_skip(config, state, last_norm, bar, main)
        for k, v in stats.items():
            window[k] = window.get(k, 0.0) + v
        window["input_tokens"] = window.get("input_tokens", 0.0) + n_in
        window["skipped"] = window.get("skipped", 0.0) + skipped
        before = (progress.elapsed, progress.fraction())
        progress.update()
        _sync_clock(progress, info, shared_clock)
        after = (progress.elapsed, progress.fraction())
        if bar is not None:
            _advance_bar(bar, progress)
        done = progress.done()
        if state.step % config.log_every == 0 or done:
            values = _log_values(parts, window, info, lr, last_norm, stage, config, t_window,
                                 state)
            state.last_values = values
            window, t_window = {}, time.monotonic()
            if logger is not None:
                logger.log(config.log_kind, state.step, values)
            if bar is not None:
                bar.set_postfix_str(_postfix(values), refresh=False)
        if every_eval.due(state.step, before, after) or done:
            result = _evaluate(parts, info, logger, state.step)
            state.last_eval = result if result is not None else state.last_eval
            if say is not None and result is not None:
                say(_status_line(config, progress, state, result))
        saved: Path | None = None
        if run_dir is not None and (every_checkpoint.due(state.step, before, after) or done):
            state.data = source.state_dict()
            saved = _checkpoint(run_dir, config, parts, state, info, say)
        with dist_utils.collective(info, "the stop-signal check", state.step):
            signum = stop.agreed(info)  # every rank stops after the same step
        if signum and not done:
            if run_dir is not None and saved is None:
                state.data = source.state_dict()
                saved = _checkpoint(run_dir, config, parts, state, info, say)
            if bar is not None:
                bar.close()
            raise Interrupted(signum, state.step, saved)
        progress.restart_clock()  # evaluation and checkpoints do not count against a budget
    if bar is not None:
        bar.close()
    return {"steps": state.step, "tokens_seen": state.tokens_seen,
            "seconds": progress.elapsed, "eval": state.last_eval,
            "skipped_steps": state.skipped_total, "last": state.last_values,
            "checkpoint": str(latest_checkpoint(run_dir) or "") if run_dir else "",
            "rank": info.rank}


def _build_optimizer(objective: Objective, config: FitConfig) -> torch.optim.Optimizer:
    o = config.optim
    return build_optimizer(objective, o.name, o.lr, o.weight_decay, tuple(o.betas), o.eps,
                           groups=objective.param_groups(o.weight_decay),
                           grad_normalization=o.grad_normalization)


def _check_fsdp(config: FitConfig, run: RunSettings, precision: str,
                depths: list[int] | None, fsdp_ok: bool) -> None:
    """Refuse, before any work, what --parallel fsdp does not do (yet)."""
    why = None
    if not fsdp_ok:
        why = f"{config.label} saves its model unsharded; only pretrain gathers FSDP shards"
    elif precision == "fp16":
        why = "fp16's loss scaler is not shard-aware; use --precision bf16 (or fp32)"
    elif depths is not None:
        why = "progressive stacking (stages with layers) copies whole blocks"
    elif run.compile:
        why = "--compile with FSDP is untested here"
    if why:
        raise UserError(f"--parallel fsdp: {why}. Use --parallel ddp for this run")


def _wrap(parts: _Parts, info: DistInfo) -> nn.Module:
    """The module the step runs: DDP across processes, compiled when asked. Built again after
    the model grows: DDP's buckets and gradient hooks cover the parameters it was made with."""
    old = getattr(parts.step_model, "_orig_mod", parts.step_model)  # under torch.compile
    if old is not parts.objective and hasattr(old, "_remove_autograd_hooks"):
        # The old DDP's reducer hooks sit on the parameters the grown model still trains;
        # left there, they would fire (and all-reduce into stale buckets) in every backward.
        old._remove_autograd_hooks()
        for handle in getattr(old, "_accum_grad_hooks", []):
            handle.remove()
    parts.step_model = parts.objective
    step_model = dist_utils.wrap_model(parts.objective, info, parts.parallel, parts.precision)
    return torch.compile(step_model) if parts.compile else step_model


def _grow_for_stage(config: FitConfig, parts: _Parts, stage: int, state: RunState,
                    info: DistInfo) -> bool:
    """Progressive stacking at a stage change: stack copies of the trained blocks until the
    model has the stage's depth and rebuild the optimizer over the new parameters (its state
    per `config.grown_optimizer`). The caller re-wraps the step model. False: nothing grew."""
    if parts.depths is None:
        return False
    model, layers = parts.objective.model, parts.depths[stage]
    before = stacking.depth(model)
    if before == layers:
        return False
    old = parts.optimizer
    pairs = stacking.grow(model, layers)
    parts.optimizer = _build_optimizer(parts.objective, config)
    if config.grown_optimizer == "copy":
        _carry_optimizer_state(old, parts.optimizer, pairs)
    if info.is_main:
        new, old_ = _blocks(before, layers - 1), _blocks(2 * before - layers, before - 1)
        kept = "state copied" if config.grown_optimizer == "copy" else "restarted"
        tqdm.write(f"motian: stage {stage + 1}/{len(config.stages)} at step {state.step}: "
                   f"grew from {before} to {layers} blocks ({new} copied from the trained "
                   f"{old_}); optimizer {kept}")
    return True


def _blocks(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def _carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer,
                           pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """Every parameter that existed keeps its state (moments, step count); every copied
    block's parameter starts from a copy of its source's, so a copy takes the same first
    steps its source would have."""
    source = {id(p): p for p in (q for group in old.param_groups for q in group["params"])}
    for twin, original in pairs:
        for p, q in zip(twin.parameters(), original.parameters()):
            source[id(p)] = q
    for group in new.param_groups:
        for p in group["params"]:
            q = source.get(id(p))
            if q is not None and q in old.state:
                new.state[p] = {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                                for k, v in old.state[q].items()}


def _start_stage(config: FitConfig, source: BatchSource, stage: int, micro: int,
                 info: DistInfo, state: RunState, main: bool) -> Iterator[dict]:
    """The batches of `stage`: continuing a resumed position, or from the start (a new stage
    warm-starts the model, not the data order)."""
    s = config.stages[stage]
    resumed = state.data if stage == state.stage else None
    if resumed is None and state.stage >= 0 and main:
        tqdm.write(f"motian: stage {stage + 1}/{len(config.stages)} at step {state.step}: "
                   f"seq_len {s.seq_len}, global batch {s.global_batch}, warm-up "
                   f"{s.warmup:.0%} of the stage; same data, weights carried over")
    state.stage = stage
    return source.start(stage, s, micro, info, resumed)


def _report_skip(config: FitConfig, state: RunState, norm: float, bar, main: bool) -> None:
    if state.bad_steps >= config.max_bad_steps:
        raise UserError(
            f"step {state.step}: the gradient was not finite (norm {norm}) for "
            f"{state.bad_steps} steps in a row, so training stopped (max_bad_steps="
            f"{config.max_bad_steps}). Usual causes: a learning rate too high for this model "
            "(try half), fp16 overflow (use bf16 or fp32), or weights already NaN (--init-from a "
            "bad checkpoint). Resume from the last good checkpoint with --resume after fixing it.")
    if main:
        (bar.write if bar is not None else print)(
            f"motian: step {state.step}: non-finite gradient (norm {norm}); step skipped "
            f"({state.bad_steps} in a row)")


def _sync_clock(progress: Progress, info: DistInfo, shared: bool = False) -> None:
    """Under a time budget (or with `shared`: an interval in minutes) every rank must act at
    the same step: adopt the slowest clock."""
    if info.distributed and (shared or progress.budget_seconds is not None):
        t = torch.tensor([progress.elapsed], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        progress.elapsed = float(t)


def _log_values(parts: _Parts, window: dict[str, float], info: DistInfo, lr: float,
                norm: float, stage: int, config: FitConfig, t_window: float,
                state: RunState) -> dict:
    keys = sorted(window)
    sums = dist_utils.all_reduce_sum(torch.tensor([window[k] for k in keys],
                                                  dtype=torch.float64), info)
    w = dict(zip(keys, sums.tolist()))
    values: dict[str, float] = {"stage": stage + 1, "seq_len": config.stages[stage].seq_len,
                                "lr": lr, "grad_norm": norm}
    if parts.depths is not None:  # progressive stacking: the depth this step trained
        values["layers"] = parts.depths[stage]
    values.update(parts.objective.summarise(w))
    with dist_utils.gathered(parts.step_model, blocks=False):  # FSDP: task weights sharded
        values.update(parts.objective.log_extra())
    if parts.scaler is not None:
        values["loss_scale"] = float(parts.scaler.get_scale())
    values["skipped"] = w.get("skipped", 0.0) / info.world_size
    values["tokens_seen"] = state.tokens_seen
    values["tokens_per_s"] = w.get("input_tokens", 0.0) / max(time.monotonic() - t_window, 1e-9)
    values["elapsed_s"] = parts.progress.elapsed
    return values


def _postfix(values: dict) -> str:
    parts = [f"{k}={values[k]:.3f}" for k in values if k == "loss" or k.startswith("loss_")]
    if "acc_mlm" in values:
        parts.append(f"acc={values['acc_mlm']:.1%}")
    parts += [f"lr={values['lr']:.2e}", f"gnorm={values['grad_norm']:.2f}",
              f"tok/s={values['tokens_per_s']:,.0f}"]
    if "loss_scale" in values:
        parts.append(f"scale={values['loss_scale']:g}")
    return " ".join(parts)


# A time-keyed bar counts seconds of training out of the budget: tqdm's own rate would read
# "1.00s/s", so the bar shows elapsed/total seconds and the postfix the speed that matters.
TIME_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} s of training [{elapsed}<{remaining}{postfix}]"


def _progress_bar(config: FitConfig, progress: Progress):
    if progress.budget_seconds is not None:
        bar = tqdm(total=int(progress.budget_seconds), unit="s", desc=config.label,
                   dynamic_ncols=True, bar_format=TIME_BAR)
        bar.update(int(progress.elapsed))
        return bar
    return tqdm(total=progress.total_steps, initial=progress.steps, unit="step",
                desc=config.label, dynamic_ncols=True)


def _number(key: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{key} {value}"
    if isinstance(value, int):
        return f"{key} {value:,}"
    if 0.0 <= value <= 1.0 and any(w in key for w in ("acc", "f1", "precision", "recall")):
        return f"{key} {value:.2%}"
    return f"{key} {value:.4g}"


def _status_line(config: FitConfig, progress: Progress, state: RunState, result: dict) -> str:
    """One line per evaluation for runs without a progress bar (--no-progress, logs)."""
    where = f"{progress.fraction():.0%} of the run, {progress.elapsed:,.0f} s of training"
    train = [_number(k, v) for k, v in state.last_values.items()
             if k.startswith(("loss", "acc"))] if state.step else []
    held = [_number(k, v) for k, v in result.items() if not isinstance(v, dict | list)]
    return (f"{config.label}: step {state.step:,} ({where})"
            + (f"; train {', '.join(train)}" if train else "")
            + f"; held-out {', '.join(held)}")


def _advance_bar(bar, progress: Progress) -> None:
    target = int(progress.elapsed) if progress.budget_seconds is not None else progress.steps
    bar.update(max(target - bar.n, 0))


def _evaluate(parts: _Parts, info: DistInfo, logger: MetricsLogger | None,
              step: int) -> dict | None:
    with dist_utils.collective(info, "held-out evaluation", step):
        with dist_utils.gathered(parts.step_model):
            result = parts.objective.evaluate(info, parts.autocast)
    if result is not None and logger is not None:
        logger.log("eval", step, result)
    return result


def _checkpoint(run_dir: Path, config: FitConfig, parts: _Parts, state: RunState,
                info: DistInfo, say: Callable[[str], None] | None = None) -> Path:
    """Save the step's checkpoint (rank 0 writes) and return its path (on every rank)."""
    # Every rank's RNG state goes into the checkpoint (dropout is reseeded each micro-batch,
    # but anything else drawing from the global generators continues exactly too).
    rng = [capture_rng_state()]
    if info.distributed:
        rng = [None] * info.world_size
        torch.distributed.all_gather_object(rng, capture_rng_state())
    saved = {"fingerprint": config.fingerprint, "stage": state.stage, "data": state.data,
             "progress": parts.progress.state_dict(), "bad_steps": state.bad_steps,
             "skipped_total": state.skipped_total, "tokens_seen": state.tokens_seen,
             "last_eval": state.last_eval, "last_values": state.last_values}
    if parts.parallel == "fsdp":  # every rank writes its shards
        path = save_sharded_checkpoint(run_dir, state.step, parts.objective,
                                       parts.objective.model, parts.optimizer, saved,
                                       config.keep_last, rng)
        if say is not None:
            say(f"step {state.step:,}: checkpoint {path} (sharded)")
        return path
    if not info.is_main:
        return Path(run_dir) / CHECKPOINTS / checkpoint_name(state.step)
    path = save_checkpoint(run_dir, state.step, parts.objective.model, parts.optimizer, saved,
                           parts.scaler, keep_last=config.keep_last, rng_states=rng,
                           extra=parts.objective.extra_state())
    if say is not None:
        say(f"step {state.step:,}: checkpoint {path}")
    return path
