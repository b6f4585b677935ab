"""`motian clean`: raw text in, deduplicated and filtered shards plus a report out.

Per document, in this order (the first failing step names the drop reason):

0. **held-out texts** (`exclude`, `HeldOut`s the caller passes in): a document whose stripped
   or normalised text, or one of whose lines, is one of `HeldOut.texts` (in any input), or a
   document of `HeldOut.lines_source` that starts on one of `HeldOut.lines`, is dropped. This
   layer knows no tasks: the `clean` verb (`motian.pipeline.clean`) passes the bundled tasks'
   dev/test texts (``--exclude-heldout``, on by default) and the user's own (``--exclude
   FILE…``), so evaluating on them does not measure memorisation.
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
the whole batch, no per-character Python) through `motian.data.stage.ordered_pool`. Steps 3–4
run in the main process in input order, so the output is identical for any number of workers.
At most ``2 × workers`` batches are in flight, so memory is bounded by the batch size plus the
dedup state (~0.7 KB per kept document at the defaults: 4 bytes per MinHash value, 16 per LSH
band and exact hash).

Output: ``clean-00000.jsonl`` … (``{"text", "source", "line"}`` per line), ``manifest.json``
(read by `motian.data.sources`), ``report.json`` and ``report.md``. The directory follows the
stage runner's rules (`motian.data.stage`): after each shard, the shard and the dedup state are
put in place and made durable, then the manifest is written atomically; a rerun with the same
inputs and settings skips the documents already consumed and continues, other settings are
refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from motian.data.dedup import DedupState, band_keys, lsh_bands, minhash
from motian.data.sources import (
    DEFAULT_MAX_LINE_BYTES,
    Document,
    iter_documents,
    pd98_path,
    resolve_inputs,
    reviews_paths,
)
from motian.data.stage import AtomicFile, ByteProgress, StageDir, ordered_pool
from motian.errors import SkipLog, UserError
from motian.io import write_json_atomic

FORMAT_VERSION = 1
MAX_EXAMPLES = 3
HELDOUT = "heldout_task_text"  # drop reason: a bundled task's dev/test text (exclude_heldout)
EXCLUDED = "excluded_text"  # drop reason: a text of the user's --exclude files
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
    # whether the bundled tasks' `HeldOut` was passed (`clean_corpus` sets it); in the manifest
    exclude_heldout: bool = True
    # a digest of the user's --exclude texts ("" = none; `clean_corpus` sets it): a resumed
    # run must exclude the same texts. Left out of the manifest when empty.
    exclude_digest: str = ""

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


def _progress(fingerprint: list[list], enabled: bool) -> ByteProgress:
    """The bar over the inputs' bytes on disk, snapping to each input's start."""
    starts: dict[str, int] = {}
    total = 0
    for item, size, _ in fingerprint:
        starts.setdefault(item, total)
        total += size
    return ByteProgress("clean", total, enabled, starts)


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


# Every file `clean` writes in its directory; --no-resume deletes them.
OWNED_FILES = (r"(clean-\d{5}\.jsonl|dedup-state-\d{5}\.npz|report\.(json|md)|manifest\.json)"
               r"(\.tmp)?")


class _Output:
    """The output directory: the current shard file, the commit (shard and dedup state in
    place, then the manifest) and the resume state, on the stage runner's `StageDir`."""

    def __init__(self, out: Path, inputs: list[str], s: CleanSettings, fingerprint: list[list],
                 resume: bool):
        self.out, self.s = out, s
        self.manifest: dict = {"kind": "cleaned", "format_version": FORMAT_VERSION,
                               "complete": False, "inputs": inputs, "input_fingerprint":
                               fingerprint, "settings": _settings_record(s),
                               "consumed_docs": 0,
                               "elapsed_s": 0.0, "state_file": None, "shards": []}
        self.state, self.tally = DedupState(s.minhash_perm), Tally()
        decides = ("format_version", "inputs", "input_fingerprint", "settings")
        self.stage = StageDir(out, "cleaned", {k: self.manifest[k] for k in decides},
                              OWNED_FILES, resume)
        old = self.stage.previous
        if old is not None:
            self.manifest = old
            self.tally = Tally(**old["counts"]["tally"]) if "counts" in old else Tally()
            if old.get("state_file"):
                self.state = DedupState.load(out / old["state_file"], s.minhash_perm)
        self.file: AtomicFile | None = None
        self.shard_docs = self.shard_chars = 0

    def write(self, doc: Document, text: str) -> None:
        if self.file is None:
            index = len(self.manifest["shards"])
            self.file = AtomicFile(self.out / f"clean-{index:05d}.jsonl", "w", encoding="utf-8")
        rec = {"text": text, "source": doc.source, "line": doc.line}
        self.file.file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.shard_docs += 1
        self.shard_chars += len(text)

    def commit(self, consumed: int, elapsed: float, complete: bool = False) -> None:
        """Make everything up to input document `consumed` durable; the manifest is written
        last, so a crash at any point leaves the previous commit intact."""
        m, files = self.manifest, []
        if self.file is not None:
            files.append(self.file.commit())
            m["shards"].append({"file": self.file.path.name, "n_docs": self.shard_docs,
                                "n_chars": self.shard_chars})
            self.file, self.shard_docs, self.shard_chars = None, 0, 0
        old_state = m["state_file"]
        if not complete:
            m["state_file"] = f"dedup-state-{len(m['shards']):05d}.npz"
            if m["state_file"] != old_state:
                self.state.save(self.out / m["state_file"])
                files.append(self.out / m["state_file"])
        else:
            m["state_file"] = None
        m["consumed_docs"], m["elapsed_s"], m["complete"] = consumed, elapsed, complete
        m["counts"] = {"tally": asdict(self.tally)}
        self.stage.commit(m, files)
        if old_state and old_state != m["state_file"]:
            (self.out / old_state).unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop the shard being written (a rerun rewrites it from the last commit)."""
        if self.file is not None:
            self.file.abort()

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


@dataclass(frozen=True)
class HeldOut:
    """Documents a corpus must not contain, as data: the caller (which knows the tasks) builds
    it. Called on a document (and its normalised text), it says why the document is held out
    (the report's detail), or None; `reason` is the drop reason the report counts it under.

    `texts` match in any input (a user file may hold a copy of them) when the document's
    stripped text, its normalised text or one of its lines (stripped) is one of them; documents
    of `lines_source` match only by the line they start on (`lines`), never by text.
    """

    texts: frozenset[str] = frozenset()
    texts_why: str = "a held-out text"
    lines: frozenset[int] = frozenset()
    lines_source: str = "pd98"
    lines_why: str = "a held-out article"
    reason: str = HELDOUT

    def __call__(self, doc: Document, normalised: str | None = None) -> str | None:
        if doc.source == self.lines_source:
            return self.lines_why if doc.line in self.lines else None
        if not self.texts:
            return None
        text = doc.text.strip()
        if text in self.texts or normalised in self.texts:
            return self.texts_why
        if "\n" in text and any(line.strip() in self.texts for line in text.split("\n")):
            return self.texts_why + " (one of its lines)"
        return None

    def digest(self) -> str:
        """A short hash of what this matches (recorded so a resume excludes the same)."""
        h = hashlib.sha256()
        for text in sorted(self.texts):
            h.update(text.encode() + b"\0")
        h.update(repr((sorted(self.lines), self.lines_source)).encode())
        return h.hexdigest()[:16]


def count_read_and_filter(t: Tally, doc: Document, r: BatchResult, i: int,
                          heldout: list[HeldOut], s: CleanSettings) -> bool:
    """Count document `i` of batch `r` as read in `t`; if a held-out matcher or a quality
    filter drops it, count the drop (reason, example) and return True. Shared by the local run
    and the datatrove steps (`motian.data.engine`), so both drop the same documents."""
    t.read_docs += 1
    t.read_chars += int(r.in_chars[i])
    t.read_bytes += int(r.in_bytes[i])
    t.normalised_away_chars += int(r.in_chars[i] - r.n_chars[i])
    reason = r.reasons[i]
    why = next(((m.reason, w) for m in heldout
                if (w := m(doc, r.texts[i] if reason is None else None))), None)
    if why is not None:
        t.drop(why[0], int(r.n_chars[i]), f"{doc.source}:{doc.line}", r.texts[i], why[1])
    elif reason is not None:
        t.drop(reason, int(r.n_chars[i]), f"{doc.source}:{doc.line}", r.texts[i],
               _detail(reason, r, i, s))
    return why is not None or reason is not None


def _run(out: _Output, docs: Iterator[Document], workers: int, bar: ByteProgress,
         heldout: list[HeldOut]) -> None:
    s, t = out.s, out.tally
    consumed = out.manifest["consumed_docs"]
    skipped = itertools.islice(docs, consumed)  # already in the committed shards
    for doc in skipped:
        bar.advance(len(doc.text.encode()) + 1, doc.source)
    t0, elapsed0 = time.perf_counter(), out.manifest["elapsed_s"]
    jobs = ((batch, ([d.text for d in batch], s)) for batch in _batches(docs))
    with contextlib.closing(ordered_pool(process_batch, jobs, workers)) as results:
        for batch, r in results:
            for i, doc in enumerate(batch):
                consumed += 1
                bar.advance(int(r.in_bytes[i]) + 1, doc.source)
                if not count_read_and_filter(t, doc, r, i, heldout, s) \
                        and _dedup(out, doc, r, i) is None:
                    t.kept_docs += 1
                    t.kept_chars += int(r.n_chars[i])
                    out.write(doc, r.texts[i])
                    if out.shard_docs == s.shard_docs:
                        out.commit(consumed, elapsed0 + time.perf_counter() - t0)
    out.commit(consumed, elapsed0 + time.perf_counter() - t0, complete=True)


# --------------------------------------------------------------------------- report

REASONS = {
    HELDOUT: "a dev/test example of a bundled task (exclude_heldout)",
    EXCLUDED: "a text of an --exclude file (your own dev/test texts)",
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


# --------------------------------------------------------------------------- entry point


def _settings_record(s: CleanSettings) -> dict:
    """The settings as the manifest records them (without an empty exclude_digest, so a
    directory cleaned before --exclude existed still resumes)."""
    record = asdict(s)
    if not record["exclude_digest"]:
        del record["exclude_digest"]
    return record


def _is_cjk_char(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in _CJK_RANGES)


def _first_line(path: Path, max_line_bytes: int) -> tuple[int, str] | None:
    """(line number, text) of the first non-blank line of a (possibly gzipped) file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno in itertools.count(1):
                raw = f.readline(max_line_bytes + 1)
                if not raw:
                    return None
                text = raw.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
                if text:
                    return lineno, text
    except (OSError, EOFError):
        return None  # unreadable: the reader counts it as skipped input, with its place
    return None


def check_text_field(inputs: list[str], text_field: str, max_line_bytes: int) -> None:
    """Refuse, before any work, a JSON-lines input whose first record lacks `text_field`:
    otherwise every one of its records would be skipped and the corpus would come out empty."""
    for item in resolve_inputs(list(inputs), SkipLog(warn=False)):
        path = Path(item)
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            continue
        first = _first_line(path, max_line_bytes)
        if first is None:
            continue
        lineno, line = first
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # counted as invalid JSON by the reader, with its line
        if not isinstance(record, dict) or isinstance(record.get(text_field), str):
            continue
        # the likely text: the string with the most CJK characters, then the longest
        strings = {k: (sum(map(_is_cjk_char, v)), len(v)) for k, v in record.items()
                   if isinstance(v, str)}
        guess = max(strings, key=strings.__getitem__) if strings else None
        hint = (f"pass --text-field {guess} (text_field={guess!r} in Python) if that field "
                "holds the text" if guess else "no field of it holds a string: the text must "
                "be a string field")
        raise UserError(f"{path}:{lineno}: the JSON record has no string field "
                        f"'{text_field}' (its keys: {', '.join(map(str, record)) or 'none'}); "
                        f"{hint}. Every record without it would be skipped.")


def with_exclusions(settings: CleanSettings, exclude: HeldOut | list[HeldOut] | None
                    ) -> tuple[CleanSettings, list[HeldOut]]:
    """The settings recording which exclusions are given (checked), and the matchers as a
    list: shared by `clean_corpus` and the datatrove engine (`motian.data.engine`)."""
    matchers = [exclude] if isinstance(exclude, HeldOut) else list(exclude or [])
    own = [m for m in matchers if m.reason == EXCLUDED]
    s = replace(settings, exclude_heldout=any(m.reason == HELDOUT for m in matchers),
                exclude_digest="+".join(m.digest() for m in own))
    s.check()
    return s, matchers


def clean_corpus(inputs: list[str], out: Path, settings: CleanSettings = CleanSettings(),
                 workers: int = 0, exclude: HeldOut | list[HeldOut] | None = None,
                 resume: bool = True, progress: bool = True) -> dict:
    """Clean a corpus: normalise, filter, remove `exclude`'s held-out texts and exact and near
    duplicates, write shards and report.json; return the report (the report layer makes
    its page).

    The engine of the `clean` verb (`motian.pipeline.clean`, which documents every setting and
    builds `exclude` from the bundled tasks and the user's --exclude files). The manifest
    records which exclusions were given (`settings.exclude_heldout`: a matcher with reason
    HELDOUT; `settings.exclude_digest`: the EXCLUDED matchers' texts), so a resume with other
    ones is refused. A JSON-lines input whose first record lacks `settings.text_field` is
    refused before any work. `workers`: processes (0: every core); `resume`: continue an
    interrupted run in `out` (False starts over); `progress`: a progress bar with an ETA on
    stderr.
    """
    s, matchers = with_exclusions(settings, exclude)
    inputs = [str(x) for x in inputs]
    fingerprint = _fingerprint(inputs)  # UserError for a missing input, before any work
    check_text_field(inputs, s.text_field, s.max_line_bytes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    output = _Output(out, inputs, s, fingerprint, resume)
    skips = SkipLog()
    docs = iter_documents(inputs, txt_mode=s.txt_mode, text_field=s.text_field,
                          max_line_bytes=s.max_line_bytes, skips=skips)
    if output.manifest["complete"]:
        for _ in docs:  # already done: only recount the skipped input for the report
            pass
    else:
        if output.manifest["consumed_docs"]:
            print(f"motian clean: resuming {out} after {output.manifest['consumed_docs']:,} "
                  f"documents ({len(output.manifest['shards'])} shards)", file=sys.stderr)
        bar = _progress(fingerprint, progress)
        try:
            _run(output, docs, workers or os.cpu_count() or 1, bar, matchers)
        except BaseException:
            output.abort()
            bar.close(finished=False)
            raise
        bar.close(finished=True)
    rep = _report(output, skips)
    write_json_atomic(out / "report.json", rep)  # the Markdown page is the report layer's
    return rep
