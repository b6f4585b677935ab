"""Structured pruning (motian/pruning.py): removing a head or an FFN neuron from the weights is
exactly zeroing its mask, nothing removed is the identity, the pruned directory loads back at
its smaller size, exports to ONNX (and Hugging Face remote code) with parity, and bad options
are refused naming them."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from motian.data.sources import iter_reviews
from motian.data.tokenizer import load_tokenizer, train_tokenizer
from motian.errors import UserError
from motian.finetuning import save_fine_tuned
from motian.model import HEADS, ModelConfig, from_pretrained, preset, save_pretrained
from motian.model.io import count_parameters
from motian.pruning import choose_kept, prune, prune_model, unit_importance, unit_masks
from motian.serving.export import export
from motian.tasks.builtin import load_builtin
from motian.train.settings import OptimSettings


def tiny_classifier(position: str = "alibi", activation: str = "gelu", vocab: int = 300,
                    norm: str = "pre") -> torch.nn.Module:
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=vocab, hidden=32, heads=4, ffn=48, position=position,
                    activation=activation, norm=norm, dropout=0.0, attention_dropout=0.0)
    return HEADS["SequenceClassification"](config, num_labels=2).eval()


def batch(vocab: int = 300) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids)}


def logits(model, b) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).logits


@pytest.mark.parametrize("position,activation", [("alibi", "gelu"), ("t5", "geglu"),
                                                 ("absolute", "gelu"), ("deberta", "gelu")])
def test_removing_units_equals_zeroing_their_masks(position, activation):
    model, b = tiny_classifier(position, activation), batch()
    kept_heads = [[0, 2, 3], [1]]  # layer 0 drops head 1, layer 1 keeps only head 1
    kept_ffn = [list(range(0, 48, 2)), list(range(40))]
    heads = [torch.tensor([1.0 if h in k else 0.0 for h in range(4)]) for k in kept_heads]
    ffn = [torch.tensor([1.0 if j in k else 0.0 for j in range(48)]) for k in kept_ffn]
    with unit_masks(model, heads, ffn):
        masked = logits(model, b)
    pruned = prune_model(model, kept_heads, kept_ffn)
    assert pruned.config.layer_heads == kept_heads and pruned.config.layer_ffn == [24, 40]
    assert count_parameters(pruned) < count_parameters(model)
    torch.testing.assert_close(logits(pruned, b), masked, atol=1e-5, rtol=0)
    # and the masks do change the output: the test can fail
    assert (logits(model, b) - masked).abs().max() > 1e-4
    # pruning a pruned model again maps to the original head indices
    again = prune_model(pruned, [[1, 2], [0]], [list(range(24)), list(range(40))])
    assert again.config.layer_heads == [[2, 3], [1]]


def test_nothing_removed_is_the_identity():
    model, b = tiny_classifier(), batch()
    head_scores, ffn_scores = unit_importance(model, "single", [{**b, "labels":
                                                                 torch.tensor([0, 1, 1])}])
    assert [len(s) for s in head_scores] == [4, 4] and [len(s) for s in ffn_scores] == [48, 48]
    for s in head_scores + ffn_scores:  # normalised per layer (Michel et al.)
        assert abs(float(s.norm()) - 1.0) < 1e-5
    same = prune_model(model, choose_kept(head_scores, 0.0), choose_kept(ffn_scores, 0.0))
    assert same.config == model.config and same.config.layer_heads is None
    assert torch.equal(logits(same, b), logits(model, b))


def test_choose_kept_removes_the_lowest_and_keeps_one_per_layer():
    scores = [torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.05, 0.02, 0.01])]
    assert choose_kept(scores, 0.5) == [[0, 2], [0]]  # 3 of 6: layer 1 keeps its best
    assert choose_kept(scores, 0.99) == [[0], [0]]


def test_saved_pruned_model_loads_back_with_the_same_logits(tmp_path):
    model, b = tiny_classifier("alibi", "geglu"), batch()
    pruned = prune_model(model, [[3], [0, 1]], [list(range(10)), list(range(5, 45))])
    save_pretrained(pruned, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())["model"]
    assert config["layer_heads"] == [[3], [0, 1]] and config["layer_ffn"] == [10, 40]
    back = from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(back, b), logits(pruned, b))


def test_config_refuses_bad_layer_sizes():
    with pytest.raises(UserError, match="layer_heads must list one entry per layer"):
        preset("tiny", layer_heads=[[0]])
    with pytest.raises(UserError, match=r"layer_heads\[1\]"):
        preset("tiny", layer_heads=[[0], [4]])
    with pytest.raises(UserError, match=r"layer_ffn\[0\]"):
        preset("tiny", layer_ffn=[0, 3])
    assert ModelConfig().layer_heads is None and ModelConfig().layer_ffn is None


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A tiny reviews-sentiment classifier saved as `motian finetune` saves one (random
    weights, a real WordPiece vocabulary trained on bundled reviews, task.json)."""
    root = tmp_path_factory.mktemp("prune")
    corpus = root / "reviews.txt"
    corpus.write_text("\n".join(t for t, _, _ in itertools.islice(iter_reviews(), 0, 2000, 2)),
                      encoding="utf-8")
    train_tokenizer([str(corpus)], root / "tok", vocab_size=600, progress=False)
    tok = load_tokenizer(root / "tok" / "tokenizer.json")
    model = tiny_classifier(vocab=tok.get_vocab_size())
    save_fine_tuned(model, load_builtin("reviews-sentiment"), tok, 64, root / "model")
    return root / "model"


