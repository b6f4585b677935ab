"""Exact resume with real processes: `motian pretrain` is killed with SIGKILL after a checkpoint
appears, resumed with --resume, and must end with the parameters of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from motian.train.checkpoint import latest_checkpoint
from tests.pretrain_helpers import final_weights, max_difference, write_recipe


def pretrain_command(recipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "motian.cli", "pretrain", "--recipe", str(recipe), "--data",
            str(data), "--out", str(out), "--device", "cpu", "--threads", "1", "--no-progress",
            *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def test_sigkill_then_resume_equals_an_uninterrupted_run(pd98_encoded, tmp_path):
    # 60 steps in two stages, a checkpoint every 5: the kill lands mid-run (dropout is on, so
    # the RNG and the loader position must both continue exactly).
    recipe = write_recipe(tmp_path, steps=60, checkpoint_every=5, eval_every=20)
    subprocess.run(pretrain_command(recipe, pd98_encoded, tmp_path / "full"), env=env(),
                   check=True, capture_output=True, timeout=240)

    run = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_command(recipe, pd98_encoded, run), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while latest_checkpoint(run) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "final").exists()
    killed_at = latest_checkpoint(run)
    assert killed_at is not None

    resumed = subprocess.run(pretrain_command(recipe, pd98_encoded, run, "--resume"), env=env(),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed_at}" in resumed.stderr
    assert max_difference(final_weights(run), final_weights(tmp_path / "full")) <= 1e-6
