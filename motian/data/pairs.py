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
* **Next sentence** (`nsp_plan`; BERT's NSP). The same chunks and split as SOP; with
  probability ``random_prob`` segment B is replaced by a segment of the same length (cut at its
  document's end) starting at a random sentence of *another* document (label 0, NotNext), else
  B is the real continuation (label 1, IsNext). The random B keeps the real B's length, so the
  length of the pair says nothing about its label.
* **Click logs** (`read_click_log`, `click_source`). The user's files hold one pair per line,
  ``query<TAB>title<TAB>label`` with label 0/1, or ``query<TAB>title<TAB>impressions<TAB>
  clicks``. With counts, `ClickSettings` decides: a pair shown fewer than `min_impressions`
  times is left out (too few to judge), the label is 1 when it was clicked and its click rate
  reaches `min_ctr`, and the pair's loss weight grows with its impressions up to 1 at
  `full_weight_impressions` (a pair shown twice says less than one shown fifty times); a 0/1
  label has weight 1. Lines that do not parse are skipped and counted with file and line; a
  file with no valid line is an error. ``pd98`` and ``pd98:heldout`` name the bundled stand-in
  (`motian.data.clicks`: People's Daily headlines with paragraphs of their own or of other
  articles), training and held-out articles respectively. Queries and titles are tokenized
  with the run's tokenizer and segmented with jieba into word starts and Cilin synonym rows,
  exactly like encoded shards, so whole-word and synonym masking work on them too.
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
    weight: np.ndarray | None = None  # float32 (n,): loss weight (None: all 1)
    b_shard: np.ndarray | None = None  # int64 (n,): B's shard when it differs from A's

    def shard_of_b(self) -> np.ndarray:
        return self.shard if self.b_shard is None else self.b_shard

    def truncated(self, cap: int) -> PairPlan:
        """The same pairs with len(A) + len(B) <= cap: A loses its beginning, B its end."""
        la = np.minimum(self.a_len, np.maximum(cap - self.b_len, cap // 2))
        lb = np.minimum(self.b_len, cap - la)
        return PairPlan(self.shard, self.a_start + self.a_len - la, la, self.b_start, lb,
                        self.label, self.weight, self.b_shard)

    def weights(self) -> np.ndarray:
        return (np.ones(len(self.label), np.float32) if self.weight is None
                else self.weight.astype(np.float32))


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


def window_chunks(s: SentenceIndex, cap: int, rng: np.random.Generator,
                  min_sentences: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(first sentence, sentence count) of every chunk of at least `min_sentences` sentences
    of this epoch's windows of `cap` tokens (see the module docstring)."""
    # A document that fits one window stays whole (a random phase would only halve it).
    phase = np.where(s.doc_len > cap, rng.integers(0, cap, size=max(s.n_docs, 1))[s.doc], 0)
    window = (s.offset + phase) // cap
    new = np.ones(len(s.start), dtype=bool)
    new[1:] = (s.doc[1:] != s.doc[:-1]) | (window[1:] != window[:-1])
    first = np.flatnonzero(new)
    n = np.diff(np.append(first, len(s.start)))  # sentences per chunk
    return first[n >= min_sentences], n[n >= min_sentences]


def _chunks(s: SentenceIndex, cap: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first sentence, first sentence of B, last sentence) of every chunk of two or more
    sentences of this epoch's windows (see the module docstring)."""
    first, n = window_chunks(s, cap, rng)
    split = first + 1 + (rng.random(len(first)) * (n - 1)).astype(np.int64)  # first of B
    return first, split, first + n - 1


def _empty_plan() -> PairPlan:
    return PairPlan(*[np.zeros(0, np.int64)] * 6)


def sop_plan(sentences: SentenceIndex, cap: int, rng: np.random.Generator,
             swap_prob: float = 0.5) -> PairPlan:
    """One epoch of sentence-order examples (see the module docstring)."""
    s = sentences
    if len(s.start) == 0:
        return _empty_plan()
    first, split, last = _chunks(s, cap, rng)
    a_start, a_end = s.start[first], s.end[split - 1]
    b_start, b_end = s.start[split], s.end[last]
    # Truncate in reading order (so the junction survives), then swap.
    p = PairPlan(s.shard[first], a_start, a_end - a_start, b_start, b_end - b_start,
                 np.ones(len(first), np.int64)).truncated(cap)
    swap = rng.random(len(first)) < swap_prob
    return PairPlan(p.shard, np.where(swap, p.b_start, p.a_start),
                    np.where(swap, p.b_len, p.a_len), np.where(swap, p.a_start, p.b_start),
                    np.where(swap, p.a_len, p.b_len), (~swap).astype(np.int64))


def nsp_plan(sentences: SentenceIndex, cap: int, rng: np.random.Generator,
             random_prob: float = 0.5) -> PairPlan:
    """One epoch of next-sentence examples (see the module docstring). A random B never comes
    from A's own document; with a single document there is nothing to draw from (an error)."""
    s = sentences
    if len(s.start) == 0:
        return _empty_plan()
    docs = np.unique(s.doc)
    if len(docs) < 2:
        raise ValueError("next-sentence prediction needs at least two documents")
    first, split, last = _chunks(s, cap, rng)
    a_start, a_end = s.start[first], s.end[split - 1]
    p = PairPlan(s.shard[first], a_start, a_end - a_start, s.start[split],
                 s.end[last] - s.start[split], np.ones(len(first), np.int64)).truncated(cap)
    j = other_document_sentence(s, docs, s.doc[first], rng)
    doc_end = s.start[j] - s.offset[j] + s.doc_len[j]
    random_b = rng.random(len(first)) < random_prob
    b_start = np.where(random_b, s.start[j], p.b_start)
    b_len = np.where(random_b, np.minimum(p.b_len, doc_end - s.start[j]), p.b_len)
    return PairPlan(p.shard, p.a_start, p.a_len, b_start, b_len,
                    (~random_b).astype(np.int64),
                    b_shard=np.where(random_b, s.shard[j], p.shard))


def other_document_sentence(s: SentenceIndex, docs: np.ndarray, own_doc: np.ndarray,
                            rng: np.random.Generator) -> np.ndarray:
    """For each document id of `own_doc`, a random sentence (index into `s`) of a random
    *other* document (uniform over the others of `docs`, the sorted ids present in `s`)."""
    own = np.searchsorted(docs, own_doc)
    other = docs[(own + 1 + rng.integers(0, len(docs) - 1, len(own_doc))) % len(docs)]
    lo, hi = np.searchsorted(s.doc, other, "left"), np.searchsorted(s.doc, other, "right")
    return lo + (rng.random(len(own_doc)) * (hi - lo)).astype(np.int64)


# --------------------------------------------------------------------------- click logs


@dataclass(frozen=True)
class ClickSettings:
    """How click counts become a label and a weight (see the module docstring)."""

    min_ctr: float = 0.0  # label 1 needs a click and clicks / impressions >= min_ctr
    min_impressions: int = 1  # pairs shown fewer times are left out
    full_weight_impressions: int = 10  # weight = min(1, impressions / this)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_ctr <= 1.0:
            raise UserError(f"click min_ctr must be in [0, 1], got {self.min_ctr}")
        if self.min_impressions < 1 or self.full_weight_impressions < 1:
            raise UserError("click min_impressions and full_weight_impressions must be >= 1, "
                            f"got {self.min_impressions} and {self.full_weight_impressions}")

    def judge(self, impressions: int, clicks: int) -> tuple[int, float] | None:
        """(label, weight) of a pair with these counts, or None when it was shown too rarely."""
        if impressions < self.min_impressions:
            return None
        label = int(clicks > 0 and clicks / impressions >= self.min_ctr)
        return label, min(1.0, impressions / self.full_weight_impressions)


@dataclass
class ClickPair:
    query: str
    title: str
    label: int
    where: str  # file:line
    weight: float = 1.0


BUILTIN_CLICKS = {"pd98": "train", "pd98:heldout": "heldout"}


def read_click_log(path: Path, skips: SkipLog, settings: ClickSettings = ClickSettings(),
                   rare: list[int] | None = None) -> list[ClickPair]:
    """Parse one click-log file (see the module docstring); bad lines go to `skips`, and the
    count of pairs shown fewer than `min_impressions` times to `rare[0]` when given."""
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
        counts = _click_counts(cols[2:])
        if counts is None:
            skips.add("click log: label must be 0/1, or impressions >= clicks >= 0 integers",
                      where, repr("\t".join(cols[2:])[:40]))
            continue
        judged = (counts[1], 1.0) if len(cols) == 3 else settings.judge(*counts)
        if judged is None:
            if rare is not None:
                rare[0] += 1
            continue
        pairs.append(ClickPair(cols[0].strip(), cols[1].strip(), judged[0], where, judged[1]))
    return pairs


def _click_counts(values: list[str]) -> tuple[int, int] | None:
    """(impressions, clicks), or (1, label) for a 0/1 label; None when the values are bad."""
    try:
        numbers = [int(v.strip()) for v in values]
    except ValueError:
        return None
    if len(numbers) == 1:
        return (1, numbers[0]) if numbers[0] in (0, 1) else None
    impressions, clicks = numbers
    if not 0 <= clicks <= impressions or impressions == 0:
        return None
    return impressions, clicks


def builtin_clicks(spec: str, settings: ClickSettings, rare: list[int]) -> list[ClickPair]:
    """The bundled stand-in log `spec` (``pd98`` or ``pd98:heldout``), judged by `settings`
    like a user's file."""
    from motian.data.clicks import pd98_clicks

    pairs = []
    for r in pd98_clicks(BUILTIN_CLICKS[spec]):
        judged = settings.judge(r.impressions, r.clicks)
        if judged is None:
            rare[0] += 1
        else:
            pairs.append(ClickPair(r.query, r.title, judged[0], r.where, judged[1]))
    return pairs


def read_click_sources(specs: list[str], settings: ClickSettings = ClickSettings()
                       ) -> list[ClickPair]:
    """All pairs of the click logs `specs` (files, or the bundled names of
    `BUILTIN_CLICKS`), with a note on stderr of what was skipped; an error when none is
    valid."""
    skips, rare = SkipLog(), [0]
    pairs = [p for spec in specs for p in (
        builtin_clicks(spec, settings, rare) if spec in BUILTIN_CLICKS
        else read_click_log(Path(spec), skips, settings, rare))]
    if not pairs:
        raise UserError(f"no valid line in the click logs {', '.join(map(str, specs))}"
                        + (f"; first problems: {skips.examples}" if skips.total else "")
                        + (f"; {rare[0]} pairs were shown fewer than min_impressions="
                           f"{settings.min_impressions} times" if rare[0] else ""))
    notes = [f"{skips.total} bad lines skipped ("
             + ", ".join(f"{n} {r}" for r, n in skips.counts.items()) + ")"] if skips.total else []
    if rare[0]:
        notes.append(f"{rare[0]} pairs shown fewer than {settings.min_impressions} times "
                     "left out")
    if notes:
        print(f"motian: click logs: {len(pairs)} pairs read, {'; '.join(notes)}",
              file=sys.stderr)
    return pairs


def click_source(specs: list[str | Path], tok, synonyms: SynonymTable,
                 settings: ClickSettings = ClickSettings()) -> tuple[Shard, PairPlan]:
    """Read click logs into an in-memory shard (query i is document 2i, its title 2i+1) and
    the plan of all pairs. `tok` is a `tokenizers.Tokenizer`."""
    pairs = read_click_sources([str(s) for s in specs], settings)
    texts = [t for p in pairs for t in (p.query, p.title)]
    tokens, flags, syn, docs = encode_words(texts, tok, synonyms)
    shard = Shard(tokens, flags, syn, docs)
    q, t = np.arange(0, len(texts), 2), np.arange(1, len(texts), 2)
    plan = PairPlan(np.zeros(len(pairs), np.int64), docs[q], docs[q + 1] - docs[q],
                    docs[t], docs[t + 1] - docs[t], np.array([p.label for p in pairs]),
                    np.array([p.weight for p in pairs], np.float32))
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
