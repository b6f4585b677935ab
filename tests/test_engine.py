"""`motian clean --engine datatrove`: the datatrove stages keep exactly the documents the local
engine keeps (3 tasks on 2 workers, 4 tasks on 1; duplicates planted across files so they meet
only in the sharded LSH buckets), encode per task into one dataset, and refuse bad input before
any work."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datatrove")

from motian.data.clean import CleanSettings, normalize_text, process_batch  # noqa: E402
from motian.data.engine import ENTRY, clean_distributed  # noqa: E402
from motian.data.loader import LoaderConfig, PackedLoader  # noqa: E402
from motian.data.shards import EncodedDataset  # noqa: E402
from motian.data.sources import iter_documents, iter_reviews  # noqa: E402
from motian.errors import UserError  # noqa: E402
from motian.pipeline import clean  # noqa: E402
from tests.test_clean import pd98_articles  # noqa: E402
from tests.test_tasks import char_tokenizer  # noqa: E402


def kept(out: Path) -> list[tuple[str, int, str]]:
    """(source, line, text) of every kept document, in the order the shards list them."""
    rows = []
    for shard in json.loads((out / "manifest.json").read_text(encoding="utf-8"))["shards"]:
        for line in (out / shard["file"]).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            rows.append((r["source"], r["line"], r["text"]))
    return rows


def edit(article: str, k: int) -> str:
    """The article with one sentence replaced: a near duplicate (Jaccard ~0.9)."""
    s = article.split("。")
    s[len(s) // 2] = f"这是第{k}句被改写过的完全不同的新句子，内容与原文无关"
    return "。".join(s)


def chain(arts: list[str]) -> tuple[str, str, str]:
    """A ~ B and B ~ C (Jaccard ~0.87) but not A ~ C (~0.75): B and C each replace another 7%
    of A's characters with text from articles outside the corpus."""
    a = arts[0]
    n, m = len(a), len(a) * 7 // 100
    b = a[:n * 3 // 10] + arts[30][:m] + a[n * 3 // 10 + m:]
    return a, b, b[:n * 6 // 10] + arts[31][:m] + b[n * 6 // 10 + m:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three JSON-lines files of real text: 30 People's Daily articles and 900 reviews (the
    bundled reviews repeat many texts), with near and exact copies of a.jsonl's articles
    planted in b.jsonl and c.jsonl, a chain (`chain`) and one broken line."""
    root = tmp_path_factory.mktemp("engine")
    arts = pd98_articles(32)
    reviews = [t for t, _, _ in itertools.islice(iter_reviews(), 900)]
    files = {
        "a.jsonl": arts[:12] + reviews[:300],
        "b.jsonl": arts[12:22] + [edit(arts[k], k) for k in range(1, 6)] + arts[6:8]
                   + [arts[9].replace("，", " ， "), chain(arts)[1]] + reviews[250:600],
        "c.jsonl": arts[22:30] + [edit(arts[k], k + 100) for k in range(13, 16)]
                   + [chain(arts)[2]] + reviews[550:900],
    }
    for name, texts in files.items():
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
        if name == "c.jsonl":
            lines.insert(5, "{broken json")
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("local") / "clean"
    rep = clean([str(corpus)], out, workers=1, progress=False)
    return out, rep


def test_cli_three_tasks_two_workers_keeps_the_local_documents_and_encodes(corpus, local,
                                                                           tmp_path):
    """A real `motian clean --engine datatrove --tasks 3 --workers 2` process: the same kept
    documents in the same order as the local engine, the same drop counts, near duplicates
    found across files (so across tasks), bucket files split by key owner, and the per-task
    encoded shards read as one dataset."""
    local_out, local_rep = local
    texts = [t for _, _, t in kept(local_out)]
    char_tokenizer(tmp_path, texts)
    out = tmp_path / "dt"
    done = subprocess.run(
        [sys.executable, "-m", "motian.cli", "clean", "--inputs", str(corpus), "--out",
         str(out), "--engine", "datatrove", "--tasks", "3", "--workers", "2",
         "--encode-tokenizer", str(tmp_path / "vocab.txt")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert kept(out) == kept(local_out)
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["documents"] == local_rep["documents"]
    assert rep["characters"] == local_rep["characters"]
    assert rep["skipped_input"]["counts"] == {"invalid JSON": 1}
    dropped = rep["documents"]["dropped"]
    assert dropped["near_duplicate"] >= 8 and dropped["exact_duplicate"] >= 50
    near = rep["examples"]["near_duplicate"]
    assert any("b.jsonl" in e["where"] and "a.jsonl" in e["detail"] for e in near)
    # The chain A ~ B ~ C: B is dropped (a near copy of A); C is a near copy only of B, which
    # is not kept, so both engines keep C (a union-find cluster of A, B, C would drop it).
    a, b, c = chain(pd98_articles(32))
    r = process_batch([a, b, c], CleanSettings())
    est = {k: (r.sig[i] == r.sig[j]).mean() for k, (i, j) in {"ab": (0, 1), "bc": (1, 2),
                                                               "ac": (0, 2)}.items()}
    assert est["ab"] >= 0.8 and est["bc"] >= 0.8 and est["ac"] < 0.8, est
    kept_texts = {t for _, _, t in kept(out)}
    assert normalize_text(c) in kept_texts and normalize_text(b) not in kept_texts
    assert [f.name for f in sorted(out.glob("clean-*.jsonl"))] == [
        "clean-00000.jsonl", "clean-00001.jsonl", "clean-00002.jsonl"]
    work = out / "_datatrove"
    for b in range(3):  # bucket task b holds only the keys it owns, from every signature task
        for t in range(3):
            e = np.load(work / "buckets" / f"{t:05d}-{b:05d}.npy")
            assert e.dtype == ENTRY and len(e) > 0 and (e["key"] % 3 == b).all()
    ds = EncodedDataset(out / "encoded", tmp_path / "vocab.txt")
    assert ds.n_docs == rep["documents"]["kept"]
    assert {e["name"].split("/")[0] for e in ds.shard_entries} == {"00000", "00001", "00002"}
    first = ds.shard(0)
    assert first.n_docs > 0 and first.tokens.max() > 0
    batch = next(iter(PackedLoader(out / "encoded", config=LoaderConfig(seq_len=64,
                                                                        batch_size=2))))
    assert batch["input_ids"].shape == (2, 64)  # what `motian pretrain` reads
    assert "motian clean" in done.stdout  # the summary table was printed


def test_more_tasks_than_inputs_and_resume(corpus, local, tmp_path):
    """4 tasks over 3 files (one task reads nothing), run one after the other in this process
    (workers=1: no pool): still the local documents; the same command again skips the
    completed tasks; other settings are refused."""
    local_out, _ = local
    from motian.pipeline import heldout_matcher

    out = tmp_path / "dt4"
    rep = clean_distributed([str(corpus)], out, exclude=[heldout_matcher([str(corpus)])],
                            tasks=4, workers=1)
    assert kept(out) == kept(local_out)
    assert rep["engine"]["tasks"] == 4
    again = clean_distributed([str(corpus)], out, exclude=[heldout_matcher([str(corpus)])],
                              tasks=4, workers=1)
    assert again["documents"] == rep["documents"]
    with pytest.raises(UserError, match="other tasks"):
        clean_distributed([str(corpus)], out, exclude=[heldout_matcher([str(corpus)])],
                          tasks=2, workers=1)


def test_bad_input_fails_before_any_work_naming_file_and_line(tmp_path):
    """JSON lines without the text field: refused with the file, line and keys, before any
    datatrove stage starts (no work directory)."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "content": "今天的天气非常好，我们一起去公园散步吧。"},
                              ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"in\.jsonl:1: the JSON record has no string field "
                                        r"'text' \(its keys: id, content\)"):
        clean([str(src)], tmp_path / "out", engine="datatrove", tasks=2, workers=2,
              progress=False)
    assert not (tmp_path / "out" / "_datatrove").exists()
    with pytest.raises(UserError, match="needs --engine datatrove"):
        clean([str(src)], tmp_path / "out2", text_field="content", workers=1, progress=False,
              encode_tokenizer=tmp_path)
    with pytest.raises(UserError, match="no such file"):
        clean_distributed([str(tmp_path / "missing.jsonl")], tmp_path / "out3")
    assert list(iter_documents([str(src)], text_field="content"))  # the file itself is fine


def test_a_corpus_without_duplicates(tmp_path):
    """No bucket holds two documents, so there is no edge: every document is kept."""
    src = tmp_path / "in.jsonl"
    arts = pd98_articles(3)
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in arts),
                   encoding="utf-8")
    rep = clean_distributed([str(src)], tmp_path / "out", tasks=2, workers=1)
    assert rep["documents"] == {"read": 3, "kept": 3, "dropped": {}}
    assert [t for _, _, t in kept(tmp_path / "out")] == [normalize_text(t) for t in arts]
