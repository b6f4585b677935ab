"""Backbone, masks, heads, checkpointing and motian's own save/load, on tiny shapes."""

from __future__ import annotations

import pytest
import torch

from motian.errors import UserError
from motian.model import (
    POSITIONS,
    PRESETS,
    CausalLM,
    MaskedLM,
    ModelConfig,
    MotianModel,
    MultipleChoice,
    PreTrainingModel,
    SequenceClassification,
    SpanExtraction,
    TokenClassification,
    count_parameters,
    from_pretrained,
    load_weights,
    preset,
    save_pretrained,
)

V = 97


def tiny(**kw) -> ModelConfig:
    return preset("tiny", vocab_size=V, hidden=32, heads=4, ffn=64, **kw)


def ids(B=2, L=12, seed=0):
    return torch.randint(5, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_config_roundtrip_and_validation(tmp_path):
    c = preset("tiny", position="t5", norm="pre")
    c.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == c
    assert ModelConfig.from_dict(c.to_dict()) == c
    assert preset("base").hidden == 768 and preset("large").layers == 24
    with pytest.raises(UserError, match="divisible"):
        ModelConfig(hidden=100, heads=12)
    with pytest.raises(UserError, match="position"):
        ModelConfig(position="xpos")
    with pytest.raises(UserError, match="unknown field"):
        ModelConfig.from_dict({"hiden": 3})
    with pytest.raises(UserError, match="preset"):
        preset("huge")
    (tmp_path / "bad.json").write_text("{\n  'x': 1}")
    with pytest.raises(UserError, match="bad.json:2"):
        ModelConfig.load(tmp_path / "bad.json")


def test_preset_sizes_on_meta_device():
    with torch.device("meta"):
        counts = {name: count_parameters(MaskedLM(preset(name))) for name in PRESETS}
    assert 100e6 < counts["base"] < 105e6  # BERT-base with a 21128 vocabulary (~102M)
    assert 1.2e9 < counts["motian-1b"] < 1.3e9


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_padding_does_not_change_real_tokens(norm, activation):
    model = MotianModel(tiny(norm=norm, activation=activation)).eval()
    x = ids(1, 8)
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        alone = model(x)
        with_pad = model(padded, mask)
    torch.testing.assert_close(with_pad[:, :8], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(with_pad).all()


def test_document_mask_isolates_documents_and_never_nans():
    model = MotianModel(tiny(cross_document_attention=False, position="t5")).eval()
    x = ids(1, 10)
    docs = torch.tensor([[0] * 4 + [1] * 6])
    positions = torch.tensor([list(range(4)) + list(range(6))])
    y = x.clone()
    y[0, 6] = 3  # change a token of document 1 only
    with torch.no_grad():
        a = model(x, document_ids=docs, position_ids=positions)
        b = model(y, document_ids=docs, position_ids=positions)
        first_alone = model(x[:, :4])
        # padding queries with a document id of nobody, and an all-padding row: no NaN
        mask = torch.tensor([[1] * 7 + [0] * 3, [0] * 10])
        pad = model(x.repeat(2, 1), mask, document_ids=torch.tensor([[0] * 7 + [9] * 3] * 2))
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    torch.testing.assert_close(a[:, :4], first_alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(pad).all()
    # cross_document_attention=True ignores document ids
    free = MotianModel(tiny(position="t5")).eval()
    with torch.no_grad():
        torch.testing.assert_close(free(x, document_ids=docs), free(x))


@pytest.mark.parametrize("position", ["absolute", "alibi", "nezha", "deberta", "tupe"])
def test_causal_model_does_not_see_the_future(position):
    model = MotianModel(tiny(causal=True, position=position)).eval()
    x = ids(1, 10)
    y = x.clone()
    y[0, 7:] = 4
    mask = torch.ones(1, 10, dtype=torch.long)
    with torch.no_grad():
        a, b = model(x), model(y)
        masked = model(x, mask)  # tensor mask path instead of SDPA's is_causal
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    torch.testing.assert_close(masked, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["plain", "causal", "mask"])
def test_explicit_cpu_attention_equals_sdpa(case):
    """The path taken when training with attention dropout on CPU computes what SDPA does; a
    p that rounds to no dropped element (< 2^-16) makes the two comparable."""
    from motian.model.transformer import attention, attention_mask_bias

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    mask = None
    if case == "mask":
        pad = torch.ones(2, 9, dtype=torch.long)
        pad[1, 6:] = 0
        mask = attention_mask_bias(pad, torch.tensor([[0] * 4 + [1] * 5] * 2), False, 9,
                                   q.device)
    explicit = attention(q, k, v, mask, case == "causal", 0.3, dropout_p=1e-6)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                            is_causal=case == "causal", scale=0.3)
    torch.testing.assert_close(explicit, sdpa, atol=1e-5, rtol=1e-5)


def test_masked_lm_compact_labels_match_hf_form_and_full_logits():
    model = MaskedLM(tiny()).eval()
    x = ids(2, 12)
    positions = torch.tensor([1, 5, 13, 20])  # flat indices into B * L
    labels = torch.full((2, 12), -100)
    labels.view(-1)[positions] = x.view(-1)[positions]
    with torch.no_grad():
        compact = model(x, mlm_positions=positions, mlm_labels=x.view(-1)[positions])
        hf_form = model(x, labels=labels)
        full = model(x)
    assert compact.logits.shape == (4, V) and full.logits.shape == (2, 12, V)
    torch.testing.assert_close(compact.loss, hf_form.loss)
    torch.testing.assert_close(compact.logits, full.logits.reshape(-1, V)[positions])
    expected = torch.nn.functional.cross_entropy(full.logits.reshape(-1, V)[positions],
                                                 x.view(-1)[positions])
    torch.testing.assert_close(compact.loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm,position,causal,padded",
                         [("post", p, False, True) for p in POSITIONS[:4]]
                         + [("pre", p, False, True) for p in POSITIONS[4:]]
                         + [("pre", "rope", True, False), ("post", "nezha", True, False),
                            ("pre", "deberta", True, True), ("pre", "t5", True, True)])
def test_last_block_at_masked_rows_only_gives_the_same_loss_and_gradients(norm, position, causal,
                                                                          padded):
    """With `mlm_positions` the backbone runs its last block only for the masked rows (and
    [CLS]): queries, output projection and FFN. Loss and every gradient equal those of the full
    computation, for every position scheme, with padding, and causal with and without a mask."""
    torch.manual_seed(0)
    model = PreTrainingModel(tiny(norm=norm, position=position, causal=causal, dropout=0.0,
                                  attention_dropout=0.0))
    x, mask = ids(2, 12), torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask = mask if padded else None
    positions, pair = torch.tensor([1, 5, 13, 20]), torch.tensor([1, 0])
    sparse = model(x, mask, mlm_positions=positions, mlm_labels=x.view(-1)[positions],
                   pair_labels=pair)
    sparse.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = model(x, mask, pair_labels=pair)  # (B, L, vocab) everywhere
    assert full.hidden_states.shape == (2, 12, 32) and sparse.hidden_states.shape == (6, 32)
    mlm = torch.nn.functional.cross_entropy(full.logits.reshape(-1, V)[positions],
                                            x.view(-1)[positions])
    (mlm + full.losses["pair"]).backward()
    torch.testing.assert_close(sparse.losses["mlm"], mlm)
    torch.testing.assert_close(sparse.pair_logits, full.pair_logits)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_batch_without_masked_tokens_gives_zero_loss_not_nan():
    model = MaskedLM(tiny())
    out = model(ids(), mlm_positions=torch.zeros(0, dtype=torch.long),
                mlm_labels=torch.zeros(0, dtype=torch.long))
    assert out.loss.item() == 0.0
    out.loss.backward()


def test_tied_and_untied_output_layer():
    tied = MaskedLM(tiny())
    untied = MaskedLM(tiny(tie_word_embeddings=False))
    assert tied.mlm.decoder is None and untied.mlm.decoder is not None
    out = tied(ids(), labels=ids(seed=1))
    out.loss.backward()
    assert tied.backbone.embeddings.word.weight.grad.abs().sum() > 0


def test_pretraining_returns_per_task_losses():
    model = PreTrainingModel(tiny())
    out = model(ids(), token_type_ids=torch.zeros(2, 12, dtype=torch.long),
                mlm_positions=torch.tensor([0, 3, 17]), mlm_labels=torch.tensor([7, 8, 9]),
                pair_labels=torch.tensor([0, 1]))
    assert set(out.losses) == {"mlm", "pair"} and out.pair_logits.shape == (2, 2)
    torch.testing.assert_close(out.loss, out.losses["mlm"] + out.losses["pair"])
    out.loss.backward()
    assert model.pair.classifier.weight.grad is not None


def test_task_heads_shapes_losses_and_gradients():
    c, x = tiny(), ids(2, 12)
    cases = [
        (SequenceClassification(c, num_labels=3), dict(labels=torch.tensor([0, 2])), (2, 3)),
        (SequenceClassification(c, num_labels=1), dict(labels=torch.tensor([0.5, 1.0])), (2, 1)),
        (TokenClassification(c, num_labels=5),
         dict(labels=torch.randint(0, 5, (2, 12)).masked_fill(torch.rand(2, 12) < 0.3, -100)),
         (2, 12, 5)),
        (SpanExtraction(c), dict(start_positions=torch.tensor([1, 2]),
                                 end_positions=torch.tensor([3, 4])), (2, 12)),
    ]
    for model, labels, shape in cases:
        out = model(x, **labels)
        assert out.logits.shape == shape, type(model).__name__
        out.loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads[-2:])  # the head's output layer
        assert model.backbone.embeddings.word.weight.grad.abs().sum() > 0
        assert torch.isfinite(out.loss)
    mc = MultipleChoice(c)
    out = mc(ids(6, 8).view(2, 3, 8), labels=torch.tensor([2, 0]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def head_case(head: str) -> tuple[torch.nn.Module, dict]:
    """A fresh `head` model (no dropout) and one fixed batch of 4 x 16 with its labels."""
    c = tiny(dropout=0.0, attention_dropout=0.0)
    g = torch.Generator().manual_seed(1)
    x = ids(4, 16)
    if head == "MaskedLM":
        positions = torch.arange(0, 64, 3)
        return MaskedLM(c), dict(input_ids=x, mlm_positions=positions,
                                 mlm_labels=x.view(-1)[positions])
    if head == "PreTrainingModel":
        positions = torch.arange(0, 64, 3)
        return PreTrainingModel(c), dict(input_ids=x, mlm_positions=positions,
                                         mlm_labels=x.view(-1)[positions],
                                         pair_labels=torch.tensor([0, 1, 1, 0]))
    if head == "SequenceClassification":
        return SequenceClassification(c, num_labels=3), dict(input_ids=x,
                                                             labels=torch.tensor([0, 2, 1, 2]))
    if head == "TokenClassification":
        return TokenClassification(c, num_labels=5), dict(
            input_ids=x, labels=torch.randint(0, 5, (4, 16), generator=g))
    if head == "SpanExtraction":
        return SpanExtraction(c), dict(input_ids=x, start_positions=torch.tensor([1, 4, 7, 2]),
                                       end_positions=torch.tensor([3, 9, 7, 5]))
    if head == "MultipleChoice":
        return MultipleChoice(c), dict(input_ids=ids(12, 16).view(4, 3, 16),
                                       labels=torch.tensor([2, 0, 1, 1]))
    assert head == "CausalLM"
    return CausalLM(c.replace(causal=True)), dict(input_ids=x, labels=x)


HEAD_NAMES = ["MaskedLM", "PreTrainingModel", "SequenceClassification", "TokenClassification",
              "SpanExtraction", "MultipleChoice", "CausalLM"]


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_every_head_learns_a_tiny_batch(head):
    """20 AdamW steps on one batch cut the loss below 40% of the first (each head memorises
    its labels; a head whose loss or gradients were wired wrong would not)."""
    torch.manual_seed(0)
    model, batch = head_case(head)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.4 * losses[0], losses
    if head == "PreTrainingModel":  # both tasks learn, not only the easier one
        assert set(out.losses) == {"mlm", "pair"} and out.losses["pair"].item() < 0.3


def test_span_extraction_ignores_padding():
    model = SpanExtraction(tiny()).eval()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[:, 9:] = 0
    out = model(ids(), mask)
    assert (out.logits[:, 9:] < -1e3).all() and (out.end_logits[:, 9:] < -1e3).all()


def test_mean_pooling_reads_the_real_tokens_only():
    """classifier_pooling="mean": the head reads the mean of the real tokens' last layer (not
    [CLS], not the padding); extra padding changes nothing; the pretraining pair task keeps
    [CLS]; an unknown pooling is refused."""
    torch.manual_seed(0)
    model = SequenceClassification(tiny(classifier_pooling="mean"), num_labels=3).eval()
    x, mask = ids(), torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        out = model(x, mask)
        h = out.hidden_states
        mean = torch.stack([h[0].mean(0), h[1, :7].mean(0)])
        head = model.head
        assert torch.allclose(out.logits, head.classifier(torch.tanh(head.pooler(mean))),
                              atol=1e-6)
        cls = head.classifier(torch.tanh(head.pooler(h[:, 0])))
        assert not torch.allclose(out.logits, cls, atol=1e-3)
        padded = model(torch.cat([x, torch.zeros(2, 5, dtype=x.dtype)], 1),
                       torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], 1)).logits
        assert torch.allclose(padded, out.logits, atol=1e-5)
        choice = MultipleChoice(tiny(classifier_pooling="mean")).eval()
        assert choice(x[None], mask[None]).logits.shape == (1, 2)
    assert PreTrainingModel(tiny(classifier_pooling="mean")).pair.pooling == "cls"
    with pytest.raises(UserError, match="classifier_pooling='max' is not one of cls, mean"):
        tiny(classifier_pooling="max")


def test_causal_lm_learns_and_requires_causal_config():
    with pytest.raises(UserError, match="causal"):
        CausalLM(tiny())
    torch.manual_seed(0)
    model = CausalLM(tiny(causal=True, position="rope", norm="pre", dropout=0.0,
                          attention_dropout=0.0))
    x = ids(2, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(x, labels=x).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5  # memorises two sequences


def test_prefix_lm_sees_the_prefix_both_ways_and_the_target_left_to_right():
    torch.manual_seed(0)
    # rope: the same position terms with and without causality (a causal t5 model buckets
    # only past distances, so it would not equal the encoder below)
    c = tiny(causal=True, position="rope", norm="pre")
    model = CausalLM(c).eval()
    x = ids(2, 10)
    prefix = torch.tensor([5, 5])
    y = x.clone()
    y[:, 3] = 4  # inside the prefix
    z = x.clone()
    z[:, 7] = 4  # in the target
    with torch.no_grad():
        a, b, t = (model(v, prefix_lengths=prefix).hidden_states for v in (x, y, z))
        plain = model(x).hidden_states
        as_causal = model(x, prefix_lengths=torch.tensor([0, 1])).hidden_states
        whole = model(x, prefix_lengths=torch.tensor([10, 10])).hidden_states
        encoder = MotianModel(c.replace(causal=False))
        encoder.load_state_dict(model.backbone.state_dict())
        bidirectional = encoder.eval()(x)
    assert not torch.allclose(a[:, :3], b[:, :3])  # earlier prefix tokens see token 3
    torch.testing.assert_close(a[:, :7], t[:, :7])  # nothing before 7 sees the target's 7
    assert not torch.allclose(a[:, 7:], t[:, 7:])
    torch.testing.assert_close(as_causal, plain, atol=1e-5, rtol=1e-5)  # prefix 0/1 = causal
    torch.testing.assert_close(whole, bidirectional, atol=1e-5, rtol=1e-5)  # all prefix = encoder


def test_prefix_lm_learns_to_copy_its_source():
    """Target = source: each target token must look back into the prefix; loss on the target."""
    torch.manual_seed(0)
    model = CausalLM(tiny(causal=True, position="rope", norm="pre", dropout=0.0,
                          attention_dropout=0.0))
    src = ids(4, 6)
    x = torch.cat([src, src], dim=1)  # (4, 12)
    labels = x.clone()
    labels[:, :6] = -100
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[3, 10:] = 0  # a padded row: its last two target tokens are padding
    labels[3, 10:] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(x, mask, labels=labels, prefix_lengths=torch.full((4,), 6)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = MaskedLM(tiny(position="deberta", norm="pre", dropout=0.0, attention_dropout=0.0))
    ckpt = MaskedLM(plain.config.replace(checkpoint_activations=True))
    ckpt.load_state_dict(plain.state_dict())
    x, labels = ids(), ids(seed=3)
    for m in (plain, ckpt):
        m.train()
        m(x, labels=labels).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_save_and_load_roundtrip_strips_wrapper_prefixes(tmp_path):
    model = SequenceClassification(tiny(position="alibi"), num_labels=3).eval()
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, SequenceClassification) and loaded.head_kwargs == {"num_labels": 3}
    x = ids()
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    # a torch.compile'd, data-parallel model saves `module._orig_mod.` keys: they still load,
    # and saving the wrapper saves the model inside
    wrapper = torch.nn.DataParallel(torch.compile(model))
    assert next(iter(wrapper.state_dict())).startswith("module._orig_mod.")
    fresh = SequenceClassification(model.config, num_labels=3).eval()
    report = load_weights(fresh, wrapper.state_dict(), "wrapped")
    assert report.ok
    torch.testing.assert_close(fresh(x).logits, model(x).logits)
    save_pretrained(wrapper, tmp_path / "w")
    assert isinstance(from_pretrained(tmp_path / "w"), SequenceClassification)
    # missing keys are reported, and raise under strict
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    report = load_weights(SequenceClassification(model.config, num_labels=3), partial, "p")
    assert report.missing == ["head.classifier.bias", "head.classifier.weight",
                              "head.pooler.bias", "head.pooler.weight"]
    with pytest.raises(UserError, match="missing"):
        load_weights(SequenceClassification(model.config, num_labels=3), partial, "p", strict=True)
    with pytest.raises(UserError, match="not a motian model"):
        from_pretrained(tmp_path)


def test_absolute_positions_refuse_longer_sequences():
    model = MotianModel(tiny(max_positions=16))
    with pytest.raises(UserError, match="max_positions"):
        model(ids(1, 20))
