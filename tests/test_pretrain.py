"""The fit loop in-process on encoded People's Daily: two stages, records, evaluation, NaN guard,
--init-from (motian and Hugging Face BERT), bf16 autocast on CPU, refusals, time budget."""

from __future__ import annotations

import json

import pytest
import torch

from motian.errors import UserError
from motian.model import MaskedLM, from_pretrained, preset, save_pretrained
from motian.pretraining import pretrain_recipe
from motian.train.fit import optimizer_step
from motian.train.metrics import read_metrics
from motian.train.objectives import Pretrainer, TaskWeighting
from motian.train.recipe import ObjectiveSpec, RunSettings, load_recipe, with_overrides
from tests.pretrain_helpers import write_recipe

CPU = RunSettings(device="cpu", threads=1, progress=False)


def test_two_stage_run_writes_metrics_eval_checkpoints_and_metadata(pd98_encoded, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    summary = pretrain_recipe(recipe, CPU, pd98_encoded, tmp_path / "run")
    run = tmp_path / "run"
    train = read_metrics(run / "metrics.jsonl", "train")
    assert [r["seq_len"] for r in train] == [32, 64]  # logged at step 10 (stage 1), 16 (stage 2)
    assert all(k in train[0] for k in ("loss_mlm", "acc_mlm", "loss_pair", "lr", "grad_norm",
                                       "weight_mlm", "weight_pair", "tokens_per_s"))
    evals = read_metrics(run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 8, 16]
    assert all(e["tokens"] > 50 and 0 <= e["accuracy"] <= 1 for e in evals)
    keys = ("loss", "accuracy", "tokens", "pair_loss", "pair_accuracy", "pair_majority",
            "pair_rows")
    assert summary["steps"] == 16 and summary["eval"] == {k: evals[-1][k] for k in keys}
    # The sentence-order task is evaluated on the held-out documents' pairs too.
    assert all(e["pair_rows"] > 0 and 0 <= e["pair_accuracy"] <= 1 for e in evals)
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    assert names == ["step-00000008", "step-00000012", "step-00000016"]  # keep_last 3
    meta = json.loads((run / "run.json").read_text())
    assert meta["versions"]["torch"] == torch.__version__ and "cpu_count" in meta["hardware"]
    assert meta["recipe"]["stages"][1]["seq_len"] == 64 and "git" in meta
    assert list((run / "tensorboard").iterdir())
    model = from_pretrained(run / "final")
    assert type(model).__name__ == "PreTrainingModel"


def test_training_lowers_the_held_out_loss(pd98_encoded, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, steps=40, eval_every=40, pair_task="none",
                                      optim="adamw"))
    pretrain_recipe(recipe, CPU, pd98_encoded, tmp_path / "run")
    evals = read_metrics(tmp_path / "run" / "metrics.jsonl", "eval")
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5


def test_a_non_finite_gradient_skips_the_step_and_leaves_weights_alone():
    torch.manual_seed(0)
    model = MaskedLM(preset("tiny", vocab_size=50, hidden=32, heads=2, ffn=64))
    pre = Pretrainer(model, TaskWeighting(["mlm"], ObjectiveSpec()))
    opt = torch.optim.AdamW(pre.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in pre.state_dict().items()}
    for p in pre.parameters():
        p.grad = torch.ones_like(p)
    next(pre.parameters()).grad[0, 0] = float("nan")
    norm, skipped = optimizer_step(pre, opt, clip_norm=1.0)
    assert skipped and norm != norm
    assert all(torch.equal(before[k], v) for k, v in pre.state_dict().items())
    assert not opt.state and all(p.grad is None for p in pre.parameters())


def test_nan_weights_stop_the_run_with_a_clear_message(pd98_encoded, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, pair_task="none", eval_every=0))
    torch.manual_seed(0)
    bad = MaskedLM(preset("tiny", vocab_size=3090, hidden=32, heads=2, ffn=64, max_positions=64))
    with torch.no_grad():
        bad.backbone.blocks[0].ffn.up.weight[0, 0] = float("nan")
    save_pretrained(bad, tmp_path / "bad")
    with pytest.raises(UserError, match="not finite .* for 3 steps in a row"):
        pretrain_recipe(recipe, CPU, pd98_encoded, tmp_path / "run", init_from=tmp_path / "bad")


