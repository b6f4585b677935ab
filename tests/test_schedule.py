"""Learning-rate schedules (warm-up, linear / cosine / constant decay, min_ratio), set_lr with
per-group scales, and Progress by steps and by a wall-clock budget."""

from __future__ import annotations

import math
import time

import pytest
import torch

from motian.errors import UserError
from motian.train.schedule import Progress, lr_multiplier, set_lr


def test_warmup_is_linear_from_zero_to_one():
    for decay in ("linear", "cosine", "constant"):
        assert lr_multiplier(0.0, 0.1, decay) == 0.0
        assert lr_multiplier(0.05, 0.1, decay) == pytest.approx(0.5)
        assert lr_multiplier(0.025, 0.1, decay) == pytest.approx(0.25)
        assert lr_multiplier(0.1, 0.1, decay) == pytest.approx(1.0)


def test_decay_shapes_and_ends():
    # Linear: halfway through the decay phase -> halfway to min_ratio.
    assert lr_multiplier(0.55, 0.1, "linear") == pytest.approx(0.5)
    assert lr_multiplier(1.0, 0.1, "linear") == pytest.approx(0.0)
    assert lr_multiplier(1.0, 0.1, "linear", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(0.55, 0.1, "linear", min_ratio=0.2) == pytest.approx(0.6)
    # Cosine: 1 at the end of warm-up, (1 + min) / 2 halfway, min at the end, slow at both ends.
    assert lr_multiplier(0.1, 0.1, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(0.55, 0.1, "cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_multiplier(1.0, 0.1, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    q = 0.25
    assert lr_multiplier(0.1 + 0.9 * q, 0.1, "cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * q)))
    # Constant stays at the peak; min_ratio does not apply.
    assert lr_multiplier(1.0, 0.1, "constant", min_ratio=0.3) == 1.0
    # No warm-up; progress beyond the end is clamped.
    assert lr_multiplier(0.0, 0.0, "linear") == 1.0
    assert lr_multiplier(1.7, 0.0, "linear", min_ratio=0.05) == pytest.approx(0.05)
    assert lr_multiplier(0.5, 1.0, "cosine") == pytest.approx(0.5)  # all warm-up


def test_schedule_is_monotone_after_warmup():
    for decay in ("linear", "cosine"):
        values = [lr_multiplier(i / 100, 0.06, decay, 0.1) for i in range(6, 101)]
        assert all(a >= b for a, b in zip(values, values[1:]))


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="warmup"):
        lr_multiplier(0.5, 1.5, "linear")
    with pytest.raises(UserError, match="min_ratio"):
        lr_multiplier(0.5, 0.1, "linear", min_ratio=-0.1)
    with pytest.raises(UserError, match="unknown decay 'step'"):
        lr_multiplier(0.5, 0.1, "step")
    with pytest.raises(UserError, match="total_steps, budget_seconds"):
        Progress()


def test_set_lr_respects_lr_scale():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.25}], lr=1.0)
    set_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == [0.4, pytest.approx(0.1)]


def test_progress_by_steps():
    progress = Progress(total_steps=10)
    assert progress.fraction() == 0.0 and progress.fraction(ahead=1) == pytest.approx(0.1)
    for _ in range(9):
        progress.update()
    assert progress.fraction() == pytest.approx(0.9) and not progress.done()
    progress.update()
    assert progress.done() and progress.fraction() == 1.0
    assert progress.fraction(ahead=3) == 1.0


def test_progress_by_time_budget():
    progress = Progress(budget_seconds=10.0)
    progress.update(seconds=2.0)
    progress.update(seconds=3.0)
    assert progress.fraction() == pytest.approx(0.5)
    assert progress.fraction(ahead=1) == pytest.approx(0.75)  # one more step at 2.5 s
    assert not progress.done()
    progress.update(seconds=5.0)
    assert progress.done()
    # With both limits, the one further along drives the schedule and ends the run.
    both = Progress(total_steps=4, budget_seconds=100.0)
    both.update(seconds=1.0)
    assert both.fraction() == pytest.approx(0.25)
    both.update(seconds=80.0)
    assert both.fraction() == pytest.approx(0.81)
    both.update(seconds=0.0)
    both.update(seconds=0.0)
    assert both.done() and both.fraction() == 1.0


def test_progress_measures_wall_time_between_updates():
    progress = Progress(budget_seconds=100.0)
    time.sleep(0.05)
    progress.update()
    assert 0.04 < progress.elapsed < 5.0


def test_cpu_clock_counts_work_not_waiting():
    """A "cpu" budget does not advance while the process waits (another job holding the
    cores looks like this) and does advance while it computes; "wall" advances on both."""
    wall, cpu = Progress(budget_seconds=100.0), Progress(budget_seconds=100.0, clock="cpu")
    time.sleep(0.3)
    wall.update()
    cpu.update()
    assert wall.elapsed > 0.25 and cpu.elapsed < 0.1
    start = time.process_time()
    while time.process_time() - start < 0.3:  # busy: CPU seconds pass
        sum(range(1000))
    cpu.update()
    assert cpu.elapsed > 0.25
    with pytest.raises(UserError, match="budget clock must be one of"):
        Progress(budget_seconds=1.0, clock="gpu")


def test_progress_refuses_to_resume_on_another_clock():
    state = Progress(budget_seconds=60.0, clock="cpu").state_dict()
    with pytest.raises(UserError, match="clock='cpu' but this run has 'wall'"):
        Progress(budget_seconds=60.0).load_state_dict(state)
    old = {k: v for k, v in Progress(budget_seconds=60.0).state_dict().items() if k != "clock"}
    Progress(budget_seconds=60.0).load_state_dict(old)  # a checkpoint from before: wall


def test_progress_state_round_trip_excludes_downtime():
    progress = Progress(total_steps=100, budget_seconds=60.0)
    progress.update(steps=3, seconds=12.5)
    state = progress.state_dict()
    time.sleep(0.05)  # "downtime" between the kill and the resume: not counted
    resumed = Progress(total_steps=100, budget_seconds=60.0)
    resumed.load_state_dict(state)
    assert (resumed.steps, resumed.elapsed) == (3, 12.5)
    assert resumed.fraction() == progress.fraction()
    resumed.update(seconds=0.0)
    assert resumed.steps == 4 and resumed.elapsed == 12.5
    with pytest.raises(UserError, match="total_steps=100 but this run has 200"):
        Progress(total_steps=200, budget_seconds=60.0).load_state_dict(state)
