"""The run report on a real tiny pretraining run (People's Daily shards, two stages) and real
fine-tuning runs from its weights: report.md, valid PNGs behind relative links, the measured
numbers in its tables, the CLI verb, and clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from motian.cli import main as cli_main
from motian.distillation import distill
from motian.errors import UserError
from motian.finetuning import finetune
from motian.pretraining import pretrain_recipe
from motian.reporting.run import (
    draw_plots,
    load_run,
    read_downstream,
    run_page,
    write_report,
)
from motian.reporting.tables import distill_results_page, summary_text
from motian.train.metrics import read_metrics
from motian.train.recipe import RunSettings, load_recipe
from tests.pretrain_helpers import write_recipe
from tests.settings_helpers import typed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(pd98_encoded, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    recipe = load_recipe(write_recipe(root, steps=20, eval_every=10, checkpoint_every=0))
    pretrain_recipe(recipe, RunSettings(device="cpu", threads=1, progress=False), pd98_encoded, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def fine_tuned(tiny_run, pd98_encoded) -> dict[str, Path]:
    """reviews-sentiment from the run's weights and from random init, 2 seeds, 48 examples."""
    out = {}
    for arm, random_init in (("teacher", False), ("random init", True)):
        directory = tiny_run.parent / f"ft-{arm.replace(' ', '-')}"
        finetune("reviews-sentiment", directory, model=tiny_run / "final",
                 tokenizer=pd98_encoded, seeds=[1, 2], max_train=48, max_eval=48,
                 max_length=32, random_init=random_init, save_model=False,
                 **typed(epochs=1, device="cpu"))
        out[arm] = directory
    return out


def _images(report: Path) -> list[Path]:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text(encoding="utf-8"))
    assert all(not Path(link).is_absolute() for link in links)
    return [report.parent / link for link in links]


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    from PIL import Image  # pillow comes with matplotlib: a missing one fails, never skips

    image = Image.open(path)
    image.verify()
    assert image.size[0] > 300 and image.size[1] > 200


def test_report_has_valid_plots_and_the_measured_numbers(tiny_run, fine_tuned, tmp_path):
    path = write_report(tiny_run, tmp_path / "rep", downstream=fine_tuned)
    text = path.read_text(encoding="utf-8")
    images = _images(path)
    assert [p.name for p in images] == ["loss_lr.png", "throughput.png", "eval.png",
                                        "downstream.png"]
    for image in images:
        _assert_png(image)

    evals = read_metrics(tiny_run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 10, 20]
    for e in evals:
        assert f"| {e['step']} | {100 * e['accuracy']:.2f} | {e['loss']:.4f} |" in text
    last = read_metrics(tiny_run / "metrics.jsonl", "train")[-1]
    assert (f"| {last['step']} | 2 | 64 | {last['lr']:.3e} | {last['loss_mlm']:.4f} | "
            f"{last['loss_pair']:.4f} | {100 * last['acc_mlm']:.2f} |") in text
    meta = json.loads((tiny_run / "run.json").read_text())
    assert f"torch {meta['versions']['torch']}" in text
    assert f"({meta['hardware']['cpu_count']} cores)" in text

    for arm, directory in fine_tuned.items():
        summary = json.loads((directory / "results.json").read_text())["summary"]
        mean, std, n = summary["test"]["accuracy"]
        assert (f"| {arm} | reviews-sentiment | test | accuracy | {100 * mean:.2f} ± "
                f"{100 * std:.2f} | {n} |") in text
    # the majority-class floor of the task, once however many arms share the task
    floor = json.loads((fine_tuned["teacher"] / "results.json").read_text())["majority_class"]
    rows = [line for line in text.splitlines()
            if line.startswith("| majority class | reviews-sentiment | test | accuracy |")]
    assert rows == [f"| majority class | reviews-sentiment | test | accuracy | "
                    f"{100 * floor['test']['accuracy']:.2f} ± 0.00 | 1 |"]


def test_a_distillation_run_gives_teacher_student_and_baseline_bars(tiny_run, pd98_encoded,
                                                                    tmp_path):
    teacher = tmp_path / "ft"
    finetune("reviews-sentiment", teacher, model=tiny_run / "final", tokenizer=pd98_encoded,
             seeds=[1], max_train=48, max_eval=48, max_length=32,
             **typed(epochs=1, device="cpu"))
    distill(teacher / "seed-1" / "model", tmp_path / "student", student_layers=1, seeds=[1, 2],
            epochs=1, max_train=48, max_eval=48, **typed("distill", device="cpu"))
    rows = read_downstream({"distill": tmp_path / "student"})
    result = json.loads((tmp_path / "student" / "results.json").read_text())
    test = {r.arm: r for r in rows if (r.split, r.metric) == ("test", "accuracy")}
    assert set(test) == {"distill teacher", "distill student", "distill baseline"}
    assert test["distill teacher"].mean == result["teacher"]["scores"]["test"]["accuracy"]
    assert test["distill teacher"].n == 1 and test["distill student"].n == 2
    assert [test["distill student"].mean, test["distill student"].std] == \
        result["student"]["summary"]["test"]["accuracy"][:2]
    path = write_report(tiny_run, tmp_path / "rep", downstream={"distill": tmp_path / "student"})
    _assert_png(tmp_path / "rep" / "plots" / "downstream.png")
    assert "| distill baseline | reviews-sentiment | test | accuracy |" in path.read_text("utf-8")


