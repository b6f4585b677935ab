"""The fine-tuning loop end to end with the real tiny model, real tokenizer and real files:
every task type learns its (small) training set, CLUE submissions are written, seeds are
summarised with the checkpoint hash, runs resume, and the techniques behave as specified."""

import json

import pytest
import torch

from motian.cli import main
from motian.finetuning import evaluate, finetune, load_start, load_task
from motian.io import sha256_file
from motian.model import MaskedLM, from_pretrained, preset, save_pretrained
from motian.model.heads import MLMHead
from motian.task_training import (
    aux_mlm_loss,
    frozen_parameters,
    layer_groups,
    mask_for_mlm,
    optimizer_groups,
    trainable_groups,
)
from motian.tasks.features import Featurizer, collate
from motian.tasks.heads import build_head
from motian.tasks.types import Example, Task
from tests.settings_helpers import typed
from tests.test_clue import jsonl
from tests.test_tasks import char_tokenizer

FAST = dict(epochs=30, batch_size=8, lr=2e-3, warmup=0.1, seeds=[1], progress=False)


def clue_dir(tmp_path, name, train, test, as_json=False):
    """A CLUE task folder whose dev file is its train file: the loop must learn it."""
    d = tmp_path / name
    d.mkdir()
    for split, records in (("train", train), ("dev", train), ("test", test)):
        if as_json:
            (d / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False), "utf-8")
        else:
            jsonl(d / f"{split}.json", records)
    return d


def test_single_sentence_learns_writes_submission_and_evaluates(tmp_path, reviews, vocab):
    pos, neg = reviews
    train = [{"sentence": t, "label": "101"} for t in pos] + \
        [{"sentence": t, "label": "100"} for t in neg]
    test = [{"id": i, "sentence": t} for i, t in enumerate(pos[:3] + neg[:3])]
    d = clue_dir(tmp_path, "tnews", train, test)
    result = finetune("tnews", tmp_path / "run", tokenizer=vocab, data=d, **typed(**FAST))
    run = result["runs"][0]
    assert run["dev"]["accuracy"] >= 0.9
    lines = [json.loads(x) for x in open(run["test_submission"], encoding="utf-8")]
    assert [x["id"] for x in lines] == list(range(6))
    assert all(x["label"] in ("100", "101") for x in lines)
    again = evaluate(tmp_path / "run" / "seed-1" / "model", split="dev", data=d)
    assert again["scores"] == pytest.approx(run["dev"])


def test_pair_token_span_and_choice_learn(tmp_path, reviews, ner_sentences, vocab):
    pos, neg = reviews
    pairs = [{"sentence1": a, "sentence2": b, "label": "1"} for a, b in zip(pos, pos[1:])] + \
        [{"sentence1": a, "sentence2": b, "label": "0"} for a, b in zip(pos, neg)]
    types = {"PER": "name", "LOC": "address", "ORG": "organization"}
    ner = [{"text": e.text, "label": {}} for e in ner_sentences]
    for record, e in zip(ner, ner_sentences):
        for s, t, kind in e.entities:
            record["label"].setdefault(types[kind], {}).setdefault(e.text[s:t], []).append(
                [s, t - 1])
    qa = {"data": [{"paragraphs": [{"context": t, "qas": [{
        "id": f"q{i}", "question": "好吗", "answers": [{"text": t[2:5], "answer_start": 2}]}]}
        for i, t in enumerate(pos[:8])]}]}
    c3 = []  # pick the positive snippet among 2 or 3 (padding), in either position
    for i in range(12):
        choices = [pos[i][:12], neg[i][:12]][::(-1) ** i] + ([neg[i - 1][:12]] if i % 3 == 0
                                                              else [])
        c3.append([["评论"], [{"question": "哪条是好评", "choice": choices,
                              "answer": pos[i][:12]}], str(i)])
    cases = [("afqmc", clue_dir(tmp_path, "afqmc", pairs, pairs[:2]), "accuracy", 0.9),
             ("cluener", clue_dir(tmp_path, "cluener", ner, ner[:2]), "f1", 0.6),
             ("cmrc2018", clue_dir(tmp_path, "cmrc", qa, qa, as_json=True), "f1", 0.6),
             ("c3", _c3_dir(tmp_path, c3), "accuracy", 0.9)]
    for name, d, metric, floor in cases:
        settings = {**FAST, "epochs": 60} if name in ("cluener", "cmrc2018") else FAST
        result = finetune(name, tmp_path / f"run-{name}", tokenizer=vocab, data=d,
                          save_model=False, **typed(**settings))
        assert result["runs"][0]["dev"][metric] >= floor, (name, result["runs"][0])


