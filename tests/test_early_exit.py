"""FastBERT early exit with a real tiny classifier fine-tuned on real reviews by `motian
finetune`: the students learn the teacher (their KL falls), threshold 0 is the fine-tuned
model bit for bit, a threshold of 1 leaves every row at block 1, a batch exits as its rows do
one by one, the threshold survives save/load and reaches `predict`, export and serve; bad
thresholds and models that are not classifiers are refused with a UserError."""

import json

import pytest
import torch

from motian.cli import main
from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.early_exiting import ExitDistillation, early_exit, early_exit_curve, exit_model
from motian.errors import UserError
from motian.finetuning import finetune, load_task, save_fine_tuned, subset
from motian.model import (
    EarlyExitClassification,
    MaskedLM,
    TokenClassification,
    from_pretrained,
    preset,
    save_pretrained,
)
from motian.model.early_exit import normalised_entropy
from motian.serving.export import export
from motian.serving.predict import Predictor
from motian.tasks.features import Featurizer, collate
from motian.tasks.types import Task
from tests.settings_helpers import typed
from tests.test_serve import call, running
from tests.test_tasks import char_tokenizer

TINY = dict(hidden=32, layers=3, heads=2, ffn=64, max_positions=64)
FAST = dict(run=typed()["run"])  # no progress bar


@pytest.fixture(scope="module")
def task():
    return load_task("reviews-sentiment")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, task):
    """A 3-block, hidden-32 classifier fine-tuned on 300 real reviews (one seed)."""
    out = tmp_path_factory.mktemp("tuned")
    texts = [e.text for s in ("train", "dev", "test") for e in subset(task.splits[s], 300)]
    tok, _ = char_tokenizer(out, texts)
    ckpt = save_pretrained(MaskedLM(preset("tiny", vocab_size=tok.get_vocab_size(), **TINY)),
                           out / "init")
    finetune("reviews-sentiment", out / "run", model=ckpt, tokenizer=out / "vocab.txt",
             seeds=[1], max_length=32, max_train=300, max_eval=60,
             **typed(epochs=2, batch_size=16, lr=2e-3))
    return out / "run" / "seed-1" / "model"


@pytest.fixture(scope="module")
def exited(tuned, tmp_path_factory):
    """`motian early-exit` on it: (the early-exit model directory, its result)."""
    out = tmp_path_factory.mktemp("exited") / "model"
    result = early_exit(tuned, out, max_train=200, max_eval=60, epochs=2, batch_size=16,
                        eval_batch_size=16, **FAST)
    return out, result


def _batch(task, model_dir, n=24):
    tok = load_tokenizer(model_dir / "tokenizer.json")
    special = special_token_ids(tok)
    features = Featurizer(task, tok, special, 32)(subset(task.splits["test"], n))
    batch = collate(task.type, features, special["pad"])
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def test_trained_exits_fall_in_kl_and_the_model_is_saved(tuned, exited, task):
    out, result = exited
    ids, mask, types = _batch(task, tuned, 64)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    with torch.no_grad():
        before = ExitDistillation(exit_model(tuned)[0].eval()).loss(batch)
        after = ExitDistillation(from_pretrained(out).eval()).loss(batch)
    assert float(after) < 0.5 * float(before)
    meta = json.loads((out / "config.json").read_text("utf-8"))
    assert meta["head"] == "EarlyExitClassification"
    assert meta["head_kwargs"]["exit_threshold"] == result["threshold"]
    assert {"task.json", "tokenizer.json", "early_exit.json"} <= {p.name for p in out.iterdir()}
    rows = {r["threshold"]: r for r in result["test"]}
    assert rows[0.0]["mean_layers"] == 3.0 and rows[0.0]["differs_from_read_off"] == 0
    assert all(r["differs_from_read_off"] == 0 for r in rows.values())
    assert all(rows[a]["mean_layers"] >= rows[b]["mean_layers"]  # more exits as it grows
               for a, b in zip(sorted(rows), sorted(rows)[1:]))


def test_threshold_zero_is_the_fine_tuned_model_exactly(tuned, exited, task):
    ids, mask, types = _batch(task, tuned)
    plain = from_pretrained(tuned).eval()
    model = from_pretrained(exited[0]).eval()
    model.set_threshold(0.0)
    with torch.no_grad():
        ours, theirs = model(ids, mask, types), plain(ids, mask, types)
    assert torch.equal(ours.logits, theirs.logits)
    assert ours.exit_layers.tolist() == [3] * len(ids)


def test_threshold_one_leaves_every_row_at_block_one(exited, task):
    model = from_pretrained(exited[0]).eval()
    ids, mask, types = _batch(task, exited[0])
    model.set_threshold(1.0)
    with torch.no_grad():
        out = model(ids, mask, types)
        first = model.exit_logits(ids, mask, types)[0]
    assert out.exit_layers.tolist() == [1] * len(ids)
    torch.testing.assert_close(out.logits, first)


