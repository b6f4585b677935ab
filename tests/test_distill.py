"""Distillation with the real tiny model, the real tokenizer trained on People's Daily and the
bundled tasks: a fine-tuned teacher is distilled into a narrower, shallower student on real
reviews; the student starts from the mapped teacher layers; each loss behaves as defined; the
task-agnostic path runs (and resumes) on real encoded shards; bad inputs are refused."""

import json

import pytest
import torch

from motian.cli import main
from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.distillation import (
    Distiller,
    LossWeights,
    distill,
    distill_corpus,
    encoder_flops_per_token,
    even_layer_map,
    init_from_teacher,
    mlm_outputs,
    student_config,
    task_outputs,
)
from motian.errors import UserError
from motian.finetuning import evaluate, finetune, load_start, load_task, save_fine_tuned, subset
from motian.model import MaskedLM, from_pretrained, preset, save_pretrained
from motian.model.transformer import capture_internals
from motian.serving.predict import iter_predictions, load_predictor
from motian.task_training import seed_everything
from motian.tasks.features import Featurizer, collate
from motian.tasks.heads import build_head
from motian.tasks.types import Task
from tests.settings_helpers import typed

TINY = dict(hidden=64, layers=2, heads=4, ffn=128, max_positions=128)


@pytest.fixture(scope="module")
def tok_dir(pd98_encoded):
    return pd98_encoded  # holds the vocab.txt the shards were encoded with


@pytest.fixture(scope="module")
def reviews():
    return load_task("reviews-sentiment")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tok_dir):
    """A 2-layer, hidden-64 teacher fine-tuned on 800 real reviews (~74% dev accuracy)."""
    out = tmp_path_factory.mktemp("teacher")
    vocab = load_tokenizer(tok_dir).get_vocab_size()
    ckpt = save_pretrained(MaskedLM(preset("tiny", vocab_size=vocab, **TINY)), out / "init")
    finetune("reviews-sentiment", out / "run", model=ckpt, tokenizer=tok_dir, seeds=[1],
             max_length=48, max_train=800, max_eval=200,
             **typed(epochs=3, batch_size=16, lr=2e-3))
    return out / "run" / "seed-1" / "model"


def _batch(task, tok_dir, n=16, max_length=48):
    tok = load_tokenizer(tok_dir)
    special = special_token_ids(tok)
    features = Featurizer(task, tok, special, max_length)(subset(task.splits["train"], n))
    return collate(task.type, features, special["pad"])


def test_distill_reviews_student_and_baseline(teacher, tmp_path, capsys):
    out = tmp_path / "student"
    kwargs = typed("distill", student_layers=1, student_hidden=32, alpha_hidden=1.0,
                   alpha_attention=1.0, seeds=[1], epochs=2, batch_size=16, lr=1e-3,
                   max_train=400, max_eval=200)
    result = distill(teacher, out, task="reviews-sentiment", **kwargs)
    assert "0 <- 1" in capsys.readouterr().err  # the layer map is printed
    assert result["config"]["layer_map"] == [1]
    t, s, b = result["teacher"], result["student"], result["baseline"]
    assert (t["layers"], t["hidden"], s["layers"], s["hidden"]) == (2, 64, 1, 32)
    assert s["params"] < t["params"] and b["params"] == s["params"]
    config = from_pretrained(out / "seed-1" / "model").config
    assert result["compute_ratio"] == pytest.approx(
        encoder_flops_per_token(config, 48) / encoder_flops_per_token(
            from_pretrained(teacher).config, 48))
    assert result["compute_ratio"] < 0.25
    run = s["runs"][0]
    assert set(run["last_terms"]) == {"soft", "hard", "hidden", "attention"}
    assert set(b["runs"][0]["last_terms"]) == {"hard"}
    for split in ("dev", "test"):
        assert 0.6 < t["scores"][split]["accuracy"] <= 1.0
        assert 0.0 < run[split]["accuracy"] <= 1.0
    # The student is a fine-tuned model like any other: evaluate / predict / export load it.
    again = evaluate(out / "seed-1" / "model", split="dev", max_eval=200)
    assert again["scores"] == pytest.approx(run["dev"])
    assert "| student | 1 × 32 |" in (out / "results.md").read_text("utf-8")
    predictor = load_predictor(out / "seed-1" / "model", "torch")
    (answer,) = iter_predictions(predictor, [(0, {"text": "质量很好，物流也快"})])
    assert answer["label"] in ("negative", "positive")
    stamp = (out / "seed-1" / "result.json").stat().st_mtime_ns
    assert distill(teacher, out, **kwargs)["student"]["runs"] == s["runs"]  # resumed, not rerun
    assert (out / "seed-1" / "result.json").stat().st_mtime_ns == stamp


