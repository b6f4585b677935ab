"""The artifact layer: what a model path can be (model directory, checkpoint, training run,
Hugging Face BERT), the task card of a fine-tuned model and the tokenizer found along a model's
provenance, on real tiny files; and the layering it exists for (serving imports no training)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from motian.data.tokenizer import encoded_tokenizer, load_tokenizer
from motian.errors import UserError
from motian.io import sha256_file, write_json_atomic
from motian.model import MaskedLM, SequenceClassification, preset, save_pretrained
from motian.model.artifact import (
    TaskCard,
    find_tokenizer,
    is_hf_bert,
    load_backbone_state,
    load_task_model,
    resolve_model_dir,
)
from motian.model.hf import export_hf
from motian.train.checkpoint import latest_checkpoint, save_checkpoint

CONFIG = dict(vocab_size=64, hidden=32, heads=2, ffn=64, layers=2, max_positions=64)


def tiny_lm() -> MaskedLM:
    torch.manual_seed(0)
    return MaskedLM(preset("tiny", **CONFIG))


def tiny_run(run, steps=(2, 4), final=True):
    """A pretraining run as `motian pretrain` lays it out: checkpoints/step-N, final/, run.json."""
    model = tiny_lm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        save_checkpoint(run, step, model, optimizer, {})
    if final:
        save_pretrained(model, run / "final")
    write_json_atomic(run / "run.json", {"data": None})
    return run


# --------------------------------------------------------------------------- model paths


def test_resolve_model_dir_takes_model_checkpoint_and_run(tmp_path):
    model_dir = save_pretrained(tiny_lm(), tmp_path / "model")
    assert resolve_model_dir(model_dir) == model_dir
    run = tiny_run(tmp_path / "run")
    step = run / "checkpoints" / "step-00000004"
    assert resolve_model_dir(step) == step
    assert resolve_model_dir(run) == step == latest_checkpoint(run)  # the run's last step
    only_final = tiny_run(tmp_path / "copied", steps=())
    assert resolve_model_dir(only_final) == only_final / "final"


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_resolve_model_dir_names_the_path_and_what_to_give(tmp_path, make):
    path = tmp_path / "not-a-model"
    if make == "empty":
        path.mkdir()
        (path / "checkpoints" / "step-00000001").mkdir(parents=True)  # incomplete: no name
    with pytest.raises(UserError) as e:
        resolve_model_dir(path)
    message = str(e.value)
    assert message.startswith(str(path)) and "training run directory" in message
    assert ("does not exist" in message) == (make == "missing")


def test_is_hf_bert_and_load_backbone_state_read_both_kinds(tmp_path):
    model = tiny_lm()
    motian_dir = save_pretrained(model, tmp_path / "motian")
    bert_dir = export_hf(model, tmp_path / "bert")  # BERT-shaped: written as native BERT
    assert is_hf_bert(bert_dir) and not is_hf_bert(motian_dir)
    assert not is_hf_bert(tmp_path / "nowhere")
    ours, theirs = load_backbone_state(motian_dir), load_backbone_state(bert_dir)
    assert ours.config == model.config and ours.weights == motian_dir / "model.safetensors"
    assert ours.description == f"motian checkpoint {motian_dir}"
    assert theirs.weights == bert_dir / "model.safetensors"
    assert theirs.description.startswith("Hugging Face BERT")
    assert all(k.startswith(("backbone.", "mlm.")) for k in ours.state)
    for key in ("backbone.embeddings.word.weight", "mlm.bias"):
        assert torch.equal(ours.state[key], theirs.state[key])
    # a run resolves to its latest checkpoint; the hash taken is of that file
    run = tiny_run(tmp_path / "run")
    state = load_backbone_state(run)
    assert state.weights == latest_checkpoint(run) / "model.safetensors"
    assert len(sha256_file(state.weights)) == 64


# --------------------------------------------------------------------------- task card


def test_task_card_round_trip_and_task_model(tmp_path):
    model = SequenceClassification(preset("tiny", **CONFIG), num_labels=2)
    directory = save_pretrained(model, tmp_path / "ft" / "seed-1" / "model")
    card = TaskCard("reviews-sentiment", "single", ["negative", "positive"], max_length=64)
    card.write(directory)
    assert TaskCard.read(directory) == card
    assert json.loads((directory / "task.json").read_text("utf-8"))["labels"] == card.labels
    card.check_labels(["negative", "positive"], directory)
    with pytest.raises(UserError, match="trained with labels .* but the task now has"):
        card.check_labels(["positive", "negative"], directory)
    loaded, read = load_task_model(directory)
    assert read == card and type(loaded).__name__ == "SequenceClassification"


def test_missing_or_broken_task_card_is_a_clear_error(tmp_path):
    directory = save_pretrained(tiny_lm(), tmp_path / "ft" / "seed-1" / "model")
    assert TaskCard.read_optional(directory) is None  # a model that was not fine-tuned
    with pytest.raises(UserError, match="no task.json; give a model directory written by "
                                        "`motian finetune`") as e:
        TaskCard.read(directory)
    assert str(e.value).startswith(str(directory))
    TaskCard("pd98-ner", "token", ["PER", "LOC"], max_length=32).write(directory)
    with pytest.raises(UserError, match=r"e\.g\. .*seed-1.model"):  # the run: name a seed
        TaskCard.read(tmp_path / "ft")
    (directory / "task.json").write_text('{"name": "x",\n "type": }', encoding="utf-8")
    with pytest.raises(UserError, match="task.json:2: not valid JSON"):
        TaskCard.read(directory)


# --------------------------------------------------------------------------- tokenizer


def test_find_tokenizer_follows_the_model_provenance(tmp_path, vocab):
    tokenizer_json = tmp_path / "tok" / "tokenizer.json"
    tokenizer_json.parent.mkdir()
    load_tokenizer(vocab).save(str(tokenizer_json))
    data = tmp_path / "enc"  # encoded shards: vocab.txt beside them, manifest names the tokenizer
    data.mkdir()
    (data / "vocab.txt").write_bytes(vocab.read_bytes())
    write_json_atomic(data / "manifest.json", {"tokenizer": str(tokenizer_json.parent)})
    assert encoded_tokenizer(data) == tokenizer_json

    run = tiny_run(tmp_path / "run")
    write_json_atomic(run / "run.json", {"data": str(data)})
    checkpoint = latest_checkpoint(run)
    given = tmp_path / "given.txt"
    assert find_tokenizer(checkpoint, given) == given  # given: taken as is
    assert find_tokenizer(checkpoint) == tokenizer_json  # run.json -> data -> its tokenizer
    write_json_atomic(data / "manifest.json", {"tokenizer": "/gone"})
    assert find_tokenizer(run / "final") == data.resolve() / "vocab.txt"
    (run / "vocab.txt").write_bytes(vocab.read_bytes())  # the copy `motian pretrain` makes
    assert find_tokenizer(checkpoint) == find_tokenizer(run) == run.resolve()
    (run / "final" / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    assert find_tokenizer(run / "final") == (run / "final").resolve()

    lonely = save_pretrained(tiny_lm(), tmp_path / "lonely")
    with pytest.raises(UserError, match="lonely: found no tokenizer.*pass --tokenizer"):
        find_tokenizer(lonely)
    with pytest.raises(UserError, match="needs --tokenizer"):
        find_tokenizer(None)


# --------------------------------------------------------------------------- layering


def test_serving_and_the_artifact_layer_import_no_training_code():
    code = ("import sys, motian.model.artifact, motian.serving.predict, motian.serving.export;"
            "print(' '.join(m for m in sys.modules if m.startswith(('motian.train', "
            "'motian.finetuning', 'motian.distillation', 'motian.task_training'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
