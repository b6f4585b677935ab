"""`motian serve`: an HTTP JSON API over a `motian export` directory, with dynamic batching.

| endpoint | answer |
|---|---|
| POST /predict | one record of the fields `motian predict` reads -> its output dict; `{"texts": [...]}` (texts, [text, text_pair] pairs or records) -> `{"results": [...]}`; every output carries `"truncated"` |
| GET /health | 200 while the process serves (liveness) |
| GET /ready | 200 once the model is loaded, 503 while draining for shutdown (readiness) |
| GET /metrics | Prometheus text: requests by path and status, latency, batch sizes, queue depth, errors |

Requests are parsed and checked here, in the event loop, so one bad record is answered on its
own (400 invalid JSON, 422 missing or mistyped field, 413 too long with --reject-long) and never
reaches a shared batch; the checked records go through `DynamicBatcher`, and each batch through
`iter_predictions`, the code `motian predict` runs: the same layout, labels and rounding.

FastAPI + uvicorn because both are maintained, asyncio-native and give HTTP/1.1 keep-alive and
graceful shutdown without code of ours; prometheus_client because its text format (escaping,
cumulative histogram buckets, `_created` samples) is easy to get subtly wrong by hand. The
metrics live in a registry per app, so two servers in one process (tests) do not share counts.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from tokenizers import Tokenizer

from motian.errors import UserError
from motian.model.early_exit import saved_threshold
from motian.serving.batcher import DynamicBatcher, QueueFull
from motian.serving.onnx import ONNX_FILE
from motian.serving.predict import (
    LM_HEADS,
    MASK,
    TASK_TYPE,
    Predictor,
    _field,
    _lm_ids,
    as_records,
    iter_predictions,
    load_predictor,
    to_example,
)

PATHS = ("/predict", "/health", "/ready", "/metrics")  # metric labels: no unbounded paths


class TooLong(UserError):
    """An input longer than the model's max_length where it may not be cut (413)."""


# --------------------------------------------------------------------------- checking inputs


class InputCheck:
    """Checks one record the way `iter_predictions` will read it and says whether the model
    will see it cut to `max_length` (the featuriser cuts silently; a client should know)."""

    def __init__(self, p: Predictor, reject_long: bool):
        self.p, self.reject_long = p, reject_long
        # A copy that never truncates, to count the tokens the text really has.
        self.tok = Tokenizer.from_str(p.tokenizer.to_str())
        self.tok.no_truncation()
        self.tok.no_padding()

    def _count(self, text: str | None) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids) if text else 0

    def __call__(self, record: dict, where: str) -> bool:
        """True if the model will see the record cut; UserError (422) for a bad record,
        TooLong (413) for a long one under --reject-long or one that cannot be cut."""
        p, limit = self.p, self.p.max_length
        if p.head in LM_HEADS:
            text = _field(record, where, "text")
            if p.head == "CausalLM":  # keeps the last max_length tokens
                _lm_ids(p, text, where)
                n = self._count(text)
            else:  # cutting would drop [MASK]s: refuse instead
                n = self._count(text.replace(MASK, "")) + text.count(MASK) + 2
                if n > limit:
                    raise TooLong(f"{where}: {n} tokens, more than max_length={limit}; a "
                                  "masked text cannot be cut without losing its [MASK]s")
                _lm_ids(p, text, where)
        else:
            e = to_example(TASK_TYPE[p.head], record, where)
            if TASK_TYPE[p.head] == "pair":  # [CLS] a [SEP] (b [SEP])
                n = self._count(e.text) + self._count(e.text_b) + (3 if e.text_b else 2)
            elif TASK_TYPE[p.head] == "token":
                n = self._count(e.text) + 2
            else:  # span contexts are windowed, choices laid out per candidate: never cut
                n = 0
        if n > limit and self.reject_long:
            raise TooLong(f"{where}: {n} tokens, more than max_length={limit} (the server "
                          "runs with --reject-long; shorten the text)")
        return n > limit