def test_report_defaults_to_the_run_directory_and_the_cli_writes_it(tiny_run, tmp_path,
                                                                     capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("final", "checkpoints",
                                                                 "tensorboard"))
    assert cli_main(["report", "--run", str(run)]) == 0
    assert f"report: {run / 'report.md'}" in capsys.readouterr().out
    images = _images(run / "report.md")
    assert len(images) == 3  # no downstream chart without downstream runs
    for image in images:
        _assert_png(image)
    assert "## Downstream" not in (run / "report.md").read_text(encoding="utf-8")


def test_a_resumed_run_reports_the_last_record_of_each_step(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("final", "checkpoints",
                                                                 "tensorboard"))
    records = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    redo = json.loads(records[-1])  # the final eval, as a resumed run would log it again
    redo["loss"] = 1.2345
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(redo) + "\n" + '{"kind": "train", "st')  # and a torn last line
    loaded = load_run(run)
    assert [e["step"] for e in loaded.evals] == [0, 10, 20]
    assert loaded.evals[-1]["loss"] == 1.2345
    assert "| 20 | " in write_report(run).read_text(encoding="utf-8")
    # A run still going (or killed) has no summary.json yet: the report says so and still works.
    (run / "summary.json").unlink()
    (run / "run.json").unlink()
    text = write_report(run).read_text(encoding="utf-8")
    assert "summary.json is missing" in text and "run.json is missing" in text
    assert "1.2345" in text