def test_distillation_loss_decreases(teacher, tok_dir, reviews):
    seed_everything(0)
    t_model = from_pretrained(teacher)
    student = build_head(reviews, student_config(t_model.config, 1, 32))
    init_from_teacher(student, t_model, [1])
    distiller = Distiller(t_model, student, task_outputs("single"),
                          LossWeights(1.0, 0.5, 1.0, 1.0, 2.0), [1])
    batch = _batch(reviews, tok_dir)
    params = list(student.parameters()) + list(distiller.projections.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    student.eval()  # no dropout: the same batch gives the same loss
    for _ in range(15):
        loss = distiller.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("pruned", [{}, {"layer_heads": [[0, 2], [1]], "layer_ffn": [40, 16]}])
def test_flops_per_token_match_the_model_counted(pruned):
    # torch's FLOP counter on the real encoder: every projection and FFN matmul, layer by layer
    # (a pruned model's kept heads and units). seq_len 0 leaves out the attention-score term,
    # which the counter does not see inside CPU SDPA; that term grows with seq_len * kept width.
    from torch.utils.flop_counter import FlopCounterMode

    from motian.model.config import ModelConfig
    from motian.model.transformer import MotianModel

    config = ModelConfig(vocab_size=100, hidden=32, layers=2, heads=4, ffn=64, **pruned)
    with FlopCounterMode(display=False) as counter:
        MotianModel(config).eval()(torch.randint(5, 100, (1, 24)))
    assert counter.get_total_flops() / 24 == encoder_flops_per_token(config, 0)
    width = sum(len(h) for h in pruned["layer_heads"]) * 8 if pruned else 2 * 32
    assert encoder_flops_per_token(config, 24) - encoder_flops_per_token(config, 0) == 4 * 24 * width


def test_student_initialised_from_mapped_teacher_layers():
    task = load_task("pd98-ner")
    t_model = build_head(task, preset("tiny", vocab_size=300, **{**TINY, "layers": 4}))
    assert even_layer_map(4, 2) == [1, 3] and even_layer_map(12, 4) == [2, 5, 8, 11]
    student = build_head(task, student_config(t_model.config, 2))
    init_from_teacher(student, t_model, [1, 3])
    for i, j in enumerate([1, 3]):
        for (name, a), (_, b) in zip(student.backbone.blocks[i].state_dict().items(),
                                     t_model.backbone.blocks[j].state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(student.classifier.weight, t_model.classifier.weight)
    # Narrower: the first 16 of each head's 16 -> 8 dims of q, k and v, the first 32 residual
    # dims everywhere, the first 64 FFN units (weight selection, consistent across layers).
    narrow = build_head(task, student_config(t_model.config, 2, hidden=32))
    init_from_teacher(narrow, t_model, [1, 3])
    qkv_t = t_model.backbone.blocks[3].attention.qkv.weight.view(3, 4, 16, 64)
    qkv_s = narrow.backbone.blocks[1].attention.qkv.weight.view(3, 4, 8, 32)
    assert torch.equal(qkv_s, qkv_t[:, :, :8, :32])
    out_t = t_model.backbone.blocks[3].attention.out.weight.view(64, 4, 16)
    assert torch.equal(narrow.backbone.blocks[1].attention.out.weight.view(32, 4, 8),
                       out_t[:32, :, :8])
    assert torch.equal(narrow.backbone.blocks[0].ffn.up.weight,
                       t_model.backbone.blocks[1].ffn.up.weight[:64, :32])
    assert torch.equal(narrow.backbone.embeddings.word.weight,
                       t_model.backbone.embeddings.word.weight[:, :32])


def test_projection_only_when_sizes_differ_and_it_learns(teacher, tok_dir, reviews):
    t_model = from_pretrained(teacher)
    weights = LossWeights(soft=0.0, hidden=1.0)
    same = Distiller(t_model, build_head(reviews, student_config(t_model.config, 1)),
                     task_outputs("single"), weights, [1])
    assert same.projections is None
    narrow = Distiller(t_model, build_head(reviews, student_config(t_model.config, 1, 32)),
                       task_outputs("single"), weights, [1])
    assert [tuple(p.weight.shape) for p in narrow.projections] == [(64, 32)] * 2
    narrow.loss(_batch(reviews, tok_dir)).backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0
               for p in narrow.projections)
    assert all(p.grad is None for p in t_model.parameters())  # the teacher stays frozen


def test_a_copy_of_the_teacher_has_zero_distillation_losses(teacher, tok_dir, reviews):
    t_model = from_pretrained(teacher)
    student = build_head(reviews, t_model.config)
    init_from_teacher(student, t_model, [0, 1])
    student.eval()
    distiller = Distiller(t_model, student, task_outputs("single"),
                          LossWeights(1.0, 0.0, 1.0, 1.0, 3.0), [0, 1])
    distiller.loss(_batch(reviews, tok_dir))
    assert set(distiller.parts) == {"soft", "hidden", "attention"}
    assert all(abs(v) < 1e-6 for v in distiller.parts.values()), distiller.parts
    # ... and a different student does not.
    other = build_head(reviews, t_model.config)
    distiller = Distiller(t_model, other.eval(), task_outputs("single"),
                          LossWeights(1.0, 0.0, 1.0, 1.0, 3.0), [0, 1])
    distiller.loss(_batch(reviews, tok_dir))
    assert set(distiller.parts) == {"soft", "hidden", "attention"}
    assert all(v > 1e-4 for v in distiller.parts.values()), distiller.parts


def test_capture_records_layers_and_matches_the_fast_path(teacher, tok_dir, reviews):
    model = from_pretrained(teacher).eval()
    batch = {k: v for k, v in _batch(reviews, tok_dir, n=4).items() if k != "labels"}
    plain = model(**batch).logits
    with capture_internals(model.backbone, attention=True) as rec:
        captured = model(**batch).logits
    assert torch.allclose(plain, captured, atol=1e-5)  # explicit softmax == SDPA
    B, L = batch["input_ids"].shape
    assert [tuple(h.shape) for h in rec.hidden] == [(B, L, 64)] * 3
    assert [tuple(p.shape) for p in rec.attention] == [(B, 4, L, L)] * 2
    real = batch["attention_mask"].bool()
    assert torch.allclose(rec.attention[0].sum(-1)[real[:, None, :].expand(B, 4, L)],
                          torch.ones(()), atol=1e-5)
    assert not any(b.attention.keep_probs for b in model.backbone.blocks)  # switched back off


def test_token_classification_distils(tmp_path, tok_dir):
    task = load_task("pd98-ner")
    tok = load_tokenizer(tok_dir)
    t_model = build_head(task, preset("tiny", vocab_size=tok.get_vocab_size(), **TINY))
    teacher = save_fine_tuned(t_model, task, tok, 48, tmp_path / "teacher")
    result = distill(teacher, tmp_path / "out", student_layers=1, alpha_hidden=1.0, seeds=[1],
                     epochs=1, batch_size=16, max_train=64, max_eval=32, baseline=False,
                     **typed("distill"))
    assert "baseline" not in result and "f1" in result["student"]["runs"][0]["dev"]
    assert result["student"]["runs"][0]["last_terms"]["soft"] > 0


def test_distill_corpus_runs_resumes_and_feeds_finetune(tmp_path, pd98_encoded, reviews):
    vocab = load_tokenizer(pd98_encoded).get_vocab_size()
    config = preset("tiny", vocab_size=vocab, **{**TINY, "hidden": 32, "heads": 2, "ffn": 64})
    teacher = save_pretrained(MaskedLM(config), tmp_path / "teacher")
    kwargs = typed("distill_corpus", student_layers=1, student_hidden=16, steps=6, batch_size=4,
                   seq_len=32, checkpoint_every=3, alpha_attention=1.0, alpha_hard=0.5)
    result = distill_corpus(teacher, pd98_encoded, tmp_path / "a", **kwargs)
    assert set(result["last_terms"]) == {"soft", "hard", "hidden", "attention"}
    assert result["final_loss"] < result["first_loss"]
    first = from_pretrained(tmp_path / "a" / "model").state_dict()
    # Kill after the step-3 checkpoint (simulated: drop what came after) and run again.
    import shutil

    shutil.rmtree(tmp_path / "a" / "model")
    checkpoints = tmp_path / "a" / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000006")
    (checkpoints / "latest").unlink()
    again = distill_corpus(teacher, pd98_encoded, tmp_path / "a", **kwargs)
    assert again["final_loss"] == pytest.approx(result["final_loss"], rel=1e-5)
    second = from_pretrained(tmp_path / "a" / "model").state_dict()
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)
    # The student is a checkpoint fine-tuning starts from.
    model, info, mlm = load_start(reviews, tmp_path / "a" / "model", "tiny", vocab)
    assert model.config.hidden == 16 and mlm
    with pytest.raises(UserError, match="other settings"):
        distill_corpus(teacher, pd98_encoded, tmp_path / "a", **{**kwargs, "steps": 7})


