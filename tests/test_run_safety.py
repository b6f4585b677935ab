"""A run folder and its checkpoints under misuse, with real processes: one run per folder (a
lock naming its owner, a dead owner's lock taken over), a refused resume writes nothing, a
corrupt newest checkpoint falls back to the previous one and none readable is an error,
--steps replaces a recipe's time budget, --init-from that loads nothing is refused, a resumed
run logs every step once, Ctrl-C tells how to continue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from motian.errors import UserError
from motian.train.checkpoint import complete_checkpoints, latest_checkpoint
from motian.train.lock import LOCK
from tests.pretrain_helpers import write_recipe


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def pretrain(recipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "motian.cli", "pretrain", "--recipe", str(recipe), "--data",
            str(data), "--out", str(out), "--device", "cpu", "--threads", "1", "--no-progress",
            *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def wait_for(condition, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition(), "the run ended (or stalled) before the moment the test needs"


def test_one_run_per_folder_and_a_dead_owners_lock_is_taken_over(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=100000, checkpoint_every=5, eval_every=0)
    out = tmp_path / "run"
    first = subprocess.Popen(pretrain(recipe, pd98_encoded, out), env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: latest_checkpoint(out) is not None, first)
        second = run(pretrain(recipe, pd98_encoded, out, "--resume"))
        assert second.returncode == 1
        assert "in use by another motian run" in second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # The killed owner left its lock file behind; the next run takes it over and says so.
    assert str(first.pid) in (out / LOCK).read_text("utf-8")
    short = write_recipe(tmp_path, steps=100000, checkpoint_every=5, eval_every=0)
    third = subprocess.Popen(pretrain(short, pd98_encoded, out, "--resume"), env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: str(third.pid) in (out / LOCK).read_text("utf-8"), third)
    third.send_signal(signal.SIGKILL)
    _, err = third.communicate(timeout=30)
    assert "taking over the lock left by a run that is no longer running" in err
    assert f"pid {first.pid}" in err


def test_a_refused_resume_writes_nothing(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=8, checkpoint_every=4, eval_every=0)
    out = tmp_path / "run"
    assert run(pretrain(recipe, pd98_encoded, out)).returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "run.json", out / "tokenizer.json")}
    # another micro-batch changes the loader's rows per step: the position cannot continue
    refused = run(pretrain(recipe, pd98_encoded, out, "--resume", "--micro-batch", "2"))
    assert refused.returncode == 1 and "would not continue the same data" in refused.stderr
    assert {p.name: p.read_bytes() for p in (out / "run.json", out / "tokenizer.json")} \
        == before


def test_a_corrupt_newest_checkpoint_falls_back_and_none_readable_is_an_error(pd98_encoded,
                                                                                tmp_path):
    recipe = write_recipe(tmp_path, steps=12, checkpoint_every=4, eval_every=0)
    out = tmp_path / "run"
    assert run(pretrain(recipe, pd98_encoded, out)).returncode == 0
    step4, step8, step12 = complete_checkpoints(out)
    weights = step12 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    (step8 / "state.json").write_text("{not json", "utf-8")
    again = run(pretrain(recipe, pd98_encoded, out, "--resume"))
    assert again.returncode == 0, again.stderr
    assert f"skipping checkpoint {step12}" in again.stderr
    assert f"skipping checkpoint {step8}" in again.stderr
    assert f"resumed from {step4} (step 4)" in again.stderr
    # every checkpoint unreadable: an error that changes nothing, never a fresh start
    for step in complete_checkpoints(out):
        (step / "state.json").write_text("", "utf-8")
    listing = sorted(p.name for p in (out / "checkpoints").iterdir())
    broken = run(pretrain(recipe, pd98_encoded, out, "--resume"))
    assert broken.returncode == 1 and "no checkpoint could be read back" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == listing


def test_steps_replace_a_recipes_time_budget(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=100000, checkpoint_every=0, eval_every=0)
    recipe.write_text(recipe.read_text("utf-8").replace("steps: 100000",
                                                        "budget_minutes: 10"), "utf-8")
    done = run(pretrain(recipe, pd98_encoded, tmp_path / "run", "--steps", "3"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text("utf-8"))["steps"] == 3


def test_init_from_that_loads_nothing_is_refused(pd98_encoded, tmp_path):
    from motian.model import CausalLM, preset, save_pretrained
    from motian.pretraining import pretrain_recipe
    from motian.train.recipe import load_recipe
    from motian.train.settings import RunSettings

    # A decoder of another width: not one name and shape in common with the recipe's model.
    other = save_pretrained(CausalLM(preset("tiny", vocab_size=97, hidden=48, heads=2,
                                            ffn=96, causal=True)), tmp_path / "other")
    recipe = load_recipe(write_recipe(tmp_path, steps=2, checkpoint_every=0, eval_every=0))
    with pytest.raises(UserError, match="not one tensor of it fits"):
        pretrain_recipe(recipe, RunSettings(device="cpu", threads=1, progress=False),
                        pd98_encoded, tmp_path / "run", init_from=other)


def test_a_resumed_run_logs_every_step_once_and_ctrl_c_says_how_to_go_on(pd98_encoded,
                                                                          tmp_path):
    recipe = write_recipe(tmp_path, steps=400, checkpoint_every=20, eval_every=0)
    out = tmp_path / "run"
    proc = subprocess.Popen(pretrain(recipe, pd98_encoded, out), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"

    def logged_past_a_checkpoint() -> bool:
        cp = latest_checkpoint(out)
        return cp is not None and metrics.is_file() and any(
            json.loads(x)["step"] > int(cp.name[5:]) for x in
            metrics.read_text("utf-8").splitlines()[:-1])

    wait_for(logged_past_a_checkpoint, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command with --resume" in err
    again = run(pretrain(recipe, pd98_encoded, out, "--resume"))
    assert again.returncode == 0, again.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text("utf-8").splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(10, 401, 10))


def test_vocabularies_are_compared_by_content_not_size(pd98_encoded, tmp_path):
    from motian.data.shards import vocab_hash
    from motian.finetuning import finetune
    from motian.pretraining import pretrain_recipe
    from motian.train.recipe import load_recipe
    from motian.train.settings import RunSettings
    from tests.settings_helpers import typed

    cpu = RunSettings(device="cpu", threads=1, progress=False)
    recipe = load_recipe(write_recipe(tmp_path, steps=2, checkpoint_every=0, eval_every=0,
                                      pair_task="none"))
    pretrain_recipe(recipe, cpu, pd98_encoded, tmp_path / "a")
    final = tmp_path / "a" / "final"
    meta = json.loads((final / "config.json").read_text("utf-8"))
    assert meta["vocab_hash"] == vocab_hash(pd98_encoded / "vocab.txt")  # models record it

    # A model of the same size trained with another vocabulary (simulated: another hash).
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (other / name).write_bytes((final / name).read_bytes())
    (other / "config.json").write_text(json.dumps({**meta, "vocab_hash": "f" * 64}), "utf-8")
    with pytest.raises(UserError, match="another vocabulary than the shards"):
        pretrain_recipe(recipe, cpu, pd98_encoded, tmp_path / "b", init_from=other)
    pretrain_recipe(recipe, cpu, pd98_encoded, tmp_path / "c", init_from=other,
                    allow_vocab_mismatch=True)  # the user who means it

    # The same tokens in another order: same size, other meaning.
    tokens = (pd98_encoded / "vocab.txt").read_text("utf-8").splitlines()
    tokens[200], tokens[201] = tokens[201], tokens[200]
    permuted = tmp_path / "permuted.txt"
    permuted.write_text("\n".join(tokens) + "\n", "utf-8")
    settings = typed(epochs=1, batch_size=8)
    with pytest.raises(UserError, match="another vocabulary than .*permuted.txt"):
        finetune("reviews-sentiment", tmp_path / "ft", model=final, tokenizer=permuted,
                 seeds=[1], max_train=16, max_eval=8, max_length=32, **settings)
    result = finetune("reviews-sentiment", tmp_path / "ft", model=final, tokenizer=permuted,
                      seeds=[1], max_train=16, max_eval=8, max_length=32,
                      allow_vocab_mismatch=True, **settings)
    assert result["runs"][0]["steps"] == 2
    tuned = json.loads((tmp_path / "ft" / "seed-1" / "model" / "config.json").read_text())
    assert tuned["vocab_hash"] == vocab_hash(permuted)  # what its ids mean now


def _limited_file_size(limit: int):
    """A child whose files cannot grow past `limit` bytes: writes fail as on a full disk
    (EFBIG, the same path as ENOSPC), with SIGXFSZ ignored so the write returns the error."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_a_message_and_keeps_the_last_checkpoint(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=8, checkpoint_every=4, eval_every=0)
    out = tmp_path / "run"
    assert run(pretrain(recipe, pd98_encoded, out)).returncode == 0
    import shutil  # as if killed after the step-4 checkpoint

    shutil.rmtree(latest_checkpoint(out))
    (out / "checkpoints" / "latest").unlink()
    good = latest_checkpoint(out)
    assert good.name == "step-00000004"
    size = max(p.stat().st_size for p in good.iterdir())
    # Resume to step 8 with room for everything but the biggest checkpoint file.
    full = subprocess.run(pretrain(recipe, pd98_encoded, out, "--resume"), env=env(),
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited_file_size(size - 1))
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert "could not be written" in full.stderr and f"{good} is intact" in full.stderr
    assert latest_checkpoint(out) == good and not list((out / "checkpoints").glob(".tmp-*"))
    again = run(pretrain(recipe, pd98_encoded, out, "--resume"))  # room again: it continues
    assert again.returncode == 0 and f"resumed from {good}" in again.stderr


