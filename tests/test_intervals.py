"""Evaluation and checkpoint intervals in steps, minutes of training or shares of the run
(`motian.train.intervals`), as recipes write them."""

from __future__ import annotations

import pytest

from motian.errors import UserError
from motian.train.intervals import Every, parse_every
from motian.train.recipe import load_recipe
from tests.pretrain_helpers import write_recipe


@pytest.mark.parametrize("value, expected", [
    (400, Every(steps=400)), ("400", Every(steps=400)), (0, Every()), (400.0, Every(steps=400)),
    ("2m", Every(seconds=120)), ("1.5min", Every(seconds=90)), ("90s", Every(seconds=90)),
    ("1h", Every(seconds=3600)), ("10%", Every(fraction=0.1)), (" 25 % ", Every(fraction=0.25)),
])
def test_intervals_read(value, expected):
    assert parse_every(value, "x") == expected


@pytest.mark.parametrize("value, message", [
    (-1, "give 0"), ("2 weeks", "cannot read"), ("0m", "above 0"), ("150%", "at most 100%"),
    ("1.5", "not a whole number"), (True, "not an interval"), (2.5, "cannot read"),
])
def test_bad_intervals_say_what_to_write(value, message):
    with pytest.raises(UserError, match=message):
        parse_every(value, "recipe r: checkpoint_every")


def test_due_steps_minutes_and_shares():
    assert Every(steps=4).due(8, (0, 0), (1, 0.1)) and not Every(steps=4).due(9, (0, 0), (1, 0))
    two_minutes = Every(seconds=120)
    assert two_minutes.due(5, (119.9, 0), (120.1, 0))
    assert not two_minutes.due(6, (120.1, 0), (200.0, 0))
    assert two_minutes.due(7, (200.0, 0), (241.0, 0))
    tenth = Every(fraction=0.1)
    hits = [k for k in range(1, 101) if tenth.due(k, (0, (k - 1) / 100), (0, k / 100))]
    assert hits == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]  # 0.3 is not missed by rounding
    assert Every().never and not Every().due(10, (0, 0), (9e9, 1.0))
    assert str(two_minutes) == "every 2 min of training" and str(tenth) == "every 10% of the run"


def test_a_recipe_takes_minutes_and_shares_and_refuses_nonsense(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, checkpoint_every="2m", eval_every="10%"))
    assert recipe.checkpoint_every == "2m" and recipe.eval.every == "10%"
    with pytest.raises(UserError, match="recipe tiny: eval.every: cannot read 'often'"):
        load_recipe(write_recipe(tmp_path, eval_every="often"))
