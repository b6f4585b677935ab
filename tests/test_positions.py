"""Every position scheme: runs, trains, respects packed documents, and (where it should)
extrapolates to 512 after a model sized for 128; each scheme's score terms against a naive
reference, and T5 buckets against `transformers`' own implementation."""

from __future__ import annotations

import math

import pytest
import torch

from motian.errors import UserError
from motian.model import EXTRAPOLATING, POSITIONS, MaskedLM, MotianModel, preset
from motian.model.positions import (
    alibi_slopes,
    apply_rotary,
    deberta_bias,
    deberta_index,
    nezha_attention,
    nezha_index,
    nezha_table,
    rotary_tables,
    t5_buckets,
)

V = 97
RELATIVE_ONLY = ["t5", "alibi", "rope", "nezha", "deberta"]  # no absolute position anywhere


def tiny(position: str, **kw):
    return preset("tiny", vocab_size=V, hidden=32, heads=4, ffn=64, position=position,
                  max_positions=128, max_relative_position=16, **kw)


def ids(B: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, V, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position", POSITIONS)
def test_scheme_trains_and_respects_packed_documents(position):
    torch.manual_seed(0)
    model = MaskedLM(tiny(position, norm="pre", cross_document_attention=False))
    x = ids(2, 16)
    docs = torch.tensor([[0] * 6 + [1] * 10] * 2)
    pos = torch.tensor([list(range(6)) + list(range(10))] * 2)
    out = model(x, document_ids=docs, position_ids=pos, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():  # document 1, packed after document 0, equals document 1 alone
        packed = model.backbone(x, document_ids=docs, position_ids=pos)
        alone = model.backbone(x[:, 6:])
    torch.testing.assert_close(packed[:, 6:], alone, atol=1e-5, rtol=1e-5)


def train_steps(model: torch.nn.Module, batch: dict, steps: int = 15,
                lr: float = 1e-2) -> list[float]:
    """AdamW on one fixed batch; the loss of every step (a model that learns memorises it)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("position", POSITIONS)
def test_scheme_learns_a_tiny_batch(position, causal):
    """Shape, then learning: 15 AdamW steps of MLM on one batch of 4 x 16 halve the loss, for
    every scheme as an encoder and as a causal decoder (masks + position terms + gradients all
    have to be right for the loss to fall that fast)."""
    torch.manual_seed(0)
    model = MaskedLM(tiny(position, causal=causal, dropout=0.0, attention_dropout=0.0))
    x = ids(4, 16)
    positions = torch.arange(0, 64, 3)  # 22 of 64 positions (flat indices into B * L)
    batch = dict(input_ids=x, mlm_positions=positions, mlm_labels=x.view(-1)[positions])
    assert model(**batch).logits.shape == (len(positions), V)
    assert model.backbone(x).shape == (4, 16, 32)
    losses = train_steps(model, batch)
    assert losses[0] == pytest.approx(math.log(V), rel=0.1)  # starts at chance
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("position", POSITIONS)
def test_scheme_runs_under_bf16_autocast(position):
    """Masks and tables follow the compute dtype (what a GPU run with bf16 autocast does)."""
    model = MaskedLM(tiny(position, causal=position == "alibi", cross_document_attention=False))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids(2, 8), mask, document_ids=torch.tensor([[0] * 4 + [1] * 4] * 2),
                    labels=ids(2, 8, seed=1))
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("position", sorted(EXTRAPOLATING))
def test_extrapolating_schemes_train_at_512_after_128(position):
    """Stage 1 at 128 (max_positions 128), then stage 2 continues at 512 with the same model."""
    torch.manual_seed(0)
    model = MaskedLM(tiny(position))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for length in (128, 512):
        x = ids(1, length)
        out = model(x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss), length
    model.eval()
    with torch.no_grad():
        h = model.backbone(ids(1, 512))
    assert h.shape == (1, 512, 32) and torch.isfinite(h).all()


@pytest.mark.parametrize("position", ["absolute", "tupe"])
def test_absolute_tables_do_not_extrapolate(position):
    with pytest.raises(UserError, match="cannot extrapolate"):
        MotianModel(tiny(position))(ids(1, 200))


@pytest.mark.parametrize("position", RELATIVE_ONLY)
def test_relative_schemes_are_shift_invariant(position):
    """Only distances matter: shifting every position by 37 changes nothing."""
    model = MotianModel(tiny(position)).eval()
    x = ids(1, 10)
    with torch.no_grad():
        a = model(x, position_ids=torch.arange(10)[None])
        b = model(x, position_ids=torch.arange(37, 47)[None])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("position", ["absolute", "sinusoidal", "tupe"])
def test_absolute_schemes_see_the_shift(position):
    model = MotianModel(tiny(position)).eval()
    x = ids(1, 10)
    with torch.no_grad():
        a = model(x, position_ids=torch.arange(10)[None])
        b = model(x, position_ids=torch.arange(37, 47)[None])
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    ours = t5_buckets(rel, bidirectional, 32, 128)
    theirs = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional,
                                                   num_buckets=32, max_distance=128)
    assert torch.equal(ours, theirs)


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    six = alibi_slopes(6)  # not a power of two: the 4 of n=4, then every other one of n=8
    torch.testing.assert_close(six, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8,
                                                  2 ** -1, 2 ** -3]))


def test_rotary_scores_depend_only_on_distance():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> float:
        cos, sin = rotary_tables(torch.tensor([[i, j]]), 8, 10000.0)
        rq = apply_rotary(q, cos[:, :, :1], sin[:, :, :1])
        rk = apply_rotary(k, cos[:, :, 1:], sin[:, :, 1:])
        return (rq * rk).sum().item()

    assert score(3, 7) == pytest.approx(score(103, 107), abs=1e-4)
    assert score(3, 7) != pytest.approx(score(3, 9), abs=1e-4)
    cos, sin = rotary_tables(torch.arange(5)[None], 8, 10000.0)
    torch.testing.assert_close(apply_rotary(q.expand(1, 1, 5, 8), cos, sin).norm(dim=-1),
                               q.norm(dim=-1).expand(1, 1, 5))


def test_nezha_attention_matches_the_naive_formula():
    torch.manual_seed(0)
    B, h, L, d, K = 2, 3, 9, 8, 3
    q, k, v = torch.randn(3, B, h, L, d).unbind(0)
    pos = torch.arange(L)[None]
    index, table = nezha_index(pos, K), nezha_table(K, d, torch.device("cpu"))
    a = table[index[0]]  # (L, L, d): a_ij for every pair, the memory-hungry way
    scores = (torch.einsum("bhid,bhjd->bhij", q, k)
              + torch.einsum("bhid,ijd->bhij", q, a)) / math.sqrt(d)
    p = scores.softmax(-1)
    expected = p @ v + torch.einsum("bhij,ijd->bhid", p, a)
    torch.testing.assert_close(nezha_attention(q, k, v, None, index, table, 0.0), expected)


def test_deberta_bias_matches_the_naive_formula():
    torch.manual_seed(0)
    B, h, L, d, span = 1, 2, 7, 4, 3
    q, k = torch.randn(2, B, h, L, d).unbind(0)
    rel_q, rel_k = torch.randn(2, h, 2 * span, d).unbind(0)
    index = deberta_index(torch.arange(L)[None], span)
    got = deberta_bias(q, k, rel_q, rel_k, index)

    def delta(i: int, j: int) -> int:
        return min(max(i - j, -span), span - 1) + span

    for i in range(L):
        for j in range(L):
            c2p = (q[0, :, i] * rel_k[:, delta(i, j)]).sum(-1)
            p2c = (k[0, :, j] * rel_q[:, delta(j, i)]).sum(-1)
            torch.testing.assert_close(got[0, :, i, j], c2p + p2c)


def test_tupe_unties_cls():
    model = MotianModel(tiny("tupe"))
    tupe = model.tupe_bias
    with torch.no_grad():
        tupe.cls_to_others.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tupe.others_to_cls.copy_(torch.tensor([-1.0, -2.0, -3.0, -4.0]))
        bias = tupe(torch.arange(6)[None])  # (1, heads, L, L)
    assert torch.equal(bias[0, :, 0, :], torch.tensor([1.0, 2, 3, 4])[:, None].expand(4, 6))
    assert torch.equal(bias[0, :, 1:, 0], torch.tensor([-1.0, -2, -3, -4])[:, None].expand(4, 5))
    assert bias[0, :, 1:, 1:].abs().sum() > 0
