"""`motian clean --engine datatrove`: the clean stage as datatrove pipeline steps.

The same normalisation, filters, held-out exclusion and duplicate rule as the local engine
(`motian.data.clean`, whose functions every step calls), cut into the stages that large-scale
pipelines use, each run by a datatrove executor (`LocalPipelineExecutor` here; the same steps
run under `SlurmPipelineExecutor` or `RayPipelineExecutor` on many machines, docs/scale.md):

1. **signatures** (``tasks`` tasks): `MotianReader` reads the task's block of inputs (a file or a
   built-in corpus is the unit), `MotianFilters` normalises, filters and signs batches with
   `motian.data.clean.process_batch`, `MotianSignatureWriter` writes the task's MinHash
   signatures (``sigs/R.npy``), its candidate documents, and its LSH band keys and exact hashes
   split by owner: key ``% tasks`` names the bucket task (``buckets/R-B.npy``).
2. **buckets** (``tasks`` tasks): task B reads only the keys it owns, from every signature task,
   sorts them, and in each bucket with 2+ documents verifies pairs with the estimated Jaccard
   (share of equal MinHash values, the local engine's test, reading the rows it needs from the
   signature files as memory maps: no process holds all signatures). It writes edges
   (earlier, later, kind, estimate): exact (same text hash), near (estimate >= threshold) and
   copy (identical signature; only the earliest of each identical group is compared, so a text
   repeated 10,000 times costs 10,000 edges, not 10^8 pairs).
3. **clusters** (1 task): reads only the edges and applies the local engine's rule in input
   order: a document is dropped when it has an exact or near edge to a document that is kept
   (or a copy edge: an identical signature is always dropped, since whatever the earliest copy
   matched, it matches too). Writes the dropped documents per signature task.
4. **filter** (``tasks`` tasks): `MotianDedupFilter` drops them and datatrove's `JsonlWriter`
   writes ``clean-R.jsonl`` (``{"text", "source", "line"}``, motian's cleaned format).
   With a tokenizer, `MotianEncode` follows in the same task: `motian encode` of the task's own
   ``clean-R.jsonl`` into ``encoded/R/``; one manifest in ``encoded/`` then lists every task's
   shards, so ``motian pretrain`` reads ``out/encoded`` as one dataset.

Why this rule rather than union-find clusters (datatrove's `MinhashDedupCluster`): the local
engine streams its output and never takes back a written document, so it drops a document only
when it matches one already kept; a cluster rule would drop C in a chain A~B~C where A and C
differ. Both engines keep exactly the same documents (tested), and the chain's C, which is not a
copy of anything kept, stays in the corpus.

Document ids are (input index << 40 | ordinal), so sorting them gives the local engine's input
order; each task takes a contiguous block of inputs, so the shards in rank order hold the kept
documents in that order too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from motian.data.clean import (
    FORMAT_VERSION,
    CleanSettings,
    HeldOut,
    Tally,
    _batches,
    _fingerprint,
    _report,
    _settings_record,
    check_text_field,
    count_read_and_filter,
    process_batch,
    with_exclusions,
)
from motian.data.sources import Document, iter_documents, resolve_inputs
from motian.errors import SkipLog, UserError
from motian.io import write_json_atomic

try:
    from datatrove.data import Document as DtDocument
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.writers import JsonlWriter
except ImportError:  # the base install stays light: `pip install motian[distributed]`
    PipelineStep = object  # type: ignore[assignment,misc]
    LocalPipelineExecutor = None  # type: ignore[assignment,misc]

ID_SHIFT = 40  # document id = input index << 40 | ordinal within the input
EXACT, NEAR, COPY = 0, 1, 2  # key kinds (EXACT, NEAR = a band key) and edge kinds
REASON = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}
ENTRY = np.dtype([("key", "<u8"), ("gid", "<u8"), ("sighash", "<u8"), ("task", "<u4"),
                  ("row", "<u4"), ("kind", "u1"), ("band", "u1")])
EDGE = np.dtype([("i", "<u8"), ("j", "<u8"), ("kind", "u1"), ("est", "<f8")])
DROP = np.dtype([("gid", "<u8"), ("kind", "u1"), ("match", "<u8"), ("est", "<f8")])
WORK = "_datatrove"  # the stages' hand-over files and datatrove's logs, under out/


def block(n_items: int, rank: int, world: int) -> range:
    """The contiguous block of inputs that task `rank` of `world` reads."""
    return range(rank * n_items // world, (rank + 1) * n_items // world)


def owner(gids: np.ndarray, n_items: int, world: int) -> np.ndarray:
    """The signature task that read each document: the last task whose block starts at or
    before its input (tasks with empty blocks start where the next one does)."""
    starts = np.array([block(n_items, r, world).start for r in range(world)])
    return np.searchsorted(starts, gids >> np.uint64(ID_SHIFT), "right") - 1


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def _where(items: list[str], gid: int) -> str:
    return f"{items[gid >> ID_SHIFT]} document {(gid & ((1 << ID_SHIFT) - 1)) + 1}"


# --------------------------------------------------------------------------- 1. signatures


class MotianReader(PipelineStep):
    """Reads the task's block of inputs with `motian.data.sources.iter_documents` (the same
    readers, skip rules and warnings as the local engine)."""

    name, type = "motian inputs", "📖 - READER"

    def __init__(self, items: list[str], settings: CleanSettings, work: str):
        super().__init__()
        self.items, self.s, self.work = items, settings, work

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator:
        skips = SkipLog()
        for k in block(len(self.items), rank, world_size):
            docs = iter_documents([self.items[k]], txt_mode=self.s.txt_mode,
                                  text_field=self.s.text_field,
                                  max_line_bytes=self.s.max_line_bytes, skips=skips)
            for n, doc in enumerate(docs):
                self.stat_update("documents")
                yield DtDocument(text=doc.text, id=str(k << ID_SHIFT | n),
                                 metadata={"source": doc.source, "line": doc.line})
        _json(Path(self.work) / "skips" / f"{rank:05d}.json", skips.to_dict())


class MotianFilters(PipelineStep):
    """Normalisation, quality filters, held-out exclusion and MinHash signatures:
    `motian.data.clean.process_batch` on batches of 512 documents and `count_read_and_filter`
    per document, as in the local engine. Passing documents carry their normalised text."""

    name, type = "motian normalise + filters", "🔻 - FILTER"

    def __init__(self, settings: CleanSettings, heldout: list[HeldOut], work: str):
        super().__init__()
        self.s, self.heldout, self.work = settings, heldout, work

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator:
        tally = Tally()
        for batch in _batches(data or iter(())):
            with self.track_time("batch"):
                r = process_batch([d.text for d in batch], self.s)
            for i, d in enumerate(batch):
                doc = Document(d.text, d.metadata["source"], d.metadata["line"])
                if count_read_and_filter(tally, doc, r, i, self.heldout, self.s):
                    self.stat_update("dropped")
                    continue
                self.stat_update("passed")
                d.text = r.texts[i]
                d.metadata.update(n_chars=int(r.n_chars[i]), exact=r.exact[i],
                                  has_shingles=bool(r.has_shingles[i]), sig=r.sig[i],
                                  keys=r.keys[i])
                yield d
        _json(Path(self.work) / "tally" / f"filters-{rank:05d}.json", asdict(tally))


class MotianSignatureWriter(PipelineStep):
    """Writes the task's signatures (one row per candidate document), its candidates and its
    exact/LSH keys, split into one file per bucket task."""

    name, type = "motian signatures", "💽 - WRITER"

    def __init__(self, work: str, perm: int):
        super().__init__()
        self.work, self.perm = Path(work), perm

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator:
        sigs: list[np.ndarray] = []
        keys: list[np.ndarray] = []
        path = self.work / "candidates" / f"{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            for row, d in enumerate(data or ()):
                gid, m = int(d.id), d.metadata
                sigs.append(m["sig"])
                band = m["keys"] if m["has_shingles"] else np.empty(0, np.uint64)
                e = np.zeros(len(band) + 1, ENTRY)
                e["key"] = [m["exact"], *band.tolist()]
                e["kind"][1:], e["band"][1:] = NEAR, np.arange(len(band))
                e["gid"], e["task"], e["row"] = gid, rank, row
                e["sighash"] = int.from_bytes(
                    hashlib.blake2b(m["sig"].tobytes(), digest_size=8).digest(), "little")
                keys.append(e)
                f.write(json.dumps({"id": gid, "text": d.text, "source": m["source"],
                                    "line": m["line"], "n_chars": m["n_chars"]},
                                   ensure_ascii=False) + "\n")
                self.stat_update("candidates")
        path.with_suffix(".tmp").replace(path)
        _save(self.work / "sigs" / f"{rank:05d}.npy",
              np.stack(sigs) if sigs else np.empty((0, self.perm), np.uint32))
        entries = np.concatenate(keys) if keys else np.empty(0, ENTRY)
        bucket = entries["key"] % np.uint64(world_size)
        for b in range(world_size):
            _save(self.work / "buckets" / f"{rank:05d}-{b:05d}.npy", entries[bucket == b])
        return
        yield  # a generator: datatrove drains it


# --------------------------------------------------------------------------- 2. buckets


def _pairs(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, estimate) of the pairs a < b of distinct signatures at or above the threshold,
    compared 256 rows at a time so a big bucket stays in bounded memory."""
    out_a, out_b, out_e = [], [], []
    for lo in range(0, len(sig) - 1, 256):
        hi = min(lo + 256, len(sig))
        est = (sig[lo:hi, None, :] == sig[None, :, :]).mean(axis=2)  # the local engine's test
        a, b = np.nonzero(est >= threshold)
        later = b > a + lo
        out_a.append(a[later] + lo)
        out_b.append(b[later])
        out_e.append(est[a[later], b[later]])
    if not out_a:
        return np.empty(0, int), np.empty(0, int), np.empty(0)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_e)


