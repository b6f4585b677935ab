"""The resumable stage runner `motian clean` and `motian encode` share: one set of rules for an
output directory that a killed run continues.

* **Manifest and fingerprint** (`StageDir`). The directory holds ``manifest.json``: the stage's
  ``kind``, the fields that decide the output (the *fingerprint*: format version, inputs,
  settings) and the committed shards.
* **Resume check** (`StageDir`). A rerun whose fingerprint equals the manifest's continues after
  the committed shards; one that differs is refused, naming the directory and the fields (then
  and now values); ``resume=False`` (``--no-resume``) deletes the stage's own files and starts
  over. A directory holding another stage's output is refused either way.
* **Atomic shard commits** (`AtomicFile`, `StageDir.commit`). A shard is written to
  ``name.tmp`` and renamed into place whole; the commit then fsyncs the new files and the
  directory and writes the manifest atomically, last. A kill at any moment leaves the previous
  commit intact (and at most a ``.tmp`` file, overwritten by the rerun).
* **Bounded ordered worker pool** (`ordered_pool`). Jobs run in spawned worker processes,
  results come back in input order, and at most ``2 × workers`` jobs are in flight, so memory is
  bounded and the output does not depend on the number of workers. The workers do not re-run
  the caller's ``__main__`` (`NO_MAIN_SPAWN`), so ``motian.prepare(...)`` at the top level of a
  script without ``if __name__ == "__main__":`` works instead of every worker running the
  script again.
* **Progress by bytes** (`ByteProgress`): a tqdm bar over input bytes with an ETA.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from motian.errors import UserError
from motian.io import AtomicFile, fsync_dir, write_json_atomic  # noqa: F401 (AtomicFile re-exported)

IN_FLIGHT_PER_WORKER = 2
K = TypeVar("K")
R = TypeVar("R")

# --------------------------------------------------------------------------- the directory


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def fingerprint_diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) of every field that differs, nested dicts opened."""
    rows = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            rows += fingerprint_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            rows.append((f"{prefix}{key}", a, b))
    return rows


class StageDir:
    """A stage's output directory: the resume check on opening, and commits.

    `fingerprint` holds the manifest fields that must be equal for a rerun to continue (a
    JSON-like dict, compared after a JSON round trip); `owned` is a regular expression matching
    the names of every file the stage writes there (``.tmp`` variants included), which
    ``resume=False`` deletes. After opening, `previous` is the earlier run's manifest to continue
    from, or None when the stage starts from nothing.
    """

    def __init__(self, out: Path, kind: str, fingerprint: dict, owned: str, resume: bool):
        self.out, self.kind, self.owned = Path(out), kind, re.compile(owned)
        self.path = self.out / "manifest.json"
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.previous = self._open(resume)

    def _open(self, resume: bool) -> dict | None:
        old = self._read(resume)
        if old is not None and old.get("kind") != self.kind:
            raise UserError(f"{self.path}: this directory holds a {old.get('kind')!r} output, "
                            f"not {self.kind!r}; choose another --out")
        if not resume:
            self.remove_outputs()
            return None
        if old is None:
            return None
        differ = fingerprint_diff({k: old.get(k) for k in self.fingerprint}, self.fingerprint)
        if differ:
            name, then, now = differ[0]
            raise UserError(
                f"{self.out}: an earlier {self.kind} run wrote this directory with different "
                f"{', '.join(d[0] for d in differ)} (e.g. {name}: {_short(then)} then, "
                f"{_short(now)} now). Use --no-resume to start over (its files here are "
                "deleted), or another --out.")
        return old

    def _read(self, resume: bool) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if not resume:
                return None  # unreadable: nothing to protect, it is deleted with the rest
            raise UserError(f"{self.path} is unreadable ({err}); use --no-resume to start "
                            "over") from err

    def remove_outputs(self) -> None:
        """Delete every file of this stage (shards, state, manifest, reports, .tmp files)."""
        for p in self.out.iterdir():
            if self.owned.fullmatch(p.name):
                p.unlink()

    def commit(self, manifest: dict, files: Iterable[Path] = ()) -> None:
        """Make `files` (already in place) durable, then write `manifest`: the manifest is the
        commit record, so a shard exists for a rerun only once its data is on disk."""
        for path in files:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(self.out)
        write_json_atomic(self.path, manifest)


