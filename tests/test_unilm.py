"""UNILM (objective.kind unilm): the four attention masks on hand-checked rows, the per-row
mode shares, what seq2seq rows may see, prefix-LM decoding with a KV cache against full
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
from motian.data.seq2seq_rows import unilm_rows
from motian.errors import UserError
from motian.model import SequenceClassification, load_weights, preset
from motian.model.artifact import load_backbone_state
from motian.model.heads import UnifiedLM
from motian.model.masks import (
    BIDIRECTIONAL,
    LEFT_TO_RIGHT,
    MODES,
    RIGHT_TO_LEFT,
    SEQ2SEQ,
    unilm_visibility,
)
from motian.serving.generate import Decoding, generate_ids
from motian.train.recipe import load_recipe, with_fields
from motian.train.settings import RunSettings
from tests.decoding_helpers import assert_cache_equals_recomputation
from tests.pretrain_helpers import final_weights, max_difference, write_recipe

PROMPTS = [[2, 7, 8, 9, 10, 11], [2, 12], [2, 13, 14, 15]]
MASK = 4
RUN = RunSettings(device="cpu", threads=1, progress=False)
SMALL_EVAL = ["eval.rows=16", "eval.batch=8", "eval.every=0"]


def rows(text: str) -> list[list[int]]:
    return [[int(c) for c in line.split()] for line in text.strip().splitlines()]


def test_each_mode_sees_what_the_paper_says_on_a_hand_checked_row():
    # L = 5, the last token padding; seq2seq source = the first 2 tokens.
    pad = torch.tensor([[1, 1, 1, 1, 0]] * 4)
    modes = torch.tensor([BIDIRECTIONAL, SEQ2SEQ, LEFT_TO_RIGHT, RIGHT_TO_LEFT])
    seen = unilm_visibility(modes, torch.tensor([0, 2, 0, 0]), pad, 5).int().tolist()
    assert seen[0] == rows("1 1 1 1 0\n" * 5)
    assert seen[1] == rows("""1 1 0 0 0
                              1 1 0 0 0
                              1 1 1 0 0
                              1 1 1 1 0
                              1 1 1 1 0""")
    assert seen[2] == rows("""1 0 0 0 0
                              1 1 0 0 0
                              1 1 1 0 0
                              1 1 1 1 0
                              1 1 1 1 0""")
    assert seen[3] == rows("""1 1 1 1 0
                              0 1 1 1 0
                              0 0 1 1 0
                              0 0 0 1 0
                              0 0 0 0 0""")  # the padding query: the model lets it see itself


def test_modes_are_drawn_per_row_in_the_recipes_shares():
    shares = load_recipe("unilm-demo").objective.unilm_modes
    assert [round(shares[m] * 6, 3) for m in MODES] == [2, 2, 1, 1]
    mask = np.ones((60_000, 16), np.int64)
    mask[::3, 10:] = 0  # padded rows too
    out = unilm_rows(mask, tuple(shares[m] for m in MODES), np.random.default_rng(0))
    counts = np.bincount(out["unilm_mode"], minlength=4) / len(mask)
    np.testing.assert_allclose(counts, [1 / 3, 1 / 3, 1 / 6, 1 / 6], atol=0.01)
    seq2seq = out["unilm_mode"] == SEQ2SEQ
    source, real = out["source_length"][seq2seq], mask[seq2seq].sum(1)
    assert (source >= 1).all() and (source < real).all()  # two non-empty segments
    assert (out["source_length"][~seq2seq] == 0).all()
    # segment 1 = the target, exactly the real tokens from the source length on
    types = out["token_type_ids"][seq2seq]
    assert (types.sum(1) == real - source).all()
    assert out["token_type_ids"][~seq2seq].sum() == 0


def tiny_unilm(position: str = "alibi", seed: int = 0, **overrides) -> UnifiedLM:
    torch.manual_seed(seed)
    return UnifiedLM(preset("tiny", vocab_size=40, hidden=32, heads=4, ffn=64, norm="pre",
                            position=position, dropout=0.0, attention_dropout=0.0,
                            initializer_range=0.3, **overrides)).eval()


@pytest.mark.parametrize("position", ["alibi", "absolute", "rope"])
def test_seq2seq_targets_see_no_later_target_and_the_source_never_the_target(position):
    model = tiny_unilm(position)
    ids = torch.tensor([[2, 7, 8, 9, 10, 11, 12, 13]])
    S = 3
    visible = unilm_visibility(torch.tensor([SEQ2SEQ]), torch.tensor([S]), None, 8)
    types = (torch.arange(8) >= S).long()[None]
    base = model.backbone(ids, visible, types)
    later = ids.clone()
    later[0, 6] = 30  # a later target token
    changed = model.backbone(later, visible, types)
    torch.testing.assert_close(changed[:, :6], base[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[:, 6:], base[:, 6:])
    target = ids.clone()
    target[0, S:] = torch.tensor([20, 21, 22, 23, 24])  # a different target altogether
    torch.testing.assert_close(model.backbone(target, visible, types)[:, :S], base[:, :S],
                               atol=1e-6, rtol=0)
    # and the bidirectional mode does let the source see the target
    both = unilm_visibility(torch.tensor([BIDIRECTIONAL]), torch.tensor([0]), None, 8)
    assert not torch.allclose(model.backbone(target, both)[:, :S], model.backbone(ids, both)[:, :S])


@pytest.mark.parametrize("position", ["alibi", "absolute", "rope", "t5"])
def test_cached_prefix_lm_decoding_equals_recomputation_under_the_prefix_mask(position):
    model = tiny_unilm(position)
    assert_cache_equals_recomputation(model, PROMPTS, MASK)


def test_the_recomputed_step_is_the_mlm_head_at_a_mask_under_the_prefix_mask():
    """The reference itself, spelled out: prompt + generated tokens + [MASK], the prompt seen
    both ways, the rest causally, read by the MLM head at the [MASK]."""
    model = tiny_unilm()
    out = generate_ids(model, [PROMPTS[0]], Decoding(max_new_tokens=2, cache=False), 0,
                       keep_logits=True, mask_id=MASK)
    P = len(PROMPTS[0])
    ids = torch.tensor([PROMPTS[0] + out.tokens[0][:1] + [MASK]])
    visible = unilm_visibility(torch.tensor([SEQ2SEQ]), torch.tensor([P]), None, P + 2)
    types = (torch.arange(P + 2) >= P).long()[None]
    logits = model(ids, visible, types).logits[0, -1]
    torch.testing.assert_close(logits, out.logits[1][0], atol=1e-5, rtol=0)


def test_unilm_demo_pretrains_finetunes_and_generates(pd98_encoded, tmp_path):
    run = tmp_path / "unilm"
    summary = motian.pretrain(recipe="unilm-demo", data=pd98_encoded, out=run, steps=2,
                              override=SMALL_EVAL + ["stages=[{seq_len: 64, global_batch: 8}]"],
                              run=RUN)
    assert 0 <= summary["eval"]["accuracy"] <= 1
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["head"] == "UnifiedLM" and config["model"]["causal"] is False
    backbone = load_backbone_state(run / "final")  # what `motian finetune` reads
    classifier = SequenceClassification(backbone.config, num_labels=2)
    report = load_weights(classifier, backbone.state, "final", strict=False, quiet=True)
    assert not [k for k in report.missing if k.startswith("backbone.")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "motian.cli", "generate", "--model",
                          str(run / "final"), "--prompts", "中国", "人民", "--max-new-tokens",
                          "4", "--stop-tokens", "[PAD]", "--jsonl", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["中国", "人民"]
    assert all(r["tokens"] == 4 and r["text"] for r in lines)


def test_unilm_resume_from_a_checkpoint_equals_an_uninterrupted_run(pd98_encoded, tmp_path):
    recipe = write_recipe(tmp_path, steps=8, checkpoint_every=4, eval_every=0, optim="adamw",
                          data="{masking: bert, pair_task: none}",
                          objective="{kind: unilm, weighting: fixed}")
    full = tmp_path / "full"
    motian.pretrain(recipe=str(recipe), data=pd98_encoded, out=full, run=RUN)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for late in ("final", "checkpoints/step-00000008", "summary.json"):  # as if killed after step 4
        path = cut / late
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    motian.pretrain(recipe=str(recipe), data=pd98_encoded, out=cut, resume=True, run=RUN)
    assert max_difference(final_weights(cut), final_weights(full)) <= 1e-6


def test_bad_unilm_settings_name_their_field(pd98_encoded, tmp_path):
    recipe = load_recipe("unilm-demo")
    with pytest.raises(UserError, match=r"objective.unilm_modes must sum to 1.*0\.9"):
        with_fields(recipe, ["objective.unilm_modes={bidirectional: 0.5, seq2seq: 0.4}"])
    with pytest.raises(UserError, match="objective.unilm_modes must map some of"):
        with_fields(recipe, ["objective.unilm_modes={prefix: 1.0}"])
    with pytest.raises(UserError, match="kind is 'unlim'; choose one of .*unilm"):
        with_fields(recipe, ["objective.kind=unlim"])
    with pytest.raises(UserError, match="unilm trains no pair task; set data.pair_task: none"):
        motian.pretrain(recipe="unilm-demo", data=pd98_encoded, out=tmp_path / "x", steps=1,
                        override=SMALL_EVAL + ["data.pair_task=sop"], run=RUN)
    with_fields(recipe, ["objective.unilm_modes={bidirectional: 1.0}"])  # one mode is fine
