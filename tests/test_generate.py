"""`motian generate` and the causal recipe: the KV cache against full recomputation for every
position scheme it supports, greedy / sampling / beam search, stop tokens and strings, the
document-aware next-token labels, a gpt-demo pretrain then `motian generate` in a
subprocess, and the errors a user can hit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import motian
from motian.data.loader import LoaderConfig, PackedLoader
from motian.data.splits import causal_batches, next_token_labels
from motian.data.tokenizer import decode_text, load_tokenizer
from motian.errors import UserError
from motian.model import CausalLM, MaskedLM, preset, save_pretrained
from motian.serving.generate import Decoding, Generator, generate_ids
from motian.train.settings import RunSettings
from tests.conftest import write_vocab

CACHED = ["absolute", "sinusoidal", "rope", "alibi", "t5", "nezha"]
PROMPTS = [[2, 7, 8, 9, 10, 11], [2, 12], [2, 13, 14, 15]]  # [CLS] + tokens, three lengths


def tiny_lm(position: str = "rope", vocab: int = 40, seed: int = 0, **overrides) -> CausalLM:
    """A random 2-layer decoder; weights drawn wide (std 0.3) so the next-token distribution is
    peaked and no two logits are near a tie that rounding could flip."""
    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=vocab, hidden=32, heads=4, ffn=64, causal=True,
                    position=position, norm="pre", dropout=0.0, attention_dropout=0.0,
                    initializer_range=0.3, **overrides)
    return CausalLM(config).eval()


@pytest.mark.parametrize("position", CACHED)
def test_the_kv_cache_gives_the_tokens_and_logits_of_full_recomputation(position):
    model = tiny_lm(position)
    greedy = Decoding(max_new_tokens=8)
    cached = generate_ids(model, PROMPTS, greedy, pad_id=0, keep_logits=True)
    full = generate_ids(model, PROMPTS, Decoding(max_new_tokens=8, cache=False), pad_id=0,
                        keep_logits=True)
    assert cached.tokens == full.tokens and all(len(t) == 8 for t in cached.tokens)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Left padding and positions are right: each prompt alone gives the same tokens.
    for prompt, tokens in zip(PROMPTS, cached.tokens):
        assert generate_ids(model, [prompt], greedy, pad_id=0).tokens == [tokens]


@pytest.mark.parametrize("position", ["tupe", "deberta"])
def test_schemes_the_cache_cannot_hold_say_so_and_run_without_it(position):
    model = tiny_lm(position)
    with pytest.raises(UserError, match="without a cache"):
        generate_ids(model, PROMPTS, Decoding(max_new_tokens=3), pad_id=0)
    out = generate_ids(model, PROMPTS, Decoding(max_new_tokens=3, cache=False), pad_id=0)
    assert [len(t) for t in out.tokens] == [3, 3, 3]


def test_beam_search_with_one_beam_is_greedy():
    model = tiny_lm("alibi")
    stop = [generate_ids(model, PROMPTS[:1], Decoding(max_new_tokens=4), 0).tokens[0][3]]
    for stops in ([], stop):
        greedy = generate_ids(model, PROMPTS, Decoding(max_new_tokens=10), 0, stops)
        beam = generate_ids(model, PROMPTS, Decoding(max_new_tokens=10, num_beams=1), 0, stops)
        assert beam.tokens == greedy.tokens and beam.finish == greedy.finish


def bigram_lm(table: dict[int, dict[int, float]], vocab: int = 8) -> CausalLM:
    """A real CausalLM whose next-token distribution depends on the last token only, set by
    hand: attention and feed-forward outputs are zeroed (each block passes its input through),
    so the final hidden state of token t is a fixed vector u_t, and the (untied) output layer is
    solved so that u_t . w_s = log P(s | t) for the probabilities in `table`."""
    model = tiny_lm("rope", vocab=vocab, tie_word_embeddings=False, type_vocab_size=0)
    with torch.no_grad():
        for block in model.backbone.blocks:
            for linear in (block.attention.out, block.ffn.down):
                linear.weight.zero_()
                linear.bias.zero_()
        model.backbone.embeddings.word.weight.copy_(torch.eye(vocab, 32))
        u = model.backbone(torch.arange(vocab)[:, None])[:, 0]  # (V, hidden)
        logp = torch.full((vocab, vocab), math.log(1e-6))
        for t, row in table.items():
            for s, p in row.items():
                logp[t, s] = math.log(p)
        model.decoder.weight.copy_((torch.linalg.pinv(u) @ logp).T)
        check = model(torch.arange(vocab)[:, None]).logits[:, 0].log_softmax(-1)
    for t, row in table.items():
        for s, p in row.items():
            assert math.isclose(float(check[t, s].exp()), p, rel_tol=1e-3)
    return model


def test_beam_search_finds_the_sequence_greedy_misses():
    A, X, Y, Z, SEP = 4, 5, 6, 7, 3
    # From a: x 0.5, y 0.4. After x the mass is spread, after y it is not: greedy takes x
    # (0.5 * 0.35 = 0.175 for [x, x]), two beams keep y and find [y, z] (0.4 * 0.9 = 0.36).
    model = bigram_lm({A: {X: 0.5, Y: 0.4, SEP: 0.1 - 4e-6},
                       X: {X: 0.35, Y: 0.3, Z: 0.25, SEP: 0.1 - 4e-6},
                       Y: {Z: 0.9, SEP: 0.1 - 6e-6}, Z: {SEP: 1 - 7e-6}})
    greedy = generate_ids(model, [[A]], Decoding(max_new_tokens=2), 0)
    assert greedy.tokens == [[X, X]]
    beam = generate_ids(model, [[A]], Decoding(max_new_tokens=2, num_beams=2), 0)
    assert beam.tokens == [[Y, Z]] and beam.finish == ["length"]
    assert beam.scores[0] == pytest.approx(math.log(0.4 * 0.9) / 2, abs=1e-3)
    # With [SEP] as the stop token the hypothesis closes after z (SEP counted in the length).
    beam = generate_ids(model, [[A]], Decoding(max_new_tokens=5, num_beams=2), 0, [SEP])
    assert beam.tokens == [[Y, Z]] and beam.finish == ["stop_token"]
    assert beam.scores[0] == pytest.approx(math.log(0.4 * 0.9 * 1.0) / 3, abs=1e-3)


def test_wide_beam_search_returns_the_most_likely_sequence_of_all():
    """With as many beams as there are prefixes (V^2), beam search is exhaustive over three
    new tokens: it must return the argmax of the joint probability, computed here by brute
    force from the model itself."""
    V = 6
    model = tiny_lm("t5", vocab=V, seed=3)
    prompt = [2, 4]
    beam = generate_ids(model, [prompt], Decoding(max_new_tokens=3, num_beams=V * V), 0)
    grid = torch.cartesian_prod(*[torch.arange(V)] * 3)  # (V^3, 3)
    with torch.no_grad():
        rows = torch.cat([torch.tensor(prompt).expand(len(grid), -1), grid], dim=1)
        logp = model(rows).logits.log_softmax(-1)[:, len(prompt) - 1:-1]  # (V^3, 3, V)
        joint = logp.gather(-1, grid[:, :, None]).squeeze(-1).sum(-1)
    assert beam.tokens == [grid[int(joint.argmax())].tolist()]
    assert beam.scores[0] == pytest.approx(float(joint.max()) / 3, abs=1e-5)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny_lm("alibi")
    greedy = generate_ids(model, PROMPTS, Decoding(max_new_tokens=12), 0).tokens
    a = generate_ids(model, PROMPTS, Decoding(max_new_tokens=12, sample=True, seed=7), 0)
    b = generate_ids(model, PROMPTS, Decoding(max_new_tokens=12, sample=True, seed=7), 0)
    c = generate_ids(model, PROMPTS, Decoding(max_new_tokens=12, sample=True, seed=8), 0)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != greedy
    for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=5.0)):
        out = generate_ids(model, PROMPTS, Decoding(max_new_tokens=12, sample=True, **narrow), 0)
        assert out.tokens == greedy, narrow


def test_stop_tokens_end_a_row_and_banned_tokens_never_come():
    model = tiny_lm("rope")
    free = generate_ids(model, PROMPTS, Decoding(max_new_tokens=10), 0)
    row = free.tokens[0]
    stop = row[2] if row[2] not in row[:2] else row[1]
    out = generate_ids(model, PROMPTS, Decoding(max_new_tokens=10), 0, stop_ids=[stop])
    assert out.tokens[0] == row[:row.index(stop)] and out.finish[0] == "stop_token"
    for tokens, finish in zip(out.tokens, out.finish):  # other rows: stopped or full length
        assert stop not in tokens and (finish == "stop_token" or len(tokens) == 10)
    banned = generate_ids(model, PROMPTS, Decoding(max_new_tokens=10), 0, banned=[stop])
    assert all(stop not in t and len(t) == 10 for t in banned.tokens)


def test_next_token_labels_never_cross_a_document_boundary():
    # A hand-packed row: [CLS] a b [SEP] | c d [SEP] | e [PAD]
    tokens = torch.tensor([[2, 10, 11, 3, 12, 13, 3, 14, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2]])
    labels = next_token_labels(tokens, mask, docs)
    # c (from the [SEP] of a b) and e (from the [SEP] of c d) are not targets; nor is padding
    assert labels.tolist() == [[2, 10, 11, 3, -100, 13, 3, -100, -100]]
    # With document-aware attention the second document reads as if it were alone.
    model = tiny_lm("alibi", vocab=20, cross_document_attention=False)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    packed = model(tokens, mask, position_ids=positions, document_ids=docs).logits
    alone = model(tokens[:, 4:7]).logits
    torch.testing.assert_close(packed[:, 4:7], alone, atol=1e-5, rtol=0)


def test_causal_batches_carry_documents_and_restarting_positions(unique_tokens):
    data, vocab = unique_tokens(n_docs=40)
    loader = PackedLoader(data, vocab / "vocab.txt",
                          LoaderConfig(seq_len=32, batch_size=4, cross_document_attention=False))
    batch = next(causal_batches(loader))
    docs, labels = batch["document_ids"], batch["labels"]
    starts = torch.zeros_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    assert starts.any()
    assert (labels[starts] == -100).all()
    assert (batch["position_ids"][starts] == 0).all()
    real = ~starts & (batch["attention_mask"] == 1)
    assert (labels[real] == batch["input_ids"][real]).all()


# --------------------------------------------------------------------------- text and files


@pytest.fixture
def lm_dir(tmp_path) -> Path:
    """A saved causal model with a real vocabulary (specials + 40 CJK characters)."""
    vocab = write_vocab(tmp_path / "model", 40)
    save_pretrained(tiny_lm("alibi", vocab=45), vocab)
    return vocab


def test_generator_writes_chinese_without_spaces_and_honours_stop_strings(lm_dir):
    gen = Generator.load(lm_dir)
    first = gen(["一丁", "七"], Decoding(max_new_tokens=6), stop_tokens=[])
    assert [r["tokens"] for r in first] == [6, 6]
    for r in first:
        assert r["text"] and " " not in r["text"] and r["finish"] == "length"
    tok = load_tokenizer(lm_dir / "vocab.txt")
    assert decode_text(tok, tok.encode("一 丁 七", add_special_tokens=False).ids) == "一丁七"
    cut = first[0]["text"][-1]
    again = gen(["一丁"], Decoding(max_new_tokens=6), stop=[cut], stop_tokens=[])[0]
    assert again["text"] == first[0]["text"].split(cut)[0] and again["finish"] == "stop_string"
    beams = gen(["一丁", "七"], Decoding(max_new_tokens=4, num_beams=3), stop=[cut])
    assert all("score" in r and cut not in r["text"] for r in beams)


def test_generate_refuses_bad_input_clearly(lm_dir, tmp_path):
    mlm_dir = write_vocab(tmp_path / "mlm", 40)
    save_pretrained(MaskedLM(preset("tiny", vocab_size=45, hidden=32, heads=4, ffn=64)), mlm_dir)
    with pytest.raises(UserError, match="bidirectional.*causal"):
        motian.generate(mlm_dir, ["一"])
    with pytest.raises(UserError, match="no prompts"):
        motian.generate(lm_dir, [])
    with pytest.raises(UserError, match="max_new_tokens must be at least 1"):
        motian.generate(lm_dir, ["一"], max_new_tokens=0)
    with pytest.raises(UserError, match="not both"):
        motian.generate(lm_dir, ["一"], sample=True, num_beams=2)
    with pytest.raises(UserError, match="stop token '<eos>' is not in the vocabulary"):
        motian.generate(lm_dir, ["一"], stop_tokens=["<eos>"])
    absolute = write_vocab(tmp_path / "abs", 40)
    save_pretrained(tiny_lm("absolute", vocab=45, max_positions=16), absolute)
    with pytest.raises(UserError, match="exceeds max_positions=16"):
        motian.generate(absolute, ["一丁七"], max_new_tokens=14)


def test_gpt_demo_pretrains_and_motian_generate_continues_its_prompts(pd98_encoded, tmp_path):
    """The shipped gpt-demo recipe for two steps through `motian.pretrain` (the one `fit`),
    next-token loss, accuracy and perplexity in its eval record, then `motian generate` on its
    final/ in a fresh process."""
    run = tmp_path / "gpt"
    summary = motian.pretrain(recipe="gpt-demo", data=pd98_encoded, out=run, steps=2,
                              override=["eval.rows=16", "eval.batch=8", "eval.every=0"],
                              run=RunSettings(device="cpu", threads=1, progress=False))
    e = summary["eval"]
    assert e["perplexity"] == pytest.approx(math.exp(e["loss"])) and 0 <= e["accuracy"] <= 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("perplexity" in json.dumps(r) for r in records)
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["head"] == "CausalLM"
    assert (config["model"]["causal"], config["model"]["position"],
            config["model"]["cross_document_attention"]) == (True, "alibi", False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "motian.cli", "generate", "--model",
                          str(run / "final"), "--prompts", "中国", "人民", "--max-new-tokens",
                          "5", "--stop-tokens", "[PAD]", "--jsonl", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["中国", "人民"]
    assert all(r["tokens"] == 5 and r["text"] for r in lines)
    text = subprocess.run([sys.executable, "-m", "motian.cli", "generate", "--model", str(run),
                           "--prompts", "中国", "--max-new-tokens", "3", "--sample",
                           "--seed", "1", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert text.returncode == 0 and text.stdout.startswith("中国"), text.stderr
