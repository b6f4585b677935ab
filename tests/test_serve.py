"""`motian serve`: the real server process (`python -m motian.cli serve --port 0`) over a real
exported classifier, spoken to over 127.0.0.1 with urllib: it answers as `motian predict` does,
batches concurrent requests, names bad requests and stays up, refuses overflow with 503 +
Retry-After, and on SIGTERM finishes what it holds and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from motian.serving.predict import predict
from tests import test_export
from tests.test_predict import serve_dir

review_tokenizer = test_export.review_tokenizer  # the session fixture: one vocabulary

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")

LABELS = ["neg", "pos", "neutral"]  # tiny_checkpoint gives 3 outputs
TEXTS = ["这个手机很好用，电池也耐用", "房间太小了", "物流很快，包装完好", "太差了，不会再买"]
LONG = "物流很快" * 30  # 120 characters, more than max_length=32 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, review_tokenizer):
    """A classifier laid out as `motian finetune` saves one (task.json with label names and
    its length), exported to ONNX."""
    return serve_dir(tmp_path_factory.mktemp("serve"), "SequenceClassification",
                     review_tokenizer, task={"name": "reviews", "type": "single",
                                             "labels": LABELS, "max_length": 32})


@contextmanager
def running(model_dir, *options, stop=True):
    """The server process, its base URL; stopped with SIGTERM and checked to exit 0."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "motian.cli", "serve", "--model",
                             str(model_dir), "--port", "0", "--threads", "1", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the port bound
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, f"no address printed: {line!r} {proc.stderr.read() if not line else ''}"
        yield proc, f"http://127.0.0.1:{match.group(1)}"
        if stop:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def call(url, method="GET", body=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one request; HTTP errors are answers too."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            status, headers, text = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as err:
        status, headers, text = err.code, err.headers, err.read().decode()
    is_json = headers.get("content-type", "").startswith("application/json")
    return status, headers, json.loads(text) if is_json else text


def metric(text: str, sample: str) -> float:
    """The value of a Prometheus sample (name and labels as printed), 0 when absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def batches_over_one(url) -> float:
    text = call(url + "/metrics")[2]
    return metric(text, "motian_batch_size_count") - \
        metric(text, 'motian_batch_size_bucket{le="1.0"}')


def same(a: dict, b: dict) -> None:
    assert a["label"] == b["label"]
    assert a["probs"].keys() == b["probs"].keys() == set(LABELS)
    for name in LABELS:
        assert abs(a["probs"][name] - b["probs"][name]) <= 1e-5


@pytest.fixture(scope="module")
def server(model_dir):
    with running(model_dir, "--max-batch", "16", "--max-wait-ms", "50") as (proc, url):
        yield url


def test_health_ready_and_predictions_as_motian_predict(server, model_dir):
    assert call(server + "/health")[:3:2] == (200, {"status": "ok"})
    status, _, ready = call(server + "/ready")
    assert status == 200 and ready["ready"] and ready["backend"] == "onnx"
    assert ready["labels"] == LABELS and ready["max_length"] == 32
    expected = predict(model_dir, TEXTS, backend="onnx")
    status, _, one = call(server + "/predict", "POST", {"text": TEXTS[0]})
    assert status == 200 and one["truncated"] is False
    same(one, expected[0])
    status, _, many = call(server + "/predict", "POST", {"texts": TEXTS})
    assert status == 200 and len(many["results"]) == len(TEXTS)
    for got, want in zip(many["results"], expected):
        same(got, want)
    pair = call(server + "/predict", "POST", {"id": 7, "text": TEXTS[1], "text_pair": TEXTS[3]})
    same(pair[2], predict(model_dir, [{"text": TEXTS[1], "text_pair": TEXTS[3]}],
                          backend="onnx")[0])
    assert pair[2]["id"] == 7


def test_concurrent_requests_share_batches(server):
    before = batches_over_one(server)
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: call(server + "/predict", "POST",
                                               {"text": TEXTS[i % 4] + str(i)}), range(32)))
    assert [a[0] for a in answers] == [200] * 32
    assert all(a[2]["label"] in LABELS for a in answers)
    assert batches_over_one(server) > before  # dynamic batching happened
    text = call(server + "/metrics")[2]
    assert 'motian_requests_total{path="/predict",status="200"}' in text


def test_bad_requests_are_named_and_the_server_stays_up(server):
    status, _, body = call(server + "/predict", "POST", raw=b'{"text": ')
    assert status == 400 and "not valid JSON" in body["detail"]
    status, _, body = call(server + "/predict", "POST", {"txt": "好"})
    assert status == 422 and "'text'" in body["detail"]
    status, _, body = call(server + "/predict", "POST", {"text": 3})
    assert status == 422 and "text must be a str" in body["detail"]
    status, _, body = call(server + "/predict", "POST", {"texts": []})
    assert status == 422 and "empty" in body["detail"]  # an empty batch is refused, not echoed
    status, _, body = call(server + "/predict", "POST", {"texts": ["好", 5]})
    assert status == 422 and "input 1" in body["detail"]
    status, _, body = call(server + "/predict", "POST", {"text": LONG})
    assert status == 200 and body["truncated"] is True and body["label"] in LABELS
    # A client that sends a request and goes away before the answer.
    host, port = server.removeprefix("http://").split(":")
    payload = json.dumps({"text": TEXTS[0]}).encode()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    time.sleep(0.2)
    assert call(server + "/predict", "POST", {"text": TEXTS[0]})[0] == 200
    metrics = call(server + "/metrics")[2]
    assert 'motian_errors_total{kind="invalid_input"} 4.0' in metrics
    assert 'motian_requests_total{path="/predict",status="400"} 1.0' in metrics


def test_overflow_is_refused_and_sigterm_drains(model_dir):
    """Two requests wait in a 1.5 s batch window filling the queue (--max-queue 2): a third is
    refused with 503 + Retry-After; SIGTERM then lets both finish and the process exits 0."""
    with running(model_dir, "--max-queue", "2", "--max-wait-ms", "1500", "--reject-long",
                 stop=False) as (proc, url):
        assert call(url + "/predict", "POST", {"text": LONG})[0] == 413  # --reject-long
        answers: list = [None, None]

        def ask(i):
            answers[i] = call(url + "/predict", "POST", {"text": TEXTS[i]})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while metric(call(url + "/metrics")[2], "motian_queue_depth") < 2:
            assert time.monotonic() < deadline, "the two requests never queued"
            time.sleep(0.02)
        status, headers, body = call(url + "/predict", "POST", {"text": TEXTS[2]})
        assert status == 503 and headers["Retry-After"] == "1" and "busy" in body["detail"]
        proc.send_signal(signal.SIGTERM)  # while both wait for their batch
        for t in threads:
            t.join(timeout=20)
        assert [a[0] for a in answers] == [200, 200]
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
        assert "motian serve: stopped" in proc.stderr.read()
