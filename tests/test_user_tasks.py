"""The user's own labelled files (text-classification, text-pair, ner): each fine-tunes end to
end on real bundled text with the real tokenizer and tiny model, predictions of an unlabelled
test file come back under the user's label names (also through `motian predict`), and bad files
are refused with file:line."""

import json

import pytest

from motian.cli import main
from motian.errors import UserError
from motian.finetuning import evaluate, finetune, load_task
from motian.serving.predict import predict
from tests.settings_helpers import typed
from tests.test_clue import jsonl
from tests.test_finetune import FAST


def task_dir(tmp_path, name, train, test):
    """train.jsonl = dev.jsonl (the loop must learn it) and an unlabelled test.jsonl."""
    d = tmp_path / name
    d.mkdir()
    for split, records in (("train", train), ("dev", train), ("test", test)):
        jsonl(d / f"{split}.jsonl", records)
    return d


def test_text_classification_learns_and_predicts_label_names(tmp_path, reviews, vocab, capsys):
    pos, neg = reviews
    train = [{"text": t, "label": "好评"} for t in pos] + [{"text": t, "label": "差评"} for t in neg]
    test = [{"id": f"r{i}", "text": t} for i, t in enumerate(pos[:3] + neg[:3])]
    d = task_dir(tmp_path, "mine", train, test)
    task = load_task("text-classification", d)
    assert task.labels == sorted(["好评", "差评"])  # sorted: the same files, the same indices
    assert task.sizes() == {"train": 24, "dev": 24, "test": 6}
    result = finetune("text-classification", tmp_path / "run", tokenizer=vocab, data=d, **typed(**FAST))
    run = result["runs"][0]
    assert run["dev"]["accuracy"] >= 0.9
    lines = [json.loads(x) for x in open(run["test_predictions"], encoding="utf-8")]
    assert [x["id"] for x in lines] == [f"r{i}" for i in range(6)]
    assert [x["label"] for x in lines] == ["好评"] * 3 + ["差评"] * 3
    model = tmp_path / "run" / "seed-1" / "model"
    assert evaluate(model, split="dev", data=d)["scores"] == pytest.approx(run["dev"])
    inputs = tmp_path / "in.jsonl"
    jsonl(inputs, [{"id": 1, "text": pos[0]}, {"id": 2, "text": neg[0]}])
    predict(model, inputs, tmp_path / "out.jsonl")
    out = [json.loads(x) for x in open(tmp_path / "out.jsonl", encoding="utf-8")]
    assert [x["label"] for x in out] == ["好评", "差评"]


def test_mean_pooling_is_kept_with_the_fine_tuned_model(tmp_path, reviews, vocab):
    """--pooling mean trains a mean-pooled head, saves it with the model, and evaluate /
    predict (which rebuild the model from its directory) score it the same way; --dropout
    reaches the model, and a bad value is refused."""
    pos, neg = reviews
    train = [{"text": t, "label": "好评"} for t in pos] + [{"text": t, "label": "差评"} for t in neg]
    d = task_dir(tmp_path, "mine", train, train[:2])
    result = finetune("text-classification", tmp_path / "run", tokenizer=vocab, data=d,
                      pooling="mean", **typed(**FAST))
    run = result["runs"][0]
    assert run["dev"]["accuracy"] >= 0.9
    assert result["config"]["model_overrides"] == {"classifier_pooling": "mean"}
    model = tmp_path / "run" / "seed-1" / "model"
    saved = json.loads((model / "config.json").read_text("utf-8"))
    assert saved["model"]["classifier_pooling"] == "mean"
    assert evaluate(model, split="dev", data=d)["scores"] == pytest.approx(run["dev"])
    result = finetune("text-classification", tmp_path / "run-dropout", tokenizer=vocab, data=d,
                      dropout=0.3, save_model=True, **typed(**{**FAST, "epochs": 1}))
    saved = json.loads((tmp_path / "run-dropout" / "seed-1" / "model" / "config.json")
                       .read_text("utf-8"))["model"]
    assert saved["dropout"] == saved["attention_dropout"] == 0.3
    with pytest.raises(UserError, match="dropout and attention_dropout must be in"):
        finetune("text-classification", tmp_path / "run-bad", tokenizer=vocab, data=d,
                 dropout=1.5, **typed(**FAST))


