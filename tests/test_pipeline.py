"""End to end through the real CLI: user files → clean → vocabulary → encoded shards."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np

from motian.data.shards import EncodedDataset
from motian.data.sources import iter_documents


def test_prepare_cli_on_user_files(tmp_path):
    # A user corpus of real text: 150 People's Daily articles (blank-line separated .txt) and
    # the same articles again as .jsonl, so exact deduplication has work to do.
    docs = [d.text for d in itertools.islice(iter_documents(["pd98"]), 150)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "news.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    with open(corpus / "news.jsonl", "w", encoding="utf-8") as f:
        for text in docs[:50]:
            f.write(json.dumps({"body": text}, ensure_ascii=False) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "motian.cli", "prepare", "--inputs", str(corpus), "--out",
           str(out), "--txt-mode", "blank", "--text-field", "body", "--vocab-size", "2000",
           "--workers", "1", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "report.md").is_file()

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    kept = report["clean"]["counts"]["kept_docs"] if "kept_docs" in report["clean"].get(
        "counts", {}) else None
    data = EncodedDataset(out / "encoded", vocab_file=out / "tokenizer" / "vocab.txt")
    # the 50 repeated articles were dropped as duplicates; every kept one was encoded
    assert data.n_docs <= 150
    if kept is not None:
        assert data.n_docs == kept
    shard = data.shard(0)
    assert shard.tokens.dtype in (np.uint16, np.uint32) and len(shard.tokens) > 10_000
    assert shard.flags[0] & 1  # the first token starts a word

    # Running the same command again resumes: nothing to redo, same shards.
    before = np.array(shard.tokens)
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(before, EncodedDataset(out / "encoded").shard(0).tokens)
