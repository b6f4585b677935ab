"""ONNX and Hugging Face export: parity with PyTorch for every head and position scheme on
real tokenised text, dynamic axes at shapes the trace never saw, and the failure paths."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from motian.data.sources import iter_reviews
from motian.data.tokenizer import train_tokenizer
from motian.errors import UserError
from motian.model import HEADS, from_pretrained, preset, save_pretrained
from motian.serving.export import (
    EXPORT_LENGTH,
    OUTPUTS,
    check_batches,
    check_onnx,
    export,
    onnx_session,
    require_parity,
    run_session,
    torch_outputs,
)

pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def review_tokenizer(tmp_path_factory):
    """A real WordPiece vocabulary trained on 1,000 bundled reviews."""
    root = tmp_path_factory.mktemp("review_tok")
    corpus = root / "reviews.txt"
    texts = (t for t, _, _ in itertools.islice(iter_reviews(), 0, 3000, 3))
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    train_tokenizer([str(corpus)], root / "tok", vocab_size=800, progress=False)
    return root / "tok"


def tiny_checkpoint(directory, head, tokenizer, position="absolute", pooling="cls",
                    **head_kwargs):
    """A random-weight tiny model of `head` saved as a motian checkpoint with its tokenizer."""
    vocab = sum(1 for _ in open(tokenizer / "vocab.txt", encoding="utf-8"))
    config = preset("tiny", vocab_size=vocab, hidden=32, heads=4, ffn=64, position=position,
                    causal=head == "CausalLM", max_positions=128, classifier_pooling=pooling)
    if head in ("SequenceClassification", "TokenClassification"):
        head_kwargs.setdefault("num_labels", 3)
    torch.manual_seed(0)
    save_pretrained(HEADS[head](config, **head_kwargs), directory)
    for name in ("vocab.txt", "tokenizer.json"):
        (directory / name).write_bytes((tokenizer / name).read_bytes())
    return directory


@pytest.mark.parametrize("head", sorted(OUTPUTS))
def test_every_head_onnx_and_hf_match_pytorch(tmp_path, review_tokenizer, head):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", head, review_tokenizer)
    manifest = export(ckpt, tmp_path / "out", format="both")
    out = tmp_path / "out"
    for what in ("onnx", "hf"):
        assert manifest[what]["checked"]
        assert set(manifest[what]["max_abs_diff"]) <= set(OUTPUTS[head])
        assert max(manifest[what]["max_abs_diff"].values()) <= TOLERANCE
    # an early-exit model's ONNX graph is its full-depth classifier (exits need control flow)
    onnx_outputs = OUTPUTS["SequenceClassification" if head == "EarlyExitClassification"
                           else head]
    assert set(manifest["onnx"]["max_abs_diff"]) == set(onnx_outputs)
    # The serving directory stands alone: model, checkpoint copy, tokenizer, manifest.
    for name in ("model.onnx", "config.json", "model.safetensors", "vocab.txt", "export.json"):
        assert (out / name).is_file(), name
    exported = json.loads((out / "export.json").read_text())
    assert exported["head"] == ("SequenceClassification" if head == "EarlyExitClassification"
                                else head)
    assert ("early_exit" in exported) == (head == "EarlyExitClassification")
    assert (out / "hf" / "config.json").is_file()
    assert not (out / "model.unchecked.onnx").exists()


@pytest.mark.parametrize("head", ["SequenceClassification", "MultipleChoice"])
def test_mean_pooled_heads_export_with_parity_as_remote_code(tmp_path, review_tokenizer, head):
    """A mean-pooled head is not what transformers' BERT classes compute: it exports as remote
    code (model_type motian), with the same parity as every other head, padding included."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", head, review_tokenizer, pooling="mean")
    manifest = export(ckpt, tmp_path / "out", format="both")
    for what in ("onnx", "hf"):
        assert max(manifest[what]["max_abs_diff"].values()) <= TOLERANCE
    hf_config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "motian"