def test_text_pair_and_ner_learn(tmp_path, reviews, ner_sentences, vocab):
    pos, neg = reviews
    pairs = [{"text_a": a, "text_b": b, "label": "same"} for a, b in zip(pos, pos[1:])] + \
        [{"text_a": a, "text_b": b, "label": "different"} for a, b in zip(pos, neg)]
    ner = [{"text": e.text, "entities": [[s, t, kind] for s, t, kind in e.entities]}
           for e in ner_sentences]
    cases = [("text-pair", task_dir(tmp_path, "pairs", pairs, pairs[:2]), "accuracy", 0.9,
              FAST),
             ("ner", task_dir(tmp_path, "ner", ner, [{"text": x["text"]} for x in ner[:2]]),
              "f1", 0.6, {**FAST, "epochs": 60})]
    for name, d, metric, floor, settings in cases:
        result = finetune(name, tmp_path / f"run-{name}", tokenizer=vocab, data=d,
                          save_model=False, **typed(**settings))
        run = result["runs"][0]
        assert run["dev"][metric] >= floor, (name, run)
        lines = [json.loads(x) for x in open(run["test_predictions"], encoding="utf-8")]
        assert len(lines) == 2
    assert load_task("ner", tmp_path / "ner").labels == sorted(
        {kind for e in ner_sentences for _, _, kind in e.entities})
    entities = json.loads(open(tmp_path / "run-ner" / "seed-1" /
                               "ner_test_predictions.jsonl", encoding="utf-8").readline())
    assert entities["entities"] and all(len(x) == 3 for x in entities["entities"])


@pytest.mark.parametrize("name,train,dev,message", [
    ("text-classification", [{"text": "好", "label": "a"}, {"text": "差", "label": "b"}],
     [{"text": "还行", "label": "c"}], r"dev.jsonl:1: label 'c' never occurs in the training"),
    ("text-classification", [{"text": "好", "label": "a"}, {"text": "差"}], [],
     r"train.jsonl:2: missing field 'label'"),
    ("text-classification", [{"text": "好", "label": "a"}, {"text": "差", "label": "a"}], [],
     "only 1 distinct label"),
    ("text-pair", [{"text_a": "好", "label": "a"}, {"text_a": "差", "text_b": "坏", "label": "b"}],
     [], r"train.jsonl:1: missing field 'text_b'"),
    ("ner", [{"text": "北京", "entities": [[0, 3, "LOC"]]}], [],
     r"train.jsonl:1: entity \[0, 3, 'LOC'\] is outside the text of 2 characters"),
    ("ner", [{"text": "北京", "entities": [[0, 2, "LOC"]]}],
     [{"text": "上海", "entities": [[0, 2, "GPE"]]}], r"dev.jsonl:1: entity type 'GPE' never"),
])
def test_bad_files_name_file_and_line(tmp_path, name, train, dev, message):
    d = tmp_path / "bad"
    d.mkdir()
    jsonl(d / "train.jsonl", train)
    jsonl(d / "dev.jsonl", dev)
    with pytest.raises(UserError, match=message):
        load_task(name, d)