def test_mlm_outputs_match_the_head(pd98_encoded):
    vocab = load_tokenizer(pd98_encoded).get_vocab_size()
    model = MaskedLM(preset("tiny", vocab_size=vocab, **TINY)).eval()
    from motian.data.loader import LoaderConfig, PackedLoader

    batch = next(iter(PackedLoader(pd98_encoded, config=LoaderConfig(seq_len=32, batch_size=2))))
    hard, (logits,), _ = mlm_outputs(model, batch)
    out = model(**batch)
    assert torch.allclose(logits, out.logits, atol=1e-5) and torch.isclose(hard, out.loss)


def test_bad_inputs_are_refused(teacher, tmp_path):
    with pytest.raises(UserError, match="no task.json"):
        distill(teacher.parent, tmp_path / "x")
    with pytest.raises(UserError, match="fine-tuned on 'reviews-sentiment', not 'pd98-ner'"):
        distill(teacher, tmp_path / "x", task="pd98-ner")
    with pytest.raises(UserError, match="must not be bigger"):
        distill(teacher, tmp_path / "x", student_layers=3)
    with pytest.raises(UserError, match="must not be bigger"):
        distill(teacher, tmp_path / "x", student_hidden=128)
    with pytest.raises(UserError, match="out of range"):
        distill(teacher, tmp_path / "x", student_layers=1, layer_map="2")
    with pytest.raises(UserError, match="one per student layer"):
        distill(teacher, tmp_path / "x", student_layers=1, layer_map="0,1")
    with pytest.raises(UserError, match="no masked-LM head"):
        distill_corpus(teacher, tmp_path, tmp_path / "y")


