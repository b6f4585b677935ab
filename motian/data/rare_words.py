"""Rare words of an encoded corpus, and where they occur in a batch: the keys of the note
dictionary of Taking Notes on the Fly (TNF; Wu et al. 2021, "Taking Notes on the Fly Helps
Language Pre-Training", ICLR 2021, arXiv:2008.01466).

**What a word is.** The encoded shards mark jieba word starts (bit 0 of the flags, aligned to
tokens by `motian encode`: a word's tokens are those from its start to the next word start or
the end of the document; ``##`` pieces never start a word). A word is identified by its token
ids, hashed to one uint64 key (`word_keys`: a sum of ``(token + 1) * M_k`` over its tokens with
fixed odd multipliers per position, mod 2^64, plus its length), so counting and lookup are a
few vectorised numpy operations; two different words share a key with probability ~2^-64 per
pair. Words longer than `MAX_WORD_TOKENS` tokens are never rare words (long Latin/number runs).

**Rare.** A word is rare when it occurs in the training documents at least `min_count` and
fewer than `threshold` times (`find_rare_words`). Below `min_count` a word would rarely come
back to use its note (and the dictionary would be mostly such words).

**In a batch** (`rare_occurrences`), a word counts only when it is whole: its first token must
carry the word-start flag (a row that starts mid-word does not) and it must not touch the last
column of its row (it may continue in the next row). A word cut by a pair segment's
truncation just before [SEP] cannot be told apart and may be taken for a shorter word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from motian.data.shards import WORD_START, Shard

MAX_WORD_TOKENS = 16
# Fixed odd multipliers (drawn once from seed 0) for the token at each offset of a word and
# for its length: the keys must be the same in every process and every run.
_MULTIPLIERS = np.random.default_rng(0).integers(1, 2**63, size=MAX_WORD_TOKENS + 1,
                                                 dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def word_keys(tokens: np.ndarray, first: np.ndarray, length: np.ndarray) -> np.ndarray:
    """uint64 (W,) key of the words ``tokens[first[i] : first[i] + length[i]]`` (lengths at
    most MAX_WORD_TOKENS). Loops over offsets within a word only."""
    first = np.asarray(first, np.int64)
    length = np.asarray(length, np.int64)
    key = length.astype(np.uint64) * _MULTIPLIERS[-1]
    for k in range(int(length.max(initial=0))):
        m = length > k
        ids = np.asarray(tokens[first[m] + k]).astype(np.uint64) + np.uint64(1)
        key[m] += ids * _MULTIPLIERS[k]  # uint64 arithmetic wraps: mod 2^64
    return key


@dataclass(frozen=True, eq=False)  # eq=False: hashable by identity inside LoaderConfig
class RareWords:
    """The note dictionary's words: sorted `keys` (R,) and their corpus `counts` (R,). Note
    row r belongs to the word with key keys[r]."""

    keys: np.ndarray  # uint64 (R,), sorted
    counts: np.ndarray  # int64 (R,)
    threshold: int
    min_count: int

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """int64 (W,): the dictionary row of each key, -1 for a word that is not rare."""
        if len(self.keys) == 0:
            return np.full(len(keys), -1, np.int64)
        i = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[i] == keys, i, -1).astype(np.int64)


def document_words(shard: Shard, doc_start: np.ndarray, doc_len: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(first, length) (W,) of every word of the given documents of `shard` (positions into
    the shard's token array): from each word start to the next one or the document's end."""
    n = len(shard.tokens)
    edges = np.zeros(n + 1, np.int64)
    np.add.at(edges, doc_start, 1)
    np.add.at(edges, doc_start + doc_len, -1)
    inside = np.cumsum(edges[:-1]) > 0  # (n,) token belongs to a chosen document
    starts = inside & ((np.asarray(shard.flags) & WORD_START) > 0)
    starts[doc_start] = True  # a document always starts a word
    first = np.flatnonzero(starts)
    bounds = np.union1d(first, doc_start + doc_len)
    end = bounds[np.minimum(np.searchsorted(bounds, first, side="right"), len(bounds) - 1)]
    return first, end - first


def find_rare_words(shards: list[Shard], doc_shard: np.ndarray, doc_start: np.ndarray,
                    doc_len: np.ndarray, threshold: int, min_count: int) -> RareWords:
    """Count the words of the given documents (`doc_shard`, `doc_start`, `doc_len`, as a
    loader indexes them) and keep those seen at least `min_count` and fewer than `threshold`
    times."""
    if threshold < 1 or min_count < 1:
        raise ValueError(f"rare words need threshold >= 1 and min_count >= 1, got threshold="
                         f"{threshold}, min_count={min_count}")
    keys = []
    for s in np.unique(doc_shard):
        mine = doc_shard == s
        first, length = document_words(shards[s], doc_start[mine], doc_len[mine])
        short = length <= MAX_WORD_TOKENS
        keys.append(word_keys(shards[s].tokens, first[short], length[short]))
    unique, counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.uint64),
                               return_counts=True)
    rare = (counts >= min_count) & (counts < threshold)
    return RareWords(unique[rare], counts[rare].astype(np.int64), int(threshold), int(min_count))


def rare_occurrences(tokens: np.ndarray, word_start: np.ndarray, text: np.ndarray,
                     chosen: np.ndarray, table: RareWords) -> dict[str, np.ndarray]:
    """The whole rare words of a (B, L) batch (see the module docstring), as compact arrays
    (M,): ``note_first`` flat position of the word's first token, ``note_length`` its tokens,
    ``note_id`` its dictionary row, ``note_input`` True when none of its tokens is chosen for
    prediction (only then may its note be added to the input: the note names the word, so
    adding it to a word with a masked token would give the answer away).

    `word_start`: the shards' word-start flags; `text`: (B, L) text tokens ([UNK] included;
    not [CLS], [SEP], padding); `chosen`: (B, L) tokens the masker chose."""
    B, L = tokens.shape
    flat_text = text.reshape(-1).astype(bool)
    starts = flat_text & word_start.reshape(-1).astype(bool)
    first = np.flatnonzero(starts)
    col = np.arange(B * L) % L
    bounds = np.flatnonzero(starts | ~flat_text | (col == 0))
    bounds = np.append(bounds, B * L)
    end = bounds[np.searchsorted(bounds, first, side="right")]
    length = end - first
    whole = ((end - 1) % L < L - 1) & (length <= MAX_WORD_TOKENS)
    first, length = first[whole], length[whole]
    ids = table.lookup(word_keys(tokens.reshape(-1), first, length))
    rare = ids >= 0
    first, length, ids = first[rare], length[rare], ids[rare]
    before = np.concatenate([[0], np.cumsum(chosen.reshape(-1), dtype=np.int64)])
    n_chosen = before[first + length] - before[first]
    return {"note_first": first, "note_length": length, "note_id": ids,
            "note_input": n_chosen == 0}
