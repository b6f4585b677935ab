"""`motian long-data`: People's Daily 1998 as long text, for long-sequence pretraining and
perplexity (issue 19; docs/long.md, "Long text from the bundled corpus").

The bundled corpus is news: 3,098 articles (the heading heuristic of `motian.data.sources`),
median ~465 characters, the longest ~5,400. Two *views* of it at 512 / 1k / 2k / 4k tokens:

* **stream**: the articles in their order in the paper, each ended by [SEP], joined into one
  token stream and cut into rows of L tokens (what Transformer-XL reads, `motian.data.stream`);
  a row crosses article boundaries, so a model sees up to L tokens of real preceding text;
* **articles**: one article per row, ``[CLS] article [SEP]``, padded with [PAD] to L; an article
  longer than L continues in the next row (counted as cut).

**What is held out.** The dev articles of the bundled tasks (pd98-ner / pd98-seg: article index
mod 10 = 8, `motian.tasks.builtin.pd98_split`) are left out altogether. The test articles
(mod 10 = 9) are the held-out split for perplexity: with the dev articles gone, test article
10k + 9 is document 9k + 8 of the corpus, exactly the documents `eval.holdout_every: 9`
holds out (`motian.data.splits.SplitLoader`: document d when d mod 9 = 8), so a recipe on this
corpus (`longformer-demo`) never trains on them and evaluates on them. The build checks this
document by document.

One command builds the length-independent encoded corpus (``out/encoded``, by `motian encode`:
resumable, the same shards for every length) and writes each view at each length to
``out/<view>-<L>/{train,heldout}.{tokens,article}.npy`` with a ``view.json`` of counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np

from motian.data.stream import document_stream, split_documents
from motian.errors import UserError
from motian.io import write_json_atomic, write_text_atomic

LENGTHS = (512, 1024, 2048, 4096)
VIEWS = ("stream", "articles")
HOLDOUT_EVERY = 9  # eval.holdout_every of a recipe on this corpus: the pd98 test articles
MIN_ARTICLES = 10  # the first test article is article 9


def long_articles(articles: int = 0) -> tuple[list[str], list[bool]]:
    """The texts of pd98's articles in order without the dev articles (the first `articles`
    of the paper when > 0), and for each whether it is a test article (the held-out split).
    Checks that the held-out ones are exactly the documents `holdout_every=9` holds out."""
    from motian.data.sources import iter_documents
    from motian.tasks.builtin import pd98_heldout_lines

    held_out_lines = pd98_heldout_lines()  # dev and test: first lines of their articles
    test_lines = pd98_heldout_lines(include_dev=False)
    texts, is_test = [], []
    for n, doc in enumerate(iter_documents(["pd98"])):
        if articles and n >= articles:
            break
        if doc.line in held_out_lines and doc.line not in test_lines:
            continue  # a dev article: never read
        texts.append(doc.text)
        is_test.append(doc.line in test_lines)
    expected = [d % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 for d in range(len(texts))]
    if is_test != expected:  # the corpus's article heuristic changed: say so, do not guess
        raise RuntimeError("pd98 test articles are no longer every 9th kept document; "
                           "motian.long_text.HOLDOUT_EVERY must be revised")
    return texts, is_test


def view_rows(data: Path, view: str, seq_len: int, held_out: bool,
              holdout_every: int = HOLDOUT_EVERY) -> dict[str, np.ndarray]:
    """One split of one view of an encoded corpus (module docstring): ``tokens`` (N, L) int32
    and ``article`` (N,) int32 (the index, within the split, of the article a row starts in;
    for the stream, of its first token)."""
    if view not in VIEWS:
        raise UserError(f"--view {view}: unknown view; choose one of {', '.join(VIEWS)} "
                        "(or both)")
    if seq_len < 8:
        raise UserError(f"--seq-len {seq_len}: rows need at least 8 tokens")
    docs, vocab = split_documents(data, holdout_every, held_out)
    if view == "stream":
        stream, _ = document_stream(data, holdout_every, held_out)
        ends = np.cumsum([len(d) + 1 for d in docs])
        n = len(stream) // seq_len
        if n == 0:
            raise UserError(f"{data}: the {'held-out' if held_out else 'training'} stream has "
                            f"{len(stream):,} tokens, fewer than one row of {seq_len}; use a "
                            "shorter --seq-len or more articles")
        starts = np.arange(n) * seq_len
        return {"tokens": stream[:n * seq_len].reshape(n, seq_len).astype(np.int32),
                "article": np.searchsorted(ends, starts, side="right").astype(np.int32)}
    cls, sep, pad = (vocab.index(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    rows, article = [], []
    for i, d in enumerate(docs):
        full = np.concatenate([[cls], d, [sep]])
        pieces = -(-len(full) // seq_len)
        padded = np.full(pieces * seq_len, pad, np.int64)
        padded[:len(full)] = full
        rows.append(padded.reshape(pieces, seq_len))
        article += [i] * pieces
    return {"tokens": np.concatenate(rows).astype(np.int32),
            "article": np.asarray(article, np.int32)}


def _save_view(data: Path, out: Path, view: str, seq_len: int, pad: int) -> dict:
    """Write both splits of one view (atomically, array by array) and its view.json."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, held_out in (("train", False), ("heldout", True)):
        arrays = view_rows(data, view, seq_len, held_out)
        for name, array in arrays.items():
            tmp = out / f"{split}.{name}.tmp.npy"
            np.save(tmp, array)
            os.replace(tmp, out / f"{split}.{name}.npy")
        tokens, article = arrays["tokens"], arrays["article"]
        real = int((tokens != pad).sum()) if view == "articles" else int(tokens.size)
        counts[split] = {"rows": len(tokens), "tokens": real,
                         "articles": int(article.max()) + 1,
                         "padding": round(1 - real / tokens.size, 4),
                         "articles_cut": int(np.count_nonzero(np.bincount(article) > 1))
                         if view == "articles" else None}
    manifest = {"kind": "long-view", "view": view, "seq_len": seq_len,
                "encoded": str(data), "holdout_every": HOLDOUT_EVERY, "splits": counts}
    write_json_atomic(out / "view.json", manifest)
    return manifest