def test_init_from_a_motian_model_reports_loaded_and_new_keys(pd98_encoded, tmp_path, capsys):
    recipe = load_recipe(write_recipe(tmp_path, steps=2, eval_every=0, checkpoint_every=0))
    pretrain_recipe(with_overrides(recipe), CPU, pd98_encoded, tmp_path / "a")
    source = tmp_path / "a" / "final"
    masked = MaskedLM(from_pretrained(source).config)  # the same backbone, no pair head
    masked.load_state_dict(from_pretrained(source).state_dict(), strict=False)
    save_pretrained(masked, tmp_path / "mlm")
    capsys.readouterr()
    pretrain_recipe(recipe, CPU, pd98_encoded, tmp_path / "b", init_from=tmp_path / "mlm")
    err = capsys.readouterr().err
    assert "loaded" in err and "newly initialised (not in the source)" in err
    assert "pair.classifier.weight" in err and "backbone.embeddings" not in err.split(
        "newly initialised")[1]


def test_init_from_a_hugging_face_bert_directory(pd98_encoded, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=3090, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    torch.manual_seed(1)
    transformers.BertForPreTraining(cfg).save_pretrained(tmp_path / "hf")
    recipe = load_recipe(write_recipe(tmp_path, steps=1, eval_every=0, checkpoint_every=0,
                                      pair_task="none"))
    capsys.readouterr()
    pretrain_recipe(recipe, CPU, pd98_encoded, tmp_path / "run", init_from=tmp_path / "hf")
    err = capsys.readouterr().err
    assert "--init-from" in err and "loaded" in err
    assert "seq_relationship" in err  # BERT's NSP head has no place in MaskedLM: reported


def test_bf16_autocast_on_cpu_trains_and_evaluates(pd98_encoded, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, steps=2, eval_every=2, pair_task="none"))
    s32 = pretrain_recipe(recipe, CPU, pd98_encoded, tmp_path / "fp32")
    s16 = pretrain_recipe(recipe, RunSettings(device="cpu", threads=1, precision="bf16", progress=False), pd98_encoded,
              tmp_path / "bf16")
    assert s16["eval"]["loss"] == pytest.approx(s32["eval"]["loss"], rel=0.02)
    with pytest.raises(UserError, match="fp16 .* needs CUDA"):
        pretrain_recipe(recipe, RunSettings(device="cpu", precision="fp16", progress=False), pd98_encoded,
            tmp_path / "fp16")


def test_existing_run_needs_resume_and_the_same_recipe(pd98_encoded, tmp_path):
    path = write_recipe(tmp_path, steps=4, eval_every=0, checkpoint_every=2)
    pretrain_recipe(load_recipe(path), CPU, pd98_encoded, tmp_path / "run")
    with pytest.raises(UserError, match="already holds checkpoints"):
        pretrain_recipe(load_recipe(path), CPU, pd98_encoded, tmp_path / "run")
    other = path.read_text().replace("lr: 0.01", "lr: 0.02")
    path.write_text(other)
    with pytest.raises(UserError, match="another recipe"):
        pretrain_recipe(load_recipe(path), CPU, pd98_encoded, tmp_path / "run", resume=True)


def test_a_time_budget_ends_the_run_and_drives_the_schedule(pd98_encoded, tmp_path):
    recipe = with_overrides(load_recipe(write_recipe(tmp_path, eval_every=0,
                                                     checkpoint_every=0)), budget_minutes=0.02)
    summary = pretrain_recipe(recipe, CPU, pd98_encoded, tmp_path / "run")
    assert summary["seconds"] >= 1.2 and summary["steps"] > 2
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert train[-1]["seq_len"] == 64  # the last quarter of the time ran stage 2
