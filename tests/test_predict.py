"""`motian predict` / `motian fill-mask`: every head from both backends gives the same answers,
label names come from the checkpoint, stdin works through the real CLI, bad input is named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from motian.errors import UserError
from motian.serving.export import export
from motian.serving.predict import (
    fill_mask,
    iter_predictions,
    load_predictor,
    predict,
    read_records,
)
from tests import test_export
from tests.test_export import tiny_checkpoint

review_tokenizer = test_export.review_tokenizer  # the session fixture: one vocabulary

pytest.importorskip("onnxruntime")

RECORDS = {
    "SequenceClassification": [
        {"id": "a", "text": "这个手机很好用，电池也耐用"},
        {"id": "b", "text": "房间太小了", "text_pair": "服务态度差，不会再来"},
        {"text": "物流很快" * 60},  # longer than max_length: cut
    ],
    "TokenClassification": [{"text": "江泽民在北京会见了外宾"}, {"text": "上海市人民政府发布通知"}],
    "SpanExtraction": [
        {"question": "首都是哪里", "context": "北京是中国的首都，上海是最大的城市。"},
        # A context several windows long: the answer is searched in every window.
        {"question": "哪里", "context": "这家酒店的位置很好，离地铁站很近。" * 12},
    ],
    "MultipleChoice": [
        {"text": "他买了一部新手机", "question": "他买了什么", "choices": ["手机", "电脑", "书"]},
        {"text": "今天下雨", "choices": ["带伞", "不带伞"]},
    ],
    "MaskedLM": [{"text": "今天天[MASK]很好，我们去公[MASK]散步"}, {"text": "[MASK]"}],
    "CausalLM": [{"text": "今天天气很好"}, {"text": "我们"}],
}


def serve_dir(tmp_path, head, tokenizer, task=None):
    ckpt = tiny_checkpoint(tmp_path / f"ckpt-{head}", head, tokenizer,
                           **({"num_labels": 7} if head == "TokenClassification" else {}))
    if task is not None:  # what `motian finetune` saves beside the model
        (ckpt / "task.json").write_text(json.dumps(task))
    export(ckpt, tmp_path / f"serve-{head}", check=False)
    return tmp_path / f"serve-{head}"


def run_both(directory, records, **kwargs):
    numbered = [(f"test:{i}", r) for i, r in enumerate(records)]
    return [list(iter_predictions(load_predictor(directory, backend), numbered, **kwargs))
            for backend in ("torch", "onnx")]


def assert_same(a, b, path="out"):
    """Equal structure and strings; numbers within 1e-4 (the export parity bound)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-4, path
    else:
        assert a == b, path


@pytest.mark.parametrize("head", sorted(RECORDS))
def test_torch_and_onnx_backends_agree(tmp_path, review_tokenizer, head):
    directory = serve_dir(tmp_path, head, review_tokenizer)
    records = RECORDS[head]
    torch_out, onnx_out = run_both(directory, records, batch_size=2, top_k=3)
    assert len(torch_out) == len(records)
    assert_same(torch_out, onnx_out)
    for record, result in zip(records, torch_out):
        assert result.get("id") == record.get("id")
        check_shape(head, record, result)


def check_shape(head, record, result):
    if head == "SequenceClassification":
        assert result["label"] in result["probs"]
        assert abs(sum(result["probs"].values()) - 1) < 1e-4
    elif head == "TokenClassification":
        assert "".join(result["tokens"]) == record["text"]  # one token per character
        assert len(result["tags"]) == len(record["text"])
    elif head == "SpanExtraction":
        context = record["context"]
        assert result["answer"] == context[result["start"]:result["end"]] != ""
    elif head == "MultipleChoice":
        assert result["answer"] == record["choices"][result["choice"]]
        assert len(result["probs"]) == len(record["choices"])
    elif head == "MaskedLM":
        assert all(len(m) == 3 for m in result["masks"])
        assert len(result["masks"]) == record["text"].count("[MASK]")
        assert "[MASK]" not in result["text"]
    elif head == "CausalLM":
        assert len(result["next"]) == 3


def test_label_names_come_from_the_checkpoint(tmp_path, review_tokenizer):
    directory = serve_dir(tmp_path, "TokenClassification", review_tokenizer,
                          task={"type": "token", "labels": ["PER", "LOC", "ORG"],
                                "scheme": "BIO"})
    (result,) = run_both(directory, [{"text": "江泽民在北京"}])[1]
    assert set(result["tags"]) <= {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}
    assert result["entities"]  # (seeded random weights: this text gets entities)
    for entity in result["entities"]:
        assert entity["type"] in ("PER", "LOC", "ORG")
        assert entity["text"] == "江泽民在北京"[entity["start"]:entity["end"]]
    directory = serve_dir(tmp_path, "SequenceClassification", review_tokenizer,
                          task={"type": "single", "labels": ["neg", "pos", "neutral"],
                                "max_length": 64})
    (result,) = run_both(directory, [{"text": "很好"}])[0]
    assert set(result["probs"]) == {"neg", "pos", "neutral"}
    assert load_predictor(directory, "onnx").max_length == 64  # the fine-tuning length


