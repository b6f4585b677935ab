"""`motian encode`: word alignment, flags, synonyms, determinism across workers, resume, errors."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from motian.data.encode import align_chunk, encode
from motian.data.shards import (
    ARRAYS,
    PARAGRAPH_START,
    SENTENCE_START,
    WORD_START,
    EncodedDataset,
)
from motian.data.sources import iter_documents
from motian.data.tokenizer import load_tokenizer, train_tokenizer
from motian.errors import UserError

SENTENCES = [
    "我买了iPhone12和ThinkPad X1，价格3.5万元！！“真贵。”然后走了。",
    "这是𠀀字，企业发展很快。",
    "量子纠缠态很奇妙。",
]
SHARD_DOCS = 10


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A vocabulary trained on 120 real articles + the sentences above (without 𠀀), and those
    articles as an input file."""
    tmp = tmp_path_factory.mktemp("encode")
    docs = [d.text.replace("\n", " ")
            for d in itertools.islice(iter_documents(["pd98"]), 120)]
    (tmp / "news.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    train_text = "\n".join(docs + [s.replace("𠀀", "") for s in SENTENCES])
    (tmp / "train.txt").write_text(train_text, encoding="utf-8")
    train_tokenizer([str(tmp / "train.txt")], tmp / "tok", vocab_size=4000, progress=False)
    return tmp


@pytest.fixture(scope="module")
def reference(work):
    """An uninterrupted single-process run over the articles."""
    out = work / "ref"
    report = encode([str(work / "news.txt")], out, tokenizer=work / "tok", workers=1,
                    shard_docs=SHARD_DOCS, progress=False)
    return out, report


def _words(tok, tokens, flags):
    """Split a document's tokens into aligned words, decoded."""
    starts = list(np.flatnonzero(flags & WORD_START)) + [len(tokens)]
    return [tok.decode([int(t) for t in tokens[a:b]]).replace(" ", "")
            for a, b in zip(starts[:-1], starts[1:])]


def _assert_same_output(a, b):
    ma = json.loads((a / "manifest.json").read_text(encoding="utf-8"))
    mb = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
    assert ma["counts"] == mb["counts"] and len(ma["shards"]) == len(mb["shards"])
    for entry in ma["shards"]:
        for key in ARRAYS:
            x = np.load(a / f"{entry['name']}.{key}.npy")
            y = np.load(b / f"{entry['name']}.{key}.npy")
            assert x.dtype == y.dtype and np.array_equal(x, y), (entry["name"], key)
    sa, sb = EncodedDataset(a).synonyms(), EncodedDataset(b).synonyms()
    assert sa.words == sb.words and np.array_equal(sa.tokens, sb.tokens)


def test_alignment_of_pieces_unk_digits_and_latin_runs(work, tmp_path):
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    encode([str(tmp_path / "s.txt")], tmp_path / "out", tokenizer=work / "tok", workers=1,
           progress=False)
    tok = load_tokenizer(work / "tok")
    data = EncodedDataset(tmp_path / "out", vocab_file=work / "tok" / "vocab.txt")
    shard, table = data.shard(0), data.synonyms()
    docs = [(shard.tokens[a:b], shard.flags[a:b], shard.synonyms[a:b])
            for a, b in zip(shard.docs[:-1], shard.docs[1:])]

    tokens, flags, _ = docs[0]
    words = _words(tok, tokens, flags)
    # '##' pieces and digits stay with their Latin run; "X1" is one word although jieba and
    # the tokenizer split it differently; 3.5 is three tokens but one word
    assert words[:8] == ["我", "买", "了", "iphone12", "和", "thinkpad", "x1", "，"]
    assert "3.5" in words and "万元" in words
    pieces = [tok.id_to_token(int(t)) for t in tokens]
    latin = pieces[3:pieces.index("和")]  # the tokens of "iPhone12": several WordPiece pieces
    assert len(latin) > 1 and all(p.startswith("##") for p in latin[1:])
    assert not any(f & WORD_START for p, f in zip(pieces, flags) if p.startswith("##"))
    # sentence starts: the first token, after ！！ and after 。” (the quote stays behind)
    sentence_starts = [pieces[i] for i in np.flatnonzero(flags & SENTENCE_START)]
    assert sentence_starts == ["我", "“", "然"]
    assert flags[0] & PARAGRAPH_START and not (flags[1:] & PARAGRAPH_START).any()

    tokens, flags, syn = docs[1]
    pieces = [tok.id_to_token(int(t)) for t in tokens]
    assert pieces[2] == "[UNK]" and flags[2] & WORD_START and syn[2] == -1
    words = _words(tok, tokens, flags)
    assert "企业" in words and "发展" in words
    i = pieces.index("企")
    assert syn[i] >= 0 and table.words[syn[i]] == "企业" and syn[i + 1] == -1
    assert all(len(c) == 2 for c in table.candidates(int(syn[i])))


def test_user_dictionary_joins_a_domain_term(work, tmp_path):
    (tmp_path / "s.txt").write_text(SENTENCES[2] + "\n", encoding="utf-8")
    (tmp_path / "dict.txt").write_text("量子纠缠态 10 n\n", encoding="utf-8")
    tok = load_tokenizer(work / "tok")
    for user_dict, expected in [(None, "量子"), (tmp_path / "dict.txt", "量子纠缠态")]:
        out = tmp_path / f"out{user_dict is not None}"
        encode([str(tmp_path / "s.txt")], out, tokenizer=work / "tok", user_dict=user_dict,
               workers=1, progress=False)
        shard = EncodedDataset(out).shard(0)
        assert _words(tok, shard.tokens, shard.flags)[0] == expected


def test_round_trip_tokens_to_text(work, reference):
    out, report = reference
    tok = load_tokenizer(work / "tok")
    data = EncodedDataset(out, vocab_file=work / "tok" / "vocab.txt")
    texts = (work / "news.txt").read_text(encoding="utf-8").splitlines()
    assert data.n_docs == report["counts"]["docs"] == len(texts) == 120
    assert report["complete"] and len(data) == 12
    d = 0
    for i in range(len(data)):
        shard = data.shard(i)
        assert shard.tokens.dtype == np.uint16
        for a, b in zip(shard.docs[:-1], shard.docs[1:]):
            decoded = tok.decode([int(t) for t in shard.tokens[a:b]])
            assert "".join(decoded.split()) == "".join(texts[d].lower().split())
            assert shard.flags[a] & (WORD_START | SENTENCE_START | PARAGRAPH_START) == 7
            d += 1
    assert d == len(texts)  # every document was decoded and compared
    c = report["counts"]
    assert c["unk_tokens"] == 0 and 0.4 < c["word_starts"] / c["tokens"] < 0.9
    assert 0 < c["synonym_words"] < c["word_starts"]


def test_two_workers_give_identical_shards(work, reference, tmp_path):
    encode([str(work / "news.txt")], tmp_path / "w2", tokenizer=work / "tok", workers=2,
           shard_docs=SHARD_DOCS, progress=False)
    _assert_same_output(reference[0], tmp_path / "w2")


def test_resume_after_a_killed_run_equals_an_uninterrupted_one(work, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "motian.cli", "encode", "--inputs", str(work / "news.txt"),
           "--out", str(out), "--tokenizer", str(work / "tok"), "--workers", "1",
           "--shard-docs", str(SHARD_DOCS), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8"))["shards"]:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads(manifest.read_text(encoding="utf-8"))
    assert not partial["complete"] and 1 <= len(partial["shards"]) < 12

    report = encode([str(work / "news.txt")], out, tokenizer=work / "tok", workers=1,
                    shard_docs=SHARD_DOCS, progress=False)
    assert report["resumed_shards"] >= len(partial["shards"])
    _assert_same_output(reference[0], out)


def test_mismatches_are_refused(work, reference, tmp_path):
    out, _ = reference
    other = tmp_path / "other.txt"
    other.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n人\n", encoding="utf-8")
    # reading shards with another vocabulary
    with pytest.raises(UserError, match="different words"):
        EncodedDataset(out, vocab_file=other)
    # resuming with another tokenizer, other settings, or changed input; nothing is touched
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(UserError, match="vocab_hash"):
        encode([str(work / "news.txt")], out, tokenizer=other, workers=1,
               shard_docs=SHARD_DOCS, progress=False)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    with pytest.raises(UserError, match="shard_docs"):
        encode([str(work / "news.txt")], out, tokenizer=work / "tok", workers=1,
               shard_docs=SHARD_DOCS + 1, progress=False)
    changed = tmp_path / "news.txt"
    changed.write_text((work / "news.txt").read_text(encoding="utf-8"), encoding="utf-8")
    copy = tmp_path / "copy"
    encode([str(changed)], copy, tokenizer=work / "tok", workers=1, shard_docs=SHARD_DOCS,
           progress=False)
    with open(changed, "a", encoding="utf-8") as f:
        f.write("新的一行。\n")
    with pytest.raises(UserError, match="input_sizes"):
        encode([str(changed)], copy, tokenizer=work / "tok", workers=1,
               shard_docs=SHARD_DOCS, progress=False)
    # --no-resume starts over with the new input
    report = encode([str(changed)], copy, tokenizer=work / "tok", workers=1,
                    shard_docs=SHARD_DOCS, resume=False, progress=False)
    assert report["counts"]["docs"] == 121 and report["resumed_shards"] == 0
    with pytest.raises(UserError, match="no such jieba user dictionary"):
        encode([str(changed)], tmp_path / "x", tokenizer=work / "tok",
               user_dict=tmp_path / "missing.txt", progress=False)


def test_empty_documents_keep_their_place(work, tmp_path):
    records = ["", "   ", "你好。", "\u200b"]
    with open(tmp_path / "d.jsonl", "w", encoding="utf-8") as f:
        for text in records:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    report = encode([str(tmp_path / "d.jsonl")], tmp_path / "out", tokenizer=work / "tok",
                    workers=1, progress=False)
    shard = EncodedDataset(tmp_path / "out").shard(0)
    assert report["counts"]["docs"] == 4
    assert shard.docs.tolist() == [0, 0, 0, 3, 3]  # 你 好 。; the others have no token
    assert shard.flags[0] == WORD_START | SENTENCE_START | PARAGRAPH_START


def test_without_synonyms(work, tmp_path):
    (tmp_path / "s.txt").write_text(SENTENCES[1] + "\n", encoding="utf-8")
    report = encode([str(tmp_path / "s.txt")], tmp_path / "out", tokenizer=work / "tok",
                    synonyms=False, workers=1, progress=False)
    data = EncodedDataset(tmp_path / "out")
    assert report["counts"]["synonym_words"] == 0 and (data.shard(0).synonyms == -1).all()
    assert not (tmp_path / "out" / "synonyms.npz").exists() and not data.synonyms().words


def test_align_chunk_rules_on_exact_offsets():
    # Two documents. Doc 0 "abcd xy。好": jieba words ab|cd| |xy|。|好, tokens abc ##d xy 。 好
    # (a token crossing a jieba boundary keeps one word; no synonym for a span that is not
    # exactly one jieba word). Doc 1 "甲乙\n丙": words 甲乙|\n|丙, tokens 甲 乙 丙.
    texts = ["abcd xy。好", "甲乙\n丙"]
    words = [["ab", "cd", " ", "xy", "。", "好"], ["甲乙", "\n", "丙"]]
    vocab_rows = {"ab": 0, "xy": 1, "好": 2, "甲乙": 3}
    row_length = np.array([2, 1, 1, 2], np.int32)  # "xy" has a row of 1-token candidates
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    is_cont = np.zeros(20, bool)
    is_cont[11] = True  # ##d
    span = np.array([[0, 3], [3, 4], [5, 7], [7, 8], [8, 9], [0, 1], [1, 2], [3, 4]])
    flat = [w for doc in words for w in doc]
    flags, syn, docs = align_chunk(
        texts, np.array([len(w) for w in flat]), np.array([vocab_rows.get(w, -1) for w in flat]),
        tokens, span, np.array([5, 3]), is_cont, row_length)
    assert docs.tolist() == [0, 5, 8]
    assert (flags & WORD_START).astype(bool).tolist() == [1, 0, 1, 1, 1, 1, 0, 1]
    assert (flags & SENTENCE_START).astype(bool).tolist() == [1, 0, 0, 0, 1, 1, 0, 1]
    assert (flags & PARAGRAPH_START).astype(bool).tolist() == [1, 0, 0, 0, 0, 1, 0, 1]
    # abc##d is not exactly "ab": none; xy is one token, its row wants 1: yes; 好: row 2;
    # 甲乙 (two tokens, row length 2): row 3 at its first token
    assert syn.tolist() == [-1, -1, 1, -1, 2, 3, -1, -1]
