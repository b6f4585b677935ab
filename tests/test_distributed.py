"""Many processes with real torchrun (gloo on CPU): 2 processes give the parameters of 1 process
with the same global batch; a rank killed mid-run ends the job with a clear error, not a hang;
a world size that cannot split the batch is refused before training."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from motian.errors import UserError
from motian.train.distributed import DistInfo, check_world
from tests.pretrain_helpers import final_weights, max_difference, write_recipe

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def args(recipe: Path, data: Path, out: Path) -> list[str]:
    return ["-m", "motian.cli", "pretrain", "--recipe", str(recipe), "--data", str(data),
            "--out", str(out), "--device", "cpu", "--threads", "1", "--no-progress",
            "--micro-batch", "2", "--dist-timeout", "60"]


def torchrun(n: int, log_dir: Path) -> list[str]:
    # --standalone: a local rendezvous on a free port (tests may run next to other jobs).
    return [TORCHRUN, "--standalone", "--nproc_per_node", str(n), "--log-dir", str(log_dir)]


def test_two_processes_equal_one_with_the_same_global_batch(pd98_encoded, tmp_path):
    # Global batch 8 then 4, micro-batch 2: 1 process accumulates 4 then 2 micro-batches,
    # 2 processes 2 then 1 each. Dropout is on: its masks follow the global row, not the rank.
    recipe = write_recipe(tmp_path, steps=16, checkpoint_every=0, eval_every=8)
    one = subprocess.run([sys.executable, *args(recipe, pd98_encoded, tmp_path / "one")],
                         env=env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*torchrun(2, tmp_path / "logs"),
                          *args(recipe, pd98_encoded, tmp_path / "two")],
                         env=env(), capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr + two.stdout
    assert max_difference(final_weights(tmp_path / "one"),
                          final_weights(tmp_path / "two")) < 1e-5


def test_a_killed_rank_ends_the_job_with_a_clear_error(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=100000, checkpoint_every=0, eval_every=0)
    out = tmp_path / "run"
    proc = subprocess.Popen([*torchrun(2, tmp_path / "logs"), *args(recipe, pd98_encoded, out)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or (out / "metrics.jsonl").stat().st_size < 400:
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    started = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after a rank was killed")
    assert proc.returncode != 0
    assert time.monotonic() - started < 90
    assert "SIGKILL" in output or "Another rank most likely died" in output, output[-2000:]


def test_a_world_size_that_cannot_split_the_batch_is_refused():
    with pytest.raises(UserError, match="not divisible by 3 processes"):
        check_world([8, 4], 0, DistInfo(rank=0, world_size=3))
    check_world([8, 4], 2, DistInfo(rank=0, world_size=2))


def test_a_two_process_resume_keeps_every_ranks_random_state(pd98_encoded, tmp_path):
    # Each rank's RNG state is gathered into the checkpoint, so resuming under torchrun has
    # a state for every rank (it used to warn that rank 1's random numbers would differ).
    recipe = write_recipe(tmp_path, steps=4, checkpoint_every=2, eval_every=0)
    out = tmp_path / "run"
    first = subprocess.run([*torchrun(2, tmp_path / "logs1"), *args(recipe, pd98_encoded, out)],
                           env=env(), capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr + first.stdout
    import torch

    rng = torch.load(out / "checkpoints" / "step-00000004" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2
    again = subprocess.run([*torchrun(2, tmp_path / "logs2"), *args(recipe, pd98_encoded, out),
                            "--resume"], env=env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr + again.stdout
    assert "will differ" not in again.stderr + again.stdout
    assert "resumed from" in again.stderr + again.stdout
