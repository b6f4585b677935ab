"""The downstream task model: six task types, one `Example` record and the `Task` that holds the
splits.

Every reader (CLUE files, bundled corpora, the user's own) produces `Example`s; everything after
that (features, the fine-tuning loop, metrics, submission files) depends only on the task type,
never on which dataset the examples came from. One record with optional fields serves all six
types, because the types differ in two or three fields and a class per type would multiply the
code that dispatches on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskType = Literal["single", "pair", "token", "span", "choice", "generation"]
TASK_TYPES: tuple[str, ...] = TaskType.__args__
Scheme = Literal["BIO", "BIOES"]


@dataclass
class Example:
    """One input with its gold answer (None on an unlabelled test split).

    - single / pair: `text` (and `text_b`), `label` = class index.
    - token: `text` is read character by character; `entities` = gold (start, end, type)
      character spans, end exclusive; tags are derived from them in the task's scheme.
    - span: `text` is the context, `text_b` the question, `answers` = [(answer, char start)].
    - choice: `text` is the context, `text_b` the question (may be empty), `choices` the
      candidates, `label` the index of the right one.
    - generation: `text` is the source, `target` the text to produce (a headline).
    `where` is "file:line" (or "file:record N") so any later error can point at the source.
    """

    guid: str
    text: str
    text_b: str | None = None
    label: int | None = None
    entities: list[tuple[int, int, str]] | None = None
    answers: list[tuple[str, int]] | None = None
    choices: list[str] | None = None
    target: str | None = None
    where: str = ""


@dataclass
class Task:
    """A named task: its type, label names, and splits ("train", "dev", "test") of examples.

    `labels` are class names (single/pair), entity types (token) or empty (span/choice).
    `scheme` is the tagging scheme for token tasks. `clue` names the CLUE task whose submission
    format predictions are written in (None for the bundled tasks). `format` is set for the
    user's own files: their format (text-classification, text-pair, ner), while `name` is then
    the name the user gave the task (default: its data directory's name). `notes` documents how
    the splits were made, for the results table.
    """

    name: str
    type: TaskType
    labels: list[str] = field(default_factory=list)
    splits: dict[str, list[Example]] = field(default_factory=dict)
    scheme: Scheme = "BIO"
    clue: str | None = None
    notes: str = ""
    format: str | None = None

    def labelled(self, split: str) -> bool:
        """True if every example of `split` carries its gold answer (CLUE test files do not)."""
        examples = self.splits.get(split, [])
        return bool(examples) and all(_has_gold(self.type, e) for e in examples)

    def sizes(self) -> dict[str, int]:
        return {name: len(examples) for name, examples in self.splits.items()}


def _has_gold(task_type: str, e: Example) -> bool:
    if task_type == "token":
        return e.entities is not None
    if task_type == "span":
        return bool(e.answers)
    if task_type == "generation":
        return e.target is not None
    return e.label is not None


def tag_names(types: list[str], scheme: Scheme) -> list[str]:
    """Tag vocabulary: "O" then, per entity type, B/I (BIO) or B/I/E/S (BIOES)."""
    prefixes = "BI" if scheme == "BIO" else "BIES"
    return ["O"] + [f"{p}-{t}" for t in types for p in prefixes]
