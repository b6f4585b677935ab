"""CLUE: readers for the eleven tasks' own files and writers of CLUE's submission files.

The user gives a directory holding a task's files as CLUE distributes them (nothing is
downloaded). Each reader follows that task's layout field by field:

| task | layout (one record) |
|---|---|
| afqmc | JSONL {sentence1, sentence2, label "0"/"1", [id]} |
| tnews | JSONL {sentence, label "100".."116", label_desc, keywords, [id]} |
| iflytek | JSONL {sentence, label "0".."118", label_des, [id]} |
| ocnli, cmnli | JSONL {sentence1, sentence2, label entailment/neutral/contradiction or "-" (no consensus: skipped), [id]} |
| cluewsc2020 | JSONL {text, target {span1_text, span1_index, span2_text, span2_index}, label "true"/"false", [idx/id]} |
| csl | JSONL {id, abst, keyword [..], label "0"/"1"} |
| cluener | JSONL {text, label {type: {entity: [[start, end inclusive], ..]}}, [id]} |
| cmrc2018 | JSON, SQuAD-style {data: [{paragraphs: [{context, qas: [{id, question, answers: [{text, answer_start}]}]}]}]} |
| c3 | JSON list of [context lines, [{question, choice [..], answer, [id]}], id]; d-*.json + m-*.json |
| chid | JSONL {candidates [..], content [passages with #idiomNNNNNN# blanks]} + {split}_answer.json {blank: index} |

A malformed record raises `UserError` naming the file and line (or record path) and the field.
Test-split submission files use CLUE's names (`afqmc_predict.json`, `tnews11_predict.json`,
...; `tnews10_predict.json` etc. when the 1.0 test file was read); other splits are written as
`<task>_<split>_predictions.json`, never under a submission name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from motian.errors import SkipLog, UserError
from motian.io import write_text_atomic
from motian.tasks.types import Example, Task, TaskType

NLI_LABELS = ["entailment", "neutral", "contradiction"]
TNEWS_LABELS = [str(i) for i in range(100, 117) if i not in (105, 111)]  # 15 classes
CLUENER_TYPES = ["address", "book", "company", "game", "government", "movie", "name",
                 "organization", "position", "scene"]
CHID_BLANK = re.compile(r"#idiom\d+#")
CHID_PLACEHOLDER = "＿＿＿＿"  # the blank being asked about; other blanks stay as markers
CHID_WINDOW = 60  # characters kept on each side of the blank (fits 128 tokens with the idiom)


@dataclass(frozen=True)
class ClueSpec:
    type: TaskType
    labels: list[str]
    submission: str  # file name CLUE 1.1 expects
    reader: Callable[[Path, list[str]], list[Example]]


# --------------------------------------------------------------------------- file access


NOT_UTF8 = ("not UTF-8 (byte {byte} of the line); the file must be UTF-8 text: convert it "
            "(e.g. iconv -f GB18030 -t UTF-8 FILE > FILE.utf8) or give the right file")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; bad JSON or bytes that are not UTF-8
    (a GBK file, a binary file) are a `UserError` at file:line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: " + NOT_UTF8.format(byte=e.start)) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be "
                                "one JSON record") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got "
                                f"{type(record).__name__}")
            yield lineno, record


def read_json(path: Path) -> object:
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        byte = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise UserError(f"{path}:{lineno}: " + NOT_UTF8.format(byte=byte)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def need(record: dict, key: str, where: str, kind: type | tuple = str):
    """record[key], checked for presence and type, else a `UserError` saying what to fix."""
    if key not in record:
        raise UserError(f"{where}: missing field {key!r} (fields present: "
                        f"{', '.join(sorted(record)) or 'none'})")
    value = record[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise UserError(f"{where}: field {key!r} should be {names}, got {value!r:.60}")
    return value


def label_index(value, labels: list[str], where: str) -> int:
    value = str(value)
    if value not in labels:
        raise UserError(f"{where}: label {value!r} is not one of {', '.join(labels)}")
    return labels.index(value)


def _guid(record: dict, lineno: int) -> str:
    for key in ("id", "idx"):
        if key in record:
            return str(record[key])
    return str(lineno - 1)


# --------------------------------------------------------------------------- classification


def _classification(path: Path, labels: list[str], fields: tuple[str, ...],
                    make_text: Callable[[dict, str], tuple[str, str | None]] | None = None,
                    ) -> list[Example]:
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if make_text:
            text, text_b = make_text(record, where)
        else:
            text = need(record, fields[0], where)
            text_b = need(record, fields[1], where) if len(fields) > 1 else None
        label = None
        if "label" in record:
            if str(record["label"]) == "-":  # OCNLI/CMNLI: annotators did not agree
                continue
            label = label_index(record["label"], labels, where)
        examples.append(Example(_guid(record, lineno), text, text_b, label, where=where))
    return examples


def read_afqmc(path: Path, labels: list[str]) -> list[Example]:
    return _classification(path, labels, ("sentence1", "sentence2"))


read_ocnli = read_cmnli = read_afqmc


def read_tnews(path: Path, labels: list[str]) -> list[Example]:
    return _classification(path, labels, ("sentence",))


read_iflytek = read_tnews


def _csl_text(record: dict, where: str) -> tuple[str, str]:
    keywords = need(record, "keyword", where, list)
    # Keywords first: pair truncation trims the longer abstract, never the keywords judged.
    return "；".join(map(str, keywords)), need(record, "abst", where)


def read_csl(path: Path, labels: list[str]) -> list[Example]:
    return _classification(path, labels, (), _csl_text)


def _wsc_text(record: dict, where: str) -> tuple[str, None]:
    """Mark the candidate (span1) with _ _ and the pronoun (span2) with [ ] in the text, so
    one [CLS] classifier can judge whether they co-refer."""
    text = need(record, "text", where)
    target = need(record, "target", where, dict)
    marks = []
    for n, (left, right) in ((1, ("_", "_")), (2, ("[", "]"))):
        span = need(target, f"span{n}_text", f"{where} target")
        start = need(target, f"span{n}_index", f"{where} target", int)
        if text[start:start + len(span)] != span:
            raise UserError(f"{where}: target span{n}_text {span!r} is not at span{n}_index "
                            f"{start} of the text (found {text[start:start + len(span)]!r})")
        marks.append((start, start + len(span), left, right))
    for start, end, left, right in sorted(marks, reverse=True):  # right to left keeps offsets
        text = text[:start] + left + text[start:end] + right + text[end:]
    return text, None


def read_cluewsc2020(path: Path, labels: list[str]) -> list[Example]:
    return _classification(path, labels, (), _wsc_text)


# --------------------------------------------------------------------------- NER


def read_cluener(path: Path, labels: list[str]) -> list[Example]:
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        text = need(record, "text", where)
        entities = None
        if "label" in record:
            entities = []
            for kind, found in need(record, "label", where, dict).items():
                if kind not in labels:
                    raise UserError(f"{where}: entity type {kind!r} is not one of "
                                    f"{', '.join(labels)}")
                for name, positions in found.items():
                    for pos in positions:
                        entities.append(_cluener_span(text, name, pos, kind, where))
            entities.sort()
        examples.append(Example(_guid(record, lineno), text, entities=entities, where=where))
    return examples


def _cluener_span(text: str, name: str, pos, kind: str, where: str) -> tuple[int, int, str]:
    if not (isinstance(pos, list) and len(pos) == 2 and all(isinstance(p, int) for p in pos)):
        raise UserError(f"{where}: entity {name!r} position should be [start, end], got {pos!r}")
    start, end = pos[0], pos[1] + 1  # CLUENER's end is inclusive
    if text[start:end] != name:
        raise UserError(f"{where}: entity {name!r} ({kind}) is not at [{pos[0]}, {pos[1]}] of "
                        f"the text (found {text[start:end]!r})")
    return start, end, kind


# --------------------------------------------------------------------------- reading comprehension


def read_cmrc2018(path: Path, labels: list[str], skips: SkipLog | None = None) -> list[Example]:
    """SQuAD-style questions. An answer whose `answer_start` does not point at its text is moved
    to the text's nearest occurrence (a few CMRC records have shifted offsets); one whose text
    is not in the context at all is dropped and counted in `skips`."""
    skips = skips or SkipLog()
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"{path}: expected a SQuAD-style object with a 'data' list")
    examples = []
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(need(article, "paragraphs", f"{path}: data[{a}]", list)):
            where_p = f"{path}: data[{a}].paragraphs[{p}]"
            context = need(paragraph, "context", where_p)
            for q, qa in enumerate(need(paragraph, "qas", where_p, list)):
                where = f"{where_p}.qas[{q}]"
                answers = [_locate(context, ans, f"{where}.answers[{i}]", skips)
                           for i, ans in enumerate(qa.get("answers", []))]
                examples.append(Example(str(need(qa, "id", where, (str, int))), context,
                                        need(qa, "question", where),
                                        answers=[x for x in answers if x], where=where))
    return examples


def _locate(context: str, answer: dict, where: str, skips: SkipLog) -> tuple[str, int] | None:
    text = need(answer, "text", where)
    start = need(answer, "answer_start", where, int)
    if context[start:start + len(text)] == text:
        return text, start
    found = [m.start() for m in re.finditer(re.escape(text), context)]
    if not found:
        skips.add("answer not in context", where, repr(text[:30]))
        return None
    return text, min(found, key=lambda s: abs(s - start))


def read_c3(path: Path, labels: list[str]) -> list[Example]:
    data = read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of [context, questions, id] entries")
    examples = []
    for n, entry in enumerate(data):
        where = f"{path}: record {n}"
        if not (isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[0], list)
                and isinstance(entry[1], list)):
            raise UserError(f"{where}: expected [context lines, questions, id]")
        context = "\n".join(map(str, entry[0]))
        for q, question in enumerate(entry[1]):
            where_q = f"{where} question {q}"
            choices = need(question, "choice", where_q, list)
            label = None
            if "answer" in question:
                if question["answer"] not in choices:
                    raise UserError(f"{where_q}: answer {question['answer']!r} is not among the "
                                    f"choices {choices}")
                label = choices.index(question["answer"])
            guid = str(question["id"]) if "id" in question else f"{n}-{q}"
            examples.append(Example(guid, context, need(question, "question", where_q),
                                    label=label, choices=[str(c) for c in choices], where=where_q))
    return examples


def read_chid(path: Path, labels: list[str], answers: dict | None = None) -> list[Example]:
    """One example per blank: its passage cut to CHID_WINDOW characters each side, the blank
    shown as CHID_PLACEHOLDER, the ten candidates as choices."""
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        candidates = need(record, "candidates", where, list)
        for passage in need(record, "content", where, list):
            for m in CHID_BLANK.finditer(passage):
                blank = m.group()
                label = None
                if answers is not None:
                    if blank not in answers:
                        raise UserError(f"{where}: blank {blank} has no entry in the answer file")
                    label = int(answers[blank])
                    if not 0 <= label < len(candidates):
                        raise UserError(f"{where}: answer {label} for {blank} is outside the "
                                        f"{len(candidates)} candidates")
                left = passage[max(0, m.start() - CHID_WINDOW):m.start()]
                right = passage[m.end():m.end() + CHID_WINDOW]
                context = left + CHID_PLACEHOLDER + right
                examples.append(Example(blank, context, "", label=label,
                                        choices=[str(c) for c in candidates], where=where))
    return examples


CLUE: dict[str, ClueSpec] = {
    "afqmc": ClueSpec("pair", ["0", "1"], "afqmc_predict.json", read_afqmc),
    "tnews": ClueSpec("single", TNEWS_LABELS, "tnews11_predict.json", read_tnews),
    "iflytek": ClueSpec("single", [str(i) for i in range(119)], "iflytek_predict.json",
                        read_iflytek),
    "ocnli": ClueSpec("pair", NLI_LABELS, "ocnli_50k_predict.json", read_ocnli),
    "cmnli": ClueSpec("pair", NLI_LABELS, "cmnli_predict.json", read_cmnli),
    "cluewsc2020": ClueSpec("single", ["true", "false"], "cluewsc11_predict.json",
                            read_cluewsc2020),
    "csl": ClueSpec("pair", ["0", "1"], "csl_predict.json", read_csl),
    "cluener": ClueSpec("token", CLUENER_TYPES, "cluener_predict.json", read_cluener),
    "cmrc2018": ClueSpec("span", [], "cmrc2018_predict.json", read_cmrc2018),
    "c3": ClueSpec("choice", [], "c311_predict.json", read_c3),
    "chid": ClueSpec("choice", [], "chid11_predict.json", read_chid),
}
# Tasks whose test set CLUE 1.1 replaced: their submission name carries the version.
VERSIONED = {"tnews": "tnews", "cluewsc2020": "cluewsc", "c3": "c3", "chid": "chid"}
ALIASES = {"cluener2020": "cluener", "wsc": "cluewsc2020", "cluewsc": "cluewsc2020"}


def clue_name(name: str) -> str | None:
    """The canonical CLUE task name for `name` (case-insensitive, aliases allowed), or None."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in CLUE else None


