"""One run per folder: a lock file that names its owner.

`hold_run_dir(directory)` takes ``directory/.motian.lock`` for the life of a run: an exclusive
`flock` on the file (released by the kernel when the process dies, however it dies), and the
owner's pid, host and command written inside so that a second run can say who holds it. A
lock file left by a dead process is taken over with a message; a live owner is an error. Under
torchrun only rank 0 takes it (the other ranks belong to the same run).

`flock` is advisory and local: two hosts writing into one network folder are not kept apart by
it, which is why the host is recorded and a lock held elsewhere is reported by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from motian.errors import UserError

LOCK = ".motian.lock"


@contextlib.contextmanager
def hold_run_dir(directory: Path, enabled: bool = True) -> Iterator[None]:
    """Own `directory` for the duration (nothing when `enabled` is false: other ranks)."""
    if not enabled:
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{directory} is in use by another motian run ({_owner(path)}); "
                            "wait for it to finish, stop it, or choose another --out") from None
        previous = _owner(path)
        if previous != "unknown":
            print(f"motian: {path}: taking over the lock left by a run that is no longer "
                  f"running ({previous})", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no owner behind
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _owner(path: Path) -> str:
    try:
        owner = json.loads(path.read_text("utf-8") or "null")
    except (OSError, ValueError):
        return "unknown"
    if not isinstance(owner, dict):
        return "unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}: {owner.get('command', '')}".strip()
