"""`motian export --int8`: the quantised graph is written, smaller, checked against PyTorch and
on the bundled task's test split, agrees with fp32 on real text, is read by `motian predict`
and `motian serve` (--backend onnx-int8), and the ways it cannot be made are named."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from motian.data.sources import iter_reviews
from motian.errors import UserError
from motian.serving.export import export
from motian.serving.predict import load_predictor, predict
from tests import test_export
from tests.test_export import tiny_checkpoint
from tests.test_serve import call, running

review_tokenizer = test_export.review_tokenizer  # the session fixture: one vocabulary

pytest.importorskip("onnxruntime")

# A random-weight tiny model's logits are small (|logit| ~ 0.1-1); int8 weights with dynamic
# uint8 activations move them by ~1e-2 at most (6.6e-3 measured on the distilled student).
LOGIT_TOLERANCE = 0.05
TEXTS = [t for t, _, _ in itertools.islice(iter_reviews(), 1, 400, 5)]  # 80 real reviews


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, review_tokenizer):
    """A tiny classifier whose task card names the bundled reviews-sentiment task (as
    `motian finetune` saves one), exported with --int8."""
    root = tmp_path_factory.mktemp("int8")
    ckpt = tiny_checkpoint(root / "ckpt", "SequenceClassification", review_tokenizer,
                           num_labels=2)
    (ckpt / "task.json").write_text(json.dumps(
        {"name": "reviews-sentiment", "type": "single", "labels": ["negative", "positive"],
         "max_length": 32}))
    export(ckpt, root / "out", int8=True)
    return root / "out"


def test_int8_is_written_smaller_and_checked(int8_dir):
    manifest = json.loads((int8_dir / "export.json").read_text())
    entry = manifest["int8"]
    assert entry["file"] == "model.int8.onnx" and entry["op_types"] == ["MatMul"]
    assert (int8_dir / "model.int8.onnx").stat().st_size < \
        (int8_dir / "model.onnx").stat().st_size
    assert 0 < entry["max_abs_diff"]["logits"] < LOGIT_TOLERANCE  # quantised, and close
    test = entry["test"]  # the card names a bundled task: scored on its test split
    assert test["task"] == "reviews-sentiment" and test["metric"] == "accuracy"
    assert test["examples"] > 1000
    assert test["drop"] == pytest.approx(test["fp32"] - test["int8"])
    assert test["within_1_point"] == (test["drop"] <= 0.01)


def test_int8_predictions_agree_with_fp32_on_real_text(int8_dir):
    fp32, int8 = (load_predictor(int8_dir, backend) for backend in ("onnx", "onnx-int8"))
    batch = fp32.tokenizer.encode_batch(TEXTS[:32])
    ids = np.zeros((32, 32), dtype=np.int64)
    for i, enc in enumerate(batch):
        row = enc.ids[:32]
        ids[i, :len(row)] = row
    inputs = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64),
              "token_type_ids": np.zeros_like(ids)}
    a, b = fp32.run(inputs)["logits"], int8.run(inputs)["logits"]
    assert np.abs(a - b).max() < LOGIT_TOLERANCE
    # Labels through `motian predict`: equal on most texts (a near-tie may flip).
    labels = [[r["label"] for r in predict(int8_dir, TEXTS, backend=backend)]
              for backend in ("onnx", "onnx-int8")]
    same = sum(x == y for x, y in zip(*labels)) / len(TEXTS)
    assert same >= 0.9, f"int8 labels agree with fp32 on only {same:.0%} of texts"


def test_serve_answers_from_the_int8_graph(int8_dir):
    expected = predict(int8_dir, TEXTS[:4], backend="onnx-int8")
    with running(int8_dir, "--backend", "onnx-int8") as (_, url):
        status, _, body = call(url + "/predict", "POST", {"texts": TEXTS[:4]})
    assert status == 200
    assert [r["label"] for r in body["results"]] == [r["label"] for r in expected]


def test_int8_failures_are_named(tmp_path, review_tokenizer, int8_dir):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "SequenceClassification", review_tokenizer)
    with pytest.raises(UserError, match="--int8 quantises the ONNX graph"):
        export(ckpt, tmp_path / "hf-only", format="hf", int8=True)
    with pytest.raises(UserError, match="no task.json"):  # nothing to score the data with
        export(ckpt, tmp_path / "no-card", int8=True, check_data=tmp_path, check=False)
    export(ckpt, tmp_path / "fp32-only", check=False)  # no --int8: no model.int8.onnx
    with pytest.raises(UserError, match=r"no model\.int8\.onnx.*--int8"):
        load_predictor(tmp_path / "fp32-only", "onnx-int8")