def test_missing_metrics_and_bad_downstream_are_user_errors(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty/metrics\.jsonl: not found"):
        write_report(tmp_path / "empty")
    with pytest.raises(UserError, match=r"nowhere: not found"):
        read_downstream({"teacher": tmp_path / "nowhere"})
    broken = tmp_path / "broken.json"
    broken.write_text('{"summary": ', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.json:1: not valid JSON"):
        read_downstream({"teacher": broken})
    assert cli_main(["report", "--run", str(tiny_run), "--downstream", "no-equals-sign"]) == 1
    assert "expected LABEL=DIR" in capsys.readouterr().err


def test_the_page_is_built_from_data_in_one_go(tiny_run, tmp_path):
    # write_report = draw_plots + run_page over the same records; an appendix (the demo's
    # data-preparation section) follows the run's sections, never patched in afterwards.
    appendix = "## Data preparation: somewhere\n\nbuilt by the caller"
    text = write_report(tiny_run, tmp_path, appendix=[appendix]).read_text(encoding="utf-8")
    records = load_run(tiny_run)
    images = {k: p.relative_to(tmp_path).as_posix()
              for k, p in draw_plots(records, [], tmp_path / "plots").items()}
    assert sorted(images) == ["eval", "loss_lr", "throughput"]
    assert text == run_page(tiny_run, records, [], images, [appendix])
    assert text.endswith("\n" + appendix) and text.index("## Held-out") < text.index(appendix)


def test_distill_results_page_from_a_result_dict():
    runs = [{"seed": s, "dev": {"accuracy": 0.7}, "test": {"accuracy": 0.6 + s / 100}}
            for s in (1, 2)]
    model = {"layers": 1, "hidden": 32, "params": 6000, "flops_per_token": 1.2e6, "runs": runs}
    result = {"task": {"name": "reviews-sentiment", "type": "single"}, "compute_ratio": 0.5,
              "teacher": {"path": "t", "sha256": "ab" * 32, "flops_seq_len": 64, "layers": 2,
                          "hidden": 32, "params": 12000, "flops_per_token": 2.4e6,
                          "scores": {"dev": {"accuracy": 0.8}, "test": {"accuracy": 0.75}}},
              "student": model, "baseline": model, "config": {"layer_map": [1]}}
    page = distill_results_page(result)
    assert page.startswith("# reviews-sentiment — distillation results")
    assert "| teacher | 2 × 32 | 12,000 | 2.40 M | test | 75.00 ± 0.00 | 100.0 | 1 |" in page
    assert "| student | 1 × 32 | 6,000 | 1.20 M | test | 61.50 ± 0.71 | 82.0 | 2 |" in page
    assert "Resolved settings" not in summary_text(page) and '"layer_map"' in page


def test_only_the_verbs_above_import_the_report_layer():
    # reporting is layer 5: data/, model/, train/ and tasks/ never import it (not even lazily)
    root = Path(__file__).resolve().parents[1] / "motian"
    for layer in ("data", "model", "train", "tasks"):
        for path in (root / layer).rglob("*.py"):
            assert "motian.reporting" not in path.read_text(encoding="utf-8"), path


# ---------------------------------------------------------------- benchmarks/ablation.py arms


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_each_ablation_arm_changes_only_its_ingredient():
    from benchmarks.ablation import arm_recipe, arms
    from motian.train.recipe import to_dict

    recipes = {a.slug: _flat(to_dict(arm_recipe(a, 1.0))) for a in arms(4e-3, 2e-3)}
    motian = recipes["motian"]
    assert (motian["model.overrides.norm"], motian["model.overrides.position"],
            motian["data.masking"], motian["data.pair_task"], motian["objective.weighting"],
            motian["optim.name"]) == ("pre", "t5", "motian", "sop", "uncertainty", "lamb")
    expected = {"no-relative": {"model.overrides.position"},
                "no-synonym": {"data.masking_overrides.mask_prob",
                               "data.masking_overrides.synonym_prob", "data.masking_overrides"},
                "no-phrase-word": {"data.masking_overrides.strategy", "data.masking_overrides"},
                "no-pair": {"data.pair_task"}, "no-uncertainty": {"objective.weighting"},
                "no-pre-ln": {"model.overrides.norm"}, "no-lamb": {"optim.name", "optim.lr"},
                "motian-seed1": {"seed", "data.seed"}}
    for slug, keys in expected.items():
        changed = {k for k in motian.keys() | recipes[slug].keys()
                   if motian.get(k) != recipes[slug].get(k)} - {"name"}
        assert changed == keys, slug
    bert = recipes["bert"]
    assert (bert["model.overrides.norm"], bert["model.overrides.position"], bert["data.masking"],
            bert["objective.weighting"], bert["optim.name"]) == ("post", "absolute", "bert",
                                                                 "fixed", "adamw")
    same = {json.dumps([r[k] for k in ("model.preset", "model.overrides.hidden",
                                       "model.overrides.layers", "model.overrides.ffn",
                                       "stages", "budget_minutes", "eval.seq_len",
                                       "eval.rows", "eval.seed")]) for r in recipes.values()}
    assert len(same) == 1  # one model size, schedule, budget and held-out evaluation


# ---------------------------------------------------------------- benchmarks/objectives.py


def test_objective_arms_are_the_bundled_recipes_at_one_budget_and_clock(tmp_path):
    from benchmarks.objectives import ARMS, parse_args, pretrain_job
    from motian.train.recipe import load_recipe, to_dict

    args = parse_args(["--out", str(tmp_path), "--minutes", "2", "--clock", "cpu"])
    reference = _flat(to_dict(load_recipe("demo")))
    for arm in ARMS:
        pretrain_job(args, arm, 3)
        saved = _flat(to_dict(load_recipe(str(tmp_path / arm.slug / "seed3" / "recipe.yaml"))))
        bundled = _flat(to_dict(load_recipe(arm.recipe)))
        assert (saved["budget_minutes"], saved["budget_clock"], saved["seed"]) == (2.0, "cpu", 3)
        changed = {k for k in saved.keys() | bundled.keys() if saved.get(k) != bundled.get(k)}
        # besides budget and seed, only the fields the arm declares it overrides
        declared = tuple(o.split("=", 1)[0] for o in arm.overrides)
        assert {k for k in changed if not k.startswith(declared) or not declared} <= {
            "budget_minutes", "budget_clock", "seed", "data.seed"}, arm.slug
        # one model size for every arm (stacking reaches it by its last stage)
        assert all(saved[k] == reference[k] for k in ("model.overrides.hidden",
                                                      "model.overrides.layers"))


def test_objective_waves_pair_different_arms_and_rotate(tmp_path):
    from benchmarks.objectives import ARMS, parse_args, waves

    args = parse_args(["--out", str(tmp_path), "--seeds", "1", "2"])
    plan = waves(args, list(ARMS))
    assert sum(len(w) for w in plan) == 2 * len(ARMS)
    assert all(len({a.slug for a, _ in w}) == len(w) for w in plan)
    pairs = [frozenset(a.slug for a, _ in w) for w in plan]
    assert len(set(pairs)) == len(pairs)  # no two arms share a wave under both seeds


def test_time_to_target_interpolates_between_evaluations():
    from benchmarks.objectives import elapsed_at, time_to_target

    train = [{"step": 10, "elapsed_s": 10.0}, {"step": 20, "elapsed_s": 30.0}]
    assert elapsed_at(train, 15) == 20.0 and elapsed_at(train, 25) is None
    evals = [{"step": 0, "loss": 9.0}, {"step": 10, "loss": 7.0}, {"step": 20, "loss": 5.0}]
    assert time_to_target(evals, train, 6.0, 100.0) == pytest.approx(0.2)  # half-way 10 -> 30 s
    assert time_to_target(evals, train, 9.5, 100.0) == 0.0  # reached at the start
    assert time_to_target(evals, train, 4.0, 100.0) is None  # never reached


def test_recipe_budget_clock_is_validated_and_not_in_the_fingerprint():
    from motian.train.recipe import load_recipe, with_fields

    demo = load_recipe("demo")
    cpu = with_fields(demo, ["budget_clock=cpu"])
    assert cpu.budget_clock == "cpu" and cpu.fingerprint() == demo.fingerprint()
    with pytest.raises(UserError, match="budget_clock"):
        with_fields(demo, ["budget_clock=gpu"])