def _split_files(name: str, data_dir: Path, split: str) -> list[Path]:
    """The files holding `split` of task `name` in `data_dir`, [] if the split is absent."""
    if name == "c3":
        if split == "test":
            candidates = [["test1.1.json"], ["test1.0.json"], ["test.json"]]
        else:
            candidates = [[f"d-{split}.json", f"m-{split}.json"], [f"{split}.json"]]
    elif split == "test" and name in ("tnews", "cluewsc2020", "chid"):
        candidates = [["test1.1.json"], ["test.json"], ["test1.0.json"]]
    else:
        candidates = [[f"{split}.json"]]
    for group in candidates:
        present = [data_dir / f for f in group if (data_dir / f).is_file()]
        if present:
            return present
    return []


def load_clue(name: str, data_dir: Path) -> Task:
    """Task `name` (afqmc, tnews, ...) with the train/dev/test splits found in `data_dir`."""
    key = clue_name(name)
    if key is None:
        raise UserError(f"unknown CLUE task {name!r}; choose one of {', '.join(CLUE)}")
    spec, data_dir = CLUE[key], Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such directory; give the folder holding {key}'s "
                        "train.json / dev.json / test.json")
    task = Task(key, spec.type, labels=list(spec.labels), scheme="BIO", clue=key,
                notes=f"CLUE {key} read from {data_dir}")
    for split in ("train", "dev", "test"):
        files = _split_files(key, data_dir, split)
        if files:
            task.splits[split] = [e for f in files for e in _read_split(key, spec, f, split)]
    if "train" not in task.splits:
        raise UserError(f"{data_dir}: no training file for {key} (expected "
                        f"{', '.join(str(p.name) for p in _expected(key))})")
    return task