def _c3_dir(tmp_path, c3):
    d = tmp_path / "c3"
    d.mkdir()
    for name in ("d-train.json", "d-dev.json"):
        (d / name).write_text(json.dumps(c3, ensure_ascii=False), "utf-8")
    return d


def test_seeds_checkpoint_hash_and_resume(tmp_path, reviews, vocab, capsys):
    pos, neg = reviews
    config = preset("tiny", vocab_size=512)
    ckpt = save_pretrained(MaskedLM(config), tmp_path / "ckpt")
    train = [{"sentence": t, "label": "101"} for t in pos] + \
        [{"sentence": t, "label": "100"} for t in neg]
    d = clue_dir(tmp_path, "tnews", train, [])
    settings = {**FAST, "epochs": 1, "seeds": [1, 2]}
    out = tmp_path / "run"
    result = finetune("tnews", out, model=ckpt, tokenizer=vocab, data=d, **typed(**settings))
    sha = sha256_file(ckpt / "model.safetensors")
    assert result["model"]["sha256"] == sha and result["config"]["model_sha256"] == sha
    assert [r["seed"] for r in result["runs"]] == [1, 2]
    mean, std, n = result["summary"]["dev"]["accuracy"]
    assert n == 2 and std >= 0
    table = (out / "results.md").read_text("utf-8")
    assert "| dev | accuracy |" in table and sha[:16] in table
    stamp = (out / "seed-1" / "result.json").stat().st_mtime_ns
    again = finetune("tnews", out, model=ckpt, tokenizer=vocab, data=d, **typed(**settings))
    assert again["runs"] == result["runs"]
    assert (out / "seed-1" / "result.json").stat().st_mtime_ns == stamp
    assert "finished earlier" in capsys.readouterr().err
    task = load_task("tnews", d)
    loaded, info, mlm = load_start(task, ckpt, "tiny", 469)
    control, control_info, _ = load_start(task, ckpt, "tiny", 469, random_init=True)
    saved = from_pretrained(ckpt)
    assert torch.equal(loaded.backbone.embeddings.word.weight, saved.backbone.embeddings.word.weight)
    assert torch.equal(mlm["bias"], saved.mlm.bias)  # for the auxiliary MLM head
    assert control.config == loaded.config and "sha256" not in control_info
    assert not torch.equal(control.backbone.embeddings.word.weight,
                           saved.backbone.embeddings.word.weight)


def test_layer_decay_and_unfreezing(tmp_path):
    model = build_head(Task("t", "single", labels=["a", "b"]), preset("tiny", vocab_size=50))
    groups = optimizer_groups(model, 0.01, 0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.125, 0.25, 0.5, 1.0]  # embeddings, block 0, block 1, head (2 layers)
    emb = model.backbone.embeddings.word.weight
    assert next(g["lr_scale"] for g in groups if any(p is emb for p in g["params"])) == 0.125
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())
    n = len(layer_groups(model))
    assert trainable_groups(n, 0.0, 0.5) == 1
    frozen = {id(p) for p in frozen_parameters(model, 0.0, 0.5)}
    assert id(emb) in frozen and id(model.head.classifier.weight) not in frozen
    # 4 groups: group k from the top opens at k/3 of the unfreezing phase (0.5 of training)
    assert trainable_groups(n, 0.17, 0.5) == 2 and trainable_groups(n, 0.34, 0.5) == 3
    assert trainable_groups(n, 0.5, 0.5) == n and not frozen_parameters(model, 0.5, 0.5)
    assert trainable_groups(n, 0.0, 0.0) == n  # off


