"""Errors and skip accounting shared by every stage.

`UserError` is for problems the user can fix (a missing file, a vocabulary mismatch); the CLI
prints it without a traceback. `SkipLog` counts input that was skipped (bad lines), keeps a few
examples of each reason with file and line, and is merged across worker processes.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field


class UserError(Exception):
    """An error caused by the user's input or settings; the message says what to do."""


@dataclass
class SkipLog:
    """Counts of skipped input per reason, with up to `max_examples` (where, detail) each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5
    warn: bool = True  # print the first occurrence of each reason to stderr

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{where}: {detail}" if detail else where)
        if self.warn and self.counts[reason] == 1:
            print(f"motian: warning: {where}: {reason}{': ' + detail if detail else ''} "
                  "(skipped; further cases are counted in the report)", file=sys.stderr)

    def merge(self, other: SkipLog) -> None:
        self.counts.update(other.counts)
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: max(0, self.max_examples - len(mine))])

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> SkipLog:
        log = cls(warn=False)
        log.counts.update(d.get("counts", {}))
        log.examples = {k: list(v) for k, v in d.get("examples", {}).items()}
        return log

    @property
    def total(self) -> int:
        return sum(self.counts.values())
