"""The stage runner `clean` and `encode` share: the resume check, atomic commits, the bounded
ordered worker pool, progress by bytes; and the data layer importing no layer above it."""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import motian.data
from motian.data.stage import AtomicFile, ByteProgress, StageDir, ordered_pool
from motian.errors import UserError

OWNED = r"(part-\d+\.txt|manifest\.json)(\.tmp)?"


def _committed(out: Path, settings: dict) -> StageDir:
    stage = StageDir(out, "toy", {"format_version": 1, "settings": settings}, OWNED, True)
    with AtomicFile(out / "part-0.txt", "w", encoding="utf-8") as f:
        f.file.write("zero\n")
    stage.commit({"kind": "toy", "format_version": 1, "settings": settings,
                  "shards": ["part-0.txt"]}, [out / "part-0.txt"])
    return stage


def test_same_fingerprint_resumes_and_another_is_refused_naming_the_dir(tmp_path):
    _committed(tmp_path, {"a": 1, "b": [1, 2]})
    again = StageDir(tmp_path, "toy", {"format_version": 1, "settings": {"a": 1, "b": (1, 2)}},
                     OWNED, True)
    assert again.previous["shards"] == ["part-0.txt"]  # tuples compare as their JSON lists
    with pytest.raises(UserError) as err:
        StageDir(tmp_path, "toy", {"format_version": 1, "settings": {"a": 2, "b": [1, 2]}},
                 OWNED, True)
    message = str(err.value)
    assert str(tmp_path) in message and "settings.a" in message and "1 then, 2 now" in message
    assert "--no-resume" in message
    assert (tmp_path / "part-0.txt").is_file()  # a refusal touches nothing


def test_no_resume_deletes_only_the_stage_files_and_another_kind_is_refused(tmp_path):
    _committed(tmp_path, {"a": 1})
    (tmp_path / "part-1.txt.tmp").write_text("half", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="holds a 'toy' output, not 'other'"):
        StageDir(tmp_path, "other", {}, OWNED, resume=False)
    stage = StageDir(tmp_path, "toy", {"settings": {"a": 2}}, OWNED, resume=False)
    assert stage.previous is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_unreadable_manifest_is_a_user_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="unreadable.*--no-resume"):
        StageDir(tmp_path, "toy", {}, OWNED, True)
    assert StageDir(tmp_path, "toy", {}, OWNED, resume=False).previous is None


def test_a_writer_that_raises_leaves_no_partial_shard(tmp_path):
    stage = _committed(tmp_path, {"a": 1})
    before = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with AtomicFile(tmp_path / "part-1.txt", "w", encoding="utf-8") as f:
            f.file.write("half a shard")
            raise RuntimeError("disk on fire")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "part-0.txt"]
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert json.loads(before)["shards"] == ["part-0.txt"] and stage.previous is None


def _slow_square(i: int) -> int:
    time.sleep(0.05 if i % 3 == 0 else 0.0)  # early jobs finish last: order must not follow
    return i * i


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_pool_keeps_order_and_bounds_the_jobs_in_flight(workers):
    pulled: list[int] = []

    def jobs():
        for i in range(20):
            pulled.append(i)
            yield f"job-{i}", (i,)

    got = []
    for key, result in ordered_pool(_slow_square, jobs(), workers, max_in_flight=3):
        got.append((key, result))
        # jobs read but not yet handed back: at most max_in_flight (none with one process)
        assert len(pulled) - len(got) <= (3 if workers > 1 else 0)
    assert got == [(f"job-{i}", i * i) for i in range(20)]


def test_byte_progress_snaps_to_each_input():
    bar = ByteProgress("t", 100, enabled=True, starts={"a": 0, "b": 60})
    bar.advance(80, "a")  # an estimate above a's size stops at b's start
    assert bar.bar.n == 60
    bar.advance(10, "b")
    assert bar.bar.n == 70
    bar.close(finished=True)
    assert bar.bar.n == 100


# --------------------------------------------------------------------------- layers


def test_the_data_layer_imports_no_layer_above_it():
    modules = [m.name for m in pkgutil.walk_packages(motian.data.__path__, "motian.data.")]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('motian.') and m.split('.')[1] "
            "in ('tasks', 'train', 'finetuning', 'task_training', 'pipeline', 'pretraining')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    # lazy imports inside functions too: none in the source
    above = re.compile(r"^\s*(from|import) motian\.(tasks|train|finetuning|task_training|"
                       r"pipeline|pretraining)\b", re.MULTILINE)
    for path in Path(motian.data.__file__).parent.glob("*.py"):
        assert not above.search(path.read_text(encoding="utf-8")), path
