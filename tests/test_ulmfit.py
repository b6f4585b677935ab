"""ULMFiT's missing pieces: the slanted triangular learning rate (decay: stlr) at known points
and its validation, and `motian adapt`, the target-task LM stage: masked-LM training on the
task's own training texts that lowers the held-out loss on them, then fine-tuning from it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from motian.adaptation import adapt, task_texts
from motian.data.encode import encode
from motian.data.sources import iter_documents, iter_reviews
from motian.data.tokenizer import train_tokenizer
from motian.errors import UserError
from motian.finetuning import finetune
from motian.io import sha256_file
from motian.model.artifact import resolve_model_dir
from motian.pretraining import pretrain_recipe
from motian.task_training import TaskTraining
from motian.train import recipe as rc
from motian.train.fit import FitConfig, learning_rate
from motian.train.metrics import read_metrics
from motian.train.schedule import lr_multiplier, slanted_triangular
from motian.train.settings import OptimSettings, RunSettings, Stage


def test_stlr_at_known_steps():
    # Howard & Ruder 2018, eq. 3, with T = 1000 steps, cut_frac 0.1 (cut = 100), ratio 32
    T, cut, ratio = 1000, 100, 32

    def paper(t):
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / 0.1 - 1))
        return (1 + p * (ratio - 1)) / ratio

    for t in (0, 1, 50, 99, 100, 101, 550, 999, 1000):
        assert slanted_triangular(t / T, 0.1, 32) == pytest.approx(paper(t))
        assert lr_multiplier(t / T, 0.0, "stlr", 0.0, 0.1, 32) == pytest.approx(paper(t))
    assert slanted_triangular(0.0) == pytest.approx(1 / 32)  # both ends: lr / ratio
    assert slanted_triangular(1.0) == pytest.approx(1 / 32)
    assert slanted_triangular(0.1) == pytest.approx(1.0)  # the peak at the cut
    assert slanted_triangular(0.55) == pytest.approx(16.5 / 32)  # halfway down
    assert slanted_triangular(0.25, cut_frac=0.5, ratio=4) == pytest.approx(0.625)
    # the loop's learning rate follows it, fine-tuning and pretraining schedules alike
    optim = OptimSettings(lr=0.01, decay="stlr", cut_frac=0.2, ratio=10)
    for schedule in ("warmup-decay", "stages"):
        config = FitConfig(optim=optim, stages=(Stage(warmup=0.0),), schedule=schedule)
        assert learning_rate(config, 0.0, 0) == pytest.approx(0.001)
        assert learning_rate(config, 0.2, 0) == pytest.approx(0.01)
        assert learning_rate(config, 1.0, 0) == pytest.approx(0.001)


@pytest.mark.parametrize("fields, message", [
    ({"cut_frac": 0.0}, "cut_frac"), ({"cut_frac": 1.0}, "cut_frac"),
    ({"cut_frac": -0.1}, "cut_frac"), ({"cut_frac": "0.1"}, "cut_frac"),
    ({"ratio": 0.5}, "ratio"), ({"min_ratio": 0.1}, "min_ratio")])
def test_bad_stlr_settings_are_user_errors(fields, message):
    with pytest.raises(UserError, match=f"optim: .*{message}"):
        OptimSettings(decay="stlr", **fields)
    if message != "min_ratio":  # unused by other decays: accepted
        OptimSettings(decay="linear", **fields)


def test_stlr_in_recipes_and_fingerprints():
    demo = rc.load_recipe("demo")
    with pytest.raises(UserError, match="cut_frac"):
        rc.with_fields(demo, ["optim.decay=stlr", "optim.cut_frac=1.5"])
    stlr = rc.with_fields(demo, ["optim.decay=stlr"])
    # STLR rises by itself: a stage warm-up on top is refused when the run is set up
    with pytest.raises(UserError, match="warm-up to 0"):
        FitConfig(optim=stlr.optim, stages=stlr.stages)
    # cut_frac and ratio change the experiment only when the decay uses them
    assert rc.with_fields(demo, ["optim.cut_frac=0.3"]).fingerprint() == demo.fingerprint()
    assert rc.with_fields(stlr, ["optim.cut_frac=0.3"]).fingerprint() != stlr.fingerprint()


@pytest.fixture(scope="module")
def news_model(tmp_path_factory):
    """A tiny MLM trained a few steps on People's Daily only (news, no reviews), with a
    vocabulary that covers news and reviews."""
    root = tmp_path_factory.mktemp("news")
    news = root / "news.txt"
    news.write_text("\n".join(d.text.replace("\n", "") for d in itertools.islice(
        iter_documents(["pd98"]), 120)) + "\n", encoding="utf-8")
    reviews = root / "reviews.txt"
    reviews.write_text("\n".join(t for t, _, _ in itertools.islice(iter_reviews(), 3000))
                       + "\n", encoding="utf-8")
    train_tokenizer([str(news), str(reviews)], root / "tok", vocab_size=2000, progress=False)
    encode([str(news)], root / "enc", root / "tok", workers=1, progress=False)
    recipe = rc.Recipe(
        name="news", model=rc.ModelSpec(overrides={"hidden": 32, "layers": 2, "heads": 2,
                                                "ffn": 64, "max_positions": 128}),
        data=rc.DataSpec(masking="bert", pair_task="none"),
        objective=rc.ObjectiveSpec(weighting="fixed", weights={"mlm": 1.0}),
        stages=(Stage(seq_len=64, global_batch=8, warmup=0.0),), steps=5,
        eval=rc.EvalSpec(every=0, holdout_every=5, seq_len=64, batch=8, rows=32),
        checkpoint_every=0)
    pretrain_recipe(recipe, RunSettings(progress=False, threads=1), root / "enc",
                    root / "run")
    return root / "run"


def test_adapt_trains_on_the_task_text_then_finetune_starts_from_it(news_model, tmp_path,
                                                                  capsys):
    out = tmp_path / "adapt"
    adapt("reviews-sentiment", news_model, out, steps=30, max_train=800, seq_len=64,
          batch_size=8, optim=OptimSettings(lr=3e-3, decay="stlr"),
          run=RunSettings(progress=False, threads=1))
    # it read the training texts, labels dropped, and only those
    written = (out / "task-text.jsonl").read_text(encoding="utf-8")
    assert written.count("\n") == 800 and '"label"' not in written
    assert set(task_texts("reviews-sentiment", max_train=800)) == {
        json.loads(line)["text"] for line in written.splitlines()}
    # the held-out masked-token loss on the task's own text falls
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3, (evals[0], evals[-1])
    assert "held-out masked-token loss on the task's text" in capsys.readouterr().err
    # ... with ULMFiT's schedule (logged every 10 steps): falling after the cut (step 3) to
    # peak / 32 at the last step
    lrs = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl", "train")}
    assert lrs[10] == pytest.approx(3e-3 * slanted_triangular(10 / 30))
    assert lrs[30] == pytest.approx(3e-3 / 32)
    # fine-tuning from the adapted run starts from its weights
    adapted = resolve_model_dir(out)
    result = finetune("reviews-sentiment", tmp_path / "ft", model=out, seeds=[1],
                      max_train=64, max_eval=64, save_model=False,
                      training=TaskTraining(epochs=1, batch_size=16),
                      run=RunSettings(progress=False, threads=1))
    assert result["model"]["sha256"] == sha256_file(adapted / "model.safetensors")
    assert str(adapted) in result["model"]["source"]


def test_adapt_resume_on_a_new_stage_starts_from_the_model(news_model, tmp_path):
    # --resume with no checkpoint yet is a new stage: it must start from --model, as without
    # --resume (it once started from random weights), so both runs' step-0 losses are the same
    def first_loss(out: Path, resume: bool) -> float:
        adapt("reviews-sentiment", news_model, out, steps=1, max_train=200, seq_len=64,
              batch_size=8, resume=resume, run=RunSettings(progress=False, threads=1))
        return read_metrics(out / "metrics.jsonl", "eval")[0]["loss"]

    assert first_loss(tmp_path / "resumed", True) == pytest.approx(
        first_loss(tmp_path / "new", False), abs=1e-6)


def test_adapt_refuses_bad_input(news_model, tmp_path):
    with pytest.raises(UserError, match="--steps"):
        adapt("reviews-sentiment", news_model, tmp_path / "a", steps=0)
    with pytest.raises(UserError, match="unknown task"):
        adapt("no-such-task", news_model, tmp_path / "b", steps=5)
