"""The encoded-shard format: round trip, and refusals with a message saying what to do."""

from __future__ import annotations

import numpy as np
import pytest

from motian.data.shards import (
    FORMAT_VERSION,
    EncodedDataset,
    SynonymTable,
    vocab_hash,
    write_json_atomic,
    write_shard,
)
from motian.errors import UserError


def _dataset(tmp_path, complete=True, version=FORMAT_VERSION):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n中\n国\n", encoding="utf-8")
    tokens = np.array([5, 6, 5, 6, 6], dtype=np.uint16)
    entry = write_shard(tmp_path, 0, tokens, np.array([1, 0, 3, 0, 1]),
                        np.array([0, -1, -1, -1, -1]), np.array([0, 2, 5]))
    write_json_atomic(tmp_path / "manifest.json", {
        "kind": "encoded", "format_version": version, "vocab_hash": vocab_hash(vocab),
        "complete": complete, "shards": [entry]})
    SynonymTable(np.array([0]), np.array([1], np.int32), np.array([2], np.int32),
                 np.array([6, 5], np.int32), ["中国"]).save(tmp_path / "synonyms.npz")
    return vocab


def test_round_trip(tmp_path):
    vocab = _dataset(tmp_path)
    data = EncodedDataset(tmp_path, vocab_file=vocab)
    shard = data.shard(0)
    assert data.n_docs == 2 and data.n_tokens == 5 and shard.n_docs == 2
    assert shard.tokens.tolist() == [5, 6, 5, 6, 6] and isinstance(shard.tokens, np.memmap)
    assert data.synonyms().candidates(0) == [[6, 5]] and data.synonyms().words == ["中国"]


def test_refusals_say_what_to_do(tmp_path):
    (tmp_path / "a").mkdir()
    vocab = _dataset(tmp_path / "a", complete=False)
    with pytest.raises(UserError, match="run the same encode command again"):
        EncodedDataset(tmp_path / "a", vocab_file=vocab)
    (tmp_path / "b").mkdir()
    _dataset(tmp_path / "b", version=FORMAT_VERSION + 1)
    with pytest.raises(UserError, match="encode the data again"):
        EncodedDataset(tmp_path / "b")
    (tmp_path / "c").mkdir()
    _dataset(tmp_path / "c")
    other = tmp_path / "other.txt"
    other.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n国\n中\n", encoding="utf-8")
    with pytest.raises(UserError, match="token ids would mean different words"):
        EncodedDataset(tmp_path / "c", vocab_file=other)
    with pytest.raises(UserError, match="not an encoded dataset"):
        EncodedDataset(tmp_path)


def test_synonym_table_holds_no_pickles(tmp_path):
    """The table round-trips through plain arrays (allow_pickle=False reads it); an old file
    with pickled words is refused, naming the file and `motian encode`, without unpickling."""
    words = ["中国", "人民群众", "😀表情", "a", ""]
    table = SynonymTable(np.array([0, 2, 2, 2, 2]), np.array([1, 0, 0, 0, 0], np.int32),
                         np.array([2, 4, 3, 1, 0], np.int32), np.array([6, 5], np.int32), words)
    path = tmp_path / "synonyms.npz"
    table.save(path)
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    back = SynonymTable.load(path)
    assert back.words == words and back.candidates(0) == [[6, 5]]
    assert SynonymTable.load(_saved(tmp_path / "empty.npz", SynonymTable.empty())).words == []
    np.savez(path, start=table.start, count=table.count, length=table.length,
             tokens=table.tokens, words=np.array(words, dtype=object))  # an old motian's file
    with pytest.raises(UserError, match=r"synonyms.npz: .*old format.*motian encode"):
        SynonymTable.load(path)
    path.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match=r"synonyms.npz: not a readable synonym table"):
        SynonymTable.load(path)


def _saved(path, table):
    table.save(path)
    return path
