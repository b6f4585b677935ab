"""`motian multitask` (MT-DNN) end to end on two real bundled tasks (review sentiment and People's
Daily NER, small hash samples) with a real tokenizer and a tiny real model: the task sampling,
both heads learning through one shared encoder, per-task results in `finetune`'s format, the
saved per-task models, `--then-single`, and the task lists it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from motian.cli import main
from motian.errors import UserError
from motian.finetuning import evaluate, load_task, subset
from motian.model import MaskedLM, preset, save_pretrained
from motian.multitasking import (
    ANNEAL_TO,
    MultiTaskObjective,
    TaskMix,
    load_tasks,
    multitask,
    share_encoder,
    task_probabilities,
)
from motian.task_training import TaskObjective, TaskTraining
from motian.tasks.heads import build_head
from motian.tasks.types import Task
from motian.train.settings import OptimSettings, RunSettings
from tests.test_tasks import char_tokenizer

TASKS = ["reviews-sentiment", "pd98-ner"]
N_TRAIN, N_EVAL = 48, 16


# --------------------------------------------------------------------------- sampling


def test_sampling_probabilities_on_known_sizes():
    sizes = [100, 300, 600]
    assert task_probabilities(sizes, "proportional") == pytest.approx([0.1, 0.3, 0.6])
    assert task_probabilities(sizes, "uniform", 0.7) == pytest.approx([1 / 3] * 3)
    assert task_probabilities(sizes, "annealed", 0.0) == pytest.approx([0.1, 0.3, 0.6])
    root = np.array(sizes, dtype=float) ** ANNEAL_TO
    assert task_probabilities(sizes, "annealed", 1.0) == pytest.approx(root / root.sum())
    smallest = [task_probabilities(sizes, "annealed", f)[0] for f in (0, 0.25, 0.5, 1)]
    assert smallest == sorted(smallest) and smallest[0] < smallest[-1]  # small tasks gain
    with pytest.raises(UserError, match="--sampling 'sized'.*proportional, annealed, uniform"):
        task_probabilities(sizes, "sized")


@pytest.mark.parametrize("sampling", ["proportional", "uniform", "annealed"])
def test_the_drawn_tasks_follow_the_probabilities(sampling):
    sizes, steps = [100, 300, 600], 6000
    mix = TaskMix([], sizes, sampling, seed=3, steps=steps)
    drawn = np.array([mix.task_at(s) for s in range(steps)])
    share = np.bincount(drawn, minlength=3) / steps
    expected = np.mean([task_probabilities(sizes, sampling, s / steps)
                        for s in range(steps)], axis=0)
    assert share == pytest.approx(expected, abs=0.025)
    again = TaskMix([], sizes, sampling, seed=3, steps=steps)
    assert [again.task_at(s) for s in range(50)] == drawn[:50].tolist()  # a pure function
    other = TaskMix([], sizes, sampling, seed=4, steps=steps)
    assert [other.task_at(s) for s in range(50)] != drawn[:50].tolist()


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A character tokenizer over the samples' texts and a tiny MLM checkpoint."""
    root = tmp_path_factory.mktemp("mt")
    tasks = [load_task(name) for name in TASKS]
    texts = [e.text for t in tasks for split in ("train", "dev", "test")
             for e in subset(t.splits[split], N_TRAIN)]
    tok, _ = char_tokenizer(root, texts)
    config = preset("tiny", vocab_size=tok.get_vocab_size(), hidden=32, heads=4, ffn=64)
    torch.manual_seed(0)
    checkpoint = save_pretrained(MaskedLM(config), root / "ckpt")
    return root, checkpoint, root / "vocab.txt"


def _settings(**kw) -> dict:
    return dict(training=TaskTraining(epochs=kw.pop("epochs", 10), batch_size=8, warmup=0.1),
                optim=OptimSettings(lr=3e-3), run=RunSettings(progress=False), **kw)


@pytest.fixture(scope="module")
def mt_run(setup):
    root, checkpoint, vocab = setup
    out = root / "run"
    result = multitask(TASKS, out, model=checkpoint, tokenizer=vocab, seeds=[1],
                       max_train=N_TRAIN, max_eval=N_EVAL, max_length=64, then_single=True,
                       **_settings())
    return out, result


