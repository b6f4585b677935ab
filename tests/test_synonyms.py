"""The Cilin synonym table: groups parsed from the real file, same-length rows, token ids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from motian.data.shards import SynonymTable
from motian.data.sources import iter_documents
from motian.data.synonyms import build_synonym_table, jieba_frequencies, parse_cilin
from motian.data.tokenizer import load_tokenizer, train_tokenizer
from motian.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syn")
    docs = [d.text for d in itertools.islice(iter_documents(["pd98"]), 300)]
    (tmp / "c.txt").write_text("\n".join(d.replace("\n", " ") for d in docs), encoding="utf-8")
    train_tokenizer([str(tmp / "c.txt")], tmp / "tok", vocab_size=5000, progress=False)
    return load_tokenizer(tmp / "tok")


@pytest.fixture(scope="module")
def groups():
    return parse_cilin()


def test_parse_real_cilin(groups):
    # 9,995 '=' lines in the shipped file; '#' (related) and '@' (alone) lines are not groups
    assert 9000 < len(groups) <= 9995
    assert groups[0] == ["人", "士", "人物", "人士", "人氏", "人选"]
    assert all(len(g) > 1 for g in groups)


def test_rows_are_same_length_synonyms_from_the_words_groups(tok, groups):
    table, rows = build_synonym_table(tok, groups)
    assert len(rows) > 10_000
    members: dict[str, set[str]] = {}
    for g in groups:
        for w in g:
            members.setdefault(w, set()).update(g)
    unk = tok.token_to_id("[UNK]")
    for word, r in itertools.islice(rows.items(), 0, None, 37):
        own = tok.encode(word, add_special_tokens=False).ids
        assert table.words[r] == word and table.length[r] == len(own) and len(word) >= 2
        for cand in table.candidates(r):
            text = tok.decode(cand).replace(" ", "")
            assert len(cand) == len(own) and unk not in cand and cand != own
            assert len(text) == len(word) and text in members[word] and text != word


def test_union_of_groups_and_length_filter(tok):
    groups = [["美丽", "漂亮", "美", "好看的"], ["美丽", "秀丽"], ["漂亮", "出色"]]
    table, rows = build_synonym_table(tok, groups)
    decoded = {w: sorted(tok.decode(c).replace(" ", "") for c in table.candidates(r))
               for w, r in rows.items()}
    # 美丽 is in two groups: both contribute; 美 and 好看的 have another length
    assert decoded["美丽"] == ["漂亮", "秀丽"]
    assert decoded["漂亮"] == ["出色", "美丽"]
    assert "美" not in rows
    # with single characters allowed, 美 still has no same-length partner here
    _, rows1 = build_synonym_table(tok, groups + [["美", "丽"]], min_chars=1)
    assert "美" in rows1 and "丽" in rows1


def test_table_round_trips_through_npz(tok, tmp_path):
    table, rows = build_synonym_table(tok, [["人民", "群众", "民众"], ["国家", "江山"]])
    table.save(tmp_path / "synonyms.npz")
    back = SynonymTable.load(tmp_path / "synonyms.npz")
    assert back.words == table.words
    for r in range(len(back.words)):
        assert back.candidates(r) == table.candidates(r)
    assert np.array_equal(back.tokens, table.tokens)


def test_bad_cilin_line_names_file_and_line(tmp_path):
    path = tmp_path / "cilin.txt"
    path.write_text("Aa01A01= 人 士\nnot a cilin line\n", encoding="utf-8")
    with pytest.raises(UserError, match="cilin.txt:2"):
        parse_cilin(path)


def test_candidates_carry_jieba_counts_and_shared_groups(tok, groups):
    freq = jieba_frequencies()
    assert freq["人物"] > freq["人士"] > freq["人选"] > freq["人氏"] > 0  # jieba's real counts
    table, rows = build_synonym_table(tok, groups)
    assert table.weighted and len(table.freq) == len(table.groups) == table.count.sum()
    off = table.offsets()
    shared: dict[tuple[str, str], int] = {}
    for g in groups:
        for a, b in itertools.permutations(dict.fromkeys(g), 2):
            shared[a, b] = shared.get((a, b), 0) + 1
    checked = 0
    for word, r in itertools.islice(rows.items(), 0, None, 23):
        for j, cand in enumerate(table.candidates(r)):
            text = tok.decode(cand).replace(" ", "")
            if text not in freq and not all("\u4e00" <= ch <= "\u9fff" for ch in text):
                continue  # a spelling the tokenizer normalised (case): not looked up as is
            assert table.freq[off[r] + j] == freq.get(text, 0), (word, text)
            assert table.groups[off[r] + j] == shared[word, text], (word, text)
            checked += 1
    assert checked > 1000
    assert (table.groups >= 1).all() and (table.groups > 1).any()


def test_shared_groups_count_each_group_once(tok):
    groups = [["美丽", "漂亮", "秀丽"], ["美丽", "漂亮", "漂亮"], ["漂亮", "出色"]]
    table, rows = build_synonym_table(tok, groups, freq={"漂亮": 7, "秀丽": 2})
    r = rows["美丽"]
    got = {tok.decode(c).replace(" ", ""): (int(table.freq[table.offsets()[r] + j]),
                                            int(table.groups[table.offsets()[r] + j]))
           for j, c in enumerate(table.candidates(r))}
    # 漂亮 shares two groups with 美丽 (listed twice in the second: still one group)
    assert got == {"漂亮": (7, 2), "秀丽": (2, 1)}


def test_weights_round_trip_and_an_old_table_still_loads(tok, tmp_path):
    table, _ = build_synonym_table(tok, [["人民", "群众", "民众"], ["人民", "群众"]])
    table.save(tmp_path / "new.npz")
    back = SynonymTable.load(tmp_path / "new.npz")
    assert back.weighted
    assert np.array_equal(back.freq, table.freq) and np.array_equal(back.groups, table.groups)
    # A table written before weights existed: exactly the arrays the older `save` wrote.
    with np.load(tmp_path / "new.npz", allow_pickle=False) as z:
        old = {k: z[k] for k in ("start", "count", "length", "tokens", "word_bytes",
                                 "word_offsets")}
    np.savez(tmp_path / "old.npz", **old)
    back = SynonymTable.load(tmp_path / "old.npz")
    assert not back.weighted and back.freq is None and back.words == table.words
    assert [back.candidates(r) for r in range(len(back.words))] == \
        [table.candidates(r) for r in range(len(table.words))]
    # weights that do not fit the candidates are refused, not drawn from
    np.savez(tmp_path / "bad.npz", **old, candidate_freq=np.ones(1, np.int64),
             candidate_groups=np.ones(1, np.int32))
    with pytest.raises(UserError, match="bad.npz: the synonym weights .* do not match"):
        SynonymTable.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "half.npz", **old, candidate_freq=table.freq)
    with pytest.raises(UserError, match="half.npz: the synonym weights"):
        SynonymTable.load(tmp_path / "half.npz")


def test_bad_jieba_dictionary_line_names_file_and_line(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("人物 10520 n\n人士 many n\n", encoding="utf-8")
    with pytest.raises(UserError, match="dict.txt:2: expected a jieba dictionary line"):
        jieba_frequencies(path)