def long_data(tokenizer: Path, out: Path = Path("runs/long/pd98"),
              view: Literal["stream", "articles", "both", "none"] = "both",
              seq_len: list[int] | None = None, articles: int = 0, workers: int = 1,
              progress: bool = True) -> dict:
    """People's Daily 1998 as long text: the encoded corpus without the bundled tasks' dev
    articles, and its stream / article views at long lengths (docs/long.md).

    Writes out/encoded (pretrain on it with `motian pretrain --recipe longformer-demo` or
    xl-demo with eval.holdout_every=9: the test articles are the held-out split) and
    out/<view>-<L>/ (train and heldout rows as .npy, view.json). Running it again reuses the
    encoded shards.

    Args:
        tokenizer: the tokenizer to encode with (e.g. runs/demo/tokenizer, written by
            `motian prepare` or `motian tokenizer`).
        out: output directory.
        view: stream (articles in order, joined), articles (one per row, padded), both, or
            none (only the encoded corpus).
        seq_len: row lengths of the views (default 512 1024 2048 4096).
        articles: use only the first this many articles of the paper (0: all 3,098); at
            least 10 (the first test article is the 10th).
        workers: encoding processes (0: every core).
        progress: show a progress bar while encoding.
    """
    from motian.data.encode import encode

    out = Path(out)
    lengths = list(seq_len) if seq_len else list(LENGTHS)
    if view not in (*VIEWS, "both", "none"):
        raise UserError(f"--view {view}: choose stream, articles, both or none")
    for n in lengths:
        if n < 8:
            raise UserError(f"--seq-len {n}: rows need at least 8 tokens; give lengths such "
                            "as 512 1024 2048 4096")
    if articles < 0 or 0 < articles < MIN_ARTICLES:
        raise UserError(f"--articles {articles}: give 0 (all) or at least {MIN_ARTICLES}: the "
                        "first held-out (test) article is the paper's 10th")
    texts, is_test = long_articles(articles)
    out.mkdir(parents=True, exist_ok=True)
    source = out / "pd98-articles.txt"  # one article per blank-line separated block
    text = "\n\n".join(texts) + "\n"
    if not source.is_file() or source.read_text(encoding="utf-8") != text:
        write_text_atomic(source, text)
    encode([str(source)], out / "encoded", tokenizer=Path(tokenizer), workers=workers,
           txt_mode="blank", progress=progress)
    pad = json.loads((out / "encoded" / "manifest.json").read_text(
        encoding="utf-8"))["special_token_ids"]["pad"]
    views = {}
    for name in (VIEWS if view == "both" else () if view == "none" else (view,)):
        for n in lengths:
            views[f"{name}-{n}"] = _save_view(out / "encoded", out / f"{name}-{n}", name, n,
                                              pad)
    summary = {"encoded": str(out / "encoded"), "articles": len(texts),
               "heldout_articles": sum(is_test), "holdout_every": HOLDOUT_EVERY,
               "views": views}
    write_json_atomic(out / "long-data.json", summary)
    print(view_table(summary))
    return summary


def view_table(summary: dict) -> str:
    """The counts of every view built, as a Markdown table."""
    lines = [f"{summary['articles']:,} articles ({summary['heldout_articles']:,} held out: the "
             f"pd98 test articles, eval.holdout_every={summary['holdout_every']}) -> "
             f"{summary['encoded']}"]
    if summary["views"]:
        lines += ["| view | L | train rows | train tokens | held-out rows | held-out tokens "
                  "| padding | articles cut |", "|---|---|---|---|---|---|---|---|"]
    for v in summary["views"].values():
        t, h = v["splits"]["train"], v["splits"]["heldout"]
        cut = "—" if t["articles_cut"] is None else f"{t['articles_cut']:,}"
        lines.append(f"| {v['view']} | {v['seq_len']:,} | {t['rows']:,} | {t['tokens']:,} | "
                     f"{h['rows']:,} | {h['tokens']:,} | {100 * t['padding']:.1f}% | {cut} |")
    return "\n".join(lines)
