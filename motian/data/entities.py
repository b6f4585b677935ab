"""Named entities as masking units (ERNIE 1.0's entity-level masking): where they come from and
how `motian encode` marks them in the shards.

Sources (`encode --entities`):

* ``tags``: the POS tags of tagged input. People's Daily 1998 (``pd98``) is tagged; user files
  are read as tagger output, one document per line of ``word/TAG`` tokens separated by spaces
  (the People's Daily format; bracketed compounds ``[中央/n 人民/n 广播/vn 电台/n]nt`` are one
  word of the compound's tag). A word tagged ``nr`` (person), ``ns`` (place) or ``nt``
  (organisation) is an entity (`entity_tags` changes the set); adjacent ``nr`` words are one
  person, since the corpus tags a Chinese name as surname + given name (江/nr 泽民/nr).
* a file: an entity list, one entity per line (optionally followed by a tab and a type, which
  is ignored); every occurrence in the text is an entity, found leftmost-longest (at each
  position the longest listed entity that starts there wins, and matching goes on after it).

In the shards an entity is a run of tokens: the flags byte gets `ENTITY_START` on its first
token and `IN_ENTITY` on all of them, and its first token and the token after it start words
(so an entity is always made of whole words, even where jieba joined it to a neighbour). The
manifest's ``settings.entities`` says how they were found; shards without it (encoded without
--entities, or by a motian from before entities) are refused by entity masking.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from motian.errors import UserError

if TYPE_CHECKING:
    import numpy as np

DEFAULT_TAGS = ("nr", "ns", "nt")
PERSON = "nr"  # adjacent words with this tag are one entity (surname + given name)

Span = tuple[int, int]  # [start, end) character offsets in a document


def tagged_spans(words: Iterable[tuple[str, str]], tags: dict[str, str] | Iterable[str]
                 ) -> tuple[str, list[tuple[int, int, str]]]:
    """Text and (start, end, type) entities of tagged words: a word whose tag is in `tags` is
    an entity of type ``tags[tag]`` (of type tag itself when `tags` is not a mapping), and
    adjacent person (``nr``) words merge into one."""
    types = tags if isinstance(tags, dict) else {t: t for t in tags}
    text, spans, offset = [], [], 0
    for word, pos in words:
        kind = types.get(pos)
        if kind and pos == PERSON and spans and spans[-1][2] == kind and spans[-1][1] == offset:
            spans[-1] = (spans[-1][0], offset + len(word), kind)
        elif kind:
            spans.append((offset, offset + len(word), kind))
        text.append(word)
        offset += len(word)
    return "".join(text), spans


def parse_tagged_line(line: str, where: str) -> list[tuple[str, str]]:
    """The (word, tag) pairs of one line of tagger output; a bracketed compound
    ``[w1/t1 w2/t2]T`` becomes one word ``w1w2`` tagged T. UserError naming `where` (file:line)
    for a token that is not word/TAG or an unbalanced bracket."""
    pairs: list[tuple[str, str]] = []
    compound: list[str] | None = None
    for token in line.split():
        opens = token.startswith("[") and len(token) > 1
        if opens:
            if compound is not None:
                raise UserError(f"{where}: '[' inside a bracketed compound at {token!r}; "
                                "compounds do not nest (write [w1/t1 w2/t2]TAG)")
            compound, token = [], token[1:]
        closing = compound is not None and "]" in token.rpartition("/")[2]
        word, slash, tag = token.rpartition("/")
        outer = ""
        if closing:
            tag, _, outer = tag.partition("]")
        if not slash or not word or not tag or (closing and not outer):
            raise UserError(f"{where}: {token!r} is not a word/TAG token (tagger output is "
                            "word/TAG tokens separated by spaces, e.g. 江/nr 泽民/nr 访问/v "
                            "[中央/n 电视台/n]nt); fix or remove the line")
        if compound is not None:
            compound.append(word)
            if closing:
                pairs.append(("".join(compound), outer))
                compound = None
        else:
            pairs.append((word, tag))
    if compound is not None:
        raise UserError(f"{where}: a bracketed compound is not closed (expected ]TAG after "
                        "its last word)")
    return pairs


@dataclass(frozen=True)
class EntityList:
    """A user's entity list, matched leftmost-longest (see the module docstring)."""

    entities: frozenset[str]
    lengths: tuple[int, ...]  # the entity lengths present, longest first
    source: str

    @classmethod
    def load(cls, path: str | Path) -> EntityList:
        """Read one entity per line (``entity`` or ``entity<TAB>type``); blank lines and lines
        starting with ``#`` are skipped. UserError naming the file and line for anything else
        (invalid UTF-8, more than one tab, an empty entity, an entity with a space at its
        edge)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such entity list (one entity per line)")
        entities = set()
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8").rstrip("\r\n").lstrip("\ufeff")
                except UnicodeDecodeError as err:
                    raise UserError(f"{where}: not UTF-8 (byte {err.start}); convert the entity "
                                    "list to UTF-8") from None
                if not line.strip() or line.startswith("#"):
                    continue
                fields = line.split("\t")
                entity = fields[0]
                if len(fields) > 2 or not entity or entity != entity.strip():
                    raise UserError(f"{where}: {line!r} is not an entity line; write one entity "
                                    "per line, optionally followed by a tab and its type "
                                    "(北京\\tLOC), with no space around the entity")
                entities.add(entity)
        if not entities:
            raise UserError(f"{path}: the entity list holds no entity")
        lengths = tuple(sorted({len(e) for e in entities}, reverse=True))
        return cls(frozenset(entities), lengths, str(path))

    def find(self, text: str) -> list[Span]:
        """[start, end) of every entity in `text`, leftmost-longest, not overlapping. A scan
        over positions trying the list's lengths (longest first): O(len(text) x lengths)
        set look-ups."""
        spans, i, n = [], 0, len(text)
        while i < n:
            for k in self.lengths:
                if i + k <= n and text[i:i + k] in self.entities:
                    spans.append((i, i + k))
                    i += k
                    break
            else:
                i += 1
        return spans


def tagged_documents(lines: Iterator[tuple[int, str]], source: str, tags: Iterable[str]
                     ) -> Iterator[tuple[str, int, list[Span]]]:
    """(text, line, entity spans) per non-empty line of tagger output read from `source`."""
    tags = tuple(tags)
    for lineno, line in lines:
        if not line.strip():
            continue
        text, spans = tagged_spans(parse_tagged_line(line, f"{source}:{lineno}"), tags)
        yield text, lineno, [(s, e) for s, e, _ in spans]


def mark_entities(flags: np.ndarray, span: np.ndarray, n_tok: np.ndarray,
                  entities: list[list[Span]], doc_chars: list[int]) -> np.ndarray:
    """`flags` (T,) with the entities of each document marked (see the module docstring).

    `span` (T, 2) are the tokens' character offsets within their document, `n_tok` (D,) the
    tokens per document, `entities` per document sorted, non-overlapping [start, end) spans,
    `doc_chars` (D,) the documents' lengths. A token belongs to the entity holding its first
    character."""
    import numpy as np  # here, so reading tagged text (motian.data.sources) stays light

    from motian.data.shards import ENTITY_START, IN_ENTITY, WORD_START

    flags = flags.copy()
    base = np.zeros(len(doc_chars) + 1, np.int64)  # document d starts at chunk char base[d]
    np.cumsum(doc_chars, out=base[1:])
    starts = np.array([base[d] + s for d, spans in enumerate(entities) for s, _ in spans],
                      np.int64)
    ends = np.array([base[d] + e for d, spans in enumerate(entities) for _, e in spans],
                    np.int64)
    if not len(starts) or not len(flags):
        return flags
    char = span[:, 0] + np.repeat(base[:-1], n_tok)  # (T,) chunk-wide first character
    which = np.searchsorted(starts, char, side="right") - 1  # (T,) last entity starting before
    inside = (which >= 0) & (char < ends[np.maximum(which, 0)])
    which = np.where(inside, which, -1)
    first = inside.copy()
    first[1:] &= which[1:] != which[:-1]
    after = np.zeros_like(inside)  # the token after an entity starts a word of its own
    after[1:] = (which[1:] != which[:-1]) & inside[:-1]
    flags |= np.where(inside, IN_ENTITY, 0).astype(np.uint8)
    flags |= np.where(first, ENTITY_START | WORD_START, 0).astype(np.uint8)
    flags |= np.where(after, WORD_START, 0).astype(np.uint8)
    return flags
