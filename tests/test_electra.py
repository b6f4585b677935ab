"""ELECTRA and MC-BERT (motian.train.replaced, motian.model.electra) on real encoded People's
Daily: the corruption, the shared embeddings, MC-BERT's candidate sets, refused settings, and
whole runs through the API and the CLI (exact resume, a fine-tunable final/)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import motian
from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import MaskingConfig
from motian.errors import UserError
from motian.model import from_pretrained, preset
from motian.model.artifact import load_backbone_state
from motian.model.electra import corrupt, sample_candidates, sample_replacements
from motian.model.heads import ReplacedTokenDetection
from motian.train.checkpoint import EXTRA, latest_checkpoint
from motian.train.metrics import read_metrics
from motian.train.objectives import build_model
from motian.train.recipe import ObjectiveSpec, RunSettings, load_recipe, with_fields
from motian.train.replaced import ReplacedTokens
from tests.pretrain_helpers import final_weights, max_difference, write_recipe
from tests.test_pretrain_resume import env, pretrain_command

CPU = RunSettings(device="cpu", threads=1, progress=False)
ALL_MASK = "{masking: bert, masking_overrides: {mask_prob: 1.0, random_prob: 0.0, " \
           "keep_prob: 0.0}, pair_task: none}"


def _batch(data, seq_len=48, batch_size=4, seed=3):
    masking = MaskingConfig.preset("bert", mask_prob=1.0, random_prob=0.0, keep_prob=0.0)
    config = LoaderConfig(seq_len=seq_len, batch_size=batch_size, seed=seed, masking=masking)
    return next(iter(PackedLoader(data, config=config)))


def _objective(kind="electra", vocab_size=3100, **spec):
    torch.manual_seed(0)
    spec = ObjectiveSpec(kind=kind, **spec)
    config = preset("tiny", vocab_size=vocab_size, hidden=32, heads=2, ffn=64, dropout=0.0,
                    attention_dropout=0.0)
    return ReplacedTokens(build_model(config, spec, "none"), spec)


def test_corruption_replaces_masked_positions_only_and_labels_real_replacements(pd98_encoded):
    batch = _batch(pd98_encoded)
    objective = _objective(vocab_size=3100)
    positions, original = batch["mlm_positions"], batch["mlm_labels"]
    logits = objective.generator(batch["input_ids"], batch["attention_mask"],
                                 mlm_positions=positions).logits
    sampled = sample_replacements(logits)
    sampled[0] = original[0]  # a sample equal to the original must count as original
    corrupted, replaced = corrupt(batch["input_ids"], positions, original, sampled)
    flat_in, flat_out, flat_rep = (t.reshape(-1) for t in (batch["input_ids"], corrupted,
                                                            replaced))
    masked = torch.zeros_like(flat_rep)
    masked[positions] = True
    assert torch.equal(flat_out[~masked], flat_in[~masked])  # unmasked tokens untouched
    assert not flat_rep[~masked].any()
    assert torch.equal(flat_out[positions], sampled)
    assert torch.equal(flat_rep[positions], sampled != original)
    assert not flat_rep[positions[0]] and flat_rep.sum() > 0
    # the generator's input had [MASK] at every masked position; the discriminator's has none
    assert (flat_in[positions] == 4).all() and not (flat_out[positions[1:]] == 4).all()
    # the objective trains on exactly this: its RTD statistics count the replaced tokens
    torch.manual_seed(7)
    _, stats = objective(batch, float(len(positions)), 1)
    torch.manual_seed(7)
    again = corrupt(batch["input_ids"], positions, original, sample_replacements(
        objective.generator(batch["input_ids"], batch["attention_mask"],
                            mlm_positions=positions).logits))[1]
    assert float(stats["rtd_replaced"]) == float(again.sum())
    assert float(stats["rtd_tokens"]) == float(batch["attention_mask"].sum())


def test_the_generator_shares_the_embedding_tensor_and_is_a_quarter_wide(pd98_encoded):
    objective = _objective(generator_width=0.5)
    disc, gen = objective.model, objective.generator
    assert gen.word_embeddings.weight is disc.backbone.embeddings.word.weight
    assert (gen.config.hidden, gen.config.heads, gen.config.ffn) == (16, 1, 32)
    assert gen.config.layers == disc.config.layers
    # the shared table is the model's (saved in final/), not the objective's extra state;
    # every other generator tensor is in the extra state (checkpoints, exact resume)
    extra = objective.extra_state()
    assert not any("word" in name and "project" not in name for name in extra)
    assert len(extra) == len([p for n, p in gen.named_parameters() if "shared" not in n])
    # gradients of the generator's MLM loss and of the discriminator both reach the table
    batch = _batch(pd98_encoded)
    loss, stats = objective(batch, float(batch["mlm_labels"].numel()), 1)
    loss.backward()
    table = disc.backbone.embeddings.word.weight
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert all(float(stats[k]) >= 0 for k in stats) and torch.isfinite(loss)
    # the generator alone moves the table too (its MLM over the whole vocabulary)
    table.grad = None
    out = gen(batch["input_ids"], batch["attention_mask"],
              mlm_positions=batch["mlm_positions"], mlm_labels=batch["mlm_labels"])
    out.loss.backward()
    assert table.grad.abs().sum() > 0


def test_mc_candidates_hold_the_original_once_and_are_distinct(pd98_encoded):
    objective = _objective("mc-bert", candidates=10)
    batch = _batch(pd98_encoded)
    original = batch["mlm_labels"]
    logits = objective.generator(batch["input_ids"], batch["attention_mask"],
                                 mlm_positions=batch["mlm_positions"]).logits
    candidates = sample_candidates(logits, original, 10)
    assert candidates.shape == (original.numel(), 10)
    assert torch.equal(candidates[:, 0], original)
    assert ((candidates == original[:, None]).sum(1) == 1).all()  # exactly once
    assert all(len(set(row.tolist())) == 10 for row in candidates)  # distinct
    # the others follow the generator: a token it is sure of is always among them
    peaked = torch.zeros(3, 50)
    peaked[:, 7] = 30.0
    row_original = torch.tensor([1, 2, 7])
    drawn = sample_candidates(peaked, row_original, 4)
    assert (drawn[:2] == 7).any(1).all() and ((drawn[2] == 7).sum() == 1)
    # scores: the MLM head's logits of the candidates, the same in any column order
    h = torch.randn(original.numel(), 32)
    scores = objective.model.choice_logits(h, candidates)
    shuffled = objective.model.choice_logits(h, candidates.flip(1))
    torch.testing.assert_close(scores.flip(1), shuffled)
    full = objective.model.mlm(h, objective.model.backbone.embeddings.word.weight)
    torch.testing.assert_close(scores, full.gather(1, candidates))
    with pytest.raises(ValueError, match="k must be"):
        sample_candidates(peaked, row_original, 51)


def test_bad_settings_are_refused_naming_the_field(tmp_path, pd98_encoded):
    for objective, field in (("{kind: electra, generator_width: 1.5}", "generator_width"),
                             ("{kind: electra, generator_depth: 0}", "generator_depth"),
                             ("{kind: mc-bert, candidates: 1}", "candidates"),
                             ("{kind: mc-bert, candidates: 2.5}", "candidates"),
                             ("{kind: electra, rtd_weight: -1}", "rtd_weight")):
        path = write_recipe(tmp_path, data=ALL_MASK, objective=objective)
        with pytest.raises(UserError, match=rf"tiny.yaml: objective: objective\.{field} must"):
            load_recipe(path)
    recipe = load_recipe(write_recipe(tmp_path, data=ALL_MASK, objective="{kind: electra}"))
    with pytest.raises(UserError, match=r"objective\.generator_width must be a number in "
                                        r"\(0, 1\].*got 'half'"):
        with_fields(recipe, ["objective.generator_width=half"])
    with pytest.raises(UserError, match="set data.pair_task: none"):
        build_model(preset("tiny"), ObjectiveSpec(kind="electra"), "sop")
    with pytest.raises(UserError, match=r"objective.candidates \(60\) exceeds the vocabulary"):
        _objective("mc-bert", vocab_size=50, candidates=60)
    # a pair task in an electra recipe fails before any training
    sop = write_recipe(tmp_path, pair_task="sop", objective="{kind: electra}")
    with pytest.raises(UserError, match="data.pair_task: none"):
        motian.pretrain(recipe=str(sop), data=pd98_encoded, out=tmp_path / "sop", run=CPU)
    assert not (tmp_path / "sop" / "checkpoints").exists()


def test_electra_run_resumes_exactly_and_its_final_model_fine_tunes(pd98_encoded, tmp_path):
    """Through the API: 16 steps over both stages; then the same run cut back to its step-8
    checkpoint (as if killed there) and resumed must end with the same discriminator and
    generator. final/ is a plain ReplacedTokenDetection that `motian finetune` starts from."""
    recipe = write_recipe(tmp_path, steps=16, checkpoint_every=4, eval_every=8, data=ALL_MASK,
                          optim="adamw",
                          objective="{kind: electra}")
    full = tmp_path / "full"
    summary = motian.pretrain(recipe=str(recipe), data=pd98_encoded, out=full, run=CPU,
                              override=["objective.generator_width=0.5"])
    assert summary["steps"] == 16
    train = read_metrics(full / "metrics.jsonl", "train")
    assert all(k in train[-1] for k in ("loss", "loss_mlm", "acc_mlm", "loss_rtd", "acc_rtd",
                                        "replaced"))
    evals = read_metrics(full / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 8, 16]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3  # the generator learns
    assert evals[-1]["rtd_accuracy"] > 0.8 and 0.0 <= evals[-1]["rtd_auc"] <= 1.0
    assert 0.0 < evals[-1]["rtd_replaced"] < 0.2 and evals[-1]["rtd_tokens"] > 1000
    last = latest_checkpoint(full)
    assert last.name == "step-00000016" and (last / EXTRA).is_file()
    generator = load_file(str(last / EXTRA))
    assert any(k.startswith("generator.") for k in generator)

    run = tmp_path / "cut"
    shutil.copytree(full, run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    for step in (12, 16):
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    (run / "checkpoints" / "latest").write_text("step-00000008\n")
    motian.pretrain(recipe=str(recipe), data=pd98_encoded, out=run, run=CPU, resume=True,
                    override=["objective.generator_width=0.5"])
    assert max_difference(final_weights(run), final_weights(full)) == 0.0
    assert max_difference(load_file(str(latest_checkpoint(run) / EXTRA)), generator) == 0.0

    model = from_pretrained(full / "final")
    assert isinstance(model, ReplacedTokenDetection) and model.mlm is None
    state, config, _, _ = load_backbone_state(full / "final")
    assert config.hidden == 32 and any(k.startswith("backbone.") for k in state)
    from motian.cli import main

    out = tmp_path / "ft"
    assert main(["finetune", "--task", "reviews-sentiment", "--model", str(full / "final"),
                 "--out", str(out), "--seeds", "1", "--epochs", "1", "--batch-size", "8",
                 "--max-train", "16", "--max-eval", "8", "--max-length", "32",
                 "--no-save-model", "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text("utf-8"))
    assert result["model"]["source"] == f"motian checkpoint {full / 'final'}"
    assert result["runs"][0]["steps"] == 2 and result["runs"][0]["skipped_steps"] == 0


def test_mc_bert_from_the_cli(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=6, checkpoint_every=0, eval_every=0, data=ALL_MASK,
                          objective="{kind: mc-bert}")
    out = tmp_path / "run"
    done = subprocess.run(pretrain_command(recipe, pd98_encoded, out, "--override",
                                           "objective.candidates=4"),
                          env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "multi-choice accuracy" in done.stdout and "chance 25%" in done.stdout
    train = read_metrics(out / "metrics.jsonl", "train")
    assert 0.0 <= train[-1]["acc_mc"] <= 1.0 and train[-1]["loss_mc"] > 0
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert evals[-1]["mc_chance"] == 0.25 and 0.0 <= evals[-1]["mc_accuracy"] <= 1.0
    model = from_pretrained(out / "final")
    assert isinstance(model, ReplacedTokenDetection) and model.mlm is not None
    assert load_recipe(out / "recipe.yaml").objective.candidates == 4
