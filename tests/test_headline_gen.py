"""Headline generation (`pd98-headline-gen`): the task's article split, the character-level
ROUGE / BLEU metrics on hand-computed examples, the lead baseline, the loss mask of a
generation row, a tiny GPT pretrained through the API then `motian finetune` / `motian
evaluate` in a fresh process, and the refusal of a bidirectional model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import motian
from motian.data.clicks import article_side
from motian.errors import UserError
from motian.model import CausalLM, MaskedLM, preset, save_pretrained
from motian.model.heads import UnifiedLM
from motian.model.seq2seq import Seq2SeqLM
from motian.serving.generate import left_pad
from motian.serving.prefix_decoding import PrefixSequences, Seq2SeqSequences
from motian.task_generation import lead_baseline
from motian.task_training import TaskTraining, task_units
from motian.tasks.builtin import MAX_SOURCE_CHARS, pd98_headline_gen, pd98_heldout_lines
from motian.tasks.features import Featurizer, collate
from motian.tasks.generation_rows import mass_rows, unilm_rows
from motian.tasks.metrics import corpus_bleu, generation_scores, rouge_l, rouge_n
from motian.tasks.types import Example, Task
from motian.train.settings import RunSettings
from tests.test_tasks import char_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _article(e: Example) -> int:
    return int(e.guid[1:])  # guids are "a<article index>"


def test_split_by_article_held_out_articles_only():
    task = pd98_headline_gen()
    assert task.type == "generation" and all(task.splits[s] for s in ("train", "dev", "test"))
    articles = {s: {_article(e) for e in task.splits[s]} for s in task.splits}
    assert sum(map(len, articles.values())) == sum(task.sizes().values())  # one per article
    assert not (articles["train"] & articles["dev"] or articles["train"] & articles["test"]
                or articles["dev"] & articles["test"])
    assert all(article_side(a) == "heldout" for s in articles.values() for a in s)
    assert all(a % 10 == 9 for a in articles["test"])
    assert all(a % 10 == 8 and (a // 10) % 5 == 0 for a in articles["dev"])
    assert all(a % 10 == 8 and (a // 10) % 5 != 0 for a in articles["train"])
    # `motian prepare` leaves out the documents starting on these lines: every example's
    first_lines = pd98_heldout_lines()
    examples = [e for s in task.splits.values() for e in s]
    assert all(int(e.where.rsplit(":", 1)[1]) in first_lines for e in examples)
    assert all(e.target and 0 < len(e.text) <= MAX_SOURCE_CHARS for e in examples)
    assert task.labelled("test") and task.labelled("train")


# --------------------------------------------------------------------------- metrics


def test_metrics_identical_disjoint_and_worked_cases():
    same = generation_scores(["中国经济发展"], ["中国经济发展"])
    assert same == {"rouge_1": 1.0, "rouge_2": 1.0, "rouge_l": 1.0, "bleu": 1.0}
    assert generation_scores(["中国经济"], ["美元汇率"]) == {
        "rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0, "bleu": 0.0}
    # gold 中国经济发展 (6 characters), prediction 发展中国 (4): all 4 characters occur in gold
    # -> P 4/4, R 4/6, F1 0.8; bigrams 发展 展中 中国 vs 中国 国经 经济 济发 发展: 2 shared
    # -> P 2/3, R 2/5, F1 0.5; longest common subsequence 中国 (or 发展) = 2 -> P 2/4, R 2/6,
    # F1 0.4 (order matters to ROUGE-L, not to ROUGE-1).
    assert rouge_n("中国经济发展", "发展中国", 1) == pytest.approx(0.8)
    assert rouge_n("中国经济发展", "发展中国", 2) == pytest.approx(0.5)
    assert rouge_l("中国经济发展", "发展中国") == pytest.approx(0.4)
    assert rouge_l("中国经济发展", "中国发展") == pytest.approx(0.8)  # a gap costs nothing
    assert rouge_n("中 国", "中国", 2) == 1.0  # whitespace is not content
    # BLEU, gold 中国经济快速发展 (8), prediction 中国经济发展 (6): clipped precisions 1-gram
    # 6/6, 2-gram 4/5 (中国 国经 经济 发展), 3-gram 2/4 (中国经 国经济), 4-gram 1/3 (中国经济);
    # the prediction is shorter, so the brevity penalty is exp(1 - 8/6).
    expected = math.exp(1 - 8 / 6) * (1 * 4 / 5 * 2 / 4 * 1 / 3) ** (1 / 4)
    assert corpus_bleu(["中国经济快速发展"], ["中国经济发展"]) == pytest.approx(expected)
    # corpus BLEU sums the clipped counts over pairs before dividing (not a mean of pairs):
    # with an identical second pair (6/6, 5/5, 4/4, 3/3), c = 12 and r = 14.
    corpus = corpus_bleu(["中国经济快速发展", "中国经济发展"], ["中国经济发展", "中国经济发展"])
    p = [12 / 12, 9 / 10, 6 / 8, 4 / 6]
    assert corpus == pytest.approx(math.exp(1 - 14 / 12) * math.prod(p) ** (1 / 4))
    assert corpus_bleu(["中国经济"], ["中国"]) == 0.0  # no 4-gram at all: 0, unsmoothed
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        corpus_bleu(["a", "b"], ["a"])


def test_lead_baseline_takes_the_mean_target_length_of_train():
    train = [Example("t1", "x", target="一二"), Example("t2", "y", target="一二三四")]
    test = [Example("e1", "中国 经济发展很快", target="中国经济")]
    lead = lead_baseline(train, {"test": test, "dev": []})
    assert lead["chars"] == 3 and "dev" not in lead
    # prediction 中国经 (whitespace skipped): ROUGE-1 P 1, R 3/4 -> 6/7; ROUGE-2 P 2/2, R 2/3
    # -> 0.8; LCS 3 -> 6/7; no 4-gram -> BLEU 0
    assert lead["test"] == pytest.approx({"rouge_1": 6 / 7, "rouge_2": 0.8, "rouge_l": 6 / 7,
                                          "bleu": 0.0})
    task = pd98_headline_gen()
    real = lead_baseline(task.splits["train"], {"test": task.splits["test"]})
    lengths = [len(e.target.replace(" ", "")) for e in task.splits["train"]]
    assert real["chars"] == round(sum(lengths) / len(lengths))
    assert 0 < real["test"]["rouge_l"] < real["test"]["rouge_1"] < 1


# --------------------------------------------------------------------------- the row


def test_loss_covers_target_tokens_and_the_final_sep_only(tmp_path):
    tok, special = char_tokenizer(tmp_path, ["中国经济发展"])
    task = Task("g", "generation")
    row = Featurizer(task, tok, special, 32)([Example("a", "中国经济", target="发展")])[0]
    cls, sep = special["cls"], special["sep"]
    ids = [tok.token_to_id(c) for c in "中国经济发展"]
    assert row.input_ids == [cls, *ids[:4], sep, *ids[4:], sep]  # [CLS] source [SEP] target [SEP]
    assert row.label == [-100] * 6 + [*ids[4:], sep]
    assert row.start == 6  # the prompt at decoding: [CLS] source [SEP]
    short = Featurizer(task, tok, special, 32)([Example("b", "中", target="发")])[0]
    batch = collate("generation", [row, short], special["pad"])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"][1].tolist() == [-100] * 3 + [ids[4], sep] + [-100] * 4  # padding
    assert task_units("generation", batch) == 5  # target tokens, not rows
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=tok.get_vocab_size(), hidden=32, heads=2,
                            ffn=64, layers=2, causal=True)).eval()
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
    # by hand: position t predicts token t + 1, only where that token is target or final [SEP]
    hand = [F.cross_entropy(logits[b, t - 1], batch["input_ids"][b, t], reduction="sum")
            for b, first in ((0, 6), (1, 3)) for t in range(first, first + (3 if b == 0 else 2))]
    assert loss.item() == pytest.approx(float(sum(hand) / 5), rel=1e-5)


# --------------------------------------------------------------------------- end to end


def test_tiny_gpt_finetunes_and_evaluates_on_headlines(pd98_encoded, tmp_path):
    run = tmp_path / "gpt"
    motian.pretrain(recipe="gpt-demo", data=pd98_encoded, out=run, steps=2,
                    override=["model.overrides.hidden=32", "model.overrides.ffn=64",
                              "model.overrides.heads=2", "eval.rows=16", "eval.batch=8",
                              "eval.every=0"],
                    run=RunSettings(device="cpu", threads=1, progress=False))
    out = tmp_path / "ft"
    done = subprocess.run(
        [sys.executable, "-m", "motian.cli", "finetune", "--task", "pd98-headline-gen",
         "--model", str(run / "final"), "--out", str(out), "--seeds", "1", "--epochs", "1",
         "--batch-size", "8", "--max-train", "16", "--max-eval", "6", "--max-length", "64",
         "--threads", "1", "--no-progress"], capture_output=True, text=True, env=ENV,
        timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "results.json").read_text("utf-8"))
    assert result["task"]["type"] == "generation" and result["runs"][0]["steps"] == 2
    for split in ("dev", "test"):
        scores = result["runs"][0][split]
        assert set(scores) == {"rouge_1", "rouge_2", "rouge_l", "bleu"}
        assert all(0 <= v <= 1 for v in scores.values())
        assert set(result["lead_baseline"][split]) == set(scores)
    assert result["decoding"]["method"] == "greedy" and result["decoding"]["max_new_tokens"] > 0
    assert "baseline: lead" in (out / "results.md").read_text("utf-8")
    model = out / "seed-1" / "model"
    assert json.loads((model / "task.json").read_text())["type"] == "generation"
    scored = subprocess.run(
        [sys.executable, "-m", "motian.cli", "evaluate", "--model", str(model), "--split",
         "test", "--max-eval", "3", "--num-beams", "2", "--device", "cpu"],
        capture_output=True, text=True, env=ENV, timeout=120)
    assert scored.returncode == 0, scored.stderr
    assert scored.stdout.startswith("pd98-headline-gen test: rouge_1")
    lines = (model / "pd98-headline-gen_test_predictions.jsonl").read_text("utf-8").splitlines()
    assert len(lines) == 3 and all(isinstance(json.loads(x)["prediction"], str) for x in lines)
    # the control arm: the same shape from random weights, in-process
    control = motian.finetune("pd98-headline-gen", tmp_path / "rand", model=run / "final",
                              random_init=True, seeds=[1], max_train=8, max_eval=2,
                              max_length=48, save_model=False,
                              training=TaskTraining(epochs=1, batch_size=8),
                              run=RunSettings(device="cpu", threads=1, progress=False))
    assert control["model"]["source"].startswith("random init")
    assert "rouge_l" in control["runs"][0]["test"]


def test_a_bidirectional_model_is_refused_with_a_clear_error(tmp_path):
    mlm = tmp_path / "mlm"
    save_pretrained(MaskedLM(preset("tiny", vocab_size=40, hidden=32, heads=2, ffn=64)), mlm)
    with pytest.raises(UserError, match=r"bidirectional model \(MaskedLM\).*needs a causal"):
        motian.finetune("pd98-headline-gen", tmp_path / "out", model=mlm)
    with pytest.raises(UserError, match="needs a causal model.*give --model"):
        motian.finetune("pd98-headline-gen", tmp_path / "out")
    unilm = tmp_path / "unilm"  # generation-pretrained: accepted, but not with --aux-mlm
    save_pretrained(UnifiedLM(preset("tiny", vocab_size=40, hidden=32, heads=2, ffn=64)), unilm)
    with pytest.raises(UserError, match="--aux-mlm 0.5: .*own generation rows"):
        motian.finetune("pd98-headline-gen", tmp_path / "out", model=unilm,
                        training=TaskTraining(aux_mlm=0.5))


# --------------------------------------------------------------------------- UNILM and MASS


def _rows(tmp_path):
    """A real tokenizer, two generation rows of different lengths, collated (right-padded)."""
    tok, special = char_tokenizer(tmp_path, ["中国经济发展今日北京新闻报道"])
    task = Task("g", "generation")
    featurize = Featurizer(task, tok, special, 32)
    rows = featurize([Example("a", "中国经济今日", target="发展报道"),
                      Example("b", "北京", target="新闻")])
    return tok, special, featurize, collate("generation", rows, special["pad"])


def test_unilm_rows_mask_target_tokens_under_the_seq2seq_mask(tmp_path):
    _, special, _, batch = _rows(tmp_path)
    target = batch["labels"] != -100
    rows = unilm_rows(batch, special["mask"], rate=1.0)
    assert torch.equal(rows["input_ids"] == special["mask"], target)  # every target token
    assert torch.equal(rows["labels"], batch["labels"])
    assert rows["token_type_ids"][0].tolist() == [0] * 8 + [1] * 5  # [CLS] 6 [SEP] | 4 [SEP]
    assert rows["token_type_ids"][1].tolist() == [0] * 4 + [1] * 3 + [0] * 6  # + padding
    visible = rows["attention_mask"][0]
    assert visible[:8, :8].all() and not visible[:8, 8:].any()  # the source: both ways, only
    assert visible[9, :10].all() and not visible[9, 10:].any()  # a target token: source + past
    assert not rows["attention_mask"][1][:, 7:].any()  # padding is never seen
    one = unilm_rows(batch, special["mask"], rate=0.0)  # none drawn: one per row still
    assert ((one["labels"] != -100).sum(1) == 1).all()
    assert ((one["labels"] != -100) <= target).all()
    half = unilm_rows(batch, special["mask"], rate=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(half["input_ids"] == special["mask"], half["labels"] != -100)
    assert torch.equal(half["input_ids"][~target], batch["input_ids"][~target])


def test_mass_rows_prompt_plus_masks_then_the_target_shifted(tmp_path):
    _, special, _, batch = _rows(tmp_path)
    m, pad = special["mask"], special["pad"]
    rows = mass_rows(batch, m, pad, fill=5, max_length=32)
    ids = batch["input_ids"]
    assert rows["input_ids"][0].tolist() == ids[0, :8].tolist() + [m] * 5
    assert rows["input_ids"][1].tolist() == ids[1, :4].tolist() + [m] * 5 + [pad] * 4
    assert rows["decoder_input_ids"][0].tolist() == [m] + ids[0, 8:12].tolist()
    assert rows["decoder_labels"][0].tolist() == ids[0, 8:13].tolist()  # target + [SEP]
    assert rows["decoder_labels"][1].tolist() == ids[1, 4:7].tolist() + [-100] * 2
    assert rows["decoder_position_ids"][0].tolist() == [8, 9, 10, 11, 12]
    assert rows["decoder_position_ids"][1].tolist() == [4, 5, 6, 0, 0]
    assert rows["decoder_attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    cut = mass_rows(batch, m, pad, fill=5, max_length=12)  # room for 6 prompt tokens
    assert cut["input_ids"][0].tolist() == ids[0, :5].tolist() + [special["sep"]] + [m] * 5


@pytest.mark.parametrize("family", ["unilm", "mass"])
def test_fine_tuning_rows_read_the_first_target_token_as_the_decoder_does(tmp_path, family):
    """The first target token is predicted in fine-tuning exactly as the first decoding step
    predicts it (same inputs, attention and positions): what the model learns is what it
    generates with."""
    tok, special, featurize, batch = _rows(tmp_path)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=tok.get_vocab_size(), hidden=32, heads=2, ffn=64,
                    layers=2)
    model = (UnifiedLM if family == "unilm" else Seq2SeqLM)(config).eval()
    prompts = [batch["input_ids"][b, :n].tolist() for b, n in ((0, 8), (1, 4))]
    ids, mask = left_pad(prompts, special["pad"], torch.device("cpu"))
    with torch.no_grad():
        if family == "unilm":
            out = model(**unilm_rows(batch, special["mask"], rate=1.0))
            firsts = out.logits[[0, 5]]  # row 0's 5 masked targets come first
            decoded = PrefixSequences(model, ids, mask, False, special["mask"]).logits()
        else:
            out = model(**mass_rows(batch, special["mask"], special["pad"], 5, 32))
            firsts = out.logits[[0, 5]]
            decoded = Seq2SeqSequences(model, ids, mask, False, special["mask"], 5).logits()
    torch.testing.assert_close(firsts.float(), decoded, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe", ["unilm-demo", "mass-demo"])
def test_unilm_and_mass_fine_tune_on_headlines_in_their_own_family(pd98_encoded, tmp_path,
                                                                   recipe):
    run = tmp_path / "pre"
    motian.pretrain(recipe=recipe, data=pd98_encoded, out=run, steps=2,
                    override=["model.overrides.hidden=32", "model.overrides.ffn=64",
                              "model.overrides.heads=2", "eval.rows=16", "eval.batch=8",
                              "eval.every=0"],
                    run=RunSettings(device="cpu", threads=1, progress=False))
    head = "UnifiedLM" if recipe == "unilm-demo" else "Seq2SeqLM"
    result = motian.finetune("pd98-headline-gen", tmp_path / "ft", model=run / "final",
                             seeds=[1], max_train=16, max_eval=4, max_length=64,
                             training=TaskTraining(epochs=1, batch_size=8),
                             run=RunSettings(device="cpu", threads=1, progress=False))
    assert result["runs"][0]["steps"] == 2 and math.isfinite(result["runs"][0]["final_loss"])
    assert set(result["runs"][0]["test"]) == {"rouge_1", "rouge_2", "rouge_l", "bleu"}
    saved = json.loads((tmp_path / "ft" / "seed-1" / "model" / "config.json").read_text("utf-8"))
    assert saved["head"] == head  # still a UNILM / MASS model: `motian generate` decodes it
    scored = motian.evaluate(tmp_path / "ft" / "seed-1" / "model", split="test", max_eval=2,
                             device="cpu")
    assert set(scored["scores"]) == {"rouge_1", "rouge_2", "rouge_l", "bleu"}