def test_a_batch_exits_as_its_rows_do_one_by_one(exited, task):
    model = from_pretrained(exited[0]).eval()
    ids, mask, types = _batch(task, exited[0], 32)
    with torch.no_grad():
        ent = [normalised_entropy(x) for x in model.exit_logits(ids, mask, types)]
        model.set_threshold(float(torch.cat(ent[:2]).median()))  # some leave at 1, some at 2
        batched = model(ids, mask, types)
        alone = [model(ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n])
                 for i, n in enumerate(mask.sum(1).tolist())]
    layers = batched.exit_layers.tolist()
    assert len(set(layers)) >= 2, layers  # the batch really split
    assert layers == [int(a.exit_layers) for a in alone]
    assert batched.logits.argmax(-1).tolist() == [int(a.logits.argmax()) for a in alone]
    torch.testing.assert_close(batched.logits, torch.cat([a.logits for a in alone]),
                               atol=1e-5, rtol=1e-4)


def test_save_load_keeps_the_threshold_and_serving_reports_the_exit(exited, tmp_path):
    """Saved and loaded, predicted, exported (ONNX: full depth) and served over HTTP by the
    real `motian serve` process, which picks PyTorch for it and reports each exit."""
    model = from_pretrained(exited[0])
    model.set_threshold(0.37)
    save_pretrained(model, tmp_path / "m")
    assert from_pretrained(tmp_path / "m").exit_threshold == 0.37
    p = Predictor.load(exited[0])
    results = p(["质量很好，很满意", "太差了，不会再买"])
    assert all(r["label"] in p.labels for r in results)
    assert all(1 <= r["exit_layer"] <= 3 for r in results)
    manifest = export(exited[0], tmp_path / "export")  # ONNX: the full-depth graph
    assert manifest["early_exit"]["threshold"] == from_pretrained(exited[0]).exit_threshold
    assert manifest["head"] == "SequenceClassification"
    assert manifest["onnx"]["max_abs_diff"]["logits"] < 1e-4
    onnx = Predictor.load(tmp_path / "export", backend="onnx")(["质量很好"])
    assert "exit_layer" not in onnx[0]
    assert Predictor.load(tmp_path / "export")(["质量很好"])[0]["exit_layer"] >= 1
    with running(tmp_path / "export") as (_, url):  # auto: PyTorch, despite model.onnx
        status, _, ready = call(url + "/ready")
        assert status == 200 and ready["backend"] == "torch"
        assert ready["exit_threshold"] == manifest["early_exit"]["threshold"]
        status, _, answer = call(url + "/predict", "POST", {"texts": ["质量很好", "太差了"]})
        assert status == 200 and all(1 <= r["exit_layer"] <= 3 for r in answer["results"])


def test_curve_verb_and_cli(exited, capsys):
    result = early_exit_curve(exited[0], max_eval=40, thresholds=[0, 0.5], repeats=0)
    assert [r["threshold"] for r in result["rows"]][0] == 0.0
    assert "| threshold | accuracy | mean layers" in capsys.readouterr().out
    assert main(["early-exit-curve", "--model", str(exited[0]), "--max-eval", "20",
                 "--thresholds", "0", "1", "--repeats", "0"]) == 0
    assert "| 1 | " in capsys.readouterr().out


def test_bad_thresholds_and_models_are_refused(tuned, exited, tmp_path, task):
    config = preset("tiny", vocab_size=50, **TINY)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="threshold .* in \\[0, 1\\]"):
            EarlyExitClassification(config, 2, exit_threshold=bad)
    with pytest.raises(UserError, match="--threshold 2"):
        early_exit(tuned, tmp_path / "x", threshold=2.0, **FAST)
    with pytest.raises(UserError, match="--thresholds value"):
        early_exit(tuned, tmp_path / "x", thresholds=[0.1, 7], **FAST)
    with pytest.raises(UserError, match="2 or more labels"):
        EarlyExitClassification(config, 1)
    with pytest.raises(UserError, match="no task.json"):
        early_exit(tuned.parent, tmp_path / "x", **FAST)
    with pytest.raises(UserError, match="fine-tuned on 'reviews-sentiment', not 'pd98-ner'"):
        early_exit(tuned, tmp_path / "x", task="pd98-ner", **FAST)
    ner = Task("pd98-ner", "token", labels=["PER", "LOC", "ORG"])
    tagger = tmp_path / "tagger"
    tok = load_tokenizer(tuned / "tokenizer.json")
    save_fine_tuned(TokenClassification(preset("tiny", vocab_size=tok.get_vocab_size(),
                                               **TINY), 7), ner, tok, 32, tagger)
    with pytest.raises(UserError, match="TokenClassification .* needs a sequence classifier"):
        early_exit(tagger, tmp_path / "x", **FAST)
    with pytest.raises(UserError, match="has no exits; train them with `motian early-exit"):
        early_exit_curve(tuned)
    assert main(["early-exit", "--model", str(tuned), "--out", str(tmp_path / "y"),
                 "--threshold", "-1"]) != 0