class MotianBuckets(PipelineStep):
    """Task B owns the keys with key % tasks == B: it verifies the pairs in those buckets and
    writes edges (see the module docstring). Vectorised: identical signatures (equal 64-bit
    signature hashes) and exact groups become edges with a few sorts; only buckets that still
    hold 2+ distinct signatures read signature rows and compare them in Python's loop."""

    name, type = "motian LSH buckets", "🫂 - DEDUP"

    def __init__(self, work: str, sig_tasks: int, threshold: float):
        super().__init__()
        self.work, self.sig_tasks, self.threshold = Path(work), sig_tasks, threshold

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator:
        with self.track_time("task"):
            self._run(rank)
        return
        yield

    def _run(self, rank: int) -> None:
        parts = [np.load(self.work / "buckets" / f"{t:05d}-{rank:05d}.npy")
                 for t in range(self.sig_tasks)]
        e = np.concatenate(parts) if parts else np.empty(0, ENTRY)
        e = e[np.lexsort((e["gid"], e["sighash"], e["key"], e["kind"]))]
        same_key = np.r_[False, (e["key"][1:] == e["key"][:-1])
                         & (e["kind"][1:] == e["kind"][:-1])]
        same_sig = same_key & np.r_[False, e["sighash"][1:] == e["sighash"][:-1]]
        edges = []
        # exact: the earliest with this text hash -> every later one
        first = np.maximum.accumulate(np.where(same_key, 0, np.arange(len(e))))
        later = np.flatnonzero(same_key & (e["kind"] == EXACT))
        edges.append(self._edges(e["gid"][first[later]], e["gid"][later], EXACT))
        # copies: the earliest with this signature -> every later one (once: band 0's bucket)
        rep = np.maximum.accumulate(np.where(same_sig, 0, np.arange(len(e))))
        later = np.flatnonzero(same_sig & (e["kind"] == NEAR) & (e["band"] == 0))
        edges.append(self._edges(e["gid"][rep[later]], e["gid"][later], COPY))
        # distinct signatures sharing a band key: verify every pair
        reps = e[(e["kind"] == NEAR) & ~same_sig]
        new = np.r_[True, reps["key"][1:] != reps["key"][:-1], True]
        starts = np.flatnonzero(new)
        sizes = np.diff(starts)
        sigs = {t: np.load(self.work / "sigs" / f"{t:05d}.npy", mmap_mode="r")
                for t in range(self.sig_tasks)}
        for a, n in zip(starts[:-1][sizes >= 2].tolist(), sizes[sizes >= 2].tolist()):
            g = reps[a:a + n]
            g = g[np.argsort(g["gid"])]
            sig = np.concatenate([sigs[int(t)][[int(r)]] for t, r in zip(g["task"], g["row"])])
            i, j, est = _pairs(sig, self.threshold)
            edges.append(self._edges(g["gid"][i], g["gid"][j], NEAR, est))
            self.stat_update("verified buckets")
        _save(self.work / "edges" / f"{rank:05d}.npy", np.concatenate(edges))

    @staticmethod
    def _edges(i: np.ndarray, j: np.ndarray, kind: int, est: np.ndarray | None = None
               ) -> np.ndarray:
        out = np.zeros(len(i), EDGE)
        out["i"], out["j"], out["kind"] = i, j, kind
        out["est"] = 1.0 if est is None else est
        return out


