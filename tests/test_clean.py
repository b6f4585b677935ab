"""`motian clean`: normalisation, each filter, exact and near duplicates, the report, workers,
resuming after a real kill, and the real bundled reviews."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from motian.data.clean import CleanSettings, normalize_text, process_batch
from motian.data.dedup import KeyIndex, lsh_bands
from motian.data.sources import iter_documents
from motian.errors import UserError
from motian.pipeline import clean


def shard_texts(out: Path) -> list[str]:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return [json.loads(line)["text"] for s in manifest["shards"]
            for line in (out / s["file"]).read_text(encoding="utf-8").splitlines()]


def pd98_articles(n: int, min_chars: int = 800) -> list[str]:
    docs = []
    for d in iter_documents(["pd98"]):
        if len(d.text) >= min_chars:
            docs.append(d.text)
            if len(docs) == n:
                return docs
    raise AssertionError("pd98 has too few long articles")


# --------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("raw, expected", [
    ("ＡＢＣ１２３＠ｘ", "ABC123@x"),                       # full-width ASCII -> half-width
    ("你好，世界！真的？是：对；（好）", "你好，世界！真的？是：对；（好）"),  # Chinese punctuation kept
    ("句号。顿号、引号“书”《名》", "句号。顿号、引号“书”《名》"),
    ("　　首行缩进", "首行缩进"),                           # U+3000 -> space, then stripped
    ("零\u200b宽\u200d字\ufeff符\u2060", "零宽字符"),         # zero-width removed
    ("控\x00制\x07字\x1b符\x7f\x85", "控制字符"),              # controls removed (NEL is a newline)
    ("a  \t b\r\nc\n\n\nd  ", "a b\nc\nd"),                 # spaces collapsed, blank lines dropped
    ("\n \n\u3000", ""),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


# --------------------------------------------------------------------------- filters

def reasons(texts: list[str], **settings) -> list[str | None]:
    return process_batch(texts, CleanSettings(**settings)).reasons


def test_each_filter_has_its_own_reason():
    ok = "这家酒店的位置很好，服务也热情，下次还会再来住。"
    got = reasons([
        ok,
        "\u200b\u3000 ",                                   # empty after normalisation
        "很好",                                            # too short
        ok * 10,                                           # too long for max_chars=200
        "This hotel is great, I would stay again. 好",     # low CJK share
        "好！！@@##$$%%^^&&**",                           # symbols
        "好评" + "啊" * 25 + "真的不错呢",                  # repeated character
        "\n".join(["第一行内容很好", "重复的一行", "重复的一行", "重复的一行"]),  # repeated lines
    ], max_chars=200)
    assert got == [None, "empty", "too_short", "too_long", "low_cjk_ratio", "high_symbol_ratio",
                   "char_repeat", "dup_lines"]


def test_thresholds_are_configurable():
    text = "English words with 一点中文"
    assert reasons([text]) == ["low_cjk_ratio"]
    assert reasons([text], min_cjk_ratio=0.0) == [None]
    assert reasons(["很好"], min_chars=2) == [None]
    assert reasons(["好评" + "啊" * 25], max_char_repeat=30) == [None]


def test_settings_out_of_range_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="near_dup_threshold"):
        clean(["reviews"], tmp_path / "o", near_dup_threshold=1.5, progress=False)
    with pytest.raises(UserError, match="no such file"):
        clean([str(tmp_path / "missing.txt")], tmp_path / "o", progress=False)


def test_json_lines_without_the_text_field_fail_in_clean_naming_the_keys(tmp_path):
    """Without --text-field, JSON lines that keep their text elsewhere would clean to 0
    documents and fail only at the vocabulary: `prepare` now stops in clean, before writing
    anything, naming the file, its keys and the option to use."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("\n" + json.dumps(
        {"id": 1, "title": "短", "content": "今天的天气非常好，我们一起去公园散步吧。"},
        ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "motian.cli", "prepare", "--inputs",
                           str(corpus), "--out", str(out), "--workers", "1", "--no-progress"],
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert (f"{corpus / 'a.jsonl'}:2: the JSON record has no string field 'text' (its keys: "
            "id, title, content); pass --text-field content") in done.stderr
    assert "Traceback" not in done.stderr and "[2/3]" not in done.stdout
    assert not (out / "clean" / "manifest.json").exists()
    rep = clean([str(corpus)], tmp_path / "ok", text_field="content", workers=1,
                progress=False)
    assert rep["documents"]["kept"] == 1


# --------------------------------------------------------------------------- dedup

def test_exact_and_near_duplicates(tmp_path):
    base, unrelated = pd98_articles(2)
    sentences = base.split("。")
    assert len(sentences) >= 20
    sentences[len(sentences) // 2] = "这是一句被改写过的完全不同的新句子，内容与原文无关"
    edited = "。".join(sentences)
    spaced = base.replace("，", " ， ")  # not exact (spaces stay), same shingles
    src = tmp_path / "in.jsonl"
    rows = [base, "\u3000" + base, edited, unrelated, spaced]
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows),
                   encoding="utf-8")
    rep = clean([str(src)], tmp_path / "out", workers=1, progress=False)
    assert rep["documents"]["dropped"] == {"exact_duplicate": 1, "near_duplicate": 2}
    assert shard_texts(tmp_path / "out") == [normalize_text(base), normalize_text(unrelated)]
    near = rep["examples"]["near_duplicate"][0]
    assert near["where"] == f"{src}:3" and "clean-00000.jsonl:1" in near["detail"]
    assert rep["examples"]["exact_duplicate"][0]["where"] == f"{src}:2"
    # A stricter threshold keeps the edited article.
    rep = clean([str(src)], tmp_path / "strict", workers=1, progress=False,
                near_dup_threshold=0.99)
    assert rep["documents"]["dropped"]["near_duplicate"] == 1  # only the spacing variant


