"""MASS (objective.kind mass): the fragment masking of encoder and decoder inputs on a
hand-checked row, the decoder's causality, cached encoder-decoder decoding against full
recomputation, a `motian pretrain` run with the shipped recipe, its final/ as a backbone and
for `motian generate`, exact resume, and the errors a user can hit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import motian
from motian.data.seq2seq_rows import mass_rows
from motian.errors import UserError
from motian.model import HEADS, Seq2SeqLM, SequenceClassification, load_weights, preset
from motian.model.artifact import load_backbone_state
from motian.serving.generate import Decoding, generate_ids
from motian.train.recipe import load_recipe, with_fields
from motian.train.settings import RunSettings
from tests.decoding_helpers import assert_cache_equals_recomputation
from tests.pretrain_helpers import final_weights, max_difference, write_recipe

PROMPTS = [[2, 7, 8, 9, 10, 11], [2, 12], [2, 13, 14, 15]]
MASK = 4
RUN = RunSettings(device="cpu", threads=1, progress=False)
SMALL_EVAL = ["eval.rows=16", "eval.batch=8", "eval.every=0"]


def test_the_fragment_is_masked_in_the_encoder_and_fed_shifted_to_the_decoder():
    tokens = np.array([[2, 10, 11, 12, 13, 14, 15, 16, 17, 0, 0]])  # [CLS] + 8 tokens + pad
    mask = (tokens != 0).astype(np.int64)
    out = mass_rows(tokens, mask, 0.5, MASK, np.random.default_rng(3))
    enc, dec, labels = out["mass_input_ids"][0], out["decoder_input_ids"][0], \
        out["decoder_labels"][0]
    span = np.flatnonzero(labels != -100)
    assert len(span) == 4 and (np.diff(span) == 1).all() and span[0] >= 1 and span[-1] <= 8
    u = span[0]
    assert (enc[span] == MASK).all() and (np.delete(enc, span) == np.delete(tokens[0], span)).all()
    assert (labels[span] == tokens[0, span]).all()
    # decoder: [MASK] at the fragment's start, then the fragment shifted right; [MASK] elsewhere
    assert dec[u] == MASK and (dec[u + 1:u + 4] == tokens[0, u:u + 3]).all()
    assert (np.delete(dec, span[1:]) == MASK).all()
    # over many rows: the fragment is round(50%) of the text, starting anywhere it fits
    many = np.tile(tokens, (4000, 1))
    out = mass_rows(many, np.tile(mask, (4000, 1)), 0.5, MASK, np.random.default_rng(0))
    starts = (out["decoder_labels"] != -100).argmax(1)
    assert set(starts.tolist()) == {1, 2, 3, 4, 5}
    assert ((out["decoder_labels"] != -100).sum(1) == 4).all()


def tiny_mass(position: str = "alibi", seed: int = 0, **overrides) -> Seq2SeqLM:
    torch.manual_seed(seed)
    return Seq2SeqLM(preset("tiny", vocab_size=40, hidden=32, heads=4, ffn=64, norm="pre",
                            position=position, dropout=0.0, attention_dropout=0.0,
                            initializer_range=0.3, **overrides)).eval()


@pytest.mark.parametrize("position", ["alibi", "absolute", "rope"])
def test_the_decoder_at_step_t_reads_no_later_decoder_input(position):
    model = tiny_mass(position)
    src = torch.tensor([[2, 7, 8, MASK, MASK, MASK, 9]])
    dec = torch.tensor([[MASK, MASK, MASK, MASK, 8, 20, MASK]])
    memory = model.encode(src)
    base = model.decoder(dec, memory)
    later = dec.clone()
    later[0, 5] = 30
    changed = model.decoder(later, memory)
    torch.testing.assert_close(changed[:, :5], base[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[:, 5:], base[:, 5:])
    other = src.clone()
    other[0, 1] = 25  # the decoder does read the encoder
    assert not torch.allclose(model.decoder(dec, model.encode(other)), base)


@pytest.mark.parametrize("position", ["alibi", "absolute", "rope", "t5"])
def test_cached_encoder_decoder_decoding_equals_recomputation(position):
    model = tiny_mass(position)
    assert_cache_equals_recomputation(model, PROMPTS, MASK)


def test_the_first_step_is_the_teacher_forced_model_at_the_fragment_start():
    model = tiny_mass()
    out = generate_ids(model, [PROMPTS[0]], Decoding(max_new_tokens=2), 0, keep_logits=True,
                       mask_id=MASK)
    P = len(PROMPTS[0])
    src = torch.tensor([PROMPTS[0] + [MASK, MASK]])
    dec = torch.tensor([[MASK, out.tokens[0][0]]])
    logits = model(src, decoder_input_ids=dec, decoder_position_ids=torch.tensor([[P, P + 1]]))
    torch.testing.assert_close(logits.logits[0], torch.stack([s[0] for s in out.logits]),
                               atol=1e-5, rtol=0)


def test_mass_demo_pretrains_finetunes_and_generates(pd98_encoded, tmp_path):
    run = tmp_path / "mass"
    summary = motian.pretrain(recipe="mass-demo", data=pd98_encoded, out=run, steps=2,
                              override=SMALL_EVAL + ["stages=[{seq_len: 64, global_batch: 8}]"],
                              run=RUN)
    e = summary["eval"]
    assert 0 <= e["accuracy"] <= 1 and e["tokens"] > 0 and e["perplexity"] > 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_mass" in json.dumps(r) for r in records)
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["head"] == "Seq2SeqLM" and "Seq2SeqLM" in HEADS
    backbone = load_backbone_state(run / "final")  # the encoder, for `motian finetune`
    classifier = SequenceClassification(backbone.config, num_labels=2)
    report = load_weights(classifier, backbone.state, "final", strict=False, quiet=True)
    assert not [k for k in report.missing if k.startswith("backbone.")]
    encoder = {k: v for k, v in backbone.state.items() if k.startswith("backbone.")}
    assert all(torch.equal(classifier.state_dict()[k], v) for k, v in encoder.items())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "motian.cli", "generate", "--model",
                          str(run / "final"), "--prompts", "中国", "人民", "--max-new-tokens",
                          "4", "--stop-tokens", "[PAD]", "--jsonl", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["中国", "人民"]
    assert all(r["tokens"] == 4 and r["text"] for r in lines)


def test_mass_resume_from_a_checkpoint_equals_an_uninterrupted_run(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=8, checkpoint_every=4, eval_every=4, optim="adamw",
                          data="{masking: bert, pair_task: none}",
                          objective="{kind: mass, mass_span: 0.4}")
    full = tmp_path / "full"
    motian.pretrain(recipe=str(recipe), data=pd98_encoded, out=full, run=RUN)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for late in ("final", "checkpoints/step-00000008", "summary.json"):  # killed after step 4
        path = cut / late
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    motian.pretrain(recipe=str(recipe), data=pd98_encoded, out=cut, resume=True, run=RUN)
    assert max_difference(final_weights(cut), final_weights(full)) <= 1e-6


def test_bad_mass_settings_name_their_field(pd98_encoded, tmp_path):
    recipe = load_recipe("mass-demo")
    for bad in ("1.5", "0", "half"):
        with pytest.raises(UserError, match="objective.mass_span must be a number in"):
            with_fields(recipe, [f"objective.mass_span={bad}"])
    with pytest.raises(UserError, match="mass reads packed rows whole"):
        motian.pretrain(recipe="mass-demo", data=pd98_encoded, out=tmp_path / "x", steps=1,
                        override=SMALL_EVAL + ["data.cross_document_attention=false"], run=RUN)
    with pytest.raises(UserError, match="mass trains no pair task"):
        motian.pretrain(recipe="mass-demo", data=pd98_encoded, out=tmp_path / "y", steps=1,
                        override=SMALL_EVAL + ["data.pair_task=sop"], run=RUN)
    with pytest.raises(UserError, match="Seq2SeqLM needs a bidirectional encoder config"):
        Seq2SeqLM(preset("tiny", vocab_size=40, hidden=32, heads=4, ffn=64, causal=True))