def test_a_full_disk_while_encoding_is_a_message(pd98_encoded, tmp_path):
    corpus = pd98_encoded.parent / "pd98.txt"  # the fixture's input: 300 articles
    cmd = [sys.executable, "-m", "motian.cli", "encode", "--inputs", str(corpus), "--out",
           str(tmp_path / "enc"), "--tokenizer", str(pd98_encoded.parent / "tok"),
           "--txt-mode", "blank", "--workers", "1", "--no-progress"]
    full = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited_file_size(20_000))
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert "Free disk space and run the same command again" in full.stderr


def test_sigterm_mid_run_checkpoints_that_step_and_resume_continues_from_it(pd98_encoded,
                                                                           tmp_path):
    """No scheduled checkpoint before the end (checkpoint_every 0): SIGTERM mid-run still leaves
    one, at the step the run had reached, says how to continue, and --resume continues from that
    step (not from 0), logging every step once."""
    recipe = write_recipe(tmp_path, steps=300, checkpoint_every=0, eval_every=0)
    out = tmp_path / "run"
    proc = subprocess.Popen(pretrain(recipe, pd98_encoded, out), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text("utf-8").splitlines()) >= 3,
             proc)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    saved = complete_checkpoints(out)
    assert len(saved) == 1 and not (out / "final").exists()
    step = int(saved[0].name[5:])
    assert 30 <= step < 300
    assert f"motian: stopped by SIGTERM at step {step}; checkpoint saved: {saved[0]}. To " \
           "continue from it, run the same command with --resume." in err
    assert f"step {step}: checkpoint {saved[0]}" in stdout  # --no-progress still says it

    again = run(pretrain(recipe, pd98_encoded, out, "--resume"))
    assert again.returncode == 0, again.stderr
    assert f"resumed from {saved[0]} (step {step})" in again.stderr
    assert json.loads((out / "summary.json").read_text("utf-8"))["steps"] == 300
    steps = [json.loads(x)["step"] for x in metrics.read_text("utf-8").splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(10, 301, 10))


