"""Checkpoints: exact round trip (weights, optimizer, scaler, RNG), keep_last, leftovers of
killed saves, and real processes killed with SIGKILL in the middle of a loop of saves."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from motian.errors import UserError
from motian.model import MaskedLM, from_pretrained, preset
from motian.train.checkpoint import (
    capture_rng_state,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from motian.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0, vocab_size: int = 120) -> MaskedLM:
    torch.manual_seed(seed)
    return MaskedLM(preset("tiny", vocab_size=vocab_size, dropout=0.1))


def train_steps(model, optimizer, n: int) -> list[float]:
    """n steps on batches drawn from the global RNGs (torch for data and dropout, numpy and
    python for a per-step scale), so any RNG not restored changes the result."""
    losses = []
    for _ in range(n):
        ids = torch.randint(5, 120, (4, 16))
        labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
        scale = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        optimizer.zero_grad()
        loss = model(ids.masked_fill(labels >= 0, 4), labels=labels).loss * scale
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_resume_continues_exactly(tmp_path, name):
    model = tiny_model()
    opt = build_optimizer(model, name, lr=1e-2)
    train_steps(model, opt, 2)
    path = save_checkpoint(tmp_path, 2, model, opt, {"loader": {"rows_consumed": 8}})
    assert path == tmp_path / "checkpoints" / "step-00000002"
    expected = train_steps(model, opt, 3)

    resumed = tiny_model(seed=1)  # different initial weights: all must come from the file
    resumed_opt = build_optimizer(resumed, name, lr=1e-2)
    # The weights directory is a plain motian model directory too (--init-from, export).
    # (Built before load_checkpoint: building a model draws from the RNG being restored.)
    plain = from_pretrained(path).state_dict()
    state = load_checkpoint(path, resumed, resumed_opt)
    assert state == {"loader": {"rows_consumed": 8}, "step": 2}
    assert all(torch.equal(plain[k], v) for k, v in resumed.state_dict().items())
    assert train_steps(resumed, resumed_opt, 3) == expected
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_rng_states_restored(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, "lamb", lr=1e-3)
    random.gauss(0, 1)  # leave a cached gaussian in python's state
    np.random.normal()
    save_checkpoint(tmp_path, 1, model, opt, {})
    draws = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
             np.random.normal(), torch.rand(3).tolist())
    for _ in range(5):  # move every generator on
        random.random(), np.random.rand(), torch.rand(1)
    load_checkpoint(tmp_path, model, opt)
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
             np.random.normal(), torch.rand(3).tolist())
    assert again == draws
    load_checkpoint(tmp_path, model, opt, restore_rng=False)
    assert torch.rand(3).tolist() != draws[-1]


def test_rng_state_of_this_rank_is_restored(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, "lamb", lr=1e-3)
    torch.manual_seed(11)
    rank0 = capture_rng_state()
    torch.manual_seed(22)
    rank1 = capture_rng_state()
    save_checkpoint(tmp_path, 1, model, opt, {}, rng_states=[rank0, rank1])
    load_checkpoint(tmp_path, model, opt)  # no process group: this process is rank 0
    torch.manual_seed(11)
    expected = torch.rand(2)
    load_checkpoint(tmp_path, model, opt)
    assert torch.equal(torch.rand(2), expected)


def test_scaler_state_round_trip(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, "adamw", lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(new_scale=128.0)
    save_checkpoint(tmp_path, 3, model, opt, {}, scaler=scaler)
    other = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path, model, opt, scaler=other)
    assert other.get_scale() == 128.0 and other.get_growth_interval() == 7


def test_keep_last_and_latest(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, "lamb", lr=1e-3)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, model, opt, {"n": step}, keep_last=2)
    names = [p.name for p in complete_checkpoints(tmp_path)]
    assert names == ["step-00000040", "step-00000050"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000050"
    assert latest_checkpoint(tmp_path).name == "step-00000050"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", *names]
    # Re-saving an existing step replaces it; keep_last < 1 keeps everything.
    save_checkpoint(tmp_path, 50, model, opt, {"n": "again"}, keep_last=0)
    save_checkpoint(tmp_path, 60, model, opt, {}, keep_last=0)
    assert len(complete_checkpoints(tmp_path)) == 3
    assert json.loads((tmp_path / "checkpoints/step-00000050/state.json").read_text())["n"] \
        == "again"


def test_leftovers_of_a_killed_save_are_ignored_then_removed(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, "lamb", lr=1e-3)
    save_checkpoint(tmp_path, 5, model, opt, {})
    directory = tmp_path / "checkpoints"
    partial = directory / ".tmp-step-00000006-999"  # killed while writing step 6
    partial.mkdir()
    (partial / "config.json").write_text("{")
    (directory / ".trash-step-00000001-999").mkdir()  # killed while deleting
    broken = directory / "step-00000007"  # never made by save_checkpoint, but copied by hand
    broken.mkdir()
    (broken / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    with pytest.raises(UserError, match="incomplete checkpoint"):
        load_checkpoint(broken, model)
    # `latest` naming a missing directory (killed between retiring and renaming a re-save):
    (directory / "latest").write_text("step-00000009\n")
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    save_checkpoint(tmp_path, 8, model, opt, {})
    assert not partial.exists() and not (directory / ".trash-step-00000001-999").exists()
    assert latest_checkpoint(tmp_path).name == "step-00000008"


def test_bad_state_and_bad_checkpoints_are_clear_errors(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, "lamb", lr=1e-3)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model, opt, {"loss": torch.tensor(1.0)})
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_checkpoint(tmp_path, model)
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    with pytest.raises(UserError, match="strict load"):
        load_checkpoint(path, MaskedLM(preset("tiny", vocab_size=130)))
    with pytest.raises(UserError, match="does not fit this optimizer"):
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    (path / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="optimizer.pt: cannot be read"):
        load_checkpoint(path, model, opt)


CHILD = """
import sys
from pathlib import Path
import torch
from motian.model import MaskedLM, preset
from motian.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from motian.train.optim import build_optimizer

