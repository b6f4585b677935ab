"""Longformer attention (`attention="sliding"`, model/sparse_attention.py) and the conversion of a
short-trained model (model/longformer.py): equal to full attention when the window covers the
sequence, local otherwise, global tokens, dilation, masks, O(L * w) memory, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from motian.errors import UserError
from motian.model import MaskedLM, MotianModel, from_pretrained, preset, save_pretrained
from motian.model.longformer import longformer_convert
from motian.model.sparse_attention import sliding_plan
from motian.model.transformer import KVCache, capture_internals

V = 97


def tiny(**kw):
    base = dict(vocab_size=V, hidden=32, heads=4, ffn=64, max_positions=128,
                max_relative_position=8, dropout=0.0, attention_dropout=0.0)
    return preset("tiny", **{**base, **kw})


def ids(B: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, V, (B, L), generator=torch.Generator().manual_seed(seed))


def pair(**kw) -> tuple[MotianModel, MotianModel]:
    """A full-attention model and a sliding one with the same weights."""
    sliding = {k: kw.pop(k) for k in ("attention_window", "attention_dilation",
                                      "global_attention") if k in kw}
    torch.manual_seed(0)
    full = MotianModel(tiny(**kw)).eval()
    local = MotianModel(tiny(**kw).replace(attention="sliding", **sliding)).eval()
    local.load_state_dict(full.state_dict())
    return full, local


def changed(model, x: torch.Tensor, at: int, **kw) -> torch.Tensor:
    """Per position: does the output move when token `at` is replaced?"""
    y = x.clone()
    y[:, at] = (y[:, at] + 1 - 5) % (V - 5) + 5
    with torch.no_grad():
        return (model(x, **kw) - model(y, **kw)).abs().amax(dim=(0, 2)) > 1e-6


@pytest.mark.parametrize("position", ["absolute", "alibi", "rope", "t5", "nezha"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_full_attention_when_the_window_covers_the_sequence(position, causal):
    full, local = pair(position=position, causal=causal, cross_document_attention=False,
                       attention_window=40, global_attention="cls")
    x = ids(2, 37)
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, 30:] = 0  # padding
    docs = torch.zeros(2, 37, dtype=torch.long)
    docs[0, 20:] = 1  # two packed documents
    with torch.no_grad():
        a, b = full(x, mask, document_ids=docs), local(x, mask, document_ids=docs)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("position", ["absolute", "alibi", "t5"])
def test_a_token_sees_its_window_and_nothing_beyond(layers, position):
    w = 3
    _, model = pair(layers=layers, position=position, attention_window=w)
    x, i = ids(1, 40), 20
    reach = layers * w  # each layer widens what reaches a token by w per side
    assert changed(model, x, i + reach)[i] and changed(model, x, i - reach)[i]
    assert changed(model, x, i + 1)[i] and changed(model, x, i - 1)[i]
    assert not changed(model, x, i + reach + 1)[i] and not changed(model, x, i - reach - 1)[i]


def test_global_cls_sees_every_token_and_every_token_sees_it():
    _, model = pair(layers=1, attention_window=2, global_attention="cls")
    _, plain = pair(layers=1, attention_window=2)
    x = ids(1, 40)
    assert changed(model, x, 33)[0]  # [CLS] reads a token far outside its window
    assert changed(model, x, 0)[1:].all()  # and every token reads [CLS]
    assert not changed(plain, x, 33)[0] and not changed(plain, x, 0)[10]
    assert not changed(model, x, 33)[20]  # the others stay local


def test_a_task_marks_global_tokens_with_global_mask():
    _, model = pair(layers=1, attention_window=2)
    x = ids(2, 40)
    marks = torch.zeros(2, 40, dtype=torch.long)
    marks[:, 15] = 1  # e.g. a question token in QA
    assert changed(model, x, 15, global_mask=marks)[35]
    assert changed(model, x, 35, global_mask=marks)[15]
    assert not changed(model, x, 15)[35]


def test_dilation_picks_every_dth_key_per_head_by_hand():
    config = tiny(heads=2, attention="sliding", attention_window=2, attention_dilation=[1, 3])
    plan = sliding_plan(config, None, None, torch.arange(20)[None], None)
    c, P = plan.chunk, plan.reach
    assert (c, P) == (2, 6)  # blocks of w queries; keys reach w * max dilation each side

    def keys(head: int, query: int) -> list[int]:
        block, row = divmod(query, c)
        seen = plan.bias[0, head, block, row].isfinite().nonzero().flatten()
        return [block * c - P + int(s) for s in seen]

    assert keys(0, 10) == [8, 9, 10, 11, 12]
    assert keys(1, 10) == [4, 7, 10, 13, 16]
    assert keys(1, 1) == [1, 4, 7]  # clipped at the start of the sequence
    assert keys(1, 19) == [13, 16, 19]  # and at its end
    _, model = pair(layers=1, attention_window=1, attention_dilation=3)
    x = ids(1, 30)
    assert changed(model, x, 13)[10] and changed(model, x, 7)[10]
    assert not changed(model, x, 11)[10] and not changed(model, x, 12)[10]


def test_padding_and_documents_are_respected_inside_the_band():
    _, model = pair(layers=2, attention_window=4, cross_document_attention=False)
    x = ids(1, 24)
    mask = torch.ones(1, 24, dtype=torch.long)
    mask[0, 20:] = 0
    docs = torch.zeros(1, 24, dtype=torch.long)
    docs[0, 10:] = 1
    kw = dict(attention_mask=mask, document_ids=docs)
    assert not changed(model, x, 21, **kw)[:20].any()  # padding is read by no real token
    assert not changed(model, x, 11, **kw)[:10].any()  # nor is the next document
    assert not changed(model, x, 8, **kw)[10:20].any()
    assert changed(model, x, 8, **kw)[9]


def test_training_backward_is_finite_with_padding_and_ragged_blocks():
    config = tiny(attention="sliding", attention_window=4, global_attention="cls",
                  attention_dropout=0.1, position="alibi")
    model = MaskedLM(config).train()
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 11:] = 0
    out = model(ids(2, 19), mask, labels=ids(2, 19, seed=1))
    out.loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns (views included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_grows_with_length_times_window_never_length_squared():
    L, w = 4096, 64
    _, model = pair(heads=2, max_positions=L, position="alibi", attention_window=w,
                    global_attention="cls", cross_document_attention=False)
    mask = torch.ones(1, L, dtype=torch.long)
    mask[0, -100:] = 0
    docs = (torch.arange(L) >= 2000).long()[None]
    with torch.no_grad(), LargestTensor() as probe:
        y = model(ids(1, L), mask, document_ids=docs)
    assert y.shape == (1, L, 32) and y.isfinite().all()
    assert probe.largest <= 2 * L * (w + 2 * w + 1)  # heads x L x (chunk + 2 reach + globals)
    assert probe.largest < L * L // 8
    full, _ = pair(heads=2)  # the probe does see an (L, L) tensor where there is one
    with torch.no_grad(), LargestTensor() as probe:
        full(ids(1, 128), mask[:, -128:])  # full attention's padding mask is (1, 1, L, L)
    assert probe.largest >= 128 * 128


def test_conversion_copies_learned_positions_up_to_the_new_length(tmp_path):
    torch.manual_seed(0)
    short = MaskedLM(tiny(max_positions=16))
    save_pretrained(short, tmp_path / "short")
    (tmp_path / "short" / "vocab.txt").write_text("[PAD]\n", encoding="utf-8")
    result = longformer_convert(tmp_path / "short", tmp_path / "long", max_positions=40,
                                window=8)
    assert result["extended"] == ["backbone.embeddings.position.weight"]
    long = from_pretrained(tmp_path / "long")
    assert (tmp_path / "long" / "vocab.txt").is_file()
    c = long.config
    assert (c.attention, c.attention_window, c.global_attention, c.max_positions) == (
        "sliding", 8, "cls", 40)
    old = short.backbone.embeddings.position.weight
    new = long.backbone.embeddings.position.weight
    for i in (0, 15, 16, 31, 32, 39):
        assert torch.equal(new[i], old[i % 16])
    long.eval(), short.eval()
    x = ids(1, 30)  # now past the old 16 positions
    assert long(x).logits.shape == (1, 30, V)
    with torch.no_grad():  # a window over the whole input: the short model's outputs
        wide = from_pretrained(tmp_path / "long", attention_window=16).eval()
        torch.testing.assert_close(wide(x[:, :16]).logits, short(x[:, :16]).logits,
                                   atol=1e-5, rtol=0)


def test_conversion_of_a_relative_scheme_changes_only_the_config(tmp_path):
    save_pretrained(MaskedLM(tiny(position="alibi")), tmp_path / "short")
    result = longformer_convert(tmp_path / "short", tmp_path / "long", window=32, dilation=2,
                                global_attention="none")
    assert result["extended"] == []
    meta = json.loads((tmp_path / "long" / "config.json").read_text())
    assert meta["model"]["attention_dilation"] == 2 and meta["model"]["max_positions"] == 128
    short, long = from_pretrained(tmp_path / "short"), from_pretrained(tmp_path / "long")
    assert long.config.attention == "sliding"
    for (name, a), (_, b) in zip(short.state_dict().items(), long.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("settings, message", [
    (dict(attention_window=0), "attention_window must be >= 1"),
    (dict(attention_dilation=[1, 2]), "attention_dilation has 2 values but the model has heads=4"),
    (dict(attention_dilation=0), "attention_dilation must be integers >= 1"),
    (dict(position="deberta"), "does not support position='deberta'"),
    (dict(position="tupe"), "does not support position='tupe'"),
    (dict(global_attention="all"), "global_attention='all' is not one of"),
])
def test_bad_settings_are_refused_naming_the_option(settings, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        tiny(attention="sliding", **settings)


def test_what_sliding_attention_does_not_do_is_refused_clearly(tmp_path):
    _, model = pair(causal=True, attention_window=4)
    with pytest.raises(UserError, match="KV cache needs attention='full'"):
        model(ids(1, 8), cache=KVCache(2))
    with pytest.raises(UserError, match=r"not a \(B, L, L\) visibility mask"):
        model(ids(1, 8), torch.ones(1, 8, 8, dtype=torch.long))
    with pytest.raises(UserError, match="attention-map capture needs attention='full'"):
        with capture_internals(model, attention=True):
            model(ids(1, 8))
    with pytest.raises(UserError, match="must differ from --model"):
        save_pretrained(MaskedLM(tiny()), tmp_path / "m")
        longformer_convert(tmp_path / "m", tmp_path / "m")
    with pytest.raises(UserError, match="shorter than the model's 128"):
        longformer_convert(tmp_path / "m", tmp_path / "n", max_positions=64)


def test_hugging_face_export_keeps_sliding_attention(tmp_path):
    """A BERT-shaped model with sliding attention is not exported as native BERT (which would
    silently attend to everything) but as remote code that carries sparse_attention.py."""
    transformers = pytest.importorskip("transformers")
    from motian.model.hf import export_hf

    torch.manual_seed(0)
    model = MaskedLM(tiny(attention="sliding", attention_window=3, global_attention="cls")).eval()
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "motian"
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    x = ids(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-5, rtol=0)