# --------------------------------------------------------------------------- 3. clusters


class MotianClusters(PipelineStep):
    """One task: the local engine's rule over the edges, in input order (module docstring)."""

    name, type = "motian duplicate rule", "🫂 - DEDUP"

    def __init__(self, work: str, bucket_tasks: int, n_items: int, sig_tasks: int):
        super().__init__()
        self.work, self.bucket_tasks = Path(work), bucket_tasks
        self.n_items, self.sig_tasks = n_items, sig_tasks

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator:
        cpu = time.process_time()
        with self.track_time("task"):
            self._run()
        self.stat_update("cpu_ms", value=round(1000 * (time.process_time() - cpu)))
        return
        yield

    def _run(self) -> None:
        e = np.concatenate([np.load(self.work / "edges" / f"{b:05d}.npy")
                            for b in range(self.bucket_tasks)])
        e = e[np.argsort(e["j"], kind="stable")]  # later documents after earlier ones
        dropped: dict[int, tuple[int, int, float]] = {}
        bounds = np.flatnonzero(np.r_[True, e["j"][1:] != e["j"][:-1], True]).tolist() \
            if len(e) else []  # no edges: a corpus without duplicates
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            j = int(e["j"][lo])
            edges = list(zip(e["i"][lo:hi].tolist(), e["kind"][lo:hi].tolist(),
                             e["est"][lo:hi].tolist()))
            exact = [i for i, kind, _ in edges if kind == EXACT and i not in dropped]
            near = [(est, -i) for i, kind, est in edges if kind != EXACT and i not in dropped]
            copy = [i for i, kind, _ in edges if kind == COPY]
            if exact:  # the local engine checks the exact hash first
                dropped[j] = (EXACT, min(exact), 1.0)
            elif near:  # the most similar kept document, ties to the earliest
                est, i = max(near)
                dropped[j] = (NEAR, -i, est)
            elif copy:  # its earliest copy went, as a near duplicate of a kept one: so does it
                dropped[j] = (NEAR, min(copy), 1.0)
        rows = np.array([(gid, *d) for gid, d in dropped.items()], DROP)
        owners = owner(rows["gid"], self.n_items, self.sig_tasks)
        for t in range(self.sig_tasks):
            _save(self.work / "dropped" / f"{t:05d}.npy", rows[owners == t])
        self.stat_update("dropped", value=len(dropped))


