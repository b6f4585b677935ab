"""`motian.data.sources`: every kind of input, every kind of bad input, and the built-ins."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

from motian.data.sources import (
    count_input_bytes,
    iter_documents,
    iter_reviews,
    pd98_paragraphs,
    resolve_inputs,
    synonyms_path,
)
from motian.errors import SkipLog, UserError


def read(inputs, **kw) -> tuple[list[tuple[str, str, int]], SkipLog]:
    skips = SkipLog(warn=False)
    docs = [(d.text, d.source, d.line) for d in iter_documents(inputs, skips=skips, **kw)]
    return docs, skips


def test_txt_lines_skip_invalid_utf8_and_nul_with_file_and_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("第一行\n".encode() + b"\xc4\xe3\xba\xc3 gbk\n" + b"nul\x00here\n"
                  + "\n最后一行\r\n".encode())
    docs, skips = read([str(f)])
    assert docs == [("第一行", str(f), 1), ("最后一行", str(f), 5)]
    assert skips.counts == {"invalid UTF-8": 1, "NUL bytes in line (binary data?)": 1}
    assert skips.examples["invalid UTF-8"][0].startswith(f"{f}:2: ")
    assert "iconv" in skips.examples["invalid UTF-8"][0]  # says what to do
    assert skips.examples["NUL bytes in line (binary data?)"] == [f"{f}:3"]


def test_a_50mb_line_is_skipped_without_loading_it(tmp_path):
    f = tmp_path / "huge.txt"
    with open(f, "wb") as out:
        out.write("前一行\n".encode())
        chunk = ("长" * 1_000_000).encode()  # 3 MB
        for _ in range(17):
            out.write(chunk)  # one 51 MB line
        out.write("\n后一行\n".encode())
    tracemalloc.start()
    docs, skips = read([str(f)], max_line_bytes=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [d[0] for d in docs] == ["前一行", "后一行"] and docs[1][2] == 3
    reason = f"line longer than {1 << 20} bytes"
    assert skips.counts == {reason: 1}
    assert skips.examples[reason][0].startswith(f"{f}:2: 51000001 bytes")
    assert peak < 8 << 20  # read in bounded pieces, never the whole line


def test_empty_file_missing_file_and_empty_glob(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    docs, skips = read([str(empty)])
    assert docs == [] and skips.examples == {"empty file": [str(empty)]}
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match=f"{missing}: no such file"):
        read([str(missing)])
    with pytest.raises(UserError, match="matches no file"):
        read([str(tmp_path / "*.jsonl")])
    with pytest.raises(UserError, match="no input"):
        read([])


def test_directory_glob_and_ignored_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("乙\n", encoding="utf-8")
    (tmp_path / "d" / "sub" / "a.txt").write_text("甲\n", encoding="utf-8")
    (tmp_path / "d" / "table.csv").write_text("x,y\n", encoding="utf-8")
    (tmp_path / "d" / ".hidden").write_text("x", encoding="utf-8")
    docs, skips = read([str(tmp_path / "d")])
    assert [d[0] for d in docs] == ["乙", "甲"]  # sorted paths: d/b.txt < d/sub/a.txt
    assert skips.counts == {"ignored file (not .txt/.jsonl/.gz)": 1}
    assert skips.examples["ignored file (not .txt/.jsonl/.gz)"] == [str(tmp_path / "d" / "table.csv")]
    docs, _ = read([str(tmp_path / "d" / "**" / "*.txt")])
    assert sorted(d[0] for d in docs) == ["乙", "甲"]
    (tmp_path / "nothing").mkdir()
    _, skips = read([str(tmp_path / "nothing")])
    assert skips.counts == {"directory without text files": 1}


def test_gzip_and_truncated_gzip(tmp_path):
    f = tmp_path / "a.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as out:
        for i in range(100):
            out.write(json.dumps({"text": f"第{i}条"}, ensure_ascii=False) + "\n")
    docs, skips = read([str(f)])
    assert len(docs) == 100 and docs[-1] == ("第99条", str(f), 100) and not skips.counts
    cut = tmp_path / "cut.txt.gz"
    with gzip.open(cut, "wb") as out:
        out.write(("很长的一行文字" * 2000 + "\n").encode() * 50)
    cut.write_bytes(cut.read_bytes()[:-200])
    docs, skips = read([str(cut)])
    assert list(skips.counts) == ["unreadable data (corrupt or truncated file)"]
    assert 0 < len(docs) < 50  # lines before the cut survive, the cut one does not
    assert all(d[0] == "很长的一行文字" * 2000 for d in docs)


def test_jsonl_bad_json_missing_field_and_text_field(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "好"}\n{"text": broken\n{"body": "无"}\n[1, 2]\n\n{"text": 3}\n'
                 '{"body": "正文", "text": "x"}\n', encoding="utf-8")
    docs, skips = read([str(f)])
    assert [(d[0], d[2]) for d in docs] == [("好", 1), ("x", 7)]
    assert skips.counts == {"invalid JSON": 1, "no string field 'text'": 3}
    assert skips.examples["invalid JSON"][0].startswith(f"{f}:2: ")
    assert "text_field" in skips.examples["no string field 'text'"][0]
    docs, _ = read([str(f)], text_field="body")
    assert [d[0] for d in docs] == ["无", "正文"]


def test_byte_order_mark_is_not_part_of_the_text(tmp_path):
    # Fixed in sources.py: a BOM made the first JSON record "invalid JSON".
    j, t = tmp_path / "bom.jsonl", tmp_path / "bom.txt"
    j.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    t.write_bytes(b"\xef\xbb\xbfhello\r\n")
    docs, skips = read([str(j), str(t)])
    assert [d[0] for d in docs] == ["a", "hello"] and not skips.counts


def test_txt_blank_mode(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("第一段第一行\n第一段第二行\n\n  \n第二段\n\n\n第三段", encoding="utf-8")
    docs, _ = read([str(f)], txt_mode="blank")
    assert docs == [("第一段第一行\n第一段第二行", str(f), 1), ("第二段", str(f), 5),
                    ("第三段", str(f), 8)]


def test_unfinished_clean_output_is_refused(tmp_path):
    # Fixed in sources.py: an interrupted clean run was read as if it were complete.
    d = tmp_path / "cleaned"
    d.mkdir()
    (d / "clean-00000.jsonl").write_text('{"text": "甲", "source": "x", "line": 1}\n',
                                         encoding="utf-8")
    manifest = {"kind": "cleaned", "complete": False, "shards": [{"file": "clean-00000.jsonl"}]}
    (d / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(UserError, match="did not finish"):
        read([str(d)])
    manifest["complete"] = True
    (d / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert [x[0] for x in read([str(d)])[0]] == ["甲"]


def test_builtin_corpora():
    pd98 = [d for d in iter_documents(["pd98"])]
    assert 2_900 <= len(pd98) <= 3_300  # articles found by the heading heuristic
    assert sum(len(d.text) for d in pd98) > 1_500_000
    assert pd98[0].source == "pd98" and pd98[0].line == 1
    first = next(pd98_paragraphs())
    assert first[0] == 0 and all(pos for _, pos in first[2])
    reviews = list(iter_reviews())
    assert len(reviews) == 35_123  # 35,124 lines, one of them blank
    assert {label for _, label, _ in reviews} == {0, 1}
    assert len({t for t, _, _ in reviews}) < 18_000  # about half are duplicates
    assert synonyms_path().name == "同义词.txt"
    assert resolve_inputs(["reviews", "pd98"]) == ["reviews", "pd98"]
    assert count_input_bytes(["pd98"]) > 1_000_000
    with pytest.raises(UserError, match="built-in corpora are: pd98, reviews"):
        resolve_inputs(["pd99"])


def test_count_input_bytes_of_files(tmp_path: Path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"x" * 123)
    assert count_input_bytes([str(f), str(f)]) == 246
