"""Pair-task examples for the auxiliary loss trained jointly with MLM.

Owns `PairPlan` (one epoch's examples as arrays: segment A, segment B, label) and its two
sources:

* **Sentence order** (`sop_plan`, the default; ALBERT's SOP). Sentences come from the shards'
  flags (bit 1 sentence start, bit 2 paragraph start, plus every document start). Each
  document longer than ``cap = L - 3`` tokens is cut into windows of ``cap`` tokens at a random
  phase drawn per document and epoch (a shorter one is a single window); the sentences that start in a window form a chunk, and a chunk of two or more
  sentences is split at a random sentence boundary into A and B. With probability
  ``swap_prob`` the two are swapped (label 0), else kept in order (label 1). A pair longer
  than ``cap`` is cut away from the junction: A loses its beginning, B its end, the shorter
  side keeping at least half of ``cap``, so the evidence for the order (the boundary) is
  always in the row. Everything is vectorised over all sentences; an epoch's plan costs a few
  numpy passes over the sentence index, which is built once per loader.
* **Click logs** (`read_click_log`, `click_source`). The user's files hold one pair per line,
  ``query<TAB>title<TAB>label`` with label 0/1, or ``query<TAB>title<TAB>impressions<TAB>
  clicks`` (label 1 when the pair was clicked at least once and its click rate reaches
  `min_ctr`). Lines that do not parse are skipped and counted with file and line; a file with
  no valid line is an error. Queries and titles are tokenized with the run's tokenizer and
  segmented with jieba into word starts and Cilin synonym rows, exactly like encoded shards,
  so whole-word and synonym masking work on them too.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from motian.data.shards import PARAGRAPH_START, SENTENCE_START, Shard, SynonymTable
from motian.errors import SkipLog, UserError


@dataclass
class PairPlan:
    """Pair examples: row i is [CLS] tokens[a_start:a_start+a_len] [SEP] tokens[b_start:...]
    [SEP] of shard `shard[i]`, with label `label[i]`."""

    shard: np.ndarray  # int64 (n,)
    a_start: np.ndarray  # int64 (n,)
    a_len: np.ndarray  # int64 (n,)
    b_start: np.ndarray  # int64 (n,)
    b_len: np.ndarray  # int64 (n,)
    label: np.ndarray  # int64 (n,)

    def truncated(self, cap: int) -> PairPlan:
        """The same pairs with len(A) + len(B) <= cap: A loses its beginning, B its end."""
        la = np.minimum(self.a_len, np.maximum(cap - self.b_len, cap // 2))
        lb = np.minimum(self.b_len, cap - la)
        return PairPlan(self.shard, self.a_start + self.a_len - la, la, self.b_start, lb,
                        self.label)


@dataclass
class SentenceIndex:
    """Every sentence of an encoded dataset, in shard/document order."""

    shard: np.ndarray  # int64 (S,)
    doc: np.ndarray  # int64 (S,): document id unique across shards
    start: np.ndarray  # int64 (S,): token index in the shard
    end: np.ndarray  # int64 (S,)
    offset: np.ndarray  # int64 (S,): start - start of its document
    doc_len: np.ndarray  # int64 (S,): tokens in its document
    n_docs: int


def sentence_index(shards: list[Shard]) -> SentenceIndex:
    """Find the sentences of all shards (one pass over the flags, done once per loader)."""
    parts: list[tuple[np.ndarray, ...]] = []
    doc_base = 0
    for s, shard in enumerate(shards):
        docs = np.asarray(shard.docs, dtype=np.int64)
        flags = np.asarray(shard.flags)
        starts = np.flatnonzero(flags & (SENTENCE_START | PARAGRAPH_START))
        starts = np.union1d(starts, docs[:-1][np.diff(docs) > 0])
        doc = np.searchsorted(docs, starts, side="right") - 1
        nxt = np.append(starts[1:], docs[-1])
        end = np.minimum(nxt, docs[doc + 1])
        parts.append((np.full(len(starts), s), doc + doc_base, starts, end, starts - docs[doc],
                      docs[doc + 1] - docs[doc]))
        doc_base += len(docs) - 1
    if not parts:
        return SentenceIndex(*[np.zeros(0, np.int64)] * 6, n_docs=0)
    cols = [np.concatenate(c).astype(np.int64) for c in zip(*parts)]
    return SentenceIndex(*cols, n_docs=doc_base)


def sop_plan(sentences: SentenceIndex, cap: int, rng: np.random.Generator,
             swap_prob: float = 0.5) -> PairPlan:
    """One epoch of sentence-order examples (see the module docstring)."""
    s = sentences
    if len(s.start) == 0:
        return PairPlan(*[np.zeros(0, np.int64)] * 6)
    # A document that fits one window stays whole (a random phase would only halve it).
    phase = np.where(s.doc_len > cap, rng.integers(0, cap, size=max(s.n_docs, 1))[s.doc], 0)
    window = (s.offset + phase) // cap
    new = np.ones(len(s.start), dtype=bool)
    new[1:] = (s.doc[1:] != s.doc[:-1]) | (window[1:] != window[:-1])
    first = np.flatnonzero(new)
    n = np.diff(np.append(first, len(s.start)))  # sentences per chunk
    first, n = first[n >= 2], n[n >= 2]
    split = first + 1 + (rng.random(len(first)) * (n - 1)).astype(np.int64)  # first of B
    last = first + n - 1
    a_start, a_end = s.start[first], s.end[split - 1]
    b_start, b_end = s.start[split], s.end[last]
    # Truncate in reading order (so the junction survives), then swap.
    p = PairPlan(s.shard[first], a_start, a_end - a_start, b_start, b_end - b_start,
                 np.ones(len(first), np.int64)).truncated(cap)
    swap = rng.random(len(first)) < swap_prob
    return PairPlan(p.shard, np.where(swap, p.b_start, p.a_start),
                    np.where(swap, p.b_len, p.a_len), np.where(swap, p.a_start, p.b_start),
                    np.where(swap, p.a_len, p.b_len), (~swap).astype(np.int64))


# --------------------------------------------------------------------------- click logs


@dataclass
class ClickPair:
    query: str
    title: str
    label: int
    where: str  # file:line


def read_click_log(path: Path, skips: SkipLog, min_ctr: float = 0.0) -> list[ClickPair]:
    """Parse one click-log file (see the module docstring); bad lines go to `skips`."""
    if not path.is_file():
        raise UserError(f"{path}: no such click-log file")
    pairs = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 (byte {err.start}); convert it, e.g. "
                            "iconv -f GB18030 -t UTF-8") from err
    for lineno, line in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) not in (3, 4) or not cols[0].strip() or not cols[1].strip():
            skips.add("click log: expected query<TAB>title<TAB>label or "
                      "query<TAB>title<TAB>impressions<TAB>clicks", where, repr(line[:60]))
            continue
        label = _click_label(cols[2:], min_ctr)
        if label is None:
            skips.add("click log: label must be 0/1, or impressions >= clicks >= 0 integers",
                      where, repr("\t".join(cols[2:])[:40]))
            continue
        pairs.append(ClickPair(cols[0].strip(), cols[1].strip(), label, where))
    return pairs


def _click_label(values: list[str], min_ctr: float) -> int | None:
    try:
        numbers = [int(v.strip()) for v in values]
    except ValueError:
        return None
    if len(numbers) == 1:
        return numbers[0] if numbers[0] in (0, 1) else None
    impressions, clicks = numbers
    if not 0 <= clicks <= impressions or impressions == 0:
        return None
    return int(clicks > 0 and clicks / impressions >= min_ctr)


def click_source(files: list[Path], tok, synonyms: SynonymTable, min_ctr: float = 0.0) -> tuple[Shard, PairPlan]:
    """Read click logs into an in-memory shard (query i is document 2i, its title 2i+1) and
    the plan of all pairs. `tok` is a `tokenizers.Tokenizer`."""
    skips = SkipLog()
    pairs = [p for f in files for p in read_click_log(f, skips, min_ctr)]
    if not pairs:
        raise UserError(f"no valid line in the click logs {', '.join(map(str, files))}"
                        + (f"; first problems: {skips.examples}" if skips.total else ""))
    if skips.total:
        print(f"motian: click logs: {len(pairs)} pairs read, {skips.total} bad lines skipped "
              f"({', '.join(f'{n} {r}' for r, n in skips.counts.items())})", file=sys.stderr)
    texts = [t for p in pairs for t in (p.query, p.title)]
    tokens, flags, syn, docs = encode_words(texts, tok, synonyms)
    shard = Shard(tokens, flags, syn, docs)
    q, t = np.arange(0, len(texts), 2), np.arange(1, len(texts), 2)
    plan = PairPlan(np.zeros(len(pairs), np.int64), docs[q], docs[q + 1] - docs[q],
                    docs[t], docs[t + 1] - docs[t], np.array([p.label for p in pairs]))
    return shard, plan


def encode_words(texts: list[str], tok, synonyms: SynonymTable
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize `texts` and mark jieba word starts and Cilin rows exactly as `motian encode`
    does for shards (one shared function, `motian.data.encode.encode_texts`). Returns (tokens,
    flags, synonym rows, document offsets)."""
    import jieba  # imported here: jieba loads its dictionary on first use (~1 s)

    from motian.data.encode import continuation_mask, encode_texts

    jieba.setLogLevel(logging.WARNING)
    rows = {w: r for r, w in enumerate(synonyms.words)}
    return encode_texts(texts, tok, jieba.dt, rows, synonyms.length, continuation_mask(tok))
