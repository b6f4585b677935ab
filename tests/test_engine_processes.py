"""The one loop's promises for fine-tuning and corpus distillation, with real processes: killed
with SIGKILL after a checkpoint appears and run again with the same command, a job ends with
the parameters of an uninterrupted run; under real torchrun, 2 processes give the parameters of
1 process with the same global batch (dropout on: its masks follow the global row)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from motian.train.checkpoint import latest_checkpoint
from tests.pretrain_helpers import max_difference

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
RUN = ["--device", "cpu", "--threads", "1", "--no-progress", "--dist-timeout", "60"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


@pytest.fixture
def review_task(tmp_path):
    """The user's own text-classification files: 240 real reviews, a character vocabulary."""
    from motian.finetuning import subset
    from motian.tasks.builtin import reviews_sentiment
    from tests.test_tasks import char_tokenizer

    train = subset(reviews_sentiment().splits["train"], 240)  # both labels, stable sample
    d = tmp_path / "task"
    d.mkdir()
    for split, rows in (("train", train), ("dev", train[:40])):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(
            {"text": e.text[:30], "label": "好评" if e.label else "差评"}, ensure_ascii=False)
            + "\n" for e in rows), "utf-8")
    char_tokenizer(tmp_path, [e.text[:30] for e in train])
    return d, tmp_path / "vocab.txt"


def finetune_args(task: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    data, vocab = task
    # 240 examples, batch 8, 3 epochs: 90 steps, a checkpoint every 3; dropout on.
    return ["-m", "motian.cli", "finetune", "--task", "text-classification", "--data",
            str(data), "--tokenizer", str(vocab), "--out", str(out), "--seeds", "1",
            "--epochs", "3", "--batch-size", "8", "--lr", "1e-3", "--max-length", "32",
            "--dropout", "0.1", "--checkpoint-every", "3", *RUN, *extra]


@pytest.fixture
def corpus_teacher(tmp_path, pd98_encoded):
    from motian.data.tokenizer import load_tokenizer
    from motian.model import MaskedLM, preset, save_pretrained

    vocab = load_tokenizer(pd98_encoded).get_vocab_size()
    config = preset("tiny", vocab_size=vocab, layers=2, hidden=32, heads=2, ffn=64,
                    dropout=0.1)
    return save_pretrained(MaskedLM(config), tmp_path / "teacher")


def corpus_args(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "motian.cli", "distill-corpus", "--teacher-model", str(teacher), "--data",
            str(data), "--out", str(out), "--student-layers", "1", "--student-hidden", "16",
            "--steps", "60", "--batch-size", "8", "--seq-len", "32", "--checkpoint-every", "3",
            *RUN, *extra]


def weights(path: Path):
    return load_file(str(path / "model.safetensors"))


def kill_after_first_checkpoint(cmd: list[str], run_dir: Path) -> Path:
    proc = subprocess.Popen([sys.executable, *cmd], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while latest_checkpoint(run_dir) is None and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = latest_checkpoint(run_dir)
    assert killed_at is not None
    return killed_at


def test_finetune_killed_then_rerun_equals_an_uninterrupted_run(review_task, tmp_path):
    full = subprocess.run([sys.executable, *finetune_args(review_task, tmp_path / "full")],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(finetune_args(review_task, out), out / "seed-1")
    assert not (out / "seed-1" / "result.json").exists()
    again = subprocess.run([sys.executable, *finetune_args(review_task, out)], env=env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {killed_at}" in again.stderr
    assert max_difference(weights(out / "seed-1" / "model"),
                          weights(tmp_path / "full" / "seed-1" / "model")) <= 1e-6
    # the per-step log continues: every step exactly once (steps logged after the checkpoint
    # and before the kill are dropped on resume, then logged again)
    steps = [json.loads(x)["step"] for x in
             (out / "seed-1" / "metrics.jsonl").read_text("utf-8").splitlines()]
    assert steps == list(range(1, 91))


def test_finetune_two_processes_equal_one(review_task, tmp_path):
    one = subprocess.run([sys.executable, *finetune_args(review_task, tmp_path / "one",
                                                         "--micro-batch", "2")],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "--log-dir",
                          str(tmp_path / "logs"),
                          *finetune_args(review_task, tmp_path / "two", "--micro-batch", "2")],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr + two.stdout
    assert max_difference(weights(tmp_path / "one" / "seed-1" / "model"),
                          weights(tmp_path / "two" / "seed-1" / "model")) < 1e-5
    a = json.loads((tmp_path / "one" / "results.json").read_text("utf-8"))["runs"][0]
    b = json.loads((tmp_path / "two" / "results.json").read_text("utf-8"))["runs"][0]
    assert a["steps"] == b["steps"] == 90 and a["dev"] == pytest.approx(b["dev"])


def test_distill_corpus_killed_then_rerun_equals_an_uninterrupted_run(corpus_teacher,
                                                                       pd98_encoded, tmp_path):
    full = subprocess.run([sys.executable, *corpus_args(corpus_teacher, pd98_encoded,
                                                        tmp_path / "full")],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(corpus_args(corpus_teacher, pd98_encoded, out), out)
    assert not (out / "model").exists()
    again = subprocess.run([sys.executable, *corpus_args(corpus_teacher, pd98_encoded, out)],
                           env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {killed_at}" in again.stderr
    assert max_difference(weights(out / "model"), weights(tmp_path / "full" / "model")) <= 1e-6


def test_distill_corpus_two_processes_equal_one(corpus_teacher, pd98_encoded, tmp_path):
    one = subprocess.run([sys.executable, *corpus_args(corpus_teacher, pd98_encoded,
                                                       tmp_path / "one", "--micro-batch", "2")],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "--log-dir",
                          str(tmp_path / "logs"),
                          *corpus_args(corpus_teacher, pd98_encoded, tmp_path / "two",
                                       "--micro-batch", "2")],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr + two.stdout
    assert max_difference(weights(tmp_path / "one" / "model"),
                          weights(tmp_path / "two" / "model")) < 1e-5