def test_time_budget_runs_checkpoint_by_minutes_and_evaluate_by_share(pd98_encoded, tmp_path):
    """A run keyed to a 6-second budget with checkpoint_every "2s" and eval every "25%": a
    checkpoint every 2 s of training and an evaluation at 0, 25, 50, 75 and 100% of the budget,
    each printed as a line under --no-progress."""
    recipe = write_recipe(tmp_path, steps=100000, checkpoint_every="2s", eval_every="25%")
    text = recipe.read_text("utf-8").replace("steps: 100000", "budget_minutes: 0.1")
    recipe.write_text(text.replace("max_bad_steps: 3", "max_bad_steps: 3\nkeep_last: 0"),
                      "utf-8")
    out = tmp_path / "run"
    done = run(pretrain(recipe, pd98_encoded, out))
    assert done.returncode == 0, done.stderr
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text("utf-8").splitlines()
             if json.loads(x)["kind"] == "eval"]
    assert len(evals) == 5 and evals[0]["step"] == 0
    lines = done.stdout.splitlines()
    assert sum("; held-out loss" in line for line in lines) == 5
    assert any("(25% of the run" in line for line in lines)
    checkpoints = complete_checkpoints(out)
    assert 3 <= len(checkpoints) <= 5  # ~2, 4, 6 s; the last one at the end
    assert sum(": checkpoint " in line for line in lines) == len(checkpoints)
    elapsed = [json.loads((c / "state.json").read_text("utf-8"))["progress"]["elapsed"]
               for c in checkpoints[:-1]]
    assert all(abs(e - 2 * (i + 1)) < 1.0 for i, e in enumerate(elapsed)), elapsed
