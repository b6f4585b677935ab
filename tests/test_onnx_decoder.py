"""decoder_kv.onnx: a decoder's ONNX graph with past keys and values in and present ones out,
decoded greedily in onnxruntime one token per step against PyTorch (cached and recomputed),
on real left-padded prompts; decoders whose cache motian cannot hold get no such graph."""

from __future__ import annotations

import pytest
import torch

from motian.data.tokenizer import special_token_ids
from motian.model import from_pretrained
from motian.serving.export import export
from motian.serving.generate import Decoding, generate_ids, left_pad
from motian.serving.onnx import onnx_session
from motian.serving.onnx_decoder import KV_FILE, has_kv_graph, kv_names, onnx_greedy
from tests import test_export_decoder
from tests.test_export_decoder import TOLERANCE, decoder_checkpoint, prompts

pytest.importorskip("onnxruntime")
tokenizer_dir = test_export_decoder.tokenizer_dir  # the fixture: a WordPiece trained on reviews


@pytest.mark.parametrize("position", ["alibi", "absolute"])
def test_kv_graph_decodes_as_pytorch_token_for_token(tmp_path, tokenizer_dir, position):
    ckpt = decoder_checkpoint(tmp_path / "ckpt", tokenizer_dir, position)
    manifest = export(ckpt, tmp_path / "out", format="onnx")
    kv = manifest["onnx_kv"]
    assert kv["file"] == KV_FILE and kv["same_tokens"] is True
    assert kv["max_abs_diff"]["logits"] <= TOLERANCE
    session = onnx_session(tmp_path / "out" / KV_FILE)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask",
                                                      *kv_names(2, "past")]
    assert [o.name for o in session.get_outputs()] == ["logits", *kv_names(2, "present")]

    # Independently of the export's own check: 12 steps on 4 left-padded real prompts give the
    # tokens of PyTorch recomputing the whole sequence every step, and a prompt decoded alone
    # gives what it gives in the batch (the mask and positions are right).
    model = from_pretrained(ckpt).eval()
    pad = special_token_ids(tokenizer_dir)["pad"]
    rows = prompts(tokenizer_dir, 4)
    ids, mask = left_pad(rows, pad, torch.device("cpu"))
    assert not mask.all()
    tokens, steps = onnx_greedy(session, model, ids, mask, 12)
    want = generate_ids(model, rows, Decoding(max_new_tokens=12, cache=False), pad,
                        keep_logits=True)
    assert tokens == want.tokens
    assert len({t for r in tokens for t in r}) > 3  # varied tokens: the check has power
    for got, ref in zip(steps, want.logits):
        assert abs(got - ref.numpy()).max() <= TOLERANCE
    alone, _ = onnx_greedy(session, model, ids[1:2, -len(rows[1]):],
                           mask[1:2, -len(rows[1]):], 12)
    assert alone == [tokens[1]]


def test_decoders_without_a_cache_get_no_kv_graph(tmp_path, tokenizer_dir):
    """TUPE positions have no KV cache in motian: model.onnx only, and the manifest says none."""
    ckpt = decoder_checkpoint(tmp_path / "ckpt", tokenizer_dir, "tupe")
    assert not has_kv_graph(from_pretrained(ckpt))
    manifest = export(ckpt, tmp_path / "out", format="onnx")
    assert "onnx_kv" not in manifest and not (tmp_path / "out" / KV_FILE).exists()
    assert (tmp_path / "out" / "model.onnx").is_file()