# --------------------------------------------------------------------------- 4. filter


class MotianDedupFilter(PipelineStep):
    """Reads the task's candidates and drops the documents the duplicate rule removed."""

    name, type = "motian dedup filter", "🔻 - FILTER"

    def __init__(self, work: str, items: list[str]):
        super().__init__()
        self.work, self.items = Path(work), items

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator:
        tally = Tally()
        d = np.load(self.work / "dropped" / f"{rank:05d}.npy")
        dropped = dict(zip(d["gid"].tolist(), zip(d["kind"].tolist(), d["match"].tolist(),
                                                  d["est"].tolist())))
        with open(self.work / "candidates" / f"{rank:05d}.jsonl", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                hit = dropped.get(rec["id"])
                if hit is None:
                    tally.kept_docs += 1
                    tally.kept_chars += rec["n_chars"]
                    yield DtDocument(text=rec["text"], id=str(rec["id"]),
                                     metadata={"source": rec["source"], "line": rec["line"]})
                    continue
                kind, match, est = hit
                detail = (f"same as {_where(self.items, match)}" if kind == EXACT else
                          f"Jaccard ≈ {est:.2f} with {_where(self.items, match)}")
                tally.drop(REASON[kind], rec["n_chars"], f"{rec['source']}:{rec['line']}",
                           rec["text"], detail)
                self.stat_update(REASON[kind])
        _json(self.work / "tally" / f"dedup-{rank:05d}.json", asdict(tally))


def cleaned_record(self, document) -> dict:
    """`JsonlWriter` adapter: motian's cleaned format ({"text", "source", "line"})."""
    return {"text": document.text, "source": document.metadata["source"],
            "line": document.metadata["line"]}


# --------------------------------------------------------------------------- 5. encode


class MotianEncode(PipelineStep):
    """`motian encode` of the task's own kept documents into out/encoded/R/."""

    name, type = "motian encode", "🔢 - TOKENIZER"

    def __init__(self, out: str, tokenizer: str):
        super().__init__()
        self.out, self.tokenizer = Path(out), tokenizer

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator:
        from motian.data.encode import encode

        deque(data or (), maxlen=0)  # the writer before it finishes and closes the shard
        shard = self.out / f"clean-{rank:05d}.jsonl"
        if shard.is_file():
            encode([str(shard)], self.out / "encoded" / f"{rank:05d}", Path(self.tokenizer),
                   workers=1, progress=False)
        return
        yield


def merge_encoded(out: Path, tasks: int) -> dict:
    """One manifest in out/encoded listing every task's shards (names "R/shard-N"), so
    `motian pretrain --data out/encoded` reads them as one dataset."""
    parts = [json.loads((out / "encoded" / f"{r:05d}" / "manifest.json").read_text("utf-8"))
             for r in range(tasks) if (out / "encoded" / f"{r:05d}" / "manifest.json").is_file()]
    if not parts:
        raise UserError(f"{out}: no task kept a document, so there is nothing to encode")
    first = out / "encoded" / f"{0:05d}"
    for r in range(tasks):
        if (out / "encoded" / f"{r:05d}" / "manifest.json").is_file():
            first = out / "encoded" / f"{r:05d}"
            break
    for name in ("vocab.txt", "synonyms.npz"):
        if (first / name).is_file():
            shutil.copyfile(first / name, out / "encoded" / name)
    manifest = {**parts[0], "vocab_file": str(out / "encoded" / "vocab.txt"), "shards": [],
                "engine": "datatrove", "settings": {**parts[0]["settings"],
                                                    "inputs": [str(out)]}}
    for r, part in zip([r for r in range(tasks) if (out / "encoded" / f"{r:05d}" /
                                                     "manifest.json").is_file()], parts):
        manifest["shards"] += [{**e, "name": f"{r:05d}/{e['name']}"} for e in part["shards"]]
    manifest["counts"] = {k: sum(p["counts"].get(k, 0) for p in parts) for k in parts[0]["counts"]}
    write_json_atomic(out / "encoded" / "manifest.json", manifest)
    return manifest


# --------------------------------------------------------------------------- the run


def executors(out: Path, items: list[str], s: CleanSettings, heldout: list[HeldOut],
              tasks: int, tokenizer: Path | None = None, executor=None,
              **executor_args) -> list:
    """The four stages as datatrove executors, each depending on the one before (running the
    last runs them all). `executor`: the class (default `LocalPipelineExecutor`;
    `SlurmPipelineExecutor` or `RayPipelineExecutor` on many machines) and `executor_args` its
    own arguments (``workers``: at most as many as a stage has tasks)."""
    work = out / WORK
    executor = executor or LocalPipelineExecutor
    stages = [
        ("signatures", tasks, [MotianReader(items, s, str(work)),
                               MotianFilters(s, heldout, str(work)),
                               MotianSignatureWriter(str(work), s.minhash_perm)]),
        ("buckets", tasks, [MotianBuckets(str(work), tasks, s.near_dup_threshold)]),
        ("clusters", 1, [MotianClusters(str(work), tasks, len(items), tasks)]),
        ("filter", tasks, [MotianDedupFilter(str(work), items),
                           JsonlWriter(str(out), output_filename="clean-${rank}.jsonl",
                                       compression=None, adapter=cleaned_record),
                           *([MotianEncode(str(out), str(tokenizer))] if tokenizer else [])]),
    ]
    runs, previous = [], None
    for name, n, pipeline in stages:
        args = dict(executor_args)
        if "workers" in args:
            args["workers"] = min(args["workers"], n)
        previous = executor(pipeline, tasks=n, logging_dir=str(work / "logs" / name),
                            depends=previous, **args)
        runs.append(previous)
    return runs


def _merge_tallies(work: Path, tasks: int) -> Tally:
    total = Tally()
    for kind in ("filters", "dedup"):
        for r in range(tasks):
            path = work / "tally" / f"{kind}-{r:05d}.json"
            if not path.is_file():
                continue
            t = Tally(**json.loads(path.read_text(encoding="utf-8")))
            for name in ("read_docs", "read_chars", "read_bytes", "normalised_away_chars",
                         "kept_docs", "kept_chars"):
                setattr(total, name, getattr(total, name) + getattr(t, name))
            for reason, n in t.dropped_docs.items():
                total.dropped_docs[reason] = total.dropped_docs.get(reason, 0) + n
                total.dropped_chars[reason] = (total.dropped_chars.get(reason, 0)
                                               + t.dropped_chars[reason])
                ex = total.examples.setdefault(reason, [])
                ex.extend(t.examples.get(reason, [])[:max(0, 3 - len(ex))])
    return total


def launch(inputs: list[str], out: Path, settings: CleanSettings = CleanSettings(),
           exclude: HeldOut | list[HeldOut] | None = None, tasks: int = 2,
           tokenizer: Path | None = None, resume: bool = True, executor=None,
           **executor_args) -> list:
    """Check inputs and settings (a `UserError` before any work), record them in out/_datatrove
    and return the stages' executors, not started. Run the last one (``.run()``: it runs the
    others first); once every stage has finished, `finish(out)` writes the manifest and the
    report. `executor` and `executor_args` as in `executors` (default: the local executor)."""
    if LocalPipelineExecutor is None:
        raise UserError("the datatrove engine needs datatrove: pip install 'motian[distributed]' "
                        "(or pip install 'datatrove==0.9.0')")
    if tasks < 1 or executor_args.get("workers", 1) < 1:
        raise UserError(f"tasks and workers must be at least 1 (got {tasks}, "
                        f"{executor_args.get('workers')})")
    s, heldout = with_exclusions(settings, exclude)
    inputs = [str(x) for x in inputs]
    fingerprint = _fingerprint(inputs)  # UserError for a missing input, before any work
    check_text_field(inputs, s.text_field, s.max_line_bytes)
    items = [str(x) for x in resolve_inputs(inputs, SkipLog(warn=False))]
    out = Path(out).absolute()  # the tasks may run elsewhere (Slurm, Ray)
    record = {"kind": "cleaned", "engine": "datatrove", "format_version": FORMAT_VERSION,
              "inputs": inputs, "input_fingerprint": fingerprint,
              "settings": _settings_record(s), "tasks": tasks,
              "tokenizer": str(Path(tokenizer).absolute()) if tokenizer else None}
    _check_previous(out, record, resume)
    _json(out / WORK / "settings.json", record)
    _json(out / WORK / "started.json", {"time": time.time()})
    return executors(out, items, s, heldout, tasks, tokenizer and Path(tokenizer).absolute(),
                     executor, **executor_args)


def finish(out: Path) -> dict:
    """After every stage of `launch(out, ...)` has finished: the manifest (one shard per task,
    in input order), the merged report (report.json, returned) and, with a tokenizer, the
    encoded dataset's manifest."""
    out = Path(out).absolute()
    work = out / WORK
    if not (work / "settings.json").is_file():
        raise UserError(f"{out}: no datatrove run was launched here (no {WORK}/settings.json)")
    record = json.loads((work / "settings.json").read_text(encoding="utf-8"))
    tasks = record["tasks"]
    done = len(list((work / "logs" / "filter" / "completions").glob("*")))
    if done < tasks:
        raise UserError(f"{out}: the last stage has finished {done} of {tasks} tasks; wait for "
                        f"the jobs (logs in {work / 'logs'}) or launch the same run again")
    s = CleanSettings(**record["settings"])
    skips = SkipLog(warn=False)
    for r in range(tasks):
        path = work / "skips" / f"{r:05d}.json"
        if path.is_file():
            skips.merge(SkipLog.from_dict(json.loads(path.read_text(encoding="utf-8"))))
    tally = _merge_tallies(work, tasks)
    shards = []
    for r in range(tasks):
        path = out / f"clean-{r:05d}.jsonl"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                texts = [json.loads(line)["text"] for line in f]
            shards.append({"file": path.name, "n_docs": len(texts),
                           "n_chars": sum(map(len, texts))})
    started = json.loads((work / "started.json").read_text(encoding="utf-8"))["time"]
    manifest = {**record, "complete": True, "consumed_docs": tally.read_docs,
                "elapsed_s": time.time() - started, "state_file": None, "shards": shards,
                "counts": {"tally": asdict(tally)}}
    if record["tokenizer"]:
        merge_encoded(out, tasks)
    write_json_atomic(out / "manifest.json", manifest)
    rep = _report(SimpleNamespace(out=out, manifest=manifest, tally=tally, s=s), skips)
    rep["engine"] = {"name": "datatrove", "tasks": tasks, "work_dir": str(work)}
    write_json_atomic(out / "report.json", rep)
    return rep


def clean_distributed(inputs: list[str], out: Path, settings: CleanSettings = CleanSettings(),
                      exclude: HeldOut | list[HeldOut] | None = None, tasks: int = 2,
                      workers: int = 2, tokenizer: Path | None = None,
                      resume: bool = True) -> dict:
    """Clean `inputs` into `out` on this machine with datatrove's `LocalPipelineExecutor`
    (`tasks` tasks per stage, `workers` at a time): the same kept documents as
    `motian.data.clean.clean_corpus`, in ``clean-R.jsonl`` per task; with `tokenizer`, each
    task also encodes its kept documents (out/encoded). Returns the report (the shape
    `clean_corpus` returns, plus "engine"). A rerun skips the tasks datatrove marked done."""
    runs = launch(inputs, out, settings, exclude, tasks, tokenizer, resume, workers=workers)
    runs[-1].run()
    rep = finish(out)
    rep["engine"]["workers"] = workers
    write_json_atomic(Path(out) / "report.json", rep)
    return rep


def _check_previous(out: Path, record: dict, resume: bool) -> None:
    """Datatrove skips the tasks its logs mark completed; that is only right for the same
    inputs and settings, so other ones are refused (or, with resume=False, started over)."""
    work = out / WORK
    old_path = work / "settings.json"
    if (out / "manifest.json").is_file() and not old_path.is_file():
        raise UserError(f"{out}: holds the output of another run (manifest.json: the local "
                        "engine's?); pass a new --out for the datatrove engine")
    if not old_path.is_file():
        return
    old = json.loads(old_path.read_text(encoding="utf-8"))
    if old == record:
        if not resume:
            _remove(out)
        return
    if not resume:
        _remove(out)
        return
    diff = [k for k in record if old.get(k) != record[k]]
    raise UserError(f"{out}: an earlier datatrove run there used other {', '.join(diff)}; pass "
                    "a new --out, or --no-resume to start over")


def _remove(out: Path) -> None:
    shutil.rmtree(out / WORK, ignore_errors=True)
    for path in [*out.glob("clean-*.jsonl"), out / "manifest.json", out / "report.json",
                 out / "report.md"]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / "encoded", ignore_errors=True)