def test_missing_files_and_cli_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="no train.jsonl"):
        load_task("text-classification", tmp_path)
    with pytest.raises(UserError, match="give --data DIR"):
        load_task("ner", None)
    (tmp_path / "train.jsonl").write_text('{"text": "好", "label": "a"}\n{"text": 差}\n',
                                          encoding="utf-8")
    assert main(["finetune", "--task", "text-classification", "--data", str(tmp_path),
                 "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 1
    assert "train.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_missing_dev_file_fails_before_training_naming_it(tmp_path, reviews, vocab, capsys):
    """No dev.jsonl (or an empty one) is an error naming the file and what to do, raised
    before anything is trained or written; so is a run whose dev and test carry no labels."""
    pos, neg = reviews
    d = tmp_path / "my_task"
    d.mkdir()
    jsonl(d / "train.jsonl", [{"text": t, "label": "好评"} for t in pos] +
          [{"text": t, "label": "差评"} for t in neg])
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"my_task/dev.jsonl: not found; .*labelled data"):
        finetune("text-classification", out, tokenizer=vocab, data=d, **typed(**FAST))
    assert not list(out.glob("seed-*")) and not (out / "results.json").exists()  # no training
    (d / "dev.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"my_task/dev.jsonl: has no records"):
        finetune("text-classification", out, tokenizer=vocab, data=d, **typed(**FAST))
    jsonl(d / "dev.jsonl", [{"text": pos[0]}])  # unlabelled dev, no test: nothing to score
    with pytest.raises(UserError, match="nothing to score"):
        finetune("text-classification", out, tokenizer=vocab, data=d, **typed(**FAST))
    (d / "dev.jsonl").unlink()
    assert main(["finetune", "--task", "text-classification", "--data", str(d), "--out",
                 str(out), "--tokenizer", str(vocab), "--no-progress"]) == 1
    assert "dev.jsonl: not found" in capsys.readouterr().err


def test_own_task_name_titles_results_card_files_and_report(tmp_path, reviews, vocab):
    """Own tasks are named after their data directory (or --name): in results.json/md, the
    task card, the prediction files; `evaluate` reads the card's format back; two datasets
    of one format are two groups in the downstream report, each with its majority-class
    floor (the most frequent training label, 2:1 here) beside the seeds' scores."""
    from motian.model.artifact import TaskCard
    from motian.reporting.run import MAJORITY_ARM, read_downstream

    pos, neg = reviews
    train = [{"text": t, "label": "好评"} for t in pos] + \
        [{"text": t, "label": "差评"} for t in neg[:6]]
    product = task_dir(tmp_path, "product_reviews", train, [{"text": pos[0]}])
    hotel = task_dir(tmp_path, "hotel", train[:16], [{"text": neg[0]}])
    a = finetune("text-classification", tmp_path / "a", tokenizer=vocab, data=product,
                 **typed(**{**FAST, "epochs": 2}))
    b = finetune("text-classification", tmp_path / "b", tokenizer=vocab, data=hotel,
                 name="hotel-v2", save_model=False, **typed(**{**FAST, "epochs": 2}))
    assert a["task"]["name"] == "product_reviews" and b["task"]["name"] == "hotel-v2"
    assert a["task"]["format"] == "text-classification"
    assert a["majority_class"]["label"] == "好评"
    assert a["majority_class"]["train_share"] == pytest.approx(12 / 18)
    assert a["majority_class"]["dev"]["accuracy"] == pytest.approx(12 / 18)
    page = (tmp_path / "a" / "results.md").read_text("utf-8")
    assert page.startswith("# product_reviews — fine-tuning results")
    assert "| dev | accuracy, majority class (好评) | 66.67 | — |" in page
    model = tmp_path / "a" / "seed-1" / "model"
    card = TaskCard.read(model)
    assert (card.name, card.format) == ("product_reviews", "text-classification")
    assert (tmp_path / "a" / "seed-1" / "product_reviews_test_predictions.jsonl").is_file()
    assert evaluate(model, split="dev", data=product)["task"] == "product_reviews"
    rows = read_downstream({"pretrained/a": tmp_path / "a", "pretrained/b": tmp_path / "b"})
    assert {r.task for r in rows} == {"product_reviews", "hotel-v2"}
    floor = [r for r in rows if r.arm == MAJORITY_ARM and r.metric == "accuracy"]
    assert {(r.task, round(r.mean, 4)) for r in floor} == {("product_reviews", 0.6667),
                                                           ("hotel-v2", 0.75)}
    with pytest.raises(UserError, match="--name 'a/b': use letters"):
        load_task("text-classification", product, own_name="a/b")
    with pytest.raises(UserError, match="only your own tasks take a name"):
        load_task("reviews-sentiment", own_name="mine")
