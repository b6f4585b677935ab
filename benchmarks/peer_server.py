"""The peer for benchmarks/serving_load.py: a plain HTTP server around `transformers`'
`pipeline("text-classification")`, answering one request at a time.

    python benchmarks/peer_server.py --model runs/serve/hf --threads 1 --port 0
    # peer: text-classification pipeline (torch, 1 thread) on http://127.0.0.1:PORT

| endpoint | answer |
|---|---|
| POST /predict | `{"text": ...}` -> `{"label": ..., "score": ...}` (the pipeline's own answer) |
| GET /health | 200 once the pipeline is loaded |

This is what a first deployment of a Hugging Face model usually looks like: FastAPI on one
uvicorn worker, a synchronous endpoint calling the pipeline on the one text it received. The
same HTTP stack as `motian serve` (uvicorn, FastAPI, keep-alive, the same listen backlog), so the
load test compares what each does with a request, not two HTTP implementations. The lock makes it
one forward pass at a time (FastAPI runs `def` endpoints in a thread pool; without the lock
several pipeline calls would share the cores at once, which a pipeline object is not meant
for); parsing and answering other connections still overlap with that pass.

Inputs are cut to `--max-length` tokens as `motian serve` cuts them (the fine-tuning length).
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from transformers import pipeline

from motian.serving.server import listen_socket


def build_app(model: Path, max_length: int) -> FastAPI:
    """The peer's app around `pipeline("text-classification")` of a Hugging Face directory
    (motian's remote-code models included)."""
    classify = pipeline("text-classification", model=str(model), tokenizer=str(model),
                        trust_remote_code=True, device="cpu")
    lock = threading.Lock()
    app = FastAPI(docs_url=None, redoc_url=None)

    @app.post("/predict")
    def predict(body: dict):
        text = body.get("text")
        if not isinstance(text, str):
            return JSONResponse({"detail": "body: send {\"text\": \"...\"}"}, status_code=422)
        with lock:  # one forward pass at a time
            return classify(text, truncation=True, max_length=max_length)[0]

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face directory")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    app = build_app(args.model, args.max_length)
    sock = listen_socket("127.0.0.1", args.port)  # loopback only
    print(f"peer: text-classification pipeline (torch, {torch.get_num_threads()} thread(s)) on "
          f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(
        sockets=[sock])


if __name__ == "__main__":
    main()
