"""ERNIE 2.0's continual multi-task pretraining (motian.train.continual, motian.data.discourse):
reordering and distance rows built from real People's Daily text with correct labels, the task
schedule growing stage by stage, per-task losses and held-out accuracies, an exact resume across
a stage boundary, fine-tuning from the final model, and the recipe errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from motian.cli import main
from motian.data.clicks import click_records, pd98_articles, write_click_log
from motian.data.discourse import DiscourseLoader, orders, segments_text
from motian.data.loader import LoaderConfig
from motian.data.pairs import sentence_index
from motian.errors import UserError
from motian.pretraining import pretrain_recipe
from motian.train.continual import step_task
from motian.train.recipe import RunSettings, load_recipe
from tests.pretrain_helpers import final_weights, max_difference, run_then_resume

CPU = RunSettings(device="cpu", threads=1, progress=False)


def _loader(data, kind, **kw):
    return DiscourseLoader(data, LoaderConfig(seq_len=64, batch_size=4), 50, False, kind, **kw)


def _document_text(loader, shard: int, token: int) -> str:
    s = loader.shards[shard]
    docs = np.asarray(s.docs)
    d = int(np.searchsorted(docs, token, side="right") - 1)
    return "".join(loader.vocab[int(t)].removeprefix("##")
                   for t in s.tokens[docs[d]:docs[d + 1]])


def test_reordered_parts_unpermuted_by_the_label_read_in_document_order(pd98_encoded):
    loader = _loader(pd98_encoded, "reorder", parts=3)
    plan = loader._plan(0).pairs
    assert set(plan.label.tolist()) == set(range(6))  # all 3! orders drawn
    sentence_starts = set(sentence_index(loader.shards).start.tolist())
    for row in range(40):
        shown = segments_text(loader, plan, row)
        order = orders(3)[plan.label[row]]  # place i shows original part order[i]
        original = [shown[int(np.flatnonzero(order == j)[0])] for j in range(3)]
        starts = [int(plan.start[row, int(np.flatnonzero(order == j)[0])]) for j in range(3)]
        assert starts == sorted(starts) and all(s in sentence_starts for s in starts)
        text = _document_text(loader, int(plan.shard[row, 0]), starts[0])
        where = [text.find(part) for part in original]
        assert min(where) >= 0 and where == sorted(where), (row, original)
    # the batch shows the parts in the drawn order between [SEP]s, [CLS] first
    arrays, _ = next(loader.iter_numpy())
    tokens, sep = arrays["tokens"][0], loader.special["sep"]
    cuts = np.flatnonzero(tokens == sep)
    assert tokens[0] == loader.special["cls"] and len(cuts) == 3
    assert list(arrays["token_type_ids"][0][1:cuts[0] + 1]) == [0] * int(cuts[0])
    assert set(arrays["token_type_ids"][0][cuts[0] + 1:cuts[1] + 1]) == {1}
    row = int(loader._plan(0).row_order[0])  # the batch's first row, with its own label
    assert arrays["task_labels"][0] == plan.label[row]
    first = loader.shards[int(plan.shard[row, 0])].tokens[plan.start[row, 0]:][:cuts[0] - 1]
    assert list(tokens[1:cuts[0]]) == list(first)


def test_distance_labels_match_the_documents(pd98_encoded):
    loader = _loader(pd98_encoded, "distance")
    plan = loader._plan(0).pairs
    s = sentence_index(loader.shards)
    key = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(s.shard, s.start))}
    counts = Counter(plan.label.tolist())
    assert set(counts) == {0, 1, 2}
    assert all(0.28 < n / len(plan.label) < 0.39 for n in counts.values())  # uniform labels
    for row in range(300):
        a_end = plan.start[row, 0] + plan.length[row, 0]  # A keeps its end when truncated
        b = key[(int(plan.shard[row, 1]), int(plan.start[row, 1]))]  # B starts a sentence
        same_doc = (plan.shard[row, 0] == plan.shard[row, 1]
                    and _document_text(loader, int(plan.shard[row, 0]), int(plan.start[row, 0]))
                    == _document_text(loader, int(plan.shard[row, 1]), int(plan.start[row, 1])))
        if plan.label[row] == 0:
            assert same_doc and s.start[b] == a_end  # B is the very next sentence
        elif plan.label[row] == 1:
            i = int(np.flatnonzero((s.shard == plan.shard[row, 0]) & (s.end == a_end)
                                   & (s.start <= plan.start[row, 0]))[-1])
            assert same_doc and abs(b - i) >= 2  # the same document, not next to A
        else:
            assert not same_doc


def test_task_draws_follow_the_stage_weights():
    stage = {"mlm": 1.0, "reorder": 0.5, "distance": 0.5}
    drawn = Counter(step_task(stage, 0, 1, n) for n in range(2000))
    assert set(drawn) == set(stage)
    assert abs(drawn["mlm"] / 2000 - 0.5) < 0.05 and abs(drawn["reorder"] / 2000 - 0.25) < 0.05
    assert [step_task(stage, 0, 1, n) for n in range(50)] == \
        [step_task(stage, 0, 1, n) for n in range(50)]  # a pure function of the position
    assert {step_task({"mlm": 1.0}, 0, 0, n) for n in range(100)} == {"mlm"}


SCHEDULE = """\
model:
  preset: tiny
  overrides: {{hidden: 32, layers: 2, heads: 2, ffn: 64, max_positions: 64, dropout: 0.1}}