run = Path(sys.argv[1])
model = MaskedLM(preset("tiny", vocab_size=20000))
opt = build_optimizer(model, "lamb", lr=1e-3)
for p in model.parameters():
    p.grad = torch.ones_like(p)
opt.step()
step = 0
if latest_checkpoint(run) is not None:
    step = load_checkpoint(run, model, opt)["step"]
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    for s in opt.state.values():
        s["exp_avg"].fill_(step)
    save_checkpoint(run, step, model, opt, {"marker": step}, keep_last=2)
"""


def latest_step(run: Path) -> int:
    path = latest_checkpoint(run)
    return int(path.name.split("-")[1]) if path else 0


def run_and_kill(script: Path, run: Path, when: str, min_step: int) -> None:
    """Start (or resume) the saving loop and SIGKILL it once checkpoint `min_step` exists and
    then either a temporary directory is seen (`when="mid-write"`) or after a random delay."""
    proc = subprocess.Popen([sys.executable, str(script), str(run)], cwd=REPO,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    directory = run / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while latest_step(run) < min_step:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if when == "mid-write":
            while not any(p.startswith(".tmp-") for p in os.listdir(directory)):
                assert proc.poll() is None, proc.stderr.read().decode()
        else:
            time.sleep(random.uniform(0.0, 0.3))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def check_latest(run: Path) -> int:
    """The latest checkpoint loads, and every part of it is from the same step."""
    path = latest_checkpoint(run)
    model = MaskedLM(preset("tiny", vocab_size=20000))
    opt = build_optimizer(model, "lamb", lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = load_checkpoint(path, model, opt, restore_rng=False)
    step = state["step"]
    assert path.name == f"step-{step:08d}" and state["marker"] == step
    assert all(torch.all(p == step) for p in model.parameters())
    assert all(torch.all(s["exp_avg"] == step) for s in opt.state.values())
    return step


def test_sigkill_during_saves_leaves_a_loadable_latest(tmp_path):
    script = tmp_path / "save_loop.py"
    script.write_text(CHILD)
    run = tmp_path / "run"
    # Kill in the middle of writing a checkpoint; retry in the rare case the write finished
    # between seeing the temporary directory and the signal.
    for _ in range(3):
        run_and_kill(script, run, "mid-write", min_step=latest_step(run) + 2)
        if any(p.startswith(".tmp-") for p in os.listdir(run / "checkpoints")):
            break
    else:
        pytest.fail("never killed a save mid-write")
    step = check_latest(run)
    # The killed run resumes from there, and a kill at a random moment is survived as well.
    run_and_kill(script, run, "random", min_step=step + 2)
    assert check_latest(run) > step
    assert 1 <= len(complete_checkpoints(run)) <= 3  # keep_last=2 (+1 if killed mid-prune)
