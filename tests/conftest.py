"""Shared fixtures: small encoded datasets written with the real shard writer.

`synthetic` builds a dataset from words given as token ids (the exact word structure is then
known to the test); `pd98_encoded` trains a real vocabulary and encodes part of the bundled
People's Daily corpus once per test session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from motian.data.shards import (
    FORMAT_VERSION,
    PARAGRAPH_START,
    SENTENCE_START,
    WORD_START,
    SynonymTable,
    vocab_hash,
    write_json_atomic,
    write_shard,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
N_SPECIAL = len(SPECIALS)


def write_vocab(directory: Path, n_tokens: int) -> Path:
    """A vocab.txt of the specials plus `n_tokens` distinct CJK characters (ids 5, 6, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = SPECIALS + [chr(0x4E00 + i) for i in range(n_tokens)]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return directory


def write_dataset(out: Path, vocab_dir: Path, shards: list[list[list[list[tuple[int, ...]]]]],
                  synonyms: SynonymTable | None = None,
                  synonym_row: dict[tuple[int, ...], int] | None = None) -> Path:
    """Write shards given as documents -> sentences -> words -> token ids."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, docs in enumerate(shards):
        tokens, flags, syn, offsets = [], [], [], [0]
        for doc in docs:
            for s, sentence in enumerate(doc):
                for w, word in enumerate(sentence):
                    first = WORD_START | (SENTENCE_START if w == 0 else 0) | \
                        (PARAGRAPH_START if w == 0 and s == 0 else 0)
                    tokens.extend(word)
                    flags.extend([first] + [0] * (len(word) - 1))
                    syn.extend([(synonym_row or {}).get(word, -1)] + [-1] * (len(word) - 1))
            offsets.append(len(tokens))
        entries.append(write_shard(out, index, np.asarray(tokens, np.uint16),
                                   np.asarray(flags), np.asarray(syn), np.asarray(offsets)))
    (synonyms or SynonymTable.empty()).save(out / "synonyms.npz")
    write_json_atomic(out / "manifest.json", {
        "kind": "encoded", "format_version": FORMAT_VERSION,
        "vocab_hash": vocab_hash(vocab_dir / "vocab.txt"), "shards": entries})
    return out


@pytest.fixture
def unique_tokens(tmp_path):
    """Factory: a dataset whose every token id is distinct and increases along the corpus,
    so a token id tells exactly where it came from. Returns (data_dir, vocab_dir)."""

    def make(n_docs: int = 60, n_shards: int = 2, seed: int = 0, max_sentences: int = 5):
        rng = np.random.default_rng(seed)
        next_id = N_SPECIAL
        shards = []
        for _ in range(n_shards):
            docs = []
            for _ in range(n_docs // n_shards):
                doc = []
                for _ in range(rng.integers(1, max_sentences + 1)):
                    sentence = []
                    for _ in range(rng.integers(2, 9)):
                        n = int(rng.integers(1, 4))
                        sentence.append(tuple(range(next_id, next_id + n)))
                        next_id += n
                    doc.append(sentence)
                docs.append(doc)
            shards.append(docs)
        vocab = write_vocab(tmp_path / f"vocab{seed}", next_id - N_SPECIAL)
        return write_dataset(tmp_path / f"data{seed}", vocab, shards), vocab

    return make


@pytest.fixture
def lexicon_data(tmp_path):
    """A dataset drawn from a small lexicon in which some words have same-length synonyms.

    Returns (data_dir, vocab_dir, synonym_row: word -> row, table)."""
    rng = np.random.default_rng(1)
    lexicon = [tuple(int(t) for t in rng.integers(N_SPECIAL, N_SPECIAL + 200, size=n))
               for n in (1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 1, 2, 3)]
    lexicon = list(dict.fromkeys(lexicon))
    # Groups of same-length words (the first three of each length are synonyms of each other).
    groups = [[w for w in lexicon if len(w) == n][:3] for n in (1, 2, 3)]
    start, count, length, flat, words, row_of = [], [], [], [], [], {}
    for group in groups:
        for word in group:
            others = [o for o in group if o != word]
            row_of[word] = len(start)
            start.append(len(flat))
            count.append(len(others))
            length.append(len(word))
            flat.extend(t for o in others for t in o)
            words.append("".join(chr(0x4E00 + t - N_SPECIAL) for t in word))
    table = SynonymTable(np.asarray(start, np.int64), np.asarray(count, np.int32),
                         np.asarray(length, np.int32), np.asarray(flat, np.int32), words)
    docs = [[[lexicon[i] for i in rng.integers(len(lexicon), size=rng.integers(3, 12))]
             for _ in range(rng.integers(1, 6))] for _ in range(80)]
    vocab = write_vocab(tmp_path / "lexvocab", 200)
    data = write_dataset(tmp_path / "lexdata", vocab, [docs[:40], docs[40:]], table, row_of)
    return data, vocab, row_of, table


@pytest.fixture(scope="session")
def pd98_encoded(tmp_path_factory):
    """The first 300 articles of People's Daily 1998 (~170k tokens): a real vocabulary trained
    on them and the shards `motian encode` makes. Returns the encoded directory (it holds the
    vocab.txt)."""
    import itertools

    from motian.data.encode import encode
    from motian.data.sources import iter_documents
    from motian.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pd98")
    docs = itertools.islice(iter_documents(["pd98"]), 300)
    corpus = root / "pd98.txt"
    corpus.write_text("\n\n".join(d.text for d in docs) + "\n", encoding="utf-8")
    train_tokenizer([str(corpus)], root / "tok", vocab_size=3000, txt_mode="blank",
                    progress=False)
    encode([str(corpus)], root / "enc", tokenizer=root / "tok", workers=1, txt_mode="blank",
           shard_docs=100, progress=False)
    return root / "enc"


# Real text for the fine-tuning tests (bundled CLUE-style, user-file and built-in tasks): 12
# positive and 12 negative reviews, 16 short People's Daily sentences with entities, and a
# character vocabulary over them.
@pytest.fixture(scope="module")
def reviews():
    from motian.tasks.builtin import reviews_sentiment

    task = reviews_sentiment()
    pos = [e.text[:40] for e in task.splits["train"] if e.label == 1][:12]
    neg = [e.text[:40] for e in task.splits["train"] if e.label == 0][:12]
    return pos, neg


@pytest.fixture(scope="module")
def ner_sentences():
    from motian.tasks.builtin import pd98_ner

    return [e for e in pd98_ner().splits["train"][:400] if e.entities and len(e.text) < 40][:16]


@pytest.fixture
def vocab(tmp_path, reviews, ner_sentences):
    from tests.test_tasks import char_tokenizer

    texts = reviews[0] + reviews[1] + [e.text for e in ner_sentences] + ["好差"]
    char_tokenizer(tmp_path, texts)
    return tmp_path / "vocab.txt"
