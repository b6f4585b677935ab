"""Downstream metrics: accuracy, macro-F1, entity-level precision/recall/F1 with the BIO/BIOES
conversions they rest on, and exact match / F1 for Chinese extractive reading comprehension.

Entity scores compare *sets of typed spans* (conlleval's definition): a predicted entity counts
only if its type, start and end all match. Tags are turned into spans by one function
(`tags_to_spans`) used for gold and predictions alike, so an ill-formed predicted sequence
(I- without B-) is read the same lenient way conlleval reads it: it starts an entity.

Reading comprehension follows the CMRC 2018 evaluation: text is split into "mixed segments"
(each CJK character or punctuation mark alone, runs of Latin letters/digits kept together),
punctuation is dropped, EM compares the segment lists and F1 is computed from the longest common
*contiguous* run of segments (what CMRC's official script measures), the best over gold answers.

Generation (headlines) is scored on characters, the usual unit for Chinese (no segmenter's
errors in the score): ROUGE-1/2/L F1 per example, averaged (Lin 2004), and corpus BLEU up to
4-grams with the brevity penalty (Papineni et al. 2002). Written here rather than taken from
`rouge-score` / `sacrebleu`: neither is a dependency, `rouge-score` tokenises on Latin words
(a Chinese string becomes no tokens at all) and character-level BLEU is a few lines.
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Sequence

Span = tuple[int, int, str]  # (start, end exclusive, type)


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


def macro_f1(gold: Sequence[int], pred: Sequence[int], num_labels: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions (or all
    `num_labels` classes when given, so an unpredicted class counts as 0)."""
    classes = range(num_labels) if num_labels else sorted(set(gold) | set(pred))
    scores = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


# --------------------------------------------------------------------------- tagging


def tags_to_spans(tags: Sequence[str]) -> list[Span]:
    """Typed spans from BIO or BIOES tags (S- and E- close a span; I- after O or another type
    starts one, as conlleval does)."""
    spans: list[Span] = []
    start, kind = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        continues = prefix in ("I", "E") and kind == t and start is not None
        if not continues and start is not None:
            spans.append((start, i, kind))
            start, kind = None, None
        if prefix in ("B", "S") or (prefix in ("I", "E") and start is None):
            start, kind = i, t
        if prefix in ("E", "S") and start is not None:
            spans.append((start, i + 1, kind))
            start, kind = None, None
    return spans


def spans_to_tags(spans: Sequence[Span], length: int, scheme: str = "BIO") -> list[str]:
    """Tags for `length` positions; overlapping spans keep the first one given."""
    tags = ["O"] * length
    for start, end, kind in spans:
        if start >= end or end > length or any(t != "O" for t in tags[start:end]):
            continue
        if scheme == "BIOES" and end - start == 1:
            tags[start] = f"S-{kind}"
            continue
        tags[start] = f"B-{kind}"
        for i in range(start + 1, end):
            tags[i] = f"I-{kind}"
        if scheme == "BIOES":
            tags[end - 1] = f"E-{kind}"
    return tags


def entity_prf(gold: Sequence[Sequence[Span]], pred: Sequence[Sequence[Span]]) -> dict[str, float]:
    """Micro precision/recall/F1 over exact typed spans, summed over sentences."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred, strict=True):
        g_set, p_set = set(map(tuple, g)), set(map(tuple, p))
        tp += len(g_set & p_set)
        n_gold += len(g_set)
        n_pred += len(p_set)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------- reading comprehension

_LATIN_RUN = re.compile(r"[A-Za-z0-9]+")


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PSZ" or ch.isspace()


def mixed_segments(text: str) -> list[str]:
    """CMRC-style segments: lower-cased runs of ASCII letters/digits stay whole, every other
    character stands alone; punctuation, symbols and spaces are removed."""
    out: list[str] = []
    i = 0
    text = text.lower()
    while i < len(text):
        m = _LATIN_RUN.match(text, i)
        if m:
            out.append(m.group())
            i = m.end()
            continue
        if not _is_punct(text[i]):
            out.append(text[i])
        i += 1
    return out


def _longest_common_run(a: list[str], b: list[str]) -> int:
    """Length of the longest common contiguous run of segments (dynamic programming, O(|a||b|):
    answers are short, so this is cheap)."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def span_em_f1(gold_answers: Sequence[str], prediction: str) -> tuple[float, float]:
    """(exact match, F1) of one prediction against its gold answers, the best over answers."""
    pred = mixed_segments(prediction)
    em = f1 = 0.0
    for answer in gold_answers:
        gold = mixed_segments(answer)
        em = max(em, float(gold == pred))
        common = _longest_common_run(gold, pred)
        if common:
            p, r = common / len(pred), common / len(gold)
            f1 = max(f1, 2 * p * r / (p + r))
    return em, f1