def test_both_heads_learn_and_results_are_written_per_task(mt_run):
    out, result = mt_run
    records = [json.loads(x) for x in open(out / "seed-1" / "metrics.jsonl", encoding="utf-8")]
    for name in TASKS:
        losses = [r[f"loss_{name}"] for r in records if f"loss_{name}" in r]
        assert len(losses) > 20, name  # both tasks were drawn
        assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8]), (name, losses)
    assert sum(result["runs"][0]["tasks"][n]["steps"] for n in TASKS) == \
        result["runs"][0]["steps"] == len(records)
    metrics = {"reviews-sentiment": {"accuracy", "macro_f1"},
               "pd98-ner": {"f1", "precision", "recall"}}
    for name in TASKS:  # finetune's fields and metrics, per task
        saved = json.loads((out / name / "results.json").read_text("utf-8"))
        assert saved["task"]["name"] == name and saved["task"]["sizes"]["train_used"] == N_TRAIN
        assert set(saved["summary"]) == {"dev", "test"}
        assert set(saved["summary"]["dev"]) == metrics[name]
        assert saved["runs"][0]["dev"] == result["tasks"][name]["runs"][0]["dev"]
        assert (out / name / "results.md").read_text("utf-8").startswith(f"# {name} — multi")
    assert "majority_class" in result["tasks"]["reviews-sentiment"]
    table = (out / "results.md").read_text("utf-8")
    assert "| pd98-ner | dev | f1 |" in table and "then single" in table


def test_the_encoder_is_shared_and_each_task_model_stands_alone(mt_run):
    out, result = mt_run
    a, b = (load_file(str(out / "seed-1" / "model" / n / "model.safetensors")) for n in TASKS)
    encoder = [k for k in a if k.startswith("backbone.")]
    assert encoder and encoder == [k for k in b if k.startswith("backbone.")]
    assert all(torch.equal(a[k], b[k]) for k in encoder)  # one encoder, trained by both
    assert {k for k in a if not k.startswith("backbone.")} != \
        {k for k in b if not k.startswith("backbone.")}  # each its own head
    for name in TASKS:  # `motian evaluate` reads a task's model alone and scores it the same
        again = evaluate(out / "seed-1" / "model" / name, split="dev", max_eval=N_EVAL)
        assert again["scores"] == pytest.approx(result["tasks"][name]["runs"][0]["dev"])


def test_one_parameter_set_for_the_encoder():
    tasks = [Task("a", "single", labels=["neg", "pos"]), Task("b", "token", labels=["PER"])]
    config = preset("tiny", vocab_size=50, hidden=32, heads=4, ffn=64)
    models = share_encoder([build_head(t, config) for t in tasks])
    objective = MultiTaskObjective([TaskObjective(m, t.type, TaskTraining(), {})
                                    for m, t in zip(models, tasks)], ["a", "b"])
    assert models[0].backbone is models[1].backbone
    encoder = sum(p.numel() for p in models[0].backbone.parameters())
    heads = sum(p.numel() for m in models for n, p in m.named_parameters()
                if not n.startswith("backbone."))
    assert sum(p.numel() for p in objective.parameters()) == encoder + heads
    grouped = [p for g in objective.param_groups(0.01) for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(objective.parameters()))
    # checkpoints: task 0's model, plus the other head as the objective's extra tensors
    assert set(objective.extra_state()) == {f"tasks.1.model.{n}" for n, _ in
                                            models[1].named_parameters()
                                            if not n.startswith("backbone.")}


def test_then_single_continues_from_the_multitask_models(mt_run):
    out, result = mt_run
    for name in TASKS:
        single = json.loads((out / name / "single" / "results.json").read_text("utf-8"))
        assert single == result["then_single"][name]
        assert [r["seed"] for r in single["runs"]] == [1]
        assert set(single["summary"]["dev"]) == set(result["tasks"][name]["summary"]["dev"])
        start = json.loads((out / name / "single" / "from-seed-1" / "results.json")
                           .read_text("utf-8"))
        assert start["config"]["model"] == str(out / "seed-1" / "model" / name)


def test_a_finished_seed_is_reused(setup, mt_run, capsys):
    root, checkpoint, vocab = setup
    out, result = mt_run
    again = multitask(TASKS, out, model=checkpoint, tokenizer=vocab, seeds=[1],
                      max_train=N_TRAIN, max_eval=N_EVAL, max_length=64, **_settings())
    assert "finished earlier" in capsys.readouterr().err
    assert again["tasks"]["pd98-ner"]["summary"] == result["tasks"]["pd98-ner"]["summary"]


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize("tasks, message", [
    (["reviews-sentiment"], "needs at least two tasks; for one task use `motian finetune"),
    (["reviews-sentiment", "pd98-nerr"], "--tasks pd98-nerr: unknown task 'pd98-nerr'"),
    (["reviews-sentiment", "reviews-sentiment"], "reviews-sentiment given twice"),
    (["reviews-sentiment", "afqmc"], "--tasks afqmc: afqmc reads its files from a "
                                     "directory: write it as afqmc=DIR"),
    (["reviews-sentiment", "pd98-headline-gen"], "generation task cannot share an encoder"),
])
def test_task_lists_that_cannot_train_together(tasks, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("`", ".")):
        load_tasks(tasks, "BIO")


def test_the_cli_refuses_a_single_task_before_any_work(tmp_path, capsys):
    assert main(["multitask", "--tasks", "pd98-seg", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "--tasks pd98-seg: multi-task fine-tuning needs at least two tasks" in err
    assert "Traceback" not in err and not (tmp_path / "o" / "results.json").exists()
