"""Examples -> model inputs for each task type, and model outputs -> predictions.

Texts are tokenised once in a batch by the `tokenizers` library without special tokens; the
[CLS] A [SEP] B [SEP] layout and truncation are assembled here, so the result does not depend
on whatever template or truncation a tokenizer.json carries. Character offsets from the
tokenizer are kept for the tasks that answer in characters:

* token: gold character spans -> token spans -> one tag per token (BIO/BIOES); predicted tags
  -> token spans -> character spans. Scoring is on character spans, so a tokenisation that
  merges characters (Latin words, digits) costs what it really costs.
* span: the context is cut into overlapping windows that fit beside the question; an answer
  outside a window points at [CLS]; the best (start, end) over all windows is decoded back to
  the context's characters.
* choice: one sequence per candidate, (B, C, L); a batch mixing 3- and 4-choice questions pads
  with empty candidates that `choice_mask` removes from the softmax.
* generation: one causal-LM row [CLS] source [SEP] target [SEP]; `label` repeats the target's
  tokens and the final [SEP] (the stop token the decoder must learn) and is -100 elsewhere,
  so the loss is on the target only; the prompt at decoding is [CLS] source [SEP].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from motian.tasks.metrics import spans_to_tags, tags_to_spans
from motian.tasks.types import Example, Task, tag_names

MAX_QUESTION_TOKENS = 64
MAX_ANSWER_TOKENS = 30


@dataclass
class Feature:
    """One model input. `label` is an int (single/pair/choice), a list of tag ids (token) or
    None; `offsets` maps each input position to (char start, char end) of the text it came
    from, None for special and question tokens."""

    example: int  # index of the example this feature came from
    input_ids: list[int] | list[list[int]]  # list of lists for choice: one per candidate
    token_type_ids: list[int] | list[list[int]]
    label: int | list[int] | None = None
    offsets: list[tuple[int, int] | None] | None = None
    start: int = 0  # span: answer start/end positions in this window (0 = [CLS], no answer)
    end: int = 0


class Featurizer:
    """Turns a task's examples into `Feature`s with one tokenizer and maximum length."""

    def __init__(self, task: Task, tokenizer: Tokenizer, special: dict[str, int],
                 max_length: int = 128):
        # A private copy without the tokenizer.json's own truncation/padding: windows and
        # truncation are decided here, on the full token sequence.
        self.tok = Tokenizer.from_str(tokenizer.to_str())
        self.tok.no_truncation()
        self.tok.no_padding()
        self.task, self.max_length = task, max_length
        self.cls, self.sep, self.pad = special["cls"], special["sep"], special["pad"]
        self.tags = tag_names(task.labels, task.scheme) if task.type == "token" else []
        self.tag_ids = {t: i for i, t in enumerate(self.tags)}

    def _encode(self, texts: list[str]) -> list:
        return self.tok.encode_batch(texts, add_special_tokens=False) if texts else []

    def __call__(self, examples: list[Example]) -> list[Feature]:
        kind = self.task.type
        if kind in ("single", "pair"):
            return self._classification(examples)
        if kind == "token":
            return self._token(examples)
        if kind == "span":
            return self._span(examples)
        if kind == "generation":
            return self._generation(examples)
        return self._choice(examples)

    def _pack(self, a: list[int], b: list[int] | None) -> tuple[list[int], list[int]]:
        """[CLS] a [SEP] (b [SEP]), cutting the longer of a/b first until it fits."""
        budget = self.max_length - (3 if b is not None else 2)
        a, b = list(a), (list(b) if b is not None else None)
        while len(a) + len(b or []) > budget:
            if b is not None and len(b) > len(a):
                b.pop()
            else:
                a.pop()
        ids = [self.cls] + a + [self.sep]
        types = [0] * len(ids)
        if b is not None:
            ids += b + [self.sep]
            types += [1] * (len(b) + 1)
        return ids, types

    def _classification(self, examples: list[Example]) -> list[Feature]:
        enc_a = self._encode([e.text for e in examples])
        enc_b = self._encode([e.text_b for e in examples if e.text_b is not None])
        it_b = iter(enc_b)
        out = []
        for i, (e, a) in enumerate(zip(examples, enc_a)):
            b = next(it_b).ids if e.text_b is not None else None
            ids, types = self._pack(a.ids, b)
            out.append(Feature(i, ids, types, e.label))
        return out

    def _token(self, examples: list[Example]) -> list[Feature]:
        out = []
        for i, (e, enc) in enumerate(zip(examples, self._encode([e.text for e in examples]))):
            n = min(len(enc.ids), self.max_length - 2)
            offsets = list(enc.offsets[:n])
            label = None
            if e.entities is not None:
                tags = spans_to_tags(char_to_token_spans(e.entities, offsets, len(e.text)), n,
                                     self.task.scheme)
                label = [-100] + [self.tag_ids[t] for t in tags] + [-100]
            ids = [self.cls] + enc.ids[:n] + [self.sep]
            out.append(Feature(i, ids, [0] * len(ids), label, [None] + offsets + [None]))
        return out

    def _span(self, examples: list[Example]) -> list[Feature]:
        questions = self._encode([e.text_b or "" for e in examples])
        contexts = self._encode([e.text for e in examples])
        out = []
        for i, (e, q, c) in enumerate(zip(examples, questions, contexts)):
            q_ids = q.ids[:MAX_QUESTION_TOKENS]
            window = max(self.max_length - len(q_ids) - 3, 8)
            step = max(window - min(128, window // 2), 1)  # windows overlap by <= 128 tokens
            answer = _answer_tokens(e, c.offsets)
            for w0 in range(0, max(len(c.ids) - window, 0) + step, step):
                w1 = min(w0 + window, len(c.ids))
                ids = [self.cls] + q_ids + [self.sep] + c.ids[w0:w1] + [self.sep]
                types = [0] * (len(q_ids) + 2) + [1] * (w1 - w0 + 1)
                offsets = [None] * (len(q_ids) + 2) + list(c.offsets[w0:w1]) + [None]
                start = end = 0
                if answer and w0 <= answer[0] and answer[1] < w1:
                    shift = len(q_ids) + 2 - w0
                    start, end = answer[0] + shift, answer[1] + shift
                out.append(Feature(i, ids, types, None, offsets, start, end))
                if w1 >= len(c.ids):
                    break
        return out

    def _generation(self, examples: list[Example]) -> list[Feature]:
        """[CLS] source [SEP] target [SEP]; the target keeps up to half of max_length, the
        source is cut from its end to fit (its lead is what a headline says). `start` is the
        prompt's length. Without a target (unlabelled), the row is the prompt alone."""
        sources = self._encode([e.text for e in examples])
        targets = self._encode([e.target or "" for e in examples])
        out = []
        for i, (e, src, tgt) in enumerate(zip(examples, sources, targets)):
            target = tgt.ids[:max(self.max_length // 2 - 1, 1)] if e.target is not None else []
            budget = self.max_length - 3 - len(target) if e.target is not None else \
                self.max_length - 2
            prompt = [self.cls] + src.ids[:max(budget, 1)] + [self.sep]
            ids, label = list(prompt), None
            if e.target is not None:
                ids += target + [self.sep]
                label = [-100] * len(prompt) + target + [self.sep]
            out.append(Feature(i, ids, [0] * len(ids), label, start=len(prompt)))
        return out

    def _choice(self, examples: list[Example]) -> list[Feature]:
        flat_a, flat_b, owners = [], [], []
        for i, e in enumerate(examples):
            for choice in e.choices or []:
                flat_a.append(e.text)
                flat_b.append(f"{e.text_b} {choice}" if e.text_b else choice)
                owners.append(i)
        enc_a, enc_b = self._encode(flat_a), self._encode(flat_b)
        out = [Feature(i, [], [], e.label) for i, e in enumerate(examples)]
        for owner, a, b in zip(owners, enc_a, enc_b):
            ids, types = self._pack(a.ids, b.ids)
            out[owner].input_ids.append(ids)
            out[owner].token_type_ids.append(types)
        return out


def char_to_token_spans(spans, offsets, length: int) -> list[tuple[int, int, str]]:
    """Character spans -> token spans (first and last token overlapping the characters); a span
    none of whose characters reached a token (e.g. only whitespace) is dropped."""
    owner = [-1] * length
    for t, (s, e) in enumerate(offsets):
        for c in range(s, min(e, length)):
            owner[c] = t
    out = []
    for start, end, kind in spans:
        tokens = [owner[c] for c in range(start, min(end, length)) if owner[c] >= 0]
        if tokens:
            out.append((min(tokens), max(tokens) + 1, kind))
    return out


def _answer_tokens(e: Example, offsets) -> tuple[int, int] | None:
    """Token indices (first, last) of the example's first answer in the context."""
    if not e.answers:
        return None
    text, start = e.answers[0]
    end = start + len(text)
    inside = [t for t, (s, x) in enumerate(offsets) if x > start and s < end]
    return (inside[0], inside[-1]) if inside else None


# --------------------------------------------------------------------------- batches


def _pad(rows: list[list[int]], value: int, length: int) -> list[list[int]]:
    return [r + [value] * (length - len(r)) for r in rows]


def collate(task_type: str, features: list[Feature], pad_id: int) -> dict[str, Tensor]:
    """Pad a list of features to the longest in the batch: model inputs plus labels."""
    if task_type == "choice":
        return _collate_choice(features, pad_id)
    L = max(len(f.input_ids) for f in features)
    if task_type == "generation":  # a causal LM: no segment ids; labels already per token
        batch = {"input_ids": torch.tensor(_pad([f.input_ids for f in features], pad_id, L)),
                 "attention_mask": torch.tensor(_pad([[1] * len(f.input_ids)
                                                      for f in features], 0, L))}
        if features[0].label is not None:
            batch["labels"] = torch.tensor(_pad([f.label for f in features], -100, L))
        return batch
    batch = {
        "input_ids": torch.tensor(_pad([f.input_ids for f in features], pad_id, L)),
        "attention_mask": torch.tensor(_pad([[1] * len(f.input_ids) for f in features], 0, L)),
        "token_type_ids": torch.tensor(_pad([f.token_type_ids for f in features], 0, L)),
    }
    if task_type == "token" and features[0].label is not None:
        batch["labels"] = torch.tensor(_pad([f.label for f in features], -100, L))
    elif task_type == "span":
        batch["start_positions"] = torch.tensor([f.start for f in features])
        batch["end_positions"] = torch.tensor([f.end for f in features])
    elif task_type in ("single", "pair") and features[0].label is not None:
        batch["labels"] = torch.tensor([f.label for f in features])
    return batch


def _collate_choice(features: list[Feature], pad_id: int) -> dict[str, Tensor]:
    C = max(len(f.input_ids) for f in features)
    L = max(len(ids) for f in features for ids in f.input_ids)
    ids = torch.full((len(features), C, L), pad_id)
    types = torch.zeros((len(features), C, L), dtype=torch.long)
    mask = torch.zeros((len(features), C, L), dtype=torch.long)
    for b, f in enumerate(features):
        for c, (row, trow) in enumerate(zip(f.input_ids, f.token_type_ids)):
            ids[b, c, :len(row)] = torch.tensor(row)
            types[b, c, :len(trow)] = torch.tensor(trow)
            mask[b, c, :len(row)] = 1
    mask[:, :, 0] = 1  # an empty padding candidate still attends to its first position
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
             "choice_mask": torch.tensor([[c < len(f.input_ids) for c in range(C)]
                                          for f in features])}
    if features[0].label is not None:
        batch["labels"] = torch.tensor([f.label for f in features])
    return batch


# --------------------------------------------------------------------------- decoding


def decode_tokens(tags: list[str], offsets: list[tuple[int, int] | None]
                  ) -> list[tuple[int, int, str]]:
    """Predicted token tags (special positions included) -> character spans."""
    spans = []
    for start, end, kind in tags_to_spans(tags):
        inside = [o for o in offsets[start:end] if o is not None]
        if inside:
            spans.append((inside[0][0], inside[-1][1], kind))
    return spans


def best_span(start_logits: Tensor, end_logits: Tensor,
              offsets: list[tuple[int, int] | None]) -> tuple[float, int, int] | None:
    """(score, char start, char end) of the best answer in one window: start <= end, at most
    MAX_ANSWER_TOKENS tokens, both inside the context; None if the window has no context."""
    L = len(offsets)
    ok = torch.tensor([o is not None for o in offsets])
    if not ok.any():
        return None
    scores = start_logits[:L, None] + end_logits[None, :L]  # (L, L): start row, end column
    i = torch.arange(L)
    valid = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < MAX_ANSWER_TOKENS)
    valid &= ok[:, None] & ok[None, :]
    scores = scores.masked_fill(~valid, float("-inf"))
    flat = int(scores.argmax())
    s, e = divmod(flat, L)
    return float(scores[s, e]), offsets[s][0], offsets[e][1]
