"""ERNIE 2.0's structure-aware tasks as rows of the encoded shards (Sun et al. 2020, "ERNIE 2.0:
A Continual Pre-Training Framework for Language Understanding", AAAI, section 3.3).

Both read the sentences the shards already mark (`motian.data.pairs.sentence_index`: the
encoder's sentence and paragraph starts, at 。！？ and line ends, plus every document start), so
no raw text is read again and the held-out documents stay held out (`SplitLoader`).

* **Sentence reordering** (`reorder_plan`). This epoch's windows of ``cap`` tokens of each
  document (the random phase of the pair tasks, `window_chunks`) that hold at least k
  sentences are cut into k parts at k - 1 random sentence boundaries; the parts are shown in
  one of the k! orders, drawn uniformly, ``[CLS] P_a [SEP] P_b [SEP] P_c [SEP]``, and the
  label is the order's number in `permutations(k)`: the row shows original part
  ``permutations(k)[label][i]`` in place i. Each part keeps at most ``cap // k`` tokens, from
  its beginning (where the discourse cues are: 但是, 因此, 此外).
* **Sentence distance** (`distance_plan`). Every sentence A that has a next sentence, in a
  document of at least 4 sentences (so that all three answers exist for every A and A's
  position gives none away), is paired with B and a label drawn uniformly: 0, B is the next
  sentence; 1, B is another sentence of the same document, not next to A on either side;
  2, B is a sentence of another such document. A longer pair is cut as the pair tasks cut theirs
  (`PairPlan.truncated`: A loses its beginning, B its end).

`DiscourseLoader` is a `SplitLoader` whose epoch plan is one of these, so ordering, ranks,
masking and the saved position are the pair tasks' (the rows are masked for MLM as pair rows
are). A row's label is ``task_labels`` (B,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import permutations
from pathlib import Path

import numpy as np

from motian.data.loader import LoaderConfig, _Plan
from motian.data.pairs import (
    PairPlan,
    SentenceIndex,
    other_document_sentence,
    window_chunks,
)
from motian.data.splits import SplitLoader
from motian.errors import UserError

KINDS = ("reorder", "distance")
DISTANCE_LABELS = ("adjacent", "same document", "other document")
MAX_PARTS = 4  # 4! = 24 orders, ERNIE 2.0's largest


@dataclass
class SegmentPlan:
    """Rows of k segments: row i is [CLS] seg_0 [SEP] ... seg_{k-1} [SEP], segment j being
    `length[i, j]` tokens from `start[i, j]` of shard `shard[i, j]`; label `label[i]`."""

    shard: np.ndarray  # int64 (n, k)
    start: np.ndarray  # int64 (n, k)
    length: np.ndarray  # int64 (n, k)
    label: np.ndarray  # int64 (n,)


def orders(parts: int) -> np.ndarray:
    """(parts!, parts): every order of `parts` parts; a label is a row number."""
    return np.array(list(permutations(range(parts))), dtype=np.int64)


def classes(kind: str, parts: int) -> int:
    return math.factorial(parts) if kind == "reorder" else len(DISTANCE_LABELS)


def reorder_plan(s: SentenceIndex, cap: int, parts: int, rng: np.random.Generator
                 ) -> SegmentPlan:
    """One epoch of sentence-reordering rows (module docstring). `cap` is the row's text
    budget (seq_len - 1 - parts)."""
    first, n = window_chunks(s, cap, rng, min_sentences=parts)
    cuts = [np.zeros(len(first), np.int64)]  # first sentence of each part, from the chunk's
    for j in range(1, parts):  # part j starts after part j-1 and leaves a sentence per part
        room = n - (parts - j) - cuts[-1]
        cuts.append(cuts[-1] + 1 + (rng.random(len(first)) * room).astype(np.int64))
    begin = first[:, None] + np.stack(cuts, axis=1)  # (n, parts) sentence indices
    end = np.concatenate([begin[:, 1:], (first + n)[:, None]], axis=1)  # exclusive
    start = s.start[begin]
    length = np.minimum(s.end[end - 1] - start, cap // parts)
    label = rng.integers(0, math.factorial(parts), len(first))
    shown = orders(parts)[label]  # (n, parts): original part shown in each place
    return SegmentPlan(np.take_along_axis(s.shard[begin], shown, 1),
                       np.take_along_axis(start, shown, 1),
                       np.take_along_axis(length, shown, 1), label)


def distance_plan(s: SentenceIndex, cap: int, rng: np.random.Generator) -> SegmentPlan:
    """One epoch of sentence-distance rows (module docstring). `cap` = seq_len - 3."""
    lo = np.searchsorted(s.doc, s.doc, "left")
    size = np.searchsorted(s.doc, s.doc, "right") - lo  # sentences in each one's document
    pos = np.arange(len(s.doc)) - lo
    a = np.flatnonzero((size >= 4) & (pos < size - 1))
    docs = np.unique(s.doc[a])  # B of another document is drawn from the same kind of text
    if len(docs) < 2:
        raise ValueError("sentence distance needs documents of at least 4 sentences and at "
                         "least two documents")
    label = rng.integers(0, 3, len(a))
    # 1: a sentence of A's document outside the band A-1..A+1, uniform over the others
    band_lo, band_hi = np.maximum(pos[a] - 1, 0), np.minimum(pos[a] + 1, size[a] - 1)
    r = (rng.random(len(a)) * (size[a] - (band_hi - band_lo + 1))).astype(np.int64)
    far = lo[a] + np.where(r < band_lo, r, r + band_hi - band_lo + 1)
    other = other_document_sentence(s, docs, s.doc[a], rng)  # 2
    b = np.choose(label, [a + 1, far, other])
    p = PairPlan(s.shard[a], s.start[a], s.end[a] - s.start[a], s.start[b], s.end[b] - s.start[b],
                 label).truncated(cap)
    return SegmentPlan(np.stack([p.shard, s.shard[b]], 1), np.stack([p.a_start, p.b_start], 1),
                       np.stack([p.a_len, p.b_len], 1), label)


class DiscourseLoader(SplitLoader):
    """`SplitLoader` over reordering or distance rows (module docstring) of the training or
    the held-out documents; batches carry ``task_labels``."""

    def __init__(self, data: Path, config: LoaderConfig, holdout_every: int, held_out: bool,
                 kind: str, parts: int = 3):
        if kind not in KINDS:
            raise UserError(f"unknown discourse task {kind!r}; choose one of {', '.join(KINDS)}")
        if not 2 <= parts <= MAX_PARTS:
            raise UserError(f"data.reorder_parts must be 2 to {MAX_PARTS} (at most 4! = 24 "
                            f"orders), got {parts}")
        self.kind, self.parts = kind, parts  # before __init__: it plans the first epoch
        # The sentence index and the pair-row path of the loader (sop), with these plans
        super().__init__(data, replace(config, pair_task="sop", pair_fraction=1.0),
                         holdout_every, held_out)

    def _pair_plan(self, rng: np.random.Generator) -> _Plan:
        L = self.config.seq_len
        try:
            if self.kind == "reorder":
                plan = reorder_plan(self._sentences, L - 1 - self.parts, self.parts, rng)
            else:
                plan = distance_plan(self._sentences, L - 3, rng)
        except ValueError as e:
            raise UserError(f"{self.dataset.directory}: {e}") from None
        if len(plan.label) == 0:
            raise UserError(f"{self.dataset.directory}: no document window holds "
                            f"{self.parts} sentences for sentence reordering; use more data "
                            "or fewer data.reorder_parts")
        return _Plan(rng.permutation(len(plan.label)), pairs=plan)

    def _pair_rows(self, plan: SegmentPlan, rows: np.ndarray) -> dict[str, np.ndarray]:
        L = self.config.seq_len
        length, start, shard = plan.length[rows], plan.start[rows], plan.shard[rows]
        k = length.shape[1]
        sep = np.cumsum(length + 1, axis=1)  # (B, k): position of the [SEP] after each part
        begin = sep - length  # first position of each part
        j = np.arange(L)[None, :]
        part = np.minimum((j[:, None, :] > sep[:, :, None]).sum(1), k - 1)  # (B, L)
        at = np.take_along_axis
        real = j <= sep[:, -1:]
        is_sep = real & (j == at(sep, part, 1))
        text = real & (j >= 1) & ~is_sep
        index = np.where(text, at(start, part, 1) + j - at(begin, part, 1), 0)
        tokens, flags, syn = self._gather(at(shard, part, 1), index, text)
        tokens[is_sep] = self.special["sep"]
        tokens[:, 0] = self.special["cls"]
        tokens[~real] = self.special["pad"]
        out = {"tokens": tokens, "flags": flags, "synonyms": syn,
               "content": text & (tokens != self.special["unk"]),
               "attention_mask": real.astype(np.int64),
               "token_type_ids": np.where(real & (j >= 1), part % 2, 0).astype(np.int64),
               "document_ids": np.zeros((len(rows), L), np.int64),
               "task_labels": plan.label[rows].astype(np.int64)}
        if not self.config.cross_document_attention:
            out["position_ids"] = np.broadcast_to(j, (len(rows), L)).copy()
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "task": self.kind, "parts": self.parts}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("task", self.kind), ("parts", self.parts)):
            if state.get(key) != mine:
                raise UserError(f"the saved loader position was taken with {key}="
                                f"{state.get(key)!r} but this loader has {mine!r}; resume with "
                                "the same recipe")
        super().load_state_dict(state)


def segments_text(loader: DiscourseLoader, plan: SegmentPlan, row: int) -> list[str]:
    """The segments of one row of `plan` as text (for inspection and tests)."""
    vocab = loader.vocab
    out = []
    for j in range(plan.length.shape[1]):
        shard = loader.shards[int(plan.shard[row, j])]
        a = int(plan.start[row, j])
        ids = shard.tokens[a: a + int(plan.length[row, j])]
        out.append("".join(vocab[int(t)].removeprefix("##") for t in ids))
    return out


__all__ = ["DISTANCE_LABELS", "KINDS", "DiscourseLoader", "SegmentPlan", "classes",
           "distance_plan", "orders", "reorder_plan", "segments_text"]