def squad_scores(gold: Sequence[Sequence[str]], pred: Sequence[str]) -> dict[str, float]:
    """Mean EM and F1 (fractions in [0, 1]) over questions."""
    pairs = [span_em_f1(g, p) for g, p in zip(gold, pred, strict=True)]
    n = max(len(pairs), 1)
    return {"em": sum(e for e, _ in pairs) / n, "f1": sum(f for _, f in pairs) / n}


# --------------------------------------------------------------------------- seeds


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def label_counts(labels: Sequence[int]) -> dict[int, int]:
    return dict(sorted(Counter(labels).items()))


# --------------------------------------------------------------------------- generation


def characters(text: str) -> list[str]:
    """The units generation is scored on: every character but whitespace (a headline's parts
    are joined by a space, which no reader sees as content)."""
    return [c for c in text if not c.isspace()]


def ngrams(units: Sequence[str], n: int) -> Counter:
    return Counter(tuple(units[i:i + n]) for i in range(len(units) - n + 1))


def _f1(overlap: int, n_pred: int, n_gold: int) -> float:
    if not overlap:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_gold
    return 2 * precision * recall / (precision + recall)


def rouge_n(gold: str, pred: str, n: int) -> float:
    """ROUGE-N F1 of one prediction: clipped n-gram overlap over the prediction's n-grams
    (precision) and the gold's (recall)."""
    g, p = ngrams(characters(gold), n), ngrams(characters(pred), n)
    return _f1(sum((g & p).values()), sum(p.values()), sum(g.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (not necessarily contiguous), O(|a||b|)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(gold: str, pred: str) -> float:
    """ROUGE-L F1: the longest common subsequence over the prediction's and the gold's length
    (order matters, gaps do not)."""
    g, p = characters(gold), characters(pred)
    return _f1(lcs_length(g, p), len(p), len(g))


def corpus_bleu(gold: Sequence[str], pred: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU over characters: n-gram precisions (clipped counts summed over the corpus,
    n = 1..max_n), their geometric mean, times the brevity penalty exp(1 - r/c) when the
    predictions' total length c is below the references' r. No smoothing: a corpus without one
    matching 4-gram scores 0, as sacrebleu's default does."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} references but {len(pred)} predictions")
    matches, totals = [0] * max_n, [0] * max_n
    r = c = 0
    for g_text, p_text in zip(gold, pred):
        g, p = characters(g_text), characters(p_text)
        r, c = r + len(g), c + len(p)
        for n in range(1, max_n + 1):
            p_grams = ngrams(p, n)
            matches[n - 1] += sum((ngrams(g, n) & p_grams).values())
            totals[n - 1] += sum(p_grams.values())
    if not c or not all(matches):
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if c >= r else math.exp(1 - r / c)
    return brevity * math.exp(log_precision)


def generation_scores(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L F1 over examples and corpus BLEU-4, fractions in [0, 1]."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} references but {len(pred)} predictions")
    n = max(len(gold), 1)
    return {"rouge_1": sum(rouge_n(g, p, 1) for g, p in zip(gold, pred)) / n,
            "rouge_2": sum(rouge_n(g, p, 2) for g, p in zip(gold, pred)) / n,
            "rouge_l": sum(rouge_l(g, p) for g, p in zip(gold, pred)) / n,
            "bleu": corpus_bleu(gold, pred)}
