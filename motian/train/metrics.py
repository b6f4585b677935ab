"""What a run records: metrics as JSONL and TensorBoard, and the run's metadata.

`MetricsLogger` appends one JSON object per record to ``run_dir/metrics.jsonl`` (flushed each
time, so a killed run keeps everything it logged) and mirrors scalars to TensorBoard
(``run_dir/tensorboard``) when the `tensorboard` package is installed. `run_metadata` gathers
what is needed to reproduce or explain a run: the resolved recipe and run settings, library
versions, the git commit of the code, and the hardware.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from motian.io import write_text_atomic


class MetricsLogger:
    """JSONL (always) + TensorBoard (if installed). Only rank 0 should create one."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: JSONL is the record, TensorBoard a view of it
                pass
            else:
                self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Append {"kind", "step", "time", **values}; scalars go to TensorBoard as kind/name."""
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def drop_after(self, step: int) -> None:
        """Forget the records of steps after `step` (a run resumed from that step's checkpoint
        logs them again), rewriting the file atomically. TensorBoard keeps its copies."""
        self._file.close()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue  # a torn last line
        write_text_atomic(self.path, "".join(kept))
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path, kind: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl (of one kind if given); a torn last line is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a kill interrupted
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records


def git_sha() -> str | None:
    """The commit of the motian source tree (with "+dirty" for local changes), if it is a
    git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict[str, str]:
    import numpy

    import motian

    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "numpy": numpy.__version__, "motian": getattr(motian, "__version__", "?")}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or "?"
    return out


def hardware(world_size: int) -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "world_size": world_size}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run_metadata(recipe: dict, settings: dict, world_size: int, extra: dict) -> dict:
    """Everything saved as ``run_dir/run.json`` at the start of a run."""
    return {"recipe": recipe, "settings": settings, "versions": versions(), "git": git_sha(),
            "hardware": hardware(world_size), "command": sys.argv, "started": time.strftime(
                "%Y-%m-%dT%H:%M:%S%z"), **extra}