def _expected(name: str) -> list[Path]:
    return [Path("d-train.json"), Path("m-train.json")] if name == "c3" else [Path("train.json")]


def _read_split(name: str, spec: ClueSpec, path: Path, split: str) -> list[Example]:
    if name == "chid":
        answer_file = path.with_name(f"{split}_answer.json")
        answers = read_json(answer_file) if answer_file.is_file() else None
        if split != "test" and answers is None:
            raise UserError(f"{path}: CHID's {split} answers belong in {answer_file}, which "
                            "is missing")
        return read_chid(path, spec.labels, answers)
    return spec.reader(path, spec.labels)


# --------------------------------------------------------------------------- submissions


def submission_name(task: Task, examples: list[Example], split: str = "test") -> str:
    """The file name predictions for `split` are written under.

    Only the test split gets CLUE's submission name (`afqmc_predict.json`, ...); any other split
    gets ``<task>_<split>_predictions.json``, so scoring dev never replaces a test submission.
    The four tasks CLUE 1.1 gave new test sets (tnews, cluewsc2020, c3, chid) name the version:
    CLUE's rules ask for ``tnews11_predict.json`` for the 1.1 test set and
    ``tnews10_predict.json`` for 1.0. The version is that of the file the examples were read
    from: ``test1.0.json`` is 1.0; ``test1.1.json`` and a plain ``test.json`` (CLUE's current
    downloads ship the 1.1 set as test.json beside test1.0.json) are 1.1.
    """
    if split != "test":
        return f"{task.clue}_{split}_predictions.json"
    if task.clue in VERSIONED:
        sources = {re.split(r":\d+$|: record ", e.where)[0] for e in examples if e.where}
        if sources and all(Path(f).name == "test1.0.json" for f in sources):
            return f"{VERSIONED[task.clue]}10_predict.json"
    return CLUE[task.clue].submission


