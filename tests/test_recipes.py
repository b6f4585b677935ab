"""Recipes: every shipped YAML loads and builds its model config; bad files name the problem;
accumulation is derived from global batch / (micro-batch x processes); YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from motian.errors import UserError
from motian.train.recipe import (
    Recipe,
    Stage,
    accumulation,
    load_recipe,
    recipe_path,
    save_recipe,
    shipped_configs,
    shipped_recipes,
    with_overrides,
)

SHIPPED = shipped_recipes()


def test_the_four_recipes_the_issue_asks_for_are_shipped():
    assert {"demo", "motian-base", "motian-1b", "bert-base"} <= set(SHIPPED)
    # the recipes are package data inside motian/, not a folder beside the checkout
    import motian
    package_dir = Path(motian.__file__).resolve().parent
    assert Path(str(shipped_configs())).resolve() == package_dir / "configs"
    assert SHIPPED == sorted(p.stem for p in (package_dir / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads_and_round_trips(name, tmp_path):
    recipe = load_recipe(name)
    config = recipe.model.build(vocab_size=1000)
    assert config.vocab_size == 1000 and config.hidden >= 32
    assert recipe.data.masking_config().rate == pytest.approx(0.15)
    save_recipe(recipe, tmp_path / "r.yaml")
    again = load_recipe(tmp_path / "r.yaml")
    assert again.fingerprint() == recipe.fingerprint()
    assert again == recipe.__class__(**{**recipe.__dict__, "name": again.name})


def test_recipes_say_what_the_issue_says():
    bert, motian, demo = load_recipe("bert-base"), load_recipe("motian-base"), load_recipe("demo")
    b = bert.model.build()
    assert (b.norm, b.position, bert.optim.name, bert.data.masking) == (
        "post", "absolute", "adamw", "bert")
    m = motian.model.build()
    assert (m.norm, motian.optim.name, motian.objective.weighting) == ("pre", "lamb",
                                                                      "uncertainty")
    assert [s.seq_len for s in motian.stages] == [128, 512]
    assert [s.fraction for s in motian.stages] == [0.9, 0.1]
    assert demo.budget_minutes == 10
    assert load_recipe("motian-1b").model.build().hidden == 2048


def test_unknown_key_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {name: lamb, lr: 0.1, warmup_steps: 3}\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.yaml: optim: unknown key\(s\) warmup_steps"):
        load_recipe(path)


def test_invalid_yaml_and_bad_model_field_are_user_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {preset: tiny\nstages: [\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"broken.yaml:\d+: not valid YAML"):
        load_recipe(path)
    path.write_text("model: {preset: tiny, overrides: {hiden: 64}}\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown field.*hiden"):
        load_recipe(path)
    with pytest.raises(UserError, match=r"no recipe 'nope'.*shipped recipes \(.*demo"):
        load_recipe("nope")


def test_stage_fractions_must_sum_to_one():
    with pytest.raises(UserError, match="sum to 1"):
        Recipe(stages=(Stage(fraction=0.5),))


def test_accumulation_is_derived_and_refuses_what_does_not_divide():
    stage = Stage(global_batch=64)
    assert accumulation(stage, 0, 1) == (64, 1)
    assert accumulation(stage, 8, 2) == (8, 4)  # 64 / (8 x 2)
    assert accumulation(stage, 16, 4) == (16, 1)
    with pytest.raises(UserError, match="not divisible by 3 processes"):
        accumulation(stage, 0, 3)
    with pytest.raises(UserError, match="micro-batch 12 does not divide"):
        accumulation(stage, 12, 2)


def test_length_overrides_do_not_change_the_fingerprint():
    r = load_recipe("demo")
    assert with_overrides(r, steps=5, budget_minutes=0.1).fingerprint() == r.fingerprint()
    assert with_overrides(r, steps=5).steps == 5
    assert recipe_path("demo").is_file() and r.name == "demo"
