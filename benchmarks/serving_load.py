"""Load test: `motian serve` (onnx, onnx-int8, torch) beside a transformers pipeline server.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serving_load.py           # the demo student
    .venv/bin/python benchmarks/serving_load.py --checkpoint runs/x/model --requests 200 \
        --clients 1 8 --backends onnx

The checkpoint (default: the distilled student of `make demo`) is exported once with `motian
export --format both --int8`; from that one directory, one `motian serve` process per backend
and the peer (benchmarks/peer_server.py: FastAPI + uvicorn around `pipeline("text-
classification")` of the same weights in out/hf, one request at a time) are started as real
processes on free ports of 127.0.0.1, every one with the same thread count (`--threads`, and
OMP_NUM_THREADS), and all are stopped at the end: on success, on an error, on Ctrl-C or SIGTERM.

For each number of concurrent clients (1, 8, 32, 128), the servers take turns: every server
gets `--warmup` requests (not counted), then `--requests` requests from that many clients,
each client sending one review per request back to back on its own keep-alive connection
until the total is reached. Taking turns level by level means load from other processes on a
shared machine falls on all servers alike. The texts are the test split of reviews-sentiment
(the bundled reviews, deduplicated; texts the student never trained on), shuffled with a fixed
seed, the same sequence for every server.

Per server and level: p50 / p95 / p99 latency (nearest rank), requests/s (answered requests
over the level's wall time), errors (an exception, a timeout, a status other than 200 or an
answer without a label), and the server's CPU time per answered request (user + system, all its
threads, from /proc: on a shared machine other jobs stretch latency, not this). Every request
has a timeout, and a whole level stops at `--time-limit-s` (requests not sent by then are
reported as unsent), so the run is bounded: with the defaults the load takes 4.8 min at most,
and the export and server starts add 1-2 min on a loaded 2-core machine.

The load generator is threads with `http.client`: standard library, one thread and one
connection per client. It runs on the same machine as the servers and costs them the same.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import platform
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from motian.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
STUDENT = ROOT / "runs/demo/distill/seed-1/model"
BACKENDS = ("onnx", "onnx-int8", "torch")
PEER = "peer"


# --------------------------------------------------------------------------- the numbers


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of `values` at or below it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class LoadResult:
    """What one level of load did: latency of every answered request, errors by kind."""

    clients: int
    requested: int
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    wall_s: float = 0.0

    @property
    def unsent(self) -> int:
        return self.requested - len(self.latencies_s) - sum(self.errors.values())

    def summary(self) -> dict:
        ms = [1e3 * s for s in self.latencies_s]
        return {"clients": self.clients, "requests": self.requested, "ok": len(ms),
                "errors": sum(self.errors.values()), "error_kinds": dict(self.errors),
                "unsent": self.unsent, "wall_s": self.wall_s,
                "requests_per_s": len(ms) / self.wall_s if self.wall_s > 0 else 0.0,
                "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
                "p99_ms": percentile(ms, 99)}


# --------------------------------------------------------------------------- the load


def run_load(url: str, texts: list[str], clients: int, requests: int, timeout_s: float = 30.0,
             time_limit_s: float = 120.0) -> LoadResult:
    """`requests` POST /predict {"text": ...} from `clients` concurrent clients, each on its own
    keep-alive connection, back to back until the total is sent or `time_limit_s` has passed."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    result = LoadResult(clients, requests)
    tickets = itertools.count()  # next() is atomic under the GIL: one ticket per request
    lock, stop = threading.Lock(), threading.Event()
    start = time.perf_counter()
    deadline = start + time_limit_s

    def client() -> None:
        conn = None
        while not stop.is_set() and (i := next(tickets)) < requests and \
                time.perf_counter() < deadline:
            body = json.dumps({"text": texts[i % len(texts)]}, ensure_ascii=False).encode()
            sent = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
                conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = response.read()
                error = None if response.status == 200 else f"HTTP {response.status}"
                if error is None and "label" not in json.loads(answer):
                    error = "no label in the answer"
            except (OSError, http.client.HTTPException, ValueError) as err:
                error = type(err).__name__
                if conn is not None:
                    conn.close()
                conn = None  # reconnect for the next request
            elapsed = time.perf_counter() - sent
            with lock:
                if error is None:
                    result.latencies_s.append(elapsed)
                else:
                    result.errors[error] += 1
        if conn:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        for t in threads:  # each request is bounded by timeout_s, so this ends
            t.join()
    finally:  # Ctrl-C: no client starts another request while the servers are stopped
        stop.set()
    result.wall_s = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------- the servers


@contextmanager
def started(command: list[str], env: dict, log: Path, ready_timeout_s: float = 120.0):
    """A server process that prints its http://127.0.0.1:PORT address on its first stdout line
    (as `motian serve` and the peer do); yields (process, base URL); SIGTERM (then kill) at
    the end, whatever ended the block. stderr goes to `log`, shown if the server never starts."""
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                cwd=ROOT)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], ready_timeout_s)
        line = proc.stdout.readline() if ready else ""
        if "http://127.0.0.1:" not in line:
            raise RuntimeError(f"{command[:4]} did not start within {ready_timeout_s:.0f} s: "
                               f"{line!r}\n{log.read_text()[-2000:]}")
        yield proc, line.split()[-1].strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_commands(serving: Path, backends: list[str], threads: int, max_length: int,
                    max_wait_ms: float) -> dict[str, list[str]]:
    """{name: command line}: `motian serve` per backend, and the peer on out/hf."""
    commands = {b: [sys.executable, "-m", "motian.cli", "serve", "--model", str(serving),
                    "--backend", b, "--port", "0", "--threads", str(threads),
                    "--max-wait-ms", str(max_wait_ms)] for b in backends}
    commands[PEER] = [sys.executable, str(ROOT / "benchmarks/peer_server.py"), "--model",
                      str(serving / "hf"), "--port", "0", "--threads", str(threads),
                      "--max-length", str(max_length)]
    return commands


