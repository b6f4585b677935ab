"""benchmarks/serving_load.py: its numbers on known latencies, its load generator against the
real `motian serve` process and the real peer (benchmarks/peer_server.py: a transformers
pipeline behind uvicorn), and errors, not hangs, from servers that refuse or never answer."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
from collections import Counter

import pytest

from benchmarks.serving_load import (
    ROOT,
    LoadResult,
    check_model,
    percentile,
    run_load,
    started,
)
from motian.errors import UserError
from motian.serving.export import export
from motian.serving.predict import length_groups, load_predictor, predict
from motian.tasks.features import Feature
from tests.test_serve import (  # noqa: F401 - model_dir and review_tokenizer are fixtures
    LABELS,
    LONG,
    TEXTS,
    call,
    model_dir,
    review_tokenizer,
    running,
)

pytest.importorskip("transformers")

ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def test_percentiles_and_summary_on_known_latencies():
    latencies = [i / 1000 for i in range(1, 101)]  # 1 .. 100 ms
    random.Random(0).shuffle(latencies)
    result = LoadResult(clients=4, requested=105, latencies_s=latencies,
                        errors=Counter({"HTTP 503": 2, "TimeoutError": 1}), wall_s=2.0)
    s = result.summary()
    assert (s["p50_ms"], s["p95_ms"], s["p99_ms"]) == pytest.approx((50, 95, 99))
    assert s["ok"] == 100 and s["errors"] == 3 and s["unsent"] == 2
    assert s["requests_per_s"] == pytest.approx(50.0)  # answered requests / wall time
    assert s["error_kinds"] == {"HTTP 503": 2, "TimeoutError": 1}
    assert percentile([7.0], 99) == 7.0 and percentile([3.0, 1.0], 50) == 1.0
    assert math.isnan(percentile([], 50))
    assert LoadResult(1, 0).summary()["requests_per_s"] == 0.0


def test_runner_against_real_motian_serve(model_dir):  # noqa: F811
    with running(model_dir) as (_, url):
        result = run_load(url, TEXTS, clients=2, requests=7, timeout_s=30)
    assert (len(result.latencies_s), sum(result.errors.values()), result.unsent) == (7, 0, 0)
    s = result.summary()
    assert s["ok"] == 7 and s["requests_per_s"] > 0 and 0 < s["p50_ms"] <= s["p99_ms"]


def test_peer_server_answers_as_the_model_does(model_dir, tmp_path):  # noqa: F811
    """The peer on the Hugging Face export of the served model: the same label and
    probability as `motian predict`, 422 for a body without a text, and the runner's counts."""
    export(model_dir, tmp_path / "out", format="hf", check=False)
    command = [sys.executable, str(ROOT / "benchmarks/peer_server.py"), "--model",
               str(tmp_path / "out/hf"), "--port", "0", "--threads", "1", "--max-length", "32"]
    with started(command, ENV, tmp_path / "peer.log") as (proc, url):
        status, _, answer = call(url + "/predict", "POST", {"text": TEXTS[0]})
        want = predict(model_dir, [TEXTS[0]], backend="torch")[0]
        assert status == 200 and answer["label"] == want["label"] in LABELS
        assert answer["score"] == pytest.approx(want["probs"][want["label"]], abs=1e-4)
        assert call(url + "/predict", "POST", {"txt": TEXTS[0]})[0] == 422
        result = run_load(url, TEXTS, clients=2, requests=4)
        assert (len(result.latencies_s), sum(result.errors.values())) == (4, 0)
    assert proc.poll() is not None  # stopped when the block ended


def test_a_predictor_builds_its_featurizer_once(model_dir):  # noqa: F811
    """Building a featurizer copies the tokenizer; `motian serve` runs one batch after another
    through the same predictor, so it is built on the first batch and kept."""
    p = load_predictor(model_dir, "onnx")
    first = p(TEXTS[:2])
    assert list(p.featurizers) == [("pair", 32)]
    kept = p.featurizers[("pair", 32)]
    assert p(TEXTS[:2]) == first and p.featurizers == {("pair", 32): kept}


def test_batches_group_features_of_similar_length():
    def feature(i, n, choices=0):
        ids = [[1] * n] * choices if choices else [1] * n
        return Feature(example=i, input_ids=ids, token_type_ids=ids)

    lengths = [5, 100, 6, 7, 60, 9, 8]
    groups = list(length_groups([feature(i, n) for i, n in enumerate(lengths)], batch_size=3))
    assert [[len(f.input_ids) for f in g] for g in groups] == [[5, 6, 7], [8, 9], [60], [100]]
    assert sorted(f.example for g in groups for f in g) == list(range(len(lengths)))
    choices = [feature(0, 40, choices=2), feature(1, 10, choices=3)]  # by the longest candidate
    assert [[f.example for f in g] for g in length_groups(choices, 8)] == [[1], [0]]


def test_grouped_batches_answer_each_text_as_alone(model_dir):  # noqa: F811
    """Texts of very different lengths in one call (so regrouped and reordered inside it) get
    the answers they get one at a time, in their own order."""
    texts = [LONG, TEXTS[1], TEXTS[0] * 3, "好", TEXTS[2], TEXTS[3] * 2]
    p = load_predictor(model_dir, "onnx")
    alone = [p([text])[0] for text in texts]
    # The tiny model's answers differ from text to text by ~1e-5: a mix-up would show.
    assert len({tuple(a["probs"].values()) for a in alone}) == len(texts)
    for got, want in zip(p(texts, batch_size=4), alone, strict=True):
        assert got["label"] == want["label"]
        assert got["probs"] == pytest.approx(want["probs"], abs=2e-6)  # padding: float noise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_and_silent_servers_are_errors_not_hangs():
    refused = run_load(f"http://127.0.0.1:{_free_port()}", TEXTS, clients=2, requests=5,
                       timeout_s=1)
    assert refused.latencies_s == [] and refused.errors == {"ConnectionRefusedError": 5}
    # Accepts connections (the kernel's backlog) but never answers: every request times out,
    # and the level stops at its time limit with the rest reported as unsent.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = run_load(url, TEXTS, clients=2, requests=50, timeout_s=0.3, time_limit_s=1.0)
    assert result.latencies_s == [] and set(result.errors) == {"TimeoutError"}
    assert result.unsent > 0 and sum(result.errors.values()) + result.unsent == 50


def test_a_model_that_cannot_be_load_tested_is_named(tmp_path, model_dir):  # noqa: F811
    with pytest.raises(UserError, match=r"config\.json: no motian model there; run `make demo`"):
        check_model(tmp_path / "nothing")
    check_model(model_dir)  # a classifier passes
    config = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm/config.json").write_text(json.dumps(config | {"head": "MaskedLM"}))
    with pytest.raises(UserError, match=r"lm/config\.json: head is 'MaskedLM'"):
        check_model(tmp_path / "lm")