@pytest.mark.parametrize("position,head", [
    ("t5", "TokenClassification"), ("rope", "MaskedLM"), ("alibi", "SpanExtraction"),
    ("nezha", "MultipleChoice"), ("deberta", "SequenceClassification"),
    ("tupe", "PreTrainingModel"), ("sinusoidal", "TokenClassification"), ("t5", "CausalLM"),
])
def test_position_schemes_export_with_parity(tmp_path, review_tokenizer, position, head):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", head, review_tokenizer, position=position)
    manifest = export(ckpt, tmp_path / "out", format="onnx")
    assert manifest["onnx"]["shapes"][1][-1] == 40  # longer than the traced example
    assert max(manifest["onnx"]["max_abs_diff"].values()) <= TOLERANCE


@pytest.mark.parametrize("position", ["absolute", "t5", "rope", "alibi", "nezha"])
def test_dynamic_axes_run_at_unseen_batch_and_length(tmp_path, review_tokenizer, position):
    """Traced at batch 2 x length 16; run at batch 3 x length 40 (relative schemes build their
    biases and masks from the length, so a frozen shape would fail or give wrong numbers)."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "TokenClassification", review_tokenizer,
                           position=position)
    export(ckpt, tmp_path / "out", check=False)
    session = onnx_session(tmp_path / "out" / "model.onnx")
    dims = [d for i in session.get_inputs() for d in i.shape]
    assert all(isinstance(d, str) for d in dims), dims  # symbolic, not fixed sizes
    model = from_pretrained(ckpt)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (3, 40), generator=gen)
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, 7:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "token_type_ids": torch.zeros_like(ids)}
    assert EXPORT_LENGTH != 40
    got = run_session(session, batch)["logits"]
    want = torch_outputs(model, batch)["logits"]
    assert got.shape == (3, 40, 3)
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_check_batches_are_real_padded_text(tmp_path, review_tokenizer):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "SequenceClassification", review_tokenizer)
    batches = check_batches(from_pretrained(ckpt), ckpt)
    assert [b["input_ids"].shape[0] for b in batches] == [1, 3, 8]
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padding included
    assert any((b["token_type_ids"] == 1).any() for b in batches)  # pairs included
    unk = 1
    real = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    assert (real != unk).float().mean() > 0.9  # the model's own vocabulary covers the text


def test_parity_check_catches_a_different_model(tmp_path, review_tokenizer):
    """The check is not vacuous: the ONNX graph of one model against a slightly different
    PyTorch model is rejected, with every output's difference in the message."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "SpanExtraction", review_tokenizer)
    export(ckpt, tmp_path / "out", check=False)
    model = from_pretrained(ckpt)
    with torch.no_grad():
        model.span.weight.add_(0.01 * torch.randn_like(model.span.weight))
    parity = check_onnx(model, tmp_path / "out" / "model.onnx", check_batches(model, ckpt))
    assert parity.worst() > TOLERANCE
    with pytest.raises(UserError, match="start_logits .* end_logits"):
        require_parity(parity, TOLERANCE, "ONNX")


def test_bad_checkpoint_and_missing_tokenizer_are_user_errors(tmp_path, review_tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=str(empty)):
        export(empty, tmp_path / "out")
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "MaskedLM", review_tokenizer)
    (ckpt / "vocab.txt").unlink()
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="--tokenizer"):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_export_verb(tmp_path, review_tokenizer, capsys):
    from motian.cli import main

    ckpt = tiny_checkpoint(tmp_path / "ckpt", "TokenClassification", review_tokenizer,
                           position="alibi")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                 "--format", "onnx", "--opset", "17"]) == 0
    assert "onnx vs PyTorch on real text" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "x")]) == 1
    assert "nope" in capsys.readouterr().err


def test_hf_export_names_labels_from_task_json(tmp_path, review_tokenizer):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "SequenceClassification", review_tokenizer)
    (ckpt / "task.json").write_text(json.dumps({"type": "single",
                                                "labels": ["neg", "pos", "mixed"]}))
    export(ckpt, tmp_path / "out", format="hf")
    hf = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert hf["id2label"] == {"0": "neg", "1": "pos", "2": "mixed"}
    assert (tmp_path / "out" / "task.json").is_file() and not (tmp_path / "out" / "model.onnx").exists()