def check_model(checkpoint: Path) -> None:
    """UserError unless `checkpoint` is a motian classifier this benchmark can serve."""
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        raise UserError(f"{config}: no motian model there; run `make demo` (it writes the "
                        "student this benchmark loads by default) or give --checkpoint a "
                        "fine-tuned classifier")
    head = json.loads(config.read_text(encoding="utf-8")).get("head")
    if head != "SequenceClassification":
        raise UserError(f"{config}: head is {head!r}; the load test sends single texts to a "
                        "SequenceClassification model (the peer is a text-classification "
                        "pipeline); give --checkpoint a fine-tuned classifier")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far; NaN off Linux. On a
    shared machine this is the steadier measure of a server's cost per request: other jobs
    stretch its latency, not the work it does."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (command name)"
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def review_texts() -> list[str]:
    """The test split of reviews-sentiment (distinct bundled reviews), shuffled with a fixed
    seed: the split is in file order, negative reviews first and long ones early, so without
    the shuffle the first requests would not be a fair sample of lengths."""
    from motian.tasks.builtin import load_builtin

    texts = [e.text for e in load_builtin("reviews-sentiment").splits["test"]]
    random.Random(0).shuffle(texts)
    return texts


# --------------------------------------------------------------------------- the run


def _stop_on_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C, so the servers are stopped on the way out."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=STUDENT,
                        help="a fine-tuned motian classifier (default: the demo's student)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=400,
                        help="measured, per server and level")
    parser.add_argument("--warmup", type=int, default=50, help="per level, not counted")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--threads", type=int, default=1, help="every server gets these")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="motian serve's batch window (its default)")
    parser.add_argument("--timeout-s", type=float, default=20.0, help="per request")
    parser.add_argument("--time-limit-s", type=float, default=15.0,
                        help="per server and level (warm-up: a fifth of it); with the "
                        "defaults the load takes 16 x 18 s = 4.8 min at most")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    check_model(args.checkpoint)
    _stop_on_sigterm()
    from motian.serving.export import export

    texts = review_texts()
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    began, load_before = time.time(), os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        serving = Path(tmp) / "serve"
        export(args.checkpoint, serving, format="both", int8="onnx-int8" in args.backends)
        urls = {}
        for name, command in server_commands(serving, args.backends, args.threads,
                                             args.max_length, args.max_wait_ms).items():
            urls[name] = servers.enter_context(started(command, env, Path(tmp) / name))
        for clients in args.clients:
            for name, (proc, url) in urls.items():
                run_load(url, texts, clients, args.warmup, args.timeout_s, args.time_limit_s / 5)
                load, cpu = os.getloadavg()[0], cpu_seconds(proc.pid)
                r = run_load(url, texts[args.warmup:], clients, args.requests, args.timeout_s,
                             args.time_limit_s)
                cpu_ms = 1e3 * (cpu_seconds(proc.pid) - cpu) / max(len(r.latencies_s), 1)
                rows.append({"server": name, "load_1min": load, "cpu_ms_per_request": cpu_ms}
                            | r.summary())
                print(_row(rows[-1]), file=sys.stderr, flush=True)
    machine = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
               "load_before": load_before, "load_after": os.getloadavg(),
               "minutes": (time.time() - began) / 60, "threads": args.threads,
               "versions": _versions()}
    print_report(rows, machine, args)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


def _row(r: dict) -> str:
    errors = str(r["errors"]) + (f" {r['error_kinds']}" if r["errors"] else "") + \
        (f", {r['unsent']} unsent" if r["unsent"] else "")
    return (f"| {r['server']} | {r['clients']} | {r['ok']} | {errors} | "
            f"{r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['cpu_ms_per_request']:.2f} | {r['load_1min']:.1f} |")


def print_report(rows: list[dict], machine: dict, args) -> None:
    print(f"\nmodel: {args.checkpoint}; {args.requests} requests per level (+{args.warmup} warm-up"
          f"), max_length {args.max_length}, motian serve --max-wait-ms {args.max_wait_ms:g}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; every server {args.threads} "
          f"thread(s) (OMP_NUM_THREADS={args.threads}); {machine['versions']}")
    print(f"load average (1, 5, 15 min) before {_load(machine['load_before'])}, after "
          f"{_load(machine['load_after'])}; {machine['minutes']:.1f} min\n")
    print("| server | clients | ok | errors | requests/s | p50 ms | p95 ms | p99 ms | "
          "server CPU ms/request | load |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(_row(r))
    peer = {r["clients"]: r for r in rows if r["server"] == PEER}
    print("\nmotian serve vs the peer (requests/s ratio; p99 ms, motian / peer):")
    for r in rows:
        if r["server"] != PEER and r["clients"] in peer:
            p = peer[r["clients"]]
            print(f"  {r['clients']:>3} clients, {r['server']:<9}: "
                  f"{r['requests_per_s'] / max(p['requests_per_s'], 1e-9):.2f}x, "
                  f"p99 {r['p99_ms']:.1f} / {p['p99_ms']:.1f}, errors {r['errors']} / "
                  f"{p['errors']}")


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> str:
    import onnxruntime
    import torch
    import transformers
    import uvicorn

    return (f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, transformers "
            f"{transformers.__version__}, uvicorn {uvicorn.__version__}")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"serving_load: {err}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the servers are stopped by now
        sys.exit("serving_load: interrupted; servers stopped")
