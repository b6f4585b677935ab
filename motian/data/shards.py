"""The encoded-shard format: what `motian encode` writes and the loader reads.

An encoded dataset is a directory::

    manifest.json                  kind "encoded", format_version, vocabulary hash, settings,
                                   counts and the list of finished shards
    synonyms.npz                   the synonym table (see `SynonymTable`)
    shard-00000.tokens.npy         token ids of all documents of the shard, concatenated, no
                                   [CLS]/[SEP] (uint16 when the vocabulary fits, else uint32)
    shard-00000.flags.npy          uint8 per token: bit 0 word start (jieba word, aligned to
                                   tokens), bit 1 sentence start, bit 2 paragraph start;
                                   with `encode --entities`, bit 3 entity start and bit 4
                                   inside an entity (manifest settings.entities says so)
    shard-00000.synonyms.npy       int32 per token: at a word start, the row of `SynonymTable`
                                   holding that word's same-length synonyms; -1 elsewhere
    shard-00000.docs.npy           int64 offsets, n_docs + 1: document d is tokens[o[d]:o[d+1]]

Shards do not depend on sequence length: packing to 128 or 512 happens when reading. Arrays are
plain ``.npy`` files, opened with ``np.load(mmap_mode="r")`` so reading never loads a shard into
memory. Each shard is written to temporary names and renamed into place, then recorded in the
manifest (also written atomically), so an interrupted `encode` resumes at the first shard the
manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from motian.errors import UserError
from motian.io import (
    AtomicFile,
    write_json_atomic,  # noqa: F401  (moved; old imports work)
)

FORMAT_VERSION = 1
WORD_START, SENTENCE_START, PARAGRAPH_START = 1, 2, 4
# Named entities (encode --entities, motian.data.entities): first token, every token.
ENTITY_START, IN_ENTITY = 8, 16
ARRAYS = ("tokens", "flags", "synonyms", "docs")


def vocab_hash(vocab_file: str | Path) -> str:
    """SHA-256 of a vocab.txt's tokens in order (what ids mean), insensitive to line endings."""
    tokens = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    with AtomicFile(path) as f:  # made durable by the stage's commit
        np.save(f.file, array)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass
class Shard:
    """One shard opened as memory maps."""

    tokens: np.ndarray
    flags: np.ndarray
    synonyms: np.ndarray
    docs: np.ndarray

    @property
    def n_docs(self) -> int:
        return len(self.docs) - 1


def write_shard(directory: Path, index: int, tokens: np.ndarray, flags: np.ndarray,
                synonyms: np.ndarray, docs: np.ndarray) -> dict:
    """Write the arrays of one shard atomically; return its manifest entry."""
    n = len(tokens)
    if not (len(flags) == len(synonyms) == n and docs[0] == 0 and docs[-1] == n):
        raise ValueError("shard arrays disagree in length")
    name = shard_name(index)
    arrays = {"tokens": tokens, "flags": flags.astype(np.uint8),
              "synonyms": synonyms.astype(np.int32), "docs": docs.astype(np.int64)}
    for key, arr in arrays.items():
        save_array_atomic(directory / f"{name}.{key}.npy", arr)
    return {"name": name, "n_docs": int(len(docs) - 1), "n_tokens": int(n)}


