"""How often a run evaluates and checkpoints: every N optimizer steps, every N minutes (or
seconds, hours) of training, or every N% of the run.

A run whose length is a time budget does not know its step count in advance, so a step
interval may never come (a 3-minute run of 241 steps with ``checkpoint_every: 400`` had no
checkpoint): give such a run a time (``checkpoint_every: 2m``) or a share of the run
(``eval: {every: 10%}``, which follows a step count and a budget alike). Written in a recipe or
`FitConfig` as:

    400      every 400 optimizer steps (0: never; only at the end)
    "2m"     every 2 minutes of training ("90s", "1.5m", "2min", "1h" too)
    "10%"    every tenth of the run: at 10%, 20%, ... of the steps, or of the time budget

Training time is the run's own clock (`motian.train.schedule.Progress.elapsed`): evaluation
and checkpoint time do not count, and it carries over a resume. Under torchrun every rank uses
the slowest rank's clock, so all ranks agree on the step at which an interval falls due.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from motian.errors import UserError

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|s|sec|m|min|h)?\s*")


@dataclass(frozen=True)
class Every:
    """One interval; at most one of the fields is set (none: never)."""

    steps: int = 0
    seconds: float = 0.0
    fraction: float = 0.0

    @property
    def never(self) -> bool:
        return not (self.steps or self.seconds or self.fraction)

    @property
    def timed(self) -> bool:
        """Whether it reads the clock (ranks must then share one clock)."""
        return self.seconds > 0

    def due(self, step: int, before: tuple[float, float], after: tuple[float, float]) -> bool:
        """Whether the step that just brought the run to `step` ends an interval; `before` and
        `after` are (training seconds, fraction of the run) before and after that step."""
        if self.steps:
            return step % self.steps == 0
        if self.seconds:
            return _crossed(before[0], after[0], self.seconds)
        if self.fraction:
            return _crossed(before[1], after[1], self.fraction)
        return False

    def __str__(self) -> str:
        if self.steps:
            return f"every {self.steps:,} steps"
        if self.seconds:
            return (f"every {self.seconds / 60:g} min of training" if self.seconds >= 60
                    else f"every {self.seconds:g} s of training")
        if self.fraction:
            return f"every {100 * self.fraction:g}% of the run"
        return "only at the end"


def _crossed(a: float, b: float, period: float) -> bool:
    eps = 1e-9  # 0.3 / 0.1 is 2.9999999999999996
    return math.floor(b / period + eps) > math.floor(a / period + eps)


def parse_every(value: int | float | str | Every, where: str) -> Every:
    """An interval from a recipe value (see the module docstring); UserError naming `where`."""
    if isinstance(value, Every):
        return value
    if isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is not an interval; give steps (400), minutes "
                        "of training (2m) or a share of the run (10%)")
    if isinstance(value, int):
        if value < 0:
            raise UserError(f"{where}: {value} steps; give 0 (only at the end) or more")
        return Every(steps=value)
    if isinstance(value, float) and value.is_integer():
        return parse_every(int(value), where)
    match = _PATTERN.fullmatch(str(value))
    if match is None or isinstance(value, float):
        raise UserError(f"{where}: cannot read {value!r} as an interval; give steps (400), "
                        "minutes of training (2m, or 90s, 1h) or a share of the run (10%)")
    number, unit = float(match.group(1)), match.group(2)
    if unit is None:
        if not number.is_integer():
            raise UserError(f"{where}: {value!r} steps is not a whole number; for minutes "
                            f"write {value}m")
        return parse_every(int(number), where)
    if number <= 0:
        raise UserError(f"{where}: {value!r} must be above 0 (0 steps means only at the end)")
    if unit == "%":
        if number > 100:
            raise UserError(f"{where}: {value!r} is more than the whole run; give at most 100%")
        return Every(fraction=number / 100)
    return Every(seconds=number * _UNITS[unit])
