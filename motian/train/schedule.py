"""Learning-rate schedules as plain functions of training progress (warm-up, then linear /
cosine / constant decay, or ULMFiT's slanted triangular rate), and `Progress`, which
measures that progress in steps or against a wall-clock budget.

There is no scheduler object with hidden state: the loop asks `lr_multiplier(progress, ...)`
each step and calls `set_lr`. Resuming therefore needs only `Progress.state_dict()` (steps done
and seconds spent), and a run whose length is a time budget (Geiping & Goldstein 2023,
"Cramming", arXiv:2212.14034) uses the same schedule code as one whose length is a step count.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch

from motian.errors import UserError
from motian.train.settings import check_stlr

Decay = Literal["linear", "cosine", "constant", "stlr"]
DECAYS: tuple[str, ...] = Decay.__args__


def lr_multiplier(progress: float, warmup: float, decay: Decay, min_ratio: float = 0.0,
                  cut_frac: float = 0.1, ratio: float = 32.0) -> float:
    """The fraction of the peak learning rate at `progress` (0 = start, 1 = end of training).

    Linear warm-up from 0 over the first `warmup` fraction, then `decay` from 1 down to
    `min_ratio` at progress 1: linear, cosine (half a cosine period), or constant (stays 1).
    "stlr" is ULMFiT's slanted triangular schedule (`slanted_triangular`), which has its own
    rise (`cut_frac`) and floor (1 / `ratio`): it takes no warm-up and no min_ratio.
    Progress outside [0, 1] is clamped. Pass the progress the step being taken will reach
    (`Progress.fraction(ahead=1)`) so the first step does not run at learning rate 0."""
    if not 0.0 <= warmup <= 1.0:
        raise UserError(f"schedule: warmup is a fraction of training in [0, 1], got {warmup}")
    if not 0.0 <= min_ratio <= 1.0:
        raise UserError(f"schedule: min_ratio must be in [0, 1], got {min_ratio}")
    if decay not in DECAYS:
        raise UserError(f"schedule: unknown decay {decay!r}; choose one of {', '.join(DECAYS)}")
    p = min(max(progress, 0.0), 1.0)
    if decay == "stlr":
        check_stlr(cut_frac, ratio, warmup, min_ratio)
        return slanted_triangular(p, cut_frac, ratio)
    if p < warmup:
        return p / warmup
    if decay == "constant":
        return 1.0
    q = (p - warmup) / (1.0 - warmup) if warmup < 1.0 else 1.0  # 0 -> 1 over the decay phase
    if decay == "linear":
        return 1.0 - (1.0 - min_ratio) * q
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))


def slanted_triangular(progress: float, cut_frac: float = 0.1, ratio: float = 32.0) -> float:
    """ULMFiT's slanted triangular learning rate (Howard & Ruder 2018, "Universal Language
    Model Fine-tuning for Text Classification", eq. 3), as a fraction of the peak.

    With T steps, cut = T * cut_frac, p = t / cut before the cut and
    1 - (t - cut) / (cut * (1 / cut_frac - 1)) after it, lr = peak * (1 + p (ratio - 1)) / ratio:
    a short linear rise from peak / ratio to the peak at `cut_frac` of training, then a long
    linear fall back to peak / ratio at the end. Here t / T is `progress`, so the same curve
    serves step- and time-keyed runs (the paper's values: cut_frac 0.1, ratio 32)."""
    p = min(max(progress, 0.0), 1.0)
    rise = p / cut_frac if p < cut_frac else 1.0 - (p - cut_frac) / (1.0 - cut_frac)
    return (1.0 + rise * (ratio - 1.0)) / ratio


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to `lr` times its `lr_scale` (1 when absent), so
    layer-wise learning-rate decay is a per-group constant set once when the groups are made."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# The clocks a time budget can be kept on. "wall": seconds as a watch counts them (what a user
# pays for on a machine of their own). "cpu": this process's CPU seconds (all its threads), so a
# budget means the same work whatever else runs on the machine: equal-cost comparisons on a
# shared machine (benchmarks/objectives.py) use it. With one thread per process the two agree on
# an idle machine; with T threads a CPU-second budget buys about 1/T of the wall time.
CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


class Progress:
    """How far training is: optimizer steps done and seconds spent training.

    `fraction()` is steps / total_steps; with a `budget_seconds` it is seconds / budget, and
    with both it is whichever is further along (the run ends at the first limit reached, and the
    schedule ends with it). Seconds are measured between `update` calls on `clock` (CLOCKS);
    the time between a checkpoint and its resume is not counted (the clock restarts on
    `load_state_dict` and on `restart_clock`). Step-keyed runs resume exactly; time-keyed runs
    depend on the machine's speed by design.
    """

    def __init__(self, total_steps: int | None = None, budget_seconds: float | None = None,
                 clock: str = "wall"):
        if clock not in CLOCKS:
            raise UserError(f"training length: budget clock must be one of {sorted(CLOCKS)}, "
                            f"got {clock!r}")
        if total_steps is None and budget_seconds is None:
            raise UserError("training length: give total_steps, budget_seconds, or both")
        if total_steps is not None and total_steps < 1:
            raise UserError(f"training length: total_steps must be >= 1, got {total_steps}")
        if budget_seconds is not None and budget_seconds <= 0:
            raise UserError(f"training length: budget_seconds must be > 0, got {budget_seconds}")
        self.total_steps = total_steps
        self.budget_seconds = budget_seconds
        self.clock = clock
        self._now = CLOCKS[clock]
        self.steps = 0
        self.elapsed = 0.0
        self._mark = self._now()

    def restart_clock(self) -> None:
        """Start measuring from now (call after set-up that should not count, e.g. compile)."""
        self._mark = self._now()

    def update(self, steps: int = 1, seconds: float | None = None) -> None:
        """Count `steps` more optimizer steps and `seconds` more training time (default: the
        wall time since the last update or clock restart)."""
        now = self._now()
        self.steps += steps
        self.elapsed += (now - self._mark) if seconds is None else seconds
        self._mark = now

    def fraction(self, ahead: int = 0) -> float:
        """Progress in [0, 1] after `ahead` more steps (time: at the mean step time so far)."""
        parts = []
        if self.total_steps is not None:
            parts.append((self.steps + ahead) / self.total_steps)
        if self.budget_seconds is not None:
            mean_step = self.elapsed / self.steps if self.steps else 0.0
            parts.append((self.elapsed + ahead * mean_step) / self.budget_seconds)
        return min(max(parts), 1.0)

    def done(self) -> bool:
        steps_done = self.total_steps is not None and self.steps >= self.total_steps
        time_done = self.budget_seconds is not None and self.elapsed >= self.budget_seconds
        return steps_done or time_done

    def state_dict(self) -> dict:
        return {"steps": self.steps, "elapsed": self.elapsed, "total_steps": self.total_steps,
                "budget_seconds": self.budget_seconds, "clock": self.clock}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. The saved length must equal this one: a different length
        would silently reshape the learning-rate schedule of the resumed run."""
        state = {"clock": "wall", **state}  # checkpoints from before the clock choice
        for key in ("total_steps", "budget_seconds", "clock"):
            if state.get(key) != getattr(self, key):
                raise UserError(f"resume: the checkpoint was trained with {key}="
                                f"{state.get(key)!r} but this run has {getattr(self, key)!r}; "
                                "use the same training length to resume, or --init-from to "
                                "start a new schedule from these weights")
        self.steps = int(state["steps"])
        self.elapsed = float(state["elapsed"])
        self.restart_clock()