def test_predict_file_and_fill_mask_verbs(tmp_path, review_tokenizer):
    directory = serve_dir(tmp_path, "MaskedLM", review_tokenizer)
    inputs = tmp_path / "in.txt"
    inputs.write_text("今天[MASK]气很好\n\n{\"id\": 7, \"text\": \"北[MASK]\"}\n", encoding="utf-8")
    n = predict(directory, inputs, tmp_path / "out.jsonl", backend="onnx", top_k=2)
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == len(lines) == 2 and lines[1]["id"] == 7
    (result,) = fill_mask(directory, "今天[MASK]气很好", top_k=2, out=tmp_path / "one.jsonl")
    assert result == lines[0]
    with pytest.raises(UserError, match="no \\[MASK\\]"):
        fill_mask(directory, "没有掩码")


def test_cli_reads_stdin_with_the_onnx_backend(tmp_path, review_tokenizer):
    directory = serve_dir(tmp_path, "SequenceClassification", review_tokenizer)
    text = "这个手机很好用\n{\"id\": 2, \"text\": \"太差了\"}\n"
    proc = subprocess.run([sys.executable, "-m", "motian.cli", "predict", "--model",
                           str(directory), "--backend", "onnx"], input=text,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == 2 and lines[1]["id"] == 2 and lines[0]["label"].startswith("LABEL_")


def test_bad_input_and_bad_model_are_named(tmp_path, review_tokenizer):
    directory = serve_dir(tmp_path, "SpanExtraction", review_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "context": "c"}\n\n{"question": "q", "context": }\n',
                   encoding="utf-8")
    with pytest.raises(UserError, match=f"{bad}:3: not valid JSON"):
        predict(directory, bad, tmp_path / "out.jsonl")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"context": "北京"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"{missing}:1: no 'question' field"):
        predict(directory, missing, tmp_path / "out.jsonl", backend="onnx")
    assert list(read_records(missing))[0][0] == f"{missing}:1"
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(UserError, match="not-a-model"):
        predict(empty, missing)
    ckpt = tmp_path / "ckpt-SpanExtraction"  # a checkpoint, not exported: no model.onnx
    with pytest.raises(UserError, match="no model.onnx"):
        load_predictor(ckpt, "onnx")


def test_serves_a_fine_tuned_model_as_evaluate_scores_it(tmp_path, review_tokenizer):
    """The contract with `motian finetune`: its saved model (task.json, tokenizer.json) exports
    and serves with no other input, and both backends predict exactly what `motian evaluate`
    predicts for the same examples."""
    from motian.finetuning import evaluate, finetune
    from motian.tasks.builtin import load_builtin
    from tests.settings_helpers import typed

    finetune("reviews-sentiment", tmp_path / "ft", tokenizer=review_tokenizer, seeds=[1],
             max_train=200, max_eval=60, **typed(epochs=1, lr=1e-3))
    model = tmp_path / "ft" / "seed-1" / "model"
    evaluate(model, split="test", max_eval=60, out=tmp_path / "ev")
    (scored,) = (tmp_path / "ev").glob("*.jsonl")
    chosen = [json.loads(line) for line in scored.read_text().splitlines()]
    task = load_builtin("reviews-sentiment")
    text = {e.guid: e.text for e in task.splits["test"]}
    export(model, tmp_path / "serve")
    records = [{"id": c["id"], "text": text[c["id"]]} for c in chosen]
    for outputs in run_both(tmp_path / "serve", records):
        assert [o["label"] for o in outputs] == [task.labels[c["prediction"]] for c in chosen]


def test_texts_in_predictions_out_from_python(tmp_path, review_tokenizer):
    """`motian.predict(model, texts)` on a real fine-tuned model: a list of dicts in memory,
    in order, the same answers as the file verb and as `evaluate`; pairs and dicts too; a
    kept `Predictor` answers the same; a bad item is named by its position."""
    import motian
    from motian.finetuning import evaluate, finetune
    from motian.serving.predict import Predictor
    from motian.tasks.builtin import load_builtin
    from tests.settings_helpers import typed

    finetune("reviews-sentiment", tmp_path / "ft", tokenizer=review_tokenizer, seeds=[1],
             max_train=96, max_eval=40, **typed(epochs=1, lr=1e-3))
    model = tmp_path / "ft" / "seed-1" / "model"
    evaluate(model, split="test", max_eval=40, out=tmp_path / "ev")
    (scored,) = (tmp_path / "ev").glob("*.jsonl")
    chosen = [json.loads(line) for line in scored.read_text().splitlines()]
    task = load_builtin("reviews-sentiment")
    text = {e.guid: e.text for e in task.splits["test"]}
    texts = [text[c["id"]] for c in chosen]
    results = motian.predict(model, texts, batch_size=16)
    assert isinstance(results, list) and len(results) == len(texts)
    assert [r["label"] for r in results] == [task.labels[c["prediction"]] for c in chosen]
    pairs = [(texts[0], texts[1]), {"id": "x", "text": texts[2], "text_pair": texts[3]}]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (
        {"text": texts[0], "text_pair": texts[1]}, pairs[1])), encoding="utf-8")
    assert predict(model, inputs, tmp_path / "out.jsonl") == 2
    from_file = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert motian.predict(model, pairs) == from_file and from_file[1]["id"] == "x"
    kept = Predictor.load(model)
    assert kept(texts[:5]) == results[:5] and kept(texts[0]) == results[:1]
    with pytest.raises(UserError, match="input 1: expected a text"):
        kept(["好", 3])
