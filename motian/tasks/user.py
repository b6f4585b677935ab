"""The user's own labelled data, in three plain JSON-lines formats.

CLUE's readers fix each task's label set (TNEWS's 15 ids, IFLYTEK's 119), so a user with their
own classes or entity types needs formats of their own. A directory holds ``train.jsonl``,
``dev.jsonl`` and optionally ``test.jsonl`` (``.json`` files of JSON lines are read too); a test
record may leave its answer out, and then `motian finetune` / `evaluate` write predictions:

| task | one record per line |
|---|---|
| ``text-classification`` | ``{"text": ..., "label": ...}`` |
| ``text-pair`` | ``{"text_a": ..., "text_b": ..., "label": ...}`` |
| ``ner`` | ``{"text": ..., "entities": [[start, end, "TYPE"], ...]}`` (characters, end exclusive) |

An optional ``"id"`` is kept. The label set (class names, or entity types for ``ner``) is read
from the training file and sorted, so the same files always give the same label indices; the
model saves it in task.json and `motian predict` answers with these names.

The task is named by the user (`finetune --name`), by default after its data directory
(``my_task/`` -> ``my_task``): the name titles the results, names the prediction files and
groups the task in `motian report --downstream`; the format is kept beside it (`Task.format`,
task.json's ``format``) so `evaluate` and `distill` read the files the same way again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from motian.errors import UserError
from motian.io import write_text_atomic
from motian.tasks.clue import _guid, need, read_jsonl
from motian.tasks.types import Example, Task

USER_TASKS: dict[str, str] = {"text-classification": "single", "text-pair": "pair",
                              "ner": "token"}
FORMATS = {"text-classification": '{"text": ..., "label": ...}',
           "text-pair": '{"text_a": ..., "text_b": ..., "label": ...}',
           "ner": '{"text": ..., "entities": [[start, end, "TYPE"], ...]}'}
NAME = re.compile(r"\w[\w.-]*")  # a task name: it becomes part of file names


def task_name(given: str | None, data: Path) -> str:
    """The name of the user's task: `given` (checked: it names files and results), else the
    data directory's name made safe for a file name."""
    if given is not None:
        if not NAME.fullmatch(given):
            raise UserError(f"--name {given!r}: use letters, digits, '-', '_' or '.', starting "
                            f"with a letter or digit (it names files such as "
                            f"{given}_test_predictions.jsonl)")
        return given
    name = re.sub(r"[^\w.-]+", "-", Path(data).resolve().name).strip("-.")
    return name or "my-task"


def load_user_task(format: str, data: Path | None, name: str | None = None) -> Task:
    """Your task from the JSON-lines files in `data`, in `format` (text-classification,
    text-pair, ner), named `name` (default: the directory's name: `task_name`)."""
    if data is None:
        raise UserError(f"task {format!r} reads your files: give --data DIR with train.jsonl "
                        f"and dev.jsonl (one {FORMATS[format]} per line)")
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"{data}: no such directory; give the folder holding train.jsonl and "
                        "dev.jsonl")
    files = {split: _split_file(data, split) for split in ("train", "dev", "test")}
    if files["train"] is None:
        raise UserError(f"{data}: no train.jsonl (or train.json); task {format!r} needs one "
                        f"{FORMATS[format]} per line")
    records = {split: list(read_jsonl(path)) for split, path in files.items() if path}
    task_type = USER_TASKS[format]
    labels = _labels(task_type, files["train"], records["train"])
    kinds = "types" if task_type == "token" else "classes"
    task = Task(task_name(name, data), task_type, labels=labels, format=format,
                notes=f"your {format} files in {data} ({len(labels)} {kinds})")
    for split, rows in records.items():
        task.splits[split] = [_example(task_type, labels, files[split], lineno, record)
                              for lineno, record in rows]
    return task


def _split_file(data: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".json"):
        if (data / f"{split}{suffix}").is_file():
            return data / f"{split}{suffix}"
    return None


def _labels(task_type: str, path: Path, rows: list[tuple[int, dict]]) -> list[str]:
    """The sorted label set (class names, or entity types) of the training file."""
    found: set[str] = set()
    for lineno, record in rows:
        where = f"{path}:{lineno}"
        if task_type == "token":
            found.update(kind for _, _, kind in _entities(record, where))
        else:
            found.add(str(need(record, "label", where, (str, int))))
    if task_type != "token" and len(found) < 2:
        raise UserError(f"{path}: only {len(found)} distinct label(s) "
                        f"({', '.join(sorted(found)) or 'none'}); classification needs at least 2")
    return sorted(found)


def _entities(record: dict, where: str) -> list[tuple[int, int, str]]:
    text = need(record, "text", where)
    spans = []
    for item in need(record, "entities", where, list):
        if (not isinstance(item, list) or len(item) != 3 or not all(
                isinstance(v, int) for v in item[:2]) or not isinstance(item[2], str)):
            raise UserError(f"{where}: each entity must be [start, end, \"TYPE\"] with character "
                            f"offsets, end exclusive; got {item!r:.60}")
        start, end, kind = item
        if not 0 <= start < end <= len(text):
            raise UserError(f"{where}: entity {item!r} is outside the text of {len(text)} "
                            "characters (offsets are characters, end exclusive)")
        spans.append((start, end, kind))
    return spans


def _example(task_type: str, labels: list[str], path: Path, lineno: int,
             record: dict) -> Example:
    where = f"{path}:{lineno}"
    guid = _guid(record, lineno)
    if task_type == "token":
        entities = _entities(record, where) if "entities" in record else None
        for _, _, kind in entities or []:
            if kind not in labels:
                raise UserError(f"{where}: entity type {kind!r} never occurs in the training "
                                f"file (types: {', '.join(labels)}); add examples of it to "
                                "train.jsonl or relabel")
        return Example(guid, need(record, "text", where), entities=entities, where=where)
    if task_type == "pair":
        text, text_b = need(record, "text_a", where), need(record, "text_b", where)
    else:
        text, text_b = need(record, "text", where), None
    label = None
    if "label" in record:
        if str(record["label"]) not in labels:
            raise UserError(f"{where}: label {record['label']!r} never occurs in the training "
                            f"file (labels: {', '.join(labels)}); add examples of it to "
                            "train.jsonl or relabel")
        label = labels.index(str(record["label"]))
    return Example(guid, text, text_b, label, where=where)


def write_predictions(task: Task, examples: list[Example], predictions: list, out_dir: Path,
                      split: str = "test") -> Path:
    """JSON lines {"id", "label"} (classes by name) or {"id", "entities": [[start, end, type]]}
    for an unlabelled split of a user task, in the input's order; returns the file."""
    out = Path(out_dir) / f"{task.name}_{split}_predictions.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for e, p in zip(examples, predictions, strict=True):
        answer = ({"entities": [[s, t, kind] for s, t, kind in p]} if task.type == "token"
                  else {"label": task.labels[int(p)]})
        lines.append(json.dumps({"id": e.guid, **answer}, ensure_ascii=False) + "\n")
    write_text_atomic(out, "".join(lines))  # a failed run leaves the previous file intact
    return out