def test_lsh_bands_match_the_threshold():
    bands, rows = lsh_bands(0.8, 128)
    assert bands * rows <= 128
    s = np.array([0.5, 0.8, 0.9])
    p = 1 - (1 - s**rows) ** bands  # probability of becoming a candidate
    assert p[0] < 0.1 and p[1] > 0.5 and p[2] > 0.97


def test_key_index_merges_without_losing_keys():
    idx = KeyIndex()
    keys = np.arange(200_000, dtype=np.uint64) * np.uint64(2654435761)
    for i in range(0, len(keys), 4):
        idx.add(keys[i:i + 4], i // 4)  # crosses the merge threshold several times
    assert len(idx.keys) > 0 and idx.get(keys[[8, 9]]) == {2}
    assert idx.get(np.array([3], np.uint64)) == set()


# --------------------------------------------------------------------------- output, report, workers

def write_corpus(path: Path, n: int) -> Path:
    """A real-text file: pd98 paragraphs, some repeated, plus a few bad lines."""
    paras = [p for d in iter_documents(["pd98"]) for p in d.text.split("\n") if len(p) > 20][:n]
    with open(path, "wb") as f:
        for i, p in enumerate(paras):
            f.write(p.encode("utf-8") + b"\n")
            if i % 7 == 0:
                f.write(p.encode("utf-8") + b"\n")  # exact duplicate
            if i == 5:
                f.write(b"\xff\xfe broken \n" + b"bad\x00nul\n")
    return path


def test_report_adds_up_and_sources_reads_the_output(tmp_path):
    src = write_corpus(tmp_path / "in.txt", 300)
    out = tmp_path / "out"
    rep = clean([str(src)], out, workers=1, shard_docs=100, progress=False)
    d, c = rep["documents"], rep["characters"]
    assert d["kept"] + sum(d["dropped"].values()) == d["read"]
    assert c["kept"] + sum(c["dropped"].values()) + c["removed_by_normalisation"] == c["read"]
    assert d["dropped"]["exact_duplicate"] >= 40
    assert rep["skipped_input"]["counts"] == {"invalid UTF-8": 1, "NUL bytes in line (binary data?)": 1}
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["kind"] == "cleaned" and manifest["complete"]
    assert [s["file"] for s in manifest["shards"]] == [f"clean-0000{i}.jsonl" for i in range(3)]
    assert sum(s["n_docs"] for s in manifest["shards"]) == d["kept"]
    assert not list(out.glob("*.tmp")) and not list(out.glob("dedup-state-*"))
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "exact_duplicate" in md and f"{src}:2" in md and "invalid UTF-8" in md
    again = [doc.text for doc in iter_documents([str(out)])]
    assert again == shard_texts(out) and len(again) == d["kept"]


def test_workers_give_identical_output(tmp_path):
    src = write_corpus(tmp_path / "in.txt", 1500)
    one = clean([str(src)], tmp_path / "w1", workers=1, shard_docs=400, progress=False)
    two = clean([str(src)], tmp_path / "w2", workers=2, shard_docs=400, progress=False)
    assert one["documents"] == two["documents"] and one["examples"] == two["examples"]
    files = sorted(p.name for p in (tmp_path / "w1").glob("clean-*.jsonl"))
    assert len(files) >= 2 and files == sorted(p.name for p in (tmp_path / "w2").glob(
        "clean-*.jsonl"))
    for f in files:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes()


# --------------------------------------------------------------------------- resume

def test_changed_settings_are_refused(tmp_path):
    src = write_corpus(tmp_path / "in.txt", 50)
    clean([str(src)], tmp_path / "out", workers=1, progress=False)
    with pytest.raises(UserError, match="--no-resume"):
        clean([str(src)], tmp_path / "out", workers=1, min_chars=3, progress=False)
    rep = clean([str(src)], tmp_path / "out", workers=1, min_chars=3, resume=False,
                progress=False)
    assert rep["settings"]["min_chars"] == 3


@pytest.fixture(scope="module")
def reviews_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reviews") / "out"
    return out, clean(["reviews"], out, workers=1, shard_docs=500, progress=False)


def test_real_reviews_duplicates_are_removed(reviews_reference):
    _, rep = reviews_reference
    d = rep["documents"]
    assert d["read"] == 35_123  # non-blank lines of pos.txt + neg.txt
    # only ~17.4k reviews are distinct; by default the reviews-sentiment dev/test texts (~20%
    # of them, with their repeats) go first, as held-out task texts
    assert d["dropped"]["exact_duplicate"] + d["dropped"]["heldout_task_text"] >= 17_000
    assert 6_000 <= d["dropped"]["heldout_task_text"] <= 8_000
    assert 13_000 <= d["kept"] <= 14_500


def test_killed_run_resumes_to_the_same_output(tmp_path, reviews_reference):
    ref_out, ref = reviews_reference
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "motian.cli", "clean", "--inputs", "reviews", "--out", str(out),
           "--workers", "1", "--shard-docs", "500", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text(encoding="utf-8"))["shards"]:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no cleanup: a power cut mid-run
    proc.wait()
    state = json.loads(manifest.read_text(encoding="utf-8"))
    assert not state["complete"] and 1 <= len(state["shards"]) < ref["shards"]
    rep = clean(["reviews"], out, workers=2, shard_docs=500, progress=False)
    assert rep["documents"] == ref["documents"] and rep["characters"] == ref["characters"]
    assert shard_texts(out) == shard_texts(ref_out)
    # A finished run is not redone: the report comes back unchanged.
    assert clean(["reviews"], out, workers=1, shard_docs=500, progress=False)["documents"] \
        == ref["documents"]
