"""A GPT-2-shaped motian decoder (Pre-LN, learned absolute positions, no embedding LayerNorm:
recipe gpt2-demo) exports as a native `GPT2LMHeadModel` that plain transformers loads without
remote code, with motian's logits and greedy tokens; any other decoder falls back to remote code
and says why; old checkpoints (no `embedding_norm` field) keep their LayerNorm; decoding reads
the last column's logits only; and benchmarks/generate_speed.py runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from motian.errors import UserError
from motian.model import CausalLM, MaskedLM, from_pretrained, preset, save_pretrained
from motian.model.hf import gpt2_mismatches, require_gpt2
from motian.serving.export import export
from motian.serving.generate import left_pad
from motian.train.recipe import load_recipe
from tests import test_export_decoder
from tests.test_export_decoder import (
    TOLERANCE,
    decoder_checkpoint,
    hf_tokens,
    motian_greedy,
    prompts,
)

transformers = pytest.importorskip("transformers")
tokenizer_dir = test_export_decoder.tokenizer_dir  # the fixture: a WordPiece trained on reviews


def gpt2_checkpoint(directory, tokenizer_dir, tied: bool, type_vocab_size: int):
    """gpt2-demo's model settings at test size (hidden 32, 2 layers). Random weights drawn wide
    (std 0.3) so that greedy decoding varies even with a tied output layer."""
    from motian.data.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(tokenizer_dir).get_vocab())
    config = load_recipe("gpt2-demo").model.build().replace(
        vocab_size=vocab, hidden=32, heads=4, ffn=64, max_positions=64, initializer_range=0.3,
        tie_word_embeddings=tied, type_vocab_size=type_vocab_size)
    assert gpt2_mismatches(CausalLM(config)) == []
    torch.manual_seed(1)
    save_pretrained(CausalLM(config), directory)
    for name in ("vocab.txt", "tokenizer.json"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return directory


@pytest.mark.parametrize("tied,type_vocab_size", [(True, 0), (False, 2)])
def test_gpt2_shaped_decoder_exports_as_native_gpt2(tmp_path, tokenizer_dir, tied,
                                                    type_vocab_size):
    """Tied output layer without segments (gpt2-demo), and an untied one with segment
    embeddings (segment 0 folded into GPT-2's position table)."""
    ckpt = gpt2_checkpoint(tmp_path / "ckpt", tokenizer_dir, tied, type_vocab_size)
    manifest = export(ckpt, tmp_path / "out", format="hf")
    hf_dir = tmp_path / "out" / "hf"
    assert manifest["hf"]["native_gpt2"] is True
    assert manifest["hf"]["max_abs_diff"]["logits"] <= TOLERANCE
    assert manifest["hf"]["generate_matches"] is True
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert "auto_map" not in config and not (hf_dir / "modeling_motian.py").exists()

    # Plain transformers classes, no remote code; every weight loads, none left over.
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()
    auto = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(auto) is transformers.GPT2LMHeadModel
    model = from_pretrained(ckpt).eval()
    # As a transformers user runs it: AutoTokenizer's batch straight into the model. It holds
    # no token_type_ids, which GPT-2 would look up in its word embeddings.
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    batch = tok([tok.cls_token + t for t in ("今天天气很好", "中国", "这个手机不错啊")],
                add_special_tokens=False, padding=True, return_tensors="pt")
    assert sorted(batch) == ["attention_mask", "input_ids"]
    assert not batch["attention_mask"].all()  # left padding included
    with torch.no_grad():
        theirs = hf(**batch).logits
        ours = model(batch["input_ids"], batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=TOLERANCE, rtol=0)
    rows = prompts(tokenizer_dir, 4)

    # Greedy generate() (exported generation_config.json: stop at [SEP], specials banned) with
    # and without GPT-2's cache gives motian's tokens on left-padded real prompts.
    want = motian_greedy(model, rows, tokenizer_dir, 10)
    assert len({t for r in want for t in r}) > 3  # varied tokens: the check has power
    assert hf_tokens(hf, rows, tokenizer_dir, 10) == want
    assert hf_tokens(hf, rows, tokenizer_dir, 10, use_cache=False) == want


def test_other_decoders_fall_back_to_remote_code_and_say_why(tmp_path, tokenizer_dir, capsys):
    """gpt-demo's own shape (ALiBi, embedding LayerNorm) is no GPT-2: the export is remote code,
    with a note naming each setting to change; `require_gpt2` refuses it with the same list."""
    ckpt = decoder_checkpoint(tmp_path / "ckpt", tokenizer_dir, "alibi", "pre")
    manifest = export(ckpt, tmp_path / "out", format="hf")
    assert manifest["hf"]["native_gpt2"] is False
    config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert config["model_type"] == "motian"
    err = capsys.readouterr().err
    assert "not a native GPT2LMHeadModel" in err
    assert "embedding_norm: false" in err and "'alibi' positions" in err
    with pytest.raises(UserError, match=r"ckpt: not GPT-2-compatible: .*LayerNorm.*"
                                        r"embedding_norm: false.*'alibi' positions.*gpt2-demo"):
        require_gpt2(from_pretrained(ckpt), str(ckpt))
    post = preset("tiny", causal=True, norm="post", embedding_norm=False)
    assert gpt2_mismatches(CausalLM(post)) == ["Post-LN blocks (GPT-2 is Pre-LN: norm: pre)"]
    with pytest.raises(UserError, match="a MaskedLM is not a decoder"):
        require_gpt2(MaskedLM(preset("tiny")))


def test_checkpoints_without_the_field_keep_their_embedding_layernorm(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", causal=True, norm="pre", dropout=0.0,
                            attention_dropout=0.0)).eval()
    save_pretrained(model, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["model"]["embedding_norm"]  # as written before the field existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    old = from_pretrained(tmp_path / "old").eval()
    assert old.config.embedding_norm and old.backbone.embeddings.norm is not None
    ids = torch.tensor([[2, 5, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(old(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert CausalLM(preset("tiny", causal=True, embedding_norm=False)).backbone.embeddings.norm \
        is None


@pytest.mark.parametrize("position", ["absolute", "alibi", "rope", "t5"])
def test_last_only_logits_are_the_last_column_of_the_full_ones(position):
    """What decoding reads (`last_only`): the last column, with left padding, and after a
    cached prompt for a cached step of several tokens."""
    from motian.model.transformer import KVCache

    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=50, hidden=32, heads=4, ffn=64, causal=True,
                            norm="pre", position=position, dropout=0.0,
                            attention_dropout=0.0)).eval()
    ids, mask = left_pad([[2, 7, 8, 9, 10], [2, 12, 13]], 0, torch.device("cpu"))
    with torch.no_grad():
        full = model(ids, mask).logits
        last = model(ids, mask, last_only=True).logits
        torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
        cache = KVCache(2)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        model(ids[:, :3], mask[:, :3], positions[:, :3], cache=cache, last_only=True)
        step = model(ids[:, 3:], mask[:, 3:], positions[:, 3:], cache=cache, last_only=True)
        want = model(ids, mask, positions).logits[:, -1:]
    torch.testing.assert_close(step.logits, want, atol=1e-5, rtol=0)


def test_generate_speed_benchmark_runs_and_resumes(tmp_path, tokenizer_dir):
    """benchmarks/generate_speed.py on a tiny shape: every row, the same greedy tokens from both
    libraries; a second run reuses the stored rows instead of timing again."""
    from benchmarks.generate_speed import main

    args = ["--layers", "1", "--hidden", "32", "--heads", "2", "--batch", "1", "3",
            "--new-tokens", "5", "--repeats", "1", "--tokenizer", str(tokenizer_dir),
            "--out", str(tmp_path / "bench")]
    rows = main(args)
    assert [(r["batch"], r["cache"]) for r in rows] == [(1, True), (1, False), (3, True),
                                                        (3, False)]
    assert all(r["same_tokens"] and r["motian_tokens_per_s"] > 0
               and r["transformers_tokens_per_s"] > 0 for r in rows)
    assert rows[2]["distinct_tokens"] > 1
    stored = (tmp_path / "bench" / "results.jsonl").read_text()
    assert main(args) == rows
    assert (tmp_path / "bench" / "results.jsonl").read_text() == stored
    with pytest.raises(SystemExit, match="exceed max_positions=256"):
        main(args[:-2] + ["--out", str(tmp_path / "b2"), "--new-tokens", "300"])