def test_prune_verb_writes_a_model_that_exports_and_loads(tmp_path, fine_tuned):
    result = prune(fine_tuned, tmp_path / "pruned", heads=0.5, ffn=0.5, recovery_epochs=1.0,
                   max_train=64, max_eval=48, importance_examples=64, batch_size=16,
                   optim=OptimSettings(lr=1e-3))
    out = tmp_path / "pruned"
    assert sum(result["pruned"]["heads"]) == 4 and sum(result["pruned"]["ffn"]) == 48
    assert result["recovered"]["params"] < result["before"]["params"]
    assert result["recovered"]["steps"] == 4
    assert "accuracy" in result["before"]["scores"]["dev"]
    back = from_pretrained(out)
    assert count_parameters(back) == result["recovered"]["params"]
    assert json.loads((out / "prune.json").read_text())["task"] == "reviews-sentiment"
    manifest = export(out, tmp_path / "served", format="both")
    assert manifest["onnx"]["checked"] and manifest["onnx"]["max_abs_diff"]["logits"] <= 1e-4
    assert manifest["hf"]["native_bert"] is False  # per-layer sizes: motian's remote code
    assert manifest["hf"]["max_abs_diff"]["logits"] <= 1e-4


def test_prune_with_nothing_removed_keeps_the_logits(tmp_path, fine_tuned):
    prune(fine_tuned, tmp_path / "same", heads=0.0, ffn=0.0, recovery_epochs=0.0, max_eval=16,
          importance_examples=16)
    b = batch(vocab=from_pretrained(fine_tuned).config.vocab_size)
    assert torch.equal(logits(from_pretrained(tmp_path / "same").eval(), b),
                       logits(from_pretrained(fine_tuned).eval(), b))


def test_bad_options_are_refused_naming_them(tmp_path, fine_tuned):
    for option, value in (("heads", 1.0), ("heads", -0.1), ("ffn", 1.5)):
        with pytest.raises(UserError, match=f"--{option} "):
            prune(fine_tuned, tmp_path / "x", **{option: value})
    torch.manual_seed(0)
    save_pretrained(HEADS["MaskedLM"](preset("tiny", vocab_size=300)), tmp_path / "mlm")
    with pytest.raises(UserError, match="--model .*not a fine-tuned classifier"):
        prune(tmp_path / "mlm", tmp_path / "y")
    with pytest.raises(UserError, match="--task pd98-ner"):
        prune(fine_tuned, tmp_path / "z", task="pd98-ner")
