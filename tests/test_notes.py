"""Taking Notes on the Fly (motian.data.rare_words, motian.model.notes, motian.train.notes):
rare words counted from shards, their whole occurrences in a hand-built batch, the note window
and update rule by hand, notes in the input embedding, an end-to-end run through the API with
fine-tuning of its final model, exact resume with the dictionary, and the refused settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import motian
from motian import cli
from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.rare_words import (
    RareWords,
    find_rare_words,
    rare_occurrences,
    word_keys,
)
from motian.data.shards import EncodedDataset
from motian.errors import UserError
from motian.model import from_pretrained, preset
from motian.model.notes import notes_in_input
from motian.pretraining import pretrain_recipe
from motian.train.metrics import read_metrics
from motian.train.notes import NotesPretrainer, rare_words_for
from motian.train.objectives import TaskWeighting, build_model, predicted_tokens
from motian.train.recipe import ObjectiveSpec, RunSettings, load_recipe, with_fields
from tests.conftest import write_dataset, write_vocab
from tests.pretrain_helpers import final_weights, max_difference, run_then_resume, write_recipe

CPU = RunSettings(device="cpu", threads=1, progress=False)
NOTES_DATA = "{masking: bert, pair_task: none}"
NOTES_OBJECTIVE = ("{kind: mlm, weighting: fixed, notes: true, notes_threshold: 50, "
                   "notes_min_count: 2, notes_window: 4}")
A, B, C, D = (5, 6), (7,), (8, 9, 10), (11,)


def _keys(*words: tuple[int, ...]) -> np.ndarray:
    flat = np.concatenate([np.asarray(w) for w in words])
    length = np.array([len(w) for w in words])
    return word_keys(flat, np.cumsum(length) - length, length)


def test_rare_words_are_counted_over_the_given_documents(tmp_path):
    # A 3 times, B 10 times, C twice, D once, over two shards.
    docs = [[[A, B, B, C]], [[B, B, A, B]], [[D, B, B]]]
    more = [[[A, B, B, B, C]]]
    data = write_dataset(tmp_path / "data", write_vocab(tmp_path / "v", 20), [docs, more])
    dataset = EncodedDataset(data)
    shards = [dataset.shard(i) for i in range(len(dataset))]
    offsets = [np.asarray(s.docs) for s in shards]  # documents of 7, 5, 3 and 8 tokens
    doc_shard = np.array([0, 0, 0, 1])
    doc_start = np.concatenate([o[:-1] for o in offsets])
    doc_len = np.concatenate([np.diff(o) for o in offsets])
    assert doc_len.tolist() == [7, 5, 3, 8]

    def rare(threshold, min_count, keep=slice(None)):
        table = find_rare_words(shards, doc_shard[keep], doc_start[keep], doc_len[keep],
                                threshold, min_count)
        return dict(zip(table.keys.tolist(), table.counts.tolist()))

    a, b, c, d = _keys(A, B, C, D).tolist()
    assert rare(5, 2) == {a: 3, c: 2}
    assert rare(11, 2) == {a: 3, b: 10, c: 2}
    assert rare(2, 1) == {d: 1}
    assert rare(5, 2, keep=slice(0, 3)) == {a: 2}  # only the first shard's documents: C once
    with pytest.raises(ValueError, match="threshold >= 1"):
        find_rare_words(shards, doc_shard, doc_start, doc_len, 0, 1)


def test_whole_rare_occurrences_of_a_hand_built_batch():
    # Two rows of 10; [CLS] 2, [SEP] 3, [PAD] 0. Word starts marked by `ws`.
    tokens = np.array([[2, 5, 6, 7, 8, 9, 10, 3, 5, 6],     # A B C [SEP] A(cut at the edge)
                       [2, 6, 5, 6, 3, 8, 9, 10, 0, 0]])  # (A's tail) A [SEP] C [PAD]
    ws = np.array([[0, 1, 0, 1, 1, 0, 0, 0, 1, 0],
                   [0, 0, 1, 0, 0, 1, 0, 0, 0, 0]], bool)
    text = ~np.isin(tokens, [0, 2, 3])
    chosen = np.zeros_like(ws)
    chosen[0, 2] = True  # the second token of row 0's A is masked
    keys = _keys(A, C)
    order = np.argsort(keys)
    table = RareWords(keys[order], np.array([3, 2])[order], 5, 2)
    a, c = (int(np.flatnonzero(order == i)[0]) for i in range(2))
    got = rare_occurrences(tokens, ws, text, chosen, table)
    # Row 0: A at 1-2 (masked: no note in its input), C at 4-6; the A at 8-9 touches the last
    # column and is left out. Row 1: column 1 continues a word of the previous row (no start
    # flag), A at 12-13, C at 15-17.
    assert got["note_first"].tolist() == [1, 4, 12, 15]
    assert got["note_length"].tolist() == [2, 3, 2, 3]
    assert got["note_id"].tolist() == [a, c, a, c]
    assert got["note_input"].tolist() == [False, True, True, True]


def test_the_note_window_stays_inside_the_document_and_real_tokens():
    pre = _objective(window=2)
    H = 8
    h = torch.arange(10 * H, dtype=torch.float32).view(1, 10, H)
    batch = {"note_first": torch.tensor([3, 8]), "note_length": torch.tensor([2, 1]),
             "document_ids": torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]])}
    notes = pre.take_notes(h, batch)
    # Word at 3-4: columns 1..6 (2 each side, inside document 0). Word at 8: document 1 is
    # columns 7-9 and column 9 is padding: columns 7..8.
    torch.testing.assert_close(notes[0], h[0, 1:7].mean(0))
    torch.testing.assert_close(notes[1], h[0, 7:9].mean(0))


def test_the_update_rule_by_hand():
    pre = _objective(gamma=0.1)
    x0, x1a, x1b, y = (torch.full((8,), v) for v in (1.0, 2.0, 4.0, 10.0))
    # Step 1: word 0 once, word 1 twice: first notes are stored as they are (word 1: the mean).
    pre._pending = [(torch.tensor([0, 1]), torch.stack([x0, x1a])),
                    (torch.tensor([1]), x1b[None])]
    pre.after_backward()
    torch.testing.assert_close(pre.notes[0], x0)
    torch.testing.assert_close(pre.notes[1], torch.full((8,), 3.0))
    assert pre.notes_taken.tolist() == [1.0, 2.0, 0.0] and not pre.notes[2].any()
    # Step 2: note = (1 - gamma) * note + gamma * new.
    pre._pending = [(torch.tensor([1]), y[None])]
    pre.after_backward()
    torch.testing.assert_close(pre.notes[1], torch.full((8,), 0.9 * 3.0 + 0.1 * 10.0))
    torch.testing.assert_close(pre.notes[0], x0)
    assert pre.notes_taken.tolist() == [1.0, 3.0, 0.0]
    # A step with a non-finite note (a step gone NaN) leaves the note alone.
    pre._pending = [(torch.tensor([0]), torch.full((1, 8), float("nan")))]
    pre.after_backward()
    torch.testing.assert_close(pre.notes[0], x0)


def test_notes_enter_the_input_embedding_of_unmasked_rare_words(pd98_encoded):
    emb = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 3]])
    note = torch.ones(2, 4)
    with notes_in_input(emb, torch.tensor([0, 2]), note, 0.5):
        mixed = emb(ids)
    plain = emb(ids)
    torch.testing.assert_close(mixed[0, [0, 2]], 0.5 * plain[0, [0, 2]] + 0.5 * note)
    torch.testing.assert_close(mixed[0, 1], plain[0, 1])
    assert not emb._forward_hooks  # the hook is gone after the `with`

    # On a real batch: a note exists for every rare word, so every unmasked occurrence uses it.
    table = find_rare_words(*_training_docs(pd98_encoded), 50, 2)
    config = LoaderConfig(seq_len=48, batch_size=4, seed=1, rare_words=table)
    batch = next(iter(PackedLoader(pd98_encoded, config=config)))
    pre = _objective(rare=table)
    with torch.no_grad():
        pre.notes.normal_()
        pre.notes_taken.fill_(1.0)
    loss, stats = pre(batch, predicted_tokens(batch), 1)
    assert stats["notes_used"] == int(batch["note_input"].sum()) > 0
    assert stats["rare_words"] == len(batch["note_id"]) > stats["notes_used"]
    loss.backward()
    assert pre.notes.grad is None  # the dictionary is not trained
    pre.after_backward()
    assert (pre.notes_taken > 1).sum() == len(batch["note_id"].unique())


def test_notes_recipe_through_the_api_then_finetune_the_plain_final_model(pd98_encoded,
                                                                          tmp_path, capsys):
    recipe = write_recipe(tmp_path, steps=8, checkpoint_every=4, eval_every=0, optim="adamw",
                          data=NOTES_DATA, objective=NOTES_OBJECTIVE)
    out = tmp_path / "run"
    summary = motian.pretrain(recipe=str(recipe), data=pd98_encoded, out=out, run=CPU)
    assert summary["steps"] == 8
    last = read_metrics(out / "metrics.jsonl", "train")[-1]
    assert last["notes_words"] == len(rare_words_for(pd98_encoded, load_recipe(recipe)))
    assert 0 < last["notes_taken"] <= last["notes_words"] and last["notes_used"] > 0
    assert last["rare_per_row"] > last["notes_used_per_row"] > 0
    saved = load_file(str(out / "checkpoints" / "step-00000008" / "objective.safetensors"))
    assert saved["notes"].shape == (last["notes_words"], 32)
    assert int((saved["notes_taken"] > 0).sum()) == last["notes_taken"]
    # final/ is the plain backbone with its MLM head: no notes; fine-tuning loads it.
    assert type(from_pretrained(out / "final")).__name__ == "MaskedLM"
    assert not any("note" in k for k in final_weights(out))
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--task", "reviews-sentiment", "--model", str(out / "final"),
                     "--out", str(ft), "--seeds", "1", "--epochs", "1", "--batch-size", "8",
                     "--max-train", "16", "--max-eval", "8", "--max-length", "32",
                     "--no-save-model", "--no-progress"]) == 0
    assert json.loads((ft / "results.json").read_text("utf-8"))["runs"]


def test_resume_restores_the_note_dictionary_exactly(pd98_encoded, tmp_path, capsys):
    recipe = load_recipe(write_recipe(tmp_path, steps=8, checkpoint_every=4, eval_every=0,
                                      optim="adamw", data=NOTES_DATA, objective=NOTES_OBJECTIVE))
    # A run that stopped after its step-4 checkpoint, resumed.
    run_then_resume(recipe, CPU, pd98_encoded, tmp_path, step=4)
    assert "resumed from" in capsys.readouterr().err
    assert max_difference(final_weights(tmp_path / "resumed"),
                          final_weights(tmp_path / "full")) == 0.0
    state = [load_file(str(d / "checkpoints" / "step-00000008" / "objective.safetensors"))
             for d in (tmp_path / "full", tmp_path / "resumed")]
    assert set(state[0]) == {"notes", "notes_taken"}
    assert max_difference(*state) == 0.0
    halfway = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000004"
                             / "objective.safetensors"))
    assert float((state[0]["notes_taken"] - halfway["notes_taken"]).sum()) > 0  # it moved on


def test_a_step_split_into_micro_batches_takes_the_same_notes(pd98_encoded):
    """Notes are applied once per step from all of its micro-batches, and every micro-batch
    reads the notes of the step's start: two halves give the whole batch's gradient and
    dictionary."""
    table = find_rare_words(*_training_docs(pd98_encoded), 50, 2)
    config = LoaderConfig(seq_len=48, batch_size=8, seed=0, rare_words=table)
    whole = next(iter(PackedLoader(pd98_encoded, config=config)))
    halves = [_rows(whole, 4 * i, 4 * i + 4) for i in range(2)]
    # a word of the first half comes back, unmasked, in the second: it reads its note
    again = torch.isin(halves[1]["note_id"][halves[1]["note_input"]],
                       halves[0]["note_id"])
    assert again.any()
    results = []
    for batches in ([whole], halves):
        pre = _objective(rare=table)
        with torch.no_grad():  # notes for the words seen in the first half only
            seen = halves[0]["note_id"]
            pre.notes[seen] = torch.randn(len(seen), 8, generator=torch.Generator().manual_seed(0))
            pre.notes_taken[seen] = 1.0
        n = predicted_tokens(whole)
        for batch in batches:
            loss, _ = pre(batch, n, len(batches))
            loss.backward()
        pre.after_backward()
        grads = {k: p.grad.clone() for k, p in pre.named_parameters() if p.grad is not None}
        results.append((grads, pre.notes.detach().clone(), pre.notes_taken.detach().clone()))
    (g1, notes1, taken1), (g2, notes2, taken2) = results
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(notes2, notes1, rtol=1e-5, atol=1e-6)
    assert torch.equal(taken1, taken2) and (taken1 > 1).any()


def test_refused_settings_name_their_field(pd98_encoded, tmp_path):
    demo = load_recipe("notes-demo")
    for item, field in (("objective.notes_threshold=0", "objective.notes_threshold"),
                        ("objective.notes_min_count=0", "objective.notes_min_count"),
                        ("objective.notes_min_count=100", "objective.notes_min_count"),
                        ("objective.notes_window=-1", "objective.notes_window"),
                        ("objective.notes_gamma=0", "objective.notes_gamma"),
                        ("objective.notes_lambda=1", "objective.notes_lambda"),
                        ("objective.kind=causal", "objective.notes")):
        with pytest.raises(UserError, match=field):
            with_fields(demo, [item])
    # A range no word falls in: refused before training, naming both fields.
    empty = with_fields(load_recipe(write_recipe(tmp_path, data=NOTES_DATA,
                                                 objective=NOTES_OBJECTIVE)),
                        ["objective.notes_min_count=100000", "objective.notes_threshold=100001"])
    with pytest.raises(UserError, match="notes_min_count.*notes_threshold"):
        pretrain_recipe(empty, CPU, pd98_encoded, tmp_path / "run")


# --------------------------------------------------------------------------- helpers


def _training_docs(data):
    loader = PackedLoader(data, config=LoaderConfig(seq_len=8, batch_size=1))
    return loader.shards, loader.doc_shard, loader.doc_start, loader.doc_len


def _objective(window: int = 4, gamma: float = 0.1, rare: RareWords | None = None):
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=3100, hidden=8, heads=2, ffn=16, layers=2, dropout=0.0,
                    attention_dropout=0.0, max_positions=64)
    spec = ObjectiveSpec(notes=True, notes_window=window, notes_gamma=gamma, weighting="fixed")
    if rare is None:
        rare = RareWords(np.arange(3, dtype=np.uint64), np.ones(3, np.int64), 5, 1)
    return NotesPretrainer(build_model(config, spec, "none"),
                           TaskWeighting(["mlm"], spec), rare=rare, spec=spec)


def _rows(batch: dict, lo: int, hi: int) -> dict:
    """Rows lo..hi-1 of a loader batch, its compact arrays re-derived (flat positions
    shifted)."""
    L = batch["input_ids"].shape[1]
    part = {k: v[lo:hi] for k, v in batch.items() if v.dim() == 2}
    keep = (batch["mlm_positions"] // L >= lo) & (batch["mlm_positions"] // L < hi)
    part["mlm_positions"] = batch["mlm_positions"][keep] - lo * L
    part["mlm_labels"] = batch["mlm_labels"][keep]
    keep = (batch["note_first"] // L >= lo) & (batch["note_first"] // L < hi)
    for key in ("note_first", "note_length", "note_id", "note_input"):
        part[key] = batch[key][keep]
    part["note_first"] = part["note_first"] - lo * L
    return part
