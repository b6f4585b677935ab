"""Exporting a decoder (`CausalLM`, e.g. gpt-demo's final/): the Hugging Face directory loads
with `AutoModelForCausalLM` (remote code for these decoders, which GPT-2 cannot express; the
GPT-2-shaped ones are tests/test_export_gpt2.py), gives
motian's logits on real tokenised text, and its `generate()` picks motian's tokens; the ONNX
graph (input_ids, attention_mask -> logits) matches PyTorch in onnxruntime; a head with no
export path is refused with what to do instead."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from motian.data.sources import iter_reviews
from motian.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer
from motian.errors import UserError
from motian.model import HEADS, from_pretrained, preset, save_pretrained
from motian.serving.export import export, onnx_session, run_session, torch_outputs
from motian.serving.generate import Decoding, generate_ids, left_pad

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A real WordPiece vocabulary trained on 700 bundled reviews."""
    root = tmp_path_factory.mktemp("decoder_tok")
    corpus = root / "reviews.txt"
    corpus.write_text("\n".join(t for t, _, _ in itertools.islice(iter_reviews(), 0, 2100, 3)),
                      encoding="utf-8")
    train_tokenizer([str(corpus)], root / "tok", vocab_size=600, progress=False)
    return root / "tok"


def decoder_checkpoint(directory, tokenizer_dir, position="alibi", norm="pre", head="CausalLM"):
    """A random-weight decoder at test size (hidden 32, 2 layers) as gpt-demo saves one. The
    output layer is untied: with tied random embeddings greedy decoding only repeats the last
    token, which would let a wrong position or cache pass the generation checks."""
    vocab = len(load_tokenizer(tokenizer_dir).get_vocab())
    config = preset("tiny", vocab_size=vocab, hidden=32, layers=2, heads=4, ffn=64,
                    position=position, norm=norm, causal=head == "CausalLM", max_positions=64,
                    tie_word_embeddings=False, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    save_pretrained(HEADS[head](config), directory)
    for name in ("vocab.txt", "tokenizer.json"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return directory


def prompts(tokenizer_dir, n=3):
    """Real prompts as `motian generate` reads them: [CLS] + the text's tokens."""
    tok = load_tokenizer(tokenizer_dir)
    cls = special_token_ids(tok)["cls"]
    texts = [t[:k] for (t, _, _), k in zip(itertools.islice(iter_reviews(), 5, 500, 40),
                                           (3, 10, 6, 8))]
    return [[cls] + tok.encode(t, add_special_tokens=False).ids for t in texts[:n]]


def motian_greedy(model, rows, tokenizer_dir, new_tokens, cache=True):
    """motian's greedy tokens, with `motian generate`'s stop token and banned tokens."""
    s = special_token_ids(tokenizer_dir)
    banned = [s[k] for k in ("pad", "cls", "mask", "unk")]
    return generate_ids(model, rows, Decoding(max_new_tokens=new_tokens, cache=cache), s["pad"],
                        [s["sep"]], banned).tokens


def hf_tokens(hf, rows, tokenizer_dir, new_tokens, **kwargs):
    """transformers' generate() on left-padded rows, cut before [SEP] as motian returns them."""
    s = special_token_ids(tokenizer_dir)
    ids, mask = left_pad(rows, s["pad"], torch.device("cpu"))
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **kwargs)
    new = out[:, ids.shape[1]:].tolist()
    return [r[:r.index(s["sep"])] if s["sep"] in r else r for r in new]


@pytest.mark.parametrize("position,norm", [("alibi", "pre"), ("absolute", "post")])
def test_decoder_export_matches_motian_logits_and_greedy_tokens(tmp_path, tokenizer_dir,
                                                                position, norm):
    """gpt-demo's shape (ALiBi, Pre-LN) and a BERT-like decoder (absolute, Post-LN): both
    export as remote code, checked at export time (logits and generation) and again here."""
    ckpt = decoder_checkpoint(tmp_path / "ckpt", tokenizer_dir, position, norm)
    manifest = export(ckpt, tmp_path / "out", format="both")
    assert manifest["onnx"]["max_abs_diff"]["logits"] <= TOLERANCE
    assert manifest["hf"]["max_abs_diff"]["logits"] <= TOLERANCE
    assert manifest["hf"]["generate_matches"] is True
    hf_dir = tmp_path / "out" / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["MotianForCausalLM"] and config["model_type"] == "motian"

    # The directory as a transformers user loads it: AutoTokenizer + AutoModelForCausalLM.
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    model = from_pretrained(ckpt).eval()
    texts = [t for t, _, _ in itertools.islice(iter_reviews(), 0, 60, 20)]
    batch = tok([tok.cls_token + t[:n] for t, n in zip(texts, (30, 12, 20))],
                add_special_tokens=False,
                padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert not batch["attention_mask"].all()  # padding included
    with torch.no_grad():
        theirs = hf(**batch).logits
        ours = model(batch["input_ids"], batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=TOLERANCE, rtol=0)

    # Greedy generate() with its KV cache, without it, and motian's generate agree token for
    # token on left-padded real prompts, ending at [SEP] (generation_config.json).
    rows = prompts(tokenizer_dir)
    want = motian_greedy(model, rows, tokenizer_dir, 8)
    assert len({t for r in want for t in r}) > 3  # varied tokens: the check has power
    assert hf_tokens(hf, rows, tokenizer_dir, 8) == want
    assert hf_tokens(hf, rows, tokenizer_dir, 8, use_cache=False) == want


def test_decoder_onnx_matches_pytorch_on_real_text_at_unseen_shapes(tmp_path, tokenizer_dir):
    """The full-sequence graph (no KV cache input): traced at 2 x 16, run at 3 x L > 16 with
    right padding as `motian predict` pads, and on one unpadded row."""
    ckpt = decoder_checkpoint(tmp_path / "ckpt", tokenizer_dir)
    manifest = export(ckpt, tmp_path / "out", format="onnx")
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["outputs"] == ["logits"]
    session = onnx_session(tmp_path / "out" / "model.onnx")
    model = from_pretrained(ckpt).eval()
    rows = prompts(tokenizer_dir) + [[2] + list(range(10, 50))]
    ids, mask = left_pad(rows, 0, torch.device("cpu"))
    ids, mask = ids.flip(1), mask.flip(1)  # right padding; the flipped tokens are real text too
    for batch in ({"input_ids": ids, "attention_mask": mask},
                  {"input_ids": ids[-1:], "attention_mask": mask[-1:]}):
        got = run_session(session, batch)["logits"]
        want = torch_outputs(model, batch)["logits"]
        assert got.shape == want.shape == (*batch["input_ids"].shape, model.config.vocab_size)
        keep = batch["attention_mask"].bool().numpy()
        np.testing.assert_allclose(got[keep], want[keep], atol=TOLERANCE, rtol=0)


def test_beam_search_reorders_motian_cache(tmp_path, tokenizer_dir):
    """transformers' beam search keeps its beams through `_reorder_cache` (motian's
    KVCache.reorder): with the cache it must choose what it chooses recomputing everything."""
    ckpt = decoder_checkpoint(tmp_path / "ckpt", tokenizer_dir, "rope")
    export(ckpt, tmp_path / "out", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf",
                                                           trust_remote_code=True).eval()
    rows = prompts(tokenizer_dir, 2)
    cached = hf_tokens(hf, rows, tokenizer_dir, 6, num_beams=3)
    assert cached == hf_tokens(hf, rows, tokenizer_dir, 6, num_beams=3, use_cache=False)


def test_tupe_decoder_generates_without_a_cache(tmp_path, tokenizer_dir):
    """TUPE has no KV cache in motian: the remote class recomputes every step, as motian does."""
    ckpt = decoder_checkpoint(tmp_path / "ckpt", tokenizer_dir, "tupe")
    manifest = export(ckpt, tmp_path / "out", format="hf")
    assert manifest["hf"]["generate_matches"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf",
                                                           trust_remote_code=True).eval()
    rows = prompts(tokenizer_dir)
    want = motian_greedy(from_pretrained(ckpt).eval(), rows, tokenizer_dir, 6, cache=False)
    assert hf_tokens(hf, rows, tokenizer_dir, 6) == want


def test_head_without_export_path_is_refused_with_what_to_do(tmp_path, tokenizer_dir):
    """A UNILM decodes through a [MASK] step that neither format expresses: the error names the
    head, the heads that do export, and the command that serves it."""
    ckpt = decoder_checkpoint(tmp_path / "ckpt", tokenizer_dir, head="UnifiedLM")
    with pytest.raises(UserError, match=r"no export path for a UnifiedLM.*CausalLM.*"
                                        r"motian generate --model"):
        export(ckpt, tmp_path / "out", format="both")
    assert not (tmp_path / "out").exists()  # refused before writing anything