@dataclass
class SynonymTable:
    """Same-length synonyms as token-id rows, for vectorised replacement.

    Row r holds `count[r]` candidate words, each `length[r]` tokens long, stored back to back in
    `tokens[start[r] : start[r] + count[r] * length[r]]`. Candidate j of row r is
    ``tokens[start[r] + j * length[r] : start[r] + (j + 1) * length[r]]``. `words[r]` is the
    word the row belongs to (for inspection and tests).

    What a weighted draw needs (`MaskingConfig.synonym_weighting`), one entry per candidate in
    the same order (candidate j of row r is entry ``offsets()[r] + j``): `freq`, the count of
    the candidate word in jieba's dictionary (0 when absent), and `groups`, how many Cilin
    ``=`` groups the word and the candidate share (>= 1). Both are None in a table written
    before they existed; such a table draws uniformly.
    """

    start: np.ndarray  # int64 (R,)
    count: np.ndarray  # int32 (R,)
    length: np.ndarray  # int32 (R,)
    tokens: np.ndarray  # int32 (total,)
    words: list[str]
    freq: np.ndarray | None = None  # int64 (count.sum(),)
    groups: np.ndarray | None = None  # int32 (count.sum(),)

    @property
    def weighted(self) -> bool:
        """True when the table holds what a weighted draw needs (`freq` and `groups`)."""
        return self.freq is not None and self.groups is not None

    def offsets(self) -> np.ndarray:
        """int64 (R,): where each row's candidates begin in `freq` and `groups`."""
        return np.cumsum(self.count, dtype=np.int64) - self.count

    def candidates(self, row: int) -> list[list[int]]:
        s, c, n = int(self.start[row]), int(self.count[row]), int(self.length[row])
        return [self.tokens[s + j * n: s + (j + 1) * n].tolist() for j in range(c)]

    def save(self, path: Path) -> None:
        """Write the table as plain numeric arrays (no pickles: loading a file can never run
        code): the words are one UTF-8 byte array `word_bytes` cut at int64 `word_offsets`."""
        encoded = [w.encode("utf-8") for w in self.words]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        tmp = path.with_name(path.name + ".tmp.npz")
        weights = ({"candidate_freq": np.asarray(self.freq, np.int64),
                    "candidate_groups": np.asarray(self.groups, np.int32)}
                   if self.weighted else {})
        np.savez(tmp, start=self.start, count=self.count, length=self.length,
                 tokens=self.tokens, word_bytes=np.frombuffer(b"".join(encoded), np.uint8),
                 word_offsets=offsets, **weights)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SynonymTable:
        """Read a table written by `save`, never unpickling anything (a data folder from
        elsewhere must not be able to run code). A file from an older motian, whose words were
        a pickled object array, is refused with a `UserError`."""
        path = Path(path)
        redo = "; run `motian encode` again to rewrite the dataset"
        try:
            with np.load(path, allow_pickle=False) as z:
                if "words" in z.files and "word_bytes" not in z.files:
                    raise UserError(f"{path}: synonym table in the old format (its words are "
                                    "pickled Python objects, which motian no longer loads: "
                                    f"unpickling a file can run code){redo}")
                start, count, length, tokens = (z[k] for k in ("start", "count", "length",
                                                               "tokens"))
                data, offsets = z["word_bytes"].tobytes(), z["word_offsets"]
                words = [data[offsets[i]:offsets[i + 1]].decode("utf-8")
                         for i in range(len(offsets) - 1)]
                # A table from before weighted draws has neither array: it loads, unweighted.
                freq = z["candidate_freq"] if "candidate_freq" in z.files else None
                groups = z["candidate_groups"] if "candidate_groups" in z.files else None
        except UserError:
            raise
        except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError,
                zipfile.BadZipFile) as err:
            raise UserError(f"{path}: not a readable synonym table ({err}){redo}") from None
        if not len(start) == len(count) == len(length) == len(words):
            raise UserError(f"{path}: synonym table arrays disagree in length{redo}")
        n_candidates = int(count.sum())
        if (freq is None) != (groups is None) or (
                freq is not None and not len(freq) == len(groups) == n_candidates):
            raise UserError(f"{path}: the synonym weights (candidate_freq, candidate_groups) "
                            f"do not match the table's {n_candidates} candidates{redo}")
        if freq is not None and (freq.min(initial=0) < 0 or groups.min(initial=1) < 1):
            raise UserError(f"{path}: synonym weights must have counts >= 0 and shared groups "
                            f">= 1{redo}")
        return cls(start, count, length, tokens, words, freq, groups)

    @classmethod
    def empty(cls) -> SynonymTable:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
                   np.zeros(0, np.int32), [])


class EncodedDataset:
    """Read side of an encoded directory: the manifest, its shards as memory maps, synonyms."""

    def __init__(self, directory: str | Path, vocab_file: str | Path | None = None):
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"{self.directory}: no manifest.json; this is not an encoded "
                            "dataset (make one with `motian encode`)")
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if self.manifest.get("kind") != "encoded":
            raise UserError(f"{manifest_path}: kind is {self.manifest.get('kind')!r}, "
                            "expected 'encoded'")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{manifest_path}: format version "
                            f"{self.manifest.get('format_version')} but this motian reads "
                            f"{FORMAT_VERSION}; encode the data again with this version")
        if self.manifest.get("complete") is False:
            raise UserError(f"{manifest_path}: `motian encode` has not finished writing this "
                            "dataset; run the same encode command again to complete it (finished "
                            "shards are kept)")
        if vocab_file is not None:
            check_vocab(self.manifest, vocab_file, manifest_path)
        self.shard_entries: list[dict] = self.manifest["shards"]
        self._cache: dict[int, Shard] = {}

    def __len__(self) -> int:
        return len(self.shard_entries)

    def shard(self, i: int) -> Shard:
        if i not in self._cache:
            name = self.shard_entries[i]["name"]
            self._cache[i] = Shard(*(np.load(self.directory / f"{name}.{k}.npy", mmap_mode="r")
                                     for k in ARRAYS))
        return self._cache[i]

    def synonyms(self) -> SynonymTable:
        path = self.directory / "synonyms.npz"
        return SynonymTable.load(path) if path.is_file() else SynonymTable.empty()

    @property
    def n_tokens(self) -> int:
        return sum(e["n_tokens"] for e in self.shard_entries)

    @property
    def n_docs(self) -> int:
        return sum(e["n_docs"] for e in self.shard_entries)


def check_vocab(manifest: dict, vocab_file: str | Path, where: Path | str) -> None:
    """Refuse to read shards with a vocabulary other than the one they were encoded with."""
    expected, actual = manifest.get("vocab_hash"), vocab_hash(vocab_file)
    if expected != actual:
        raise UserError(
            f"{where}: these shards were encoded with vocabulary {expected[:12] if expected else '?'}"
            f"… ({manifest.get('vocab_file', 'unknown file')}) but {vocab_file} is {actual[:12]}…; "
            "token ids would mean different words. Use the vocabulary they were made with, or "
            "run `motian encode` again with this one.")