def test_unfreezing_keeps_embeddings_until_the_end(tmp_path, reviews, vocab):
    pos, neg = reviews
    train = [{"sentence": t, "label": "101"} for t in pos[:4]] + \
        [{"sentence": t, "label": "100"} for t in neg[:4]]
    d = clue_dir(tmp_path, "tnews", train, [])
    config = preset("tiny", vocab_size=512)
    ckpt = save_pretrained(MaskedLM(config), tmp_path / "ckpt")
    finetune("tnews", tmp_path / "run", model=ckpt, tokenizer=vocab, data=d,
             **typed(**{**FAST, "epochs": 4, "batch_size": 2, "unfreeze": 1.0}))
    start = from_pretrained(ckpt)
    tuned = from_pretrained(tmp_path / "run" / "seed-1" / "model")
    # embeddings open only when progress reaches 1: they never train; the top block does
    assert torch.equal(tuned.backbone.embeddings.word.weight,
                       start.backbone.embeddings.word.weight)
    assert not torch.equal(tuned.backbone.blocks[-1].ffn_norm.weight,
                           start.backbone.blocks[-1].ffn_norm.weight)


def test_aux_mlm_masks_only_real_tokens_and_trains_backbone(tmp_path, reviews, vocab):
    tok, special = char_tokenizer(tmp_path, reviews[0])
    task = Task("t", "single", labels=["a", "b"])
    features = Featurizer(task, tok, special, 64)(
        [Example(str(i), t, label=0) for i, t in enumerate(reviews[0][:8])])
    batch = collate("single", features, special["pad"])
    gen = torch.Generator().manual_seed(0)
    masked, positions, labels = mask_for_mlm(batch["input_ids"], batch["attention_mask"],
                                             special, tok.get_vocab_size(), 0.5, gen)
    flat = batch["input_ids"].reshape(-1)
    assert not torch.isin(flat[positions], torch.tensor([special["cls"], special["sep"],
                                                         special["pad"]])).any()
    assert torch.equal(labels, flat[positions]) and len(positions) > 0
    model = build_head(task, preset("tiny", vocab_size=tok.get_vocab_size()))
    mlm = MLMHead(model.config)
    loss = aux_mlm_loss(model, mlm, batch, special, 0.15, gen)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(
        float(tok.get_vocab_size())))) < 1.5  # an untrained LM is near uniform
    loss.backward()
    assert model.backbone.blocks[0].ffn_norm.weight.grad is not None


def test_cli_runs_bundled_task_and_reports_errors(tmp_path, vocab, capsys):
    for task in ("reviews-sentiment", "pd98-ner"):
        out = tmp_path / task
        code = main(["finetune", "--task", task, "--out", str(out), "--tokenizer", str(vocab),
                     "--seeds", "1", "--epochs", "1", "--max-train", "64", "--max-eval", "32",
                     "--no-progress", "--layer-lr-decay", "0.8", "--aux-mlm", "0.5"])
        assert code == 0
        result = json.loads((out / "results.json").read_text("utf-8"))
        assert result["task"]["sizes"]["train_used"] == 64 and "test" in result["runs"][0]
        assert result["config"]["aux_mlm"] == 0.5 and result["config"]["layer_lr_decay"] == 0.8
        assert main(["evaluate", "--model", str(out / "seed-1" / "model"), "--split", "test",
                     "--max-eval", "32"]) == 0
        assert (out / "seed-1" / "model" / f"{task}_test_predictions.jsonl").is_file()
    assert main(["finetune", "--task", "glue", "--out", str(out)]) == 1
    assert "unknown task 'glue'" in capsys.readouterr().err


# --------------------------------------------------------------------------- tokenizer discovery


