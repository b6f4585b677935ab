"""The packing loader: packing, document boundaries, determinism, exact resume, rank split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.masking import MaskingConfig
from motian.errors import UserError

SEP, CLS, PAD = 3, 2, 0


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def original_tokens(batch):
    """Undo the masking with the compact labels: the packed tokens before masking."""
    ids = batch["input_ids"].clone().reshape(-1)
    ids[batch["mlm_positions"]] = batch["mlm_labels"]
    return ids.reshape(batch["input_ids"].shape)


def test_packing_lays_documents_end_to_end(unique_tokens):
    data, vocab = unique_tokens()
    loader = PackedLoader(data, vocab, LoaderConfig(seq_len=16, batch_size=2))
    plan = loader._plan(0)
    rows = loader._packed_rows(plan, np.arange(len(plan.row_order)))
    assert (rows["tokens"][:, 0] == CLS).all()
    stream = rows["tokens"][:, 1:].reshape(-1)
    stream = stream[stream != PAD]
    # Documents in the epoch's order, each followed by [SEP]; every token exactly once.
    expected = []
    for d in plan.doc_order:
        s = loader.shards[loader.doc_shard[d]]
        start = loader.doc_start[d]
        expected.extend(np.asarray(s.tokens[start: start + loader.doc_len[d]]).tolist() + [SEP])
    assert stream.tolist() == expected
    assert sorted(t for t in expected if t != SEP) == list(range(5, 5 + loader.dataset.n_tokens))


def test_document_ids_and_restarting_positions(unique_tokens):
    data, vocab = unique_tokens()
    cfg = LoaderConfig(seq_len=64, batch_size=4, cross_document_attention=False)
    for batch in take(PackedLoader(data, vocab, cfg), 3):
        ids, docs, pos = original_tokens(batch), batch["document_ids"], batch["position_ids"]
        for r in range(ids.shape[0]):
            real = batch["attention_mask"][r].bool()
            seps = torch.nonzero(ids[r] == SEP).flatten().tolist()
            # A new document starts right after every [SEP] (except at the row's end).
            for p in range(1, int(real.sum())):
                new_doc = (p - 1) in seps
                assert docs[r, p] - docs[r, p - 1] == int(new_doc)
                assert pos[r, p] == (0 if new_doc else pos[r, p - 1] + 1)
        assert pos[:, 0].eq(0).all() and docs[:, 0].eq(0).all()
    assert "position_ids" not in take(PackedLoader(data, vocab, LoaderConfig(64, 4)), 1)[0]


def test_batch_contract_shapes_and_types(unique_tokens):
    data, vocab = unique_tokens()
    batch = take(PackedLoader(data, vocab, LoaderConfig(seq_len=32, batch_size=3)), 1)[0]
    for key in ("input_ids", "attention_mask", "token_type_ids", "document_ids"):
        assert batch[key].shape == (3, 32) and batch[key].dtype == torch.long, key
    assert batch["mlm_positions"].dtype == torch.long and batch["mlm_labels"].dtype == torch.long
    assert batch["mlm_positions"].shape == batch["mlm_labels"].shape
    assert (batch["token_type_ids"] == 0).all()


def test_same_shards_serve_any_length(unique_tokens):
    data, vocab = unique_tokens(n_docs=200)
    for L in (16, 128, 512):
        batch = take(PackedLoader(data, vocab, LoaderConfig(seq_len=L, batch_size=2)), 1)[0]
        assert batch["input_ids"].shape == (2, L)


def test_deterministic_given_seed_and_reshuffled_each_epoch(unique_tokens):
    data, vocab = unique_tokens()
    cfg = LoaderConfig(seq_len=32, batch_size=4, seed=7)
    a = take(PackedLoader(data, vocab, cfg), 6)
    b = take(PackedLoader(data, vocab, cfg), 6)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    c = take(PackedLoader(data, vocab, LoaderConfig(seq_len=32, batch_size=4, seed=8)), 1)
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    loader = PackedLoader(data, vocab, cfg)
    assert not np.array_equal(loader._plan(0).doc_order, loader._plan(1).doc_order)


def test_exact_resume_without_replaying(unique_tokens, monkeypatch):
    data, vocab = unique_tokens()
    cfg = LoaderConfig(seq_len=32, batch_size=4, seed=3)
    first = PackedLoader(data, vocab, cfg)
    steps = first.steps_per_epoch
    reference = take(first, 2 * steps + 5)  # crosses two epoch boundaries
    for stop in (3, steps, 2 * steps + 1):
        run = PackedLoader(data, vocab, cfg)
        it = iter(run)
        for _ in range(stop):
            next(it)
        state = run.state_dict()
        resumed = PackedLoader(data, vocab, cfg)
        built = []
        original = resumed.make_batch
        monkeypatch.setattr(resumed, "make_batch", lambda *a, b=built, o=original: b.append(1) or o(*a))
        resumed.load_state_dict(state)
        for i, batch in enumerate(take(resumed, 4)):
            assert all(torch.equal(batch[k], reference[stop + i][k]) for k in batch)
        assert len(built) == 4  # nothing before the saved position was assembled again


def test_resume_refuses_other_settings(unique_tokens):
    data, vocab = unique_tokens()
    loader = PackedLoader(data, vocab, LoaderConfig(seq_len=32, batch_size=4))
    state = loader.state_dict()
    other = PackedLoader(data, vocab, LoaderConfig(seq_len=64, batch_size=4))
    with pytest.raises(UserError, match="seq_len"):
        other.load_state_dict(state)


def test_ranks_see_disjoint_data_and_split_the_global_batch(unique_tokens):
    data, vocab = unique_tokens(n_docs=100)
    seen = []
    for rank in range(2):
        cfg = LoaderConfig(seq_len=32, batch_size=3, rank=rank, world_size=2, seed=5)
        loader = PackedLoader(data, vocab, cfg)
        batches = take(loader, loader.steps_per_epoch)
        seen.append([original_tokens(b) for b in batches])
    tokens = [set(torch.cat(s).flatten().tolist()) - {CLS, SEP, PAD} for s in seen]
    assert tokens[0] and tokens[1] and not tokens[0] & tokens[1]  # ids are unique per position
    # Two ranks of 3 rows see exactly what one process of 6 rows sees, step by step.
    single = PackedLoader(data, vocab, LoaderConfig(seq_len=32, batch_size=6, seed=5))
    for step, batch in enumerate(take(single, 4)):
        assert torch.equal(original_tokens(batch), torch.cat([seen[0][step], seen[1][step]]))


def test_vocabulary_mismatch_and_tiny_data_are_user_errors(unique_tokens, tmp_path):
    data, vocab = unique_tokens()
    _, other_vocab = unique_tokens(seed=1)
    with pytest.raises(UserError, match="vocabulary"):
        PackedLoader(data, other_vocab, LoaderConfig())
    with pytest.raises(UserError, match="fewer than one global batch"):
        PackedLoader(data, vocab, LoaderConfig(seq_len=512, batch_size=64))
    with pytest.raises(UserError, match="not an encoded dataset"):
        PackedLoader(tmp_path, vocab, LoaderConfig())


def test_sop_rows(unique_tokens):
    data, vocab = unique_tokens(n_docs=120)
    cfg = LoaderConfig(seq_len=48, batch_size=8, pair_task="sop",
                       masking=MaskingConfig(rate=0.15))
    labels = []
    for batch in take(PackedLoader(data, vocab, cfg), 10):
        ids = original_tokens(batch)
        for r in range(ids.shape[0]):
            n = int(batch["attention_mask"][r].sum())
            row, seg = ids[r, :n].tolist(), batch["token_type_ids"][r, :n].tolist()
            assert row[0] == CLS and row[-1] == SEP and row.count(SEP) == 2
            cut = row.index(SEP)
            a, b = row[1:cut], row[cut + 1: -1]
            assert a and b and seg == [0] * (cut + 1) + [1] * (len(b) + 1)
            # Ids increase along the corpus: in order iff B comes after A, contiguous when not cut.
            in_order = b[0] > a[-1]
            assert batch["pair_labels"][r] == int(in_order)
            assert a == list(range(a[0], a[0] + len(a))) and b == list(range(b[0], b[0] + len(b)))
            # Truncation keeps the junction between the two sentences, swapped or not.
            assert (b[0] == a[-1] + 1) if in_order else (a[0] == b[-1] + 1)
            labels.append(int(in_order))
    assert 0.3 < np.mean(labels) < 0.7


@pytest.mark.parametrize("pair_task,cross", [("none", False), ("sop", True)])
def test_batches_feed_the_model(pd98_encoded, pair_task, cross):
    """The contract with issue 4: a batch goes straight into the real tiny model."""
    from motian.model.config import preset
    from motian.model.heads import PreTrainingModel

    cfg = LoaderConfig(seq_len=64, batch_size=4, pair_task=pair_task,
                       cross_document_attention=cross, masking=MaskingConfig.preset("motian"))
    loader = PackedLoader(pd98_encoded, config=cfg)
    torch.manual_seed(0)
    model = PreTrainingModel(preset("tiny", vocab_size=len(loader.vocab), max_positions=64,
                                    cross_document_attention=cross))
    batch = take(loader, 1)[0]
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[0] == len(batch["mlm_labels"])
    assert ("pair" in out.losses) == (pair_task != "none")
    out.loss.backward()


def test_tokenizer_json_is_checked_against_the_shards(pd98_encoded, unique_tokens):
    trained = pd98_encoded.parent / "tok"  # the tokenizer.json the shards were made with
    assert (trained / "tokenizer.json").is_file()
    PackedLoader(pd98_encoded, trained, LoaderConfig(seq_len=64, batch_size=2))
    _, other = unique_tokens()
    with pytest.raises(UserError, match="another vocabulary"):
        PackedLoader(pd98_encoded, other, LoaderConfig(seq_len=64, batch_size=2))