def test_cli_distill(teacher, tmp_path, capsys):
    code = main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"),
                 "--student-layers", "1", "--seeds", "2", "--epochs", "0.2", "--max-train",
                 "64", "--max-eval", "32", "--no-baseline", "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "s" / "results.json").read_text("utf-8"))
    assert result["student"]["runs"][0]["seed"] == 2
    assert main(["distill", "--teacher", str(tmp_path), "--out", str(tmp_path / "t")]) != 0
    assert "no task.json" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["span", "choice"])
def test_span_and_choice_heads_distil(kind):
    """The other heads: start/end logits and candidate logits are matched; a copy matches."""
    task = Task(kind, kind)
    t_model = build_head(task, preset("tiny", vocab_size=100, **TINY)).eval()
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 12) if kind == "choice" else (3, 12)
    batch = {"input_ids": torch.randint(5, 100, shape, generator=g),
             "attention_mask": torch.ones(shape, dtype=torch.long),
             "token_type_ids": torch.zeros(shape, dtype=torch.long)}
    if kind == "choice":
        batch |= {"labels": torch.tensor([0, 1, 0]), "choice_mask": torch.ones(3, 2).bool()}
    else:
        batch |= {"start_positions": torch.tensor([1, 2, 3]),
                  "end_positions": torch.tensor([2, 4, 3])}
    weights = LossWeights(1.0, 1.0, 1.0, 1.0, 2.0)
    copy = build_head(task, t_model.config)
    init_from_teacher(copy, t_model, [0, 1])
    same = Distiller(t_model, copy.eval(), task_outputs(kind), weights, [0, 1])
    same.loss(batch)
    assert all(abs(same.parts[k]) < 1e-6 for k in ("soft", "hidden", "attention"))
    student = build_head(task, student_config(t_model.config, 1, 32))
    init_from_teacher(student, t_model, [1])
    loss = Distiller(t_model, student, task_outputs(kind), weights, [1]).loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and student.backbone.embeddings.word.weight.grad is not None