def test_finetune_finds_the_tokenizer_of_a_pretraining_run(tmp_path, pd98_encoded):
    import shutil

    from motian.errors import UserError
    from motian.model.artifact import find_tokenizer
    from motian.pretraining import pretrain_recipe
    from motian.train.checkpoint import latest_checkpoint
    from motian.train.metrics import read_metrics
    from motian.train.recipe import RunSettings, load_recipe
    from tests.pretrain_helpers import write_recipe

    data = tmp_path / "enc"  # a copy whose manifest can be edited
    shutil.copytree(pd98_encoded, data)
    trained_with = pd98_encoded.parent / "tok" / "tokenizer.json"
    recipe = load_recipe(write_recipe(tmp_path, steps=4, eval_every=0, checkpoint_every=2,
                                      pair_task="none"))
    run = tmp_path / "run"
    pretrain_recipe(recipe, RunSettings(device="cpu", threads=1, progress=False), data, run)
    # pretraining left the tokenizer it was fed in the run and in final/
    assert (run / "final" / "tokenizer.json").read_bytes() == trained_with.read_bytes()
    assert find_tokenizer(run / "final") == (run / "final").resolve()
    checkpoint = latest_checkpoint(run)
    assert find_tokenizer(checkpoint) == run.resolve()
    # without the copy, run.json's data leads to the encoded shards' own tokenizer ...
    (run / "tokenizer.json").unlink()
    assert find_tokenizer(checkpoint) == trained_with
    # ... or, where their manifest names a tokenizer that is gone, to their vocab.txt
    manifest = json.loads((data / "manifest.json").read_text("utf-8"))
    (data / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "/gone"}), "utf-8")
    assert find_tokenizer(checkpoint) == data.resolve() / "vocab.txt"
    # a bare model directory: a clear error naming the option to pass
    lonely = tmp_path / "lonely"
    shutil.copytree(checkpoint, lonely)
    with pytest.raises(UserError, match="pass --tokenizer"):
        find_tokenizer(lonely)

    # the CLI call the demo makes, with LAMB for once; one metrics record per step
    out = tmp_path / "ft"
    assert main(["finetune", "--task", "reviews-sentiment", "--model", str(run / "final"),
                 "--out", str(out), "--seeds", "1", "--epochs", "1", "--batch-size", "8",
                 "--max-train", "24", "--max-eval", "16", "--max-length", "32",
                 "--optimizer", "lamb", "--lr", "1e-3", "--no-save-model",
                 "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text("utf-8"))
    assert result["config"]["tokenizer"] == str((run / "final").resolve())
    assert result["config"]["optimizer"] == "lamb" and result["runs"][0]["precision"] == "fp32"
    records = read_metrics(out / "seed-1" / "metrics.jsonl", "finetune")
    assert not (out / "seed-1" / "checkpoints").exists()  # a finished seed keeps no checkpoints
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["lr"] > 0 and records[-1]["lr"] == 0  # linear decay to 0
    assert all(r["grad_norm"] > 0 and r["skipped"] == 0 for r in records)
    assert records[-1]["loss"] == pytest.approx(result["runs"][0]["final_loss"])


# --------------------------------------------------------------------------- defaults by model


def test_lr_and_pooling_follow_the_checkpoint_unless_given(tmp_path, reviews, vocab, capsys):
    """Without --lr / --pooling, a run on a narrow MLM-only checkpoint trains at 1e-3 with
    mean pooling, says so in one stderr line and stores the choice (results.json, results.md,
    the resolved settings and the saved model); given values are kept and nothing is said."""
    from motian.task_training import TaskTraining
    from motian.train.settings import OptimSettings, RunSettings

    pos, neg = reviews
    train = [{"sentence": t, "label": "101"} for t in pos] + \
        [{"sentence": t, "label": "100"} for t in neg]
    d = clue_dir(tmp_path, "tnews", train, [])
    mlm = save_pretrained(MaskedLM(preset("tiny", vocab_size=512, hidden=32, heads=4, ffn=64)),
                          tmp_path / "mlm")
    quick = dict(seeds=[1], training=TaskTraining(epochs=1, batch_size=8),
                 run=RunSettings(progress=False))
    result = finetune("tnews", tmp_path / "auto", model=mlm, tokenizer=vocab, data=d, **quick)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("motian: chose")]
    assert len(lines) == 1
    assert "lr 0.001 (hidden 32, 2 layers" in lines[0]
    assert "pooling mean (MLM-only pretraining never trained [CLS])" in lines[0]
    assert result["config"]["lr"] == 1e-3
    assert result["config"]["model_overrides"] == {"classifier_pooling": "mean"}
    assert {k: v["chosen"] for k, v in result["defaults"].items()} == {"lr": "auto",
                                                                       "pooling": "auto"}
    saved = json.loads((tmp_path / "auto" / "results.json").read_text("utf-8"))
    assert saved["defaults"] == result["defaults"]
    assert "- chosen for this model (not given): lr 0.001 (hidden 32" in \
        (tmp_path / "auto" / "results.md").read_text("utf-8")
    tuned = from_pretrained(tmp_path / "auto" / "seed-1" / "model")
    assert tuned.config.classifier_pooling == "mean"
    given = finetune("tnews", tmp_path / "given", model=mlm, tokenizer=vocab, data=d,
                     pooling="cls", optim=OptimSettings(lr=5e-5), save_model=False, **quick)
    assert "motian: chose" not in capsys.readouterr().err
    assert given["config"]["lr"] == 5e-5
    assert given["config"]["model_overrides"] == {"classifier_pooling": "cls"}
    assert {v["chosen"] for v in given["defaults"].values()} == {"given"}


def test_defaults_read_size_and_what_pretraining_trained(tmp_path):
    """The rate falls with the width; [CLS] is read only where a pair task trained it and the
    model is at least 256 wide (motian's PreTrainingModel; a Hugging Face BERT whose pooler
    was saved, i.e. next-sentence prediction); token tasks get no pooling; a negative rate
    is refused."""
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    from motian.errors import UserError
    from motian.finetuning import choose_defaults
    from motian.model import PreTrainingModel

    def saved(cls, name, **kw):
        return save_pretrained(cls(preset("tiny", vocab_size=99, **kw)), tmp_path / name)

    def chosen(task_type, model, random_init=False):
        c = choose_defaults(task_type, model, "tiny", 99, random_init, 0.0, None)
        return c["lr"]["value"], c.get("pooling", {}).get("value"), c

    narrow_pair = saved(PreTrainingModel, "narrow", hidden=32, heads=4, ffn=64)
    wide_pair = saved(PreTrainingModel, "wide", hidden=256, heads=4, ffn=256, layers=1)
    wide_mlm = saved(MaskedLM, "wide-mlm", hidden=256, heads=4, ffn=256, layers=1)
    assert chosen("pair", narrow_pair)[:2] == (1e-3, "mean")
    assert "trained by a pair task, but below hidden 256" in \
        chosen("pair", narrow_pair)[2]["pooling"]["why"]
    assert chosen("single", wide_pair)[:2] == (3e-4, "cls")
    assert chosen("choice", wide_mlm)[:2] == (3e-4, "mean")
    assert chosen("token", wide_pair)[1] is None
    assert "keeps the checkpoint's settings" in chosen("single", wide_pair, True)[2][
        "pooling"]["why"]
    assert chosen("single", None)[:2] == (1e-3, "cls")  # random init of the tiny preset
    bert = BertConfig(vocab_size=99, hidden_size=256, num_hidden_layers=1,
                      num_attention_heads=4, intermediate_size=256)
    BertForPreTraining(bert).save_pretrained(tmp_path / "bert-nsp")
    BertForMaskedLM(bert).save_pretrained(tmp_path / "bert-mlm")
    assert chosen("single", tmp_path / "bert-nsp")[:2] == (3e-4, "cls")
    assert chosen("single", tmp_path / "bert-mlm")[:2] == (3e-4, "mean")
    with pytest.raises(UserError, match="--lr -1"):
        choose_defaults("single", None, "tiny", 99, False, -1.0, None)