data: {{masking: {masking}, pair_task: {pair_task}, reorder_parts: {parts},
        click_files: [{train}], click_eval_files: [{heldout}]}}
objective: {{kind: mlm, weighting: uncertainty, weight_bounds: [0.5, 2.0]}}
optim: {{name: adamw, lr: 0.005}}
stages:
  - {{fraction: 0.25, seq_len: 64, global_batch: 8, warmup: 0.2, tasks: {first}}}
  - {{fraction: 0.5, seq_len: 64, global_batch: 8, warmup: 0.0, tasks: {second}}}
  - {{fraction: 0.25, seq_len: 64, global_batch: 8, warmup: 0.0, tasks: {third}}}
steps: 16
eval: {{every: 4, seq_len: 64, rows: 32, batch: 16, holdout_every: 10}}
checkpoint_every: 4
keep_last: 5
"""
GOOD = dict(first="{mlm: 1.0}", second="{mlm: 1.0, reorder: 1.0, distance: 1.0}",
            third="{mlm: 1.0, reorder: 1.0, distance: 1.0, relevance: 3.0}", parts=3,
            masking="wwm", pair_task="none")


@pytest.fixture(scope="module")
def click_logs(tmp_path_factory):
    """Real click logs in the user format, made as the bundled stand-in makes its own
    (headline with snippets of its own or other articles) from 40 + 20 articles."""
    root = tmp_path_factory.mktemp("clicks")
    articles = list(pd98_articles()[:60])
    write_click_log(click_records(articles[:40], 0), root / "train.tsv")
    write_click_log(click_records(articles[40:], 1), root / "heldout.tsv")
    return root


def _recipe(tmp_path, click_logs, **changes):
    path = tmp_path / "schedule.yaml"
    path.write_text(SCHEDULE.format(**{**GOOD, **changes, "train": click_logs / "train.tsv",
                                       "heldout": click_logs / "heldout.tsv"}),
                    encoding="utf-8")
    return load_recipe(path)


def test_stages_add_tasks_log_each_and_resume_exactly_across_a_boundary(pd98_encoded,
                                                                      click_logs, tmp_path):
    recipe = _recipe(tmp_path, click_logs)
    # stopped after the step-4 checkpoint, the last step of stage 1: the resumed run starts
    # stage 2 (new loaders, new tasks) from the saved state alone
    full, resumed = run_then_resume(recipe, CPU, pd98_encoded, tmp_path, step=4)
    assert max_difference(final_weights(full), final_weights(resumed)) == 0.0
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [10, 16]
    first, last = train
    assert first["share_relevance"] == 0.0 and first["share_mlm"] >= 0.4  # steps 1-10
    assert first["share_reorder"] + first["share_distance"] > 0.0  # stage 2 added them
    assert last["share_relevance"] > 0.0  # stage 3 added it
    assert all(f"loss_{t}" in first for t in ("mlm",)) and "loss_relevance" in last
    assert {"weight_mlm", "weight_reorder", "weight_distance", "weight_relevance"} <= set(last)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 4, 8, 12, 16]
    for task in ("reorder", "distance", "relevance"):
        assert all(0.0 <= e[f"{task}_accuracy"] <= 1.0 and e[f"{task}_rows"] > 0 for e in evals)
    assert evals[0]["reorder_majority"] < 0.5  # six orders, none dominant
    state = json.loads((resumed / "checkpoints" / "step-00000016" / "state.json").read_text())
    assert state["data"]["tasks"] == ["mlm", "reorder", "distance", "relevance"]
    assert state["data"]["step"] == 4 and set(state["data"]["loaders"]) == set(
        state["data"]["tasks"])

    # the final model fine-tunes like any encoder (the relevance head is its pair head)
    out = tmp_path / "ft"
    assert main(["finetune", "--task", "reviews-sentiment", "--model", str(full / "final"),
                 "--out", str(out), "--max-train", "16", "--max-eval", "16", "--epochs", "1",
                 "--batch-size", "8", "--max-length", "64", "--seeds", "1", "--no-save-model",
                 "--device", "cpu",
                 "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert 0.0 <= result["runs"][0]["test"]["accuracy"] <= 1.0


@pytest.mark.parametrize("changes, field", [
    (dict(second="{mlm: 1.0, reordering: 0.3}"), r"stages\[1\].tasks names unknown task"),
    (dict(second="{mlm: 1.0, reorder: 0}"), r"stages\[1\].tasks: reorder has weight 0"),
    (dict(second="{mlm: -1, reorder: 1}"), r"stages\[1\].tasks: mlm has weight -1"),
    (dict(third="{mlm: 1.0, relevance: 1.0}"),
     r"stages\[2\].tasks drops reorder, distance.*add reorder: <weight>"),
    (dict(first="{}"), r"stages\[0\].tasks is empty"),
    (dict(pair_task="sop"), "data.pair_task is sop"),
    (dict(parts=5), "data.reorder_parts must be 2, 3 or 4"),
])
def test_a_bad_schedule_names_the_field(tmp_path, click_logs, changes, field):
    with pytest.raises(UserError, match=field):
        _recipe(tmp_path, click_logs, **changes)


def test_relevance_needs_click_logs_and_entity_masking_needs_marks(tmp_path, pd98_encoded,
                                                                   click_logs):
    path = tmp_path / "r.yaml"
    text = SCHEDULE.format(**GOOD, train="x", heldout="y").replace(
        "click_files: [x], click_eval_files: [y]", "click_files: []")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="relevance task needs data.click_files"):
        load_recipe(path)
    shipped = load_recipe("ernie2-demo")  # each stage keeps the tasks before it
    assert [sorted(s.tasks) for s in shipped.stages][:3] == [
        ["mlm"], ["distance", "mlm", "reorder"], ["distance", "mlm", "relevance", "reorder"]]
    assert shipped.data.masking == "ernie"
    # knowledge masking (ernie) on shards encoded without entity marks is refused
    with pytest.raises(UserError, match="carry no entity spans"):
        pretrain_recipe(_recipe(tmp_path, click_logs, masking="ernie"), CPU, pd98_encoded,
                        tmp_path / "run")