def write_submission(task: Task, examples: list[Example], predictions: list, out_dir: Path,
                     split: str = "test") -> Path:
    """Write `predictions` for `examples` in CLUE's submission format; returns the file.

    predictions: class indices (single/pair), choice indices (choice), [(start, end, type)]
    character spans with end exclusive (token), answer strings (span). The file is named by
    `submission_name` (CLUE's name for the test split only) and written atomically.
    """
    out = Path(out_dir) / submission_name(task, examples, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    if task.type == "span":  # CMRC2018: one JSON object {question id: answer}
        body = json.dumps({e.guid: p for e, p in zip(examples, predictions, strict=True)},
                          ensure_ascii=False, indent=0)
    elif task.clue == "chid":  # CHID: one JSON object {blank: candidate index}
        body = json.dumps({e.guid: int(p) for e, p in zip(examples, predictions, strict=True)},
                          ensure_ascii=False, indent=0)
    else:
        lines = [json.dumps({"id": _id(e.guid), "label": _label(task, e, p)}, ensure_ascii=False)
                 for e, p in zip(examples, predictions, strict=True)]
        body = "\n".join(lines)
    write_text_atomic(out, body + "\n")
    return out


def _id(guid: str) -> int | str:
    return int(guid) if guid.isdigit() else guid


def _label(task: Task, example: Example, prediction):
    if task.type == "token":
        found: dict[str, dict[str, list[list[int]]]] = {}
        for start, end, kind in prediction:
            found.setdefault(kind, {}).setdefault(example.text[start:end], []).append(
                [start, end - 1])
        return found
    if task.type == "choice":
        return int(prediction)
    return task.labels[int(prediction)]
