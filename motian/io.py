"""File helpers every layer shares: content hashes and atomic writes.

An atomic write goes to a temporary name beside the target (`name.tmp`), is fsynced, renamed
over the target (a rename is atomic on POSIX filesystems) and the directory is fsynced, so a
reader sees the old file or the new one, never half of one, and a kill at any moment leaves
at most a `.tmp` file behind. This module imports nothing from motian: everything may use it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import IO


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes as hex, read in 1 MiB blocks (checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class AtomicFile:
    """A file written under ``name.tmp`` and renamed into place whole by `commit` (`abort`
    deletes it). As a context manager it commits on success and aborts on an exception, so a
    writer that raises leaves neither a partial file nor a temporary one. With `durable` the
    commit also fsyncs the file and its directory (a stage that commits many files at once
    fsyncs them itself: `motian.data.stage.StageDir.commit`). The one temp-and-rename of the
    package: text, JSON, arrays, shards and predictions all go through it."""

    def __init__(self, path: str | Path, mode: str = "wb", encoding: str | None = None,
                 durable: bool = False):
        self.path, self.durable = Path(path), durable
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file: IO = open(self.tmp, mode, encoding=encoding)

    def commit(self) -> Path:
        if self.durable:
            self.file.flush()
            os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        if self.durable:
            fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically and durably."""
    with AtomicFile(path, "w", encoding="utf-8", durable=True) as f:
        f.file.write(text)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """`data` as indented UTF-8 JSON (Chinese kept readable), written atomically."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2))


def fsync_dir(path: str | Path) -> None:
    """Make a rename or new entry in `path` durable (POSIX; Windows cannot open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OUT_OF_SPACE_TEXT = ("no space left", "file too large", "disk quota", "os error 28",
                      "os error 27", "os error 122", "file write failed")


def is_out_of_space(error: BaseException) -> bool:
    """A write that failed for lack of room: disk full, quota, file-size limit. Libraries that
    write through their own code report it in their own way (safetensors' SafetensorError
    "I/O error: ... (os error 28)", torch.save's RuntimeError "file write failed")."""
    if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
        return True
    text = str(error).lower()
    return not isinstance(error, OSError) and any(t in text for t in _OUT_OF_SPACE_TEXT)