def parse_body(raw: bytes) -> tuple[list[tuple[str, dict]], bool]:
    """(("where", record) pairs, whether the request was a batch) from a request body;
    ValueError for invalid JSON (400), UserError for a body of the wrong shape (422)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"request body is not valid JSON ({err}); send one JSON object") \
            from None
    if not isinstance(body, dict):
        raise UserError(f"body: expected a JSON object, got {type(body).__name__}")
    if "texts" not in body:
        return [("body", body)], False
    texts = body["texts"]
    if not isinstance(texts, list):
        raise UserError(f"body: 'texts' must be a list, got {type(texts).__name__}")
    if not texts:  # an empty batch is a client mistake worth naming, not an empty answer
        raise UserError("body: 'texts' is empty; send at least one text")
    return list(as_records(texts)), True


# --------------------------------------------------------------------------- the app


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("motian_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("motian_request_latency_seconds", "request latency by path",
                                 ["path"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                          2.5, 5, 10))
        self.batch_size = Histogram("motian_batch_size", "items per forward pass",
                                    registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.errors = Counter("motian_errors", "failed requests by kind", ["kind"],
                              registry=self.registry)
        self.queue = Gauge("motian_queue_depth", "items admitted and waiting for a batch",
                           registry=self.registry)


class _Observe:
    """ASGI middleware: count every response by path and status and time it (pure ASGI, not
    BaseHTTPMiddleware, so a client that disconnects cannot break the response task)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in PATHS else "other"
        status = {"code": 500}
        start = time.perf_counter()

        async def observe(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            self.metrics.requests.labels(path, str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def build_app(p: Predictor, describe: dict, max_batch: int = 32, max_wait_ms: float = 5.0,
              max_queue: int = 256, reject_long: bool = False, top_k: int = 5):
    """(the ASGI app to run, the FastAPI app inside it) around a loaded predictor;
    `describe` is what /ready reports."""
    metrics, check = Metrics(), InputCheck(p, reject_long)

    def run_batch(records: list[tuple[str, dict]]) -> list[dict]:
        return list(iter_predictions(p, records, batch_size=max_batch, top_k=top_k))

    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = DynamicBatcher(run_batch, max_batch, max_wait_ms, max_queue,
                                           on_batch=metrics.batch_size.observe)
        app.state.batcher.start()
        yield
        await app.state.batcher.close()  # after uvicorn has answered every open request

    app = FastAPI(title="motian serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.draining = False

    def error(status: int, kind: str, detail: str, headers: dict | None = None):
        metrics.errors.labels(kind).inc()
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.post("/predict")
    async def predict(request: Request):
        try:
            records, batched = parse_body(await request.body())
            truncated = [check(record, where) for where, record in records]
        except ValueError as err:
            return error(400, "invalid_json", str(err))
        except TooLong as err:
            return error(413, "too_long", str(err))
        except UserError as err:
            return error(422, "invalid_input", str(err))
        batcher: DynamicBatcher = request.app.state.batcher
        if len(records) > max_queue:
            return error(413, "too_many", f"body: {len(records)} texts, more than the server "
                         f"admits at once (--max-queue {max_queue}); split the request")
        try:
            metrics.queue.inc(len(records))
            try:
                results = await batcher.submit(records)
            finally:
                metrics.queue.set(batcher.waiting)
        except QueueFull as err:
            # Retry-After: one batch wait is when the queue has moved on; whole seconds.
            return error(503, "overloaded", f"server busy ({err}); retry later",
                         headers={"Retry-After": "1"})
        except Exception as err:  # noqa: BLE001 - a failed batch answers 500, the server lives
            return error(500, "inference", f"inference failed: {type(err).__name__}: {err}")
        results = [r | {"truncated": t} for r, t in zip(results, truncated)]
        return {"results": results} if batched else results[0]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        if request.app.state.draining:
            return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503)
        return {"ready": True} | describe

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return _Observe(app, metrics), app


# --------------------------------------------------------------------------- the verb


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening (also used by benchmarks/peer_server.py,
    so both servers of a load test bind alike); a port in use is a UserError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pick another "
                        "--port (0 picks a free one)") from None
    sock.listen(2048)  # connections made before uvicorn starts wait here, not refused
    return sock


def serve(model: Path, host: str = "127.0.0.1", port: int = 8000,
          backend: Literal["auto", "onnx", "onnx-int8", "torch"] = "auto", max_batch: int = 32,
          max_wait_ms: float = 5.0, max_queue: int = 256, max_length: int | None = None,
          reject_long: bool = False, top_k: int = 5, threads: int = 0,
          tokenizer: Path | None = None, drain_timeout_s: float = 30.0) -> None:
    """Serve a model over HTTP: POST /predict (JSON), GET /health, /ready, /metrics.

    Concurrent requests are batched: a batch runs when it holds --max-batch texts or
    --max-wait-ms after its first; more than --max-queue waiting texts get 503 with
    Retry-After. SIGTERM or Ctrl-C stops accepting, finishes the requests in flight and exits 0.
    Prints the address it listens on (with --port 0, the free port it picked).

    Args:
        model: a `motian export` directory (or, for --backend torch, any motian checkpoint).
        host: address to listen on; the default accepts local clients only.
        port: TCP port; 0 picks a free one.
        backend: onnx (onnxruntime), onnx-int8 (model.int8.onnx of `motian export --int8`),
            torch (PyTorch), or auto: onnx when the directory has model.onnx, else torch
            (int8 is never picked on its own: its accuracy is a trade to choose). An
            early-exit model (`motian early-exit`) exits early with torch only, which auto
            picks for it; each result then reports its "exit_layer".
        max_batch: most texts in one forward pass.
        max_wait_ms: longest a text waits for others to share its batch.
        max_queue: most texts waiting for a batch; beyond it requests get 503.
        max_length: longest input in tokens; default: the fine-tuning length, else 128.
        reject_long: answer 413 to texts longer than max_length instead of cutting them (a cut
            text is answered with "truncated": true).
        top_k: masked / causal LMs: candidate tokens listed.
        threads: CPU threads for inference (0: the backend's default).
        tokenizer: the model's tokenizer, when the directory holds none.
        drain_timeout_s: on shutdown, longest wait for requests in flight.
    """
    if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
        raise UserError("--max-batch and --max-queue must be >= 1, --max-wait-ms >= 0")
    threshold = saved_threshold(model)  # an early-exit model's; None for any other
    if backend == "auto":  # early exit runs in PyTorch only (its ONNX graph is full depth)
        backend = "onnx" if (Path(model) / ONNX_FILE).is_file() and threshold is None \
            else "torch"
    p = load_predictor(Path(model), backend, tokenizer, max_length, threads)
    describe = {"model": str(model), "head": p.head, "backend": backend,
                "max_length": p.max_length, "labels": p.labels}
    if threshold is not None:
        describe["exit_threshold"] = threshold if backend == "torch" else None
    asgi, app = build_app(p, describe, max_batch, max_wait_ms, max_queue, reject_long, top_k)
    sock = listen_socket(host, port)
    config = uvicorn.Config(asgi, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout_s)
    server = _Server(config)
    server.fastapi_app = app
    shown = f"[{host}]" if ":" in host else host
    print(f"motian serve: {p.head} ({backend}) on http://{shown}:{sock.getsockname()[1]}",
          flush=True)
    server.run(sockets=[sock])
    if not server.started:
        raise UserError("motian serve: the server did not start; see the messages above")
    print("motian serve: stopped", file=sys.stderr, flush=True)


class _Server(uvicorn.Server):
    """uvicorn's server, with one change: SIGTERM / SIGINT mean "drain and exit 0". uvicorn
    shuts down gracefully on them (stop accepting, finish open requests, then lifespan
    shutdown), and since 0.29 re-raises the signal afterwards so that the process dies by it;
    a server that finished its work cleanly should exit 0, so the signal is not kept."""

    fastapi_app = None  # the FastAPI app, whose /ready turns 503 once draining starts

    def handle_exit(self, sig, frame) -> None:
        if self.fastapi_app is not None:
            self.fastapi_app.state.draining = True
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