# --------------------------------------------------------------------------- the worker pool


_MAIN_SWAP = threading.Lock()


class _NoMainProcess(SpawnProcess):
    """A spawned process that does not import the parent's ``__main__``.

    A spawned child normally re-runs the parent's main script (as ``__mp_main__``) so that
    functions defined there can be unpickled; a script that calls motian at its top level
    without the ``if __name__ == "__main__":`` guard then calls it again in every worker, which
    multiprocessing refuses in a loop that never ends. The pool's functions all live in motian's
    own modules, so the child needs nothing from ``__main__``: while the child is launched (the
    moment multiprocessing reads ``sys.modules["__main__"]`` to describe the parent), an empty
    module stands in for it."""

    @staticmethod
    def _Popen(process_obj):
        with _MAIN_SWAP:
            main = sys.modules["__main__"]
            sys.modules["__main__"] = types.ModuleType("__main__")
            try:
                return SpawnProcess._Popen(process_obj)
            finally:
                sys.modules["__main__"] = main


class _NoMainSpawn(SpawnContext):
    Process = _NoMainProcess


NO_MAIN_SPAWN = _NoMainSpawn()  # the start method of every worker pool


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    # Ctrl-C is the parent's to handle (it stops the pool; committed shards stay), not a
    # traceback from every worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def ordered_pool(fn: Callable[..., R], jobs: Iterable[tuple[K, tuple]], workers: int,
                 initializer: Callable | None = None, initargs: tuple = (),
                 max_in_flight: int | None = None) -> Iterator[tuple[K, R]]:
    """``(key, fn(*args))`` for each ``(key, args)`` of `jobs`, in the order of `jobs`.

    With ``workers <= 1`` everything runs in this process (`initializer` too, once). Otherwise
    `workers` spawned processes (spawn: safe with threads in the parent, the same on every OS;
    `NO_MAIN_SPAWN`: without re-running the caller's ``__main__``, so `fn` and `initializer`
    must be importable module-level functions, never ones defined in a script) run
    `initializer(*initargs)` once each, then the jobs; `jobs` is read lazily and at most
    `max_in_flight` (default ``2 × workers``) jobs are submitted and not yet yielded, so memory
    is bounded. Only `args` travel to the workers; the key stays here. Closing the generator
    (or an error) cancels the queued jobs and waits for the running ones.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for key, args in jobs:
            yield key, fn(*args)
        return
    limit = max(1, max_in_flight or IN_FLIGHT_PER_WORKER * workers)
    pool = ProcessPoolExecutor(workers, mp_context=NO_MAIN_SPAWN,
                               initializer=_start_worker, initargs=(initializer, initargs))
    pending: deque = deque()
    try:
        for key, args in jobs:
            pending.append((key, pool.submit(fn, *args)))
            if len(pending) >= limit:
                key, future = pending.popleft()
                yield key, future.result()
        while pending:
            key, future = pending.popleft()
            yield key, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- progress


class ByteProgress:
    """tqdm over input bytes with an ETA; `advance` by each document's or shard's bytes.

    With `starts` (input name → its first byte in `total`), the bar snaps to an input's start
    when its first document arrives and never passes the next input's start, so per-document
    estimates that differ from the size on disk (gzip, JSON, pd98's POS tags) never drift
    across inputs."""

    def __init__(self, desc: str, total: int | None, enabled: bool,
                 starts: dict[str, int] | None = None):
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled,
                        smoothing=0.1)
        self.starts = starts
        self.source: str | None = None
        self.pos = self.limit = 0

    def advance(self, nbytes: int, source: str | None = None) -> None:
        if self.starts is None:
            self.bar.update(nbytes)
            return
        if source != self.source:
            self.source = source
            start = self.starts.get(source, self.bar.n) if source is not None else self.bar.n
            ends = [v for v in self.starts.values() if v > start] + [self.bar.total]
            self.pos, self.limit = start, min(ends)
        new = min(self.pos + nbytes, self.limit)
        if new > self.bar.n:
            self.bar.update(new - self.bar.n)
        self.pos = new

    def close(self, finished: bool) -> None:
        if finished and self.bar.total is not None and self.bar.total > self.bar.n:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()
