"""Hugging Face interop, both ways, against tiny models that `transformers` itself creates and
saves (no download): logits equal within 1e-4 in fp32."""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never the network

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
)

from motian.cli import main as cli_main  # noqa: E402
from motian.errors import UserError  # noqa: E402
from motian.model import (  # noqa: E402
    CausalLM,
    MaskedLM,
    MotianModel,
    PreTrainingModel,
    from_pretrained,
    preset,
)
from motian.model.hf import export_hf, import_bert  # noqa: E402

V = 99
ATOL = 1e-4


def bert_config(**kw) -> BertConfig:
    return BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=64, **kw)


def batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, V, (2, 12), generator=g)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    token_type_ids = torch.zeros(2, 12, dtype=torch.long)
    token_type_ids[:, 6:] = 1
    return input_ids, attention_mask, token_type_ids


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_import_bert_for_pretraining_matches_logits(tmp_path):
    torch.manual_seed(0)
    hf = BertForPreTraining(bert_config()).eval()
    hf.save_pretrained(tmp_path / "bert")  # safetensors
    model, report = import_bert(tmp_path / "bert")
    assert isinstance(model, PreTrainingModel) and report.ok, report.summary()
    x, mask, types = batch()
    with torch.no_grad():
        theirs = hf(x, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        ours = model.eval()(x, mask, types)
    close(ours.logits, theirs.prediction_logits)  # MLM logits on all positions
    close(ours.pair_logits, theirs.seq_relationship_logits)  # NSP
    close(ours.hidden_states, theirs.hidden_states[-1])


def test_import_bin_masked_lm_and_bare_bert_model(tmp_path):
    torch.manual_seed(1)
    hf = BertForMaskedLM(bert_config()).eval()
    hf.save_pretrained(tmp_path / "mlm", safe_serialization=False)  # pytorch_model.bin
    assert (tmp_path / "mlm" / "pytorch_model.bin").is_file()
    model, report = import_bert(tmp_path / "mlm")
    assert isinstance(model, MaskedLM) and report.ok
    x, mask, types = batch()
    with torch.no_grad():
        close(model.eval()(x, mask, types).logits, hf(x, mask, types).logits)
    base = BertModel(bert_config()).eval()
    base.save_pretrained(tmp_path / "base")
    backbone, report = import_bert(tmp_path / "base")
    assert isinstance(backbone, MotianModel)
    assert report.unexpected == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    with torch.no_grad():
        close(backbone.eval()(x, mask, types), base(x, mask, types).last_hidden_state)


def test_import_sharded_checkpoint(tmp_path):
    torch.manual_seed(7)
    hf = BertForMaskedLM(bert_config()).eval()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, report = import_bert(tmp_path / "sharded")
    assert report.ok, report.summary()
    x, mask, types = batch()
    with torch.no_grad():
        close(model.eval()(x, mask, types).logits, hf(x, mask, types).logits)


def test_missing_mlm_head_is_reported_loudly(tmp_path, capsys):
    BertModel(bert_config()).save_pretrained(tmp_path / "base")
    model, report = import_bert(tmp_path / "base", head="MaskedLM")
    assert {"mlm.bias", "mlm.dense.weight", "mlm.norm.weight"} <= set(report.missing)
    assert "mlm.dense.weight" in capsys.readouterr().err
    with pytest.raises(UserError, match="missing"):
        import_bert(tmp_path / "base", head="MaskedLM", strict=True)


def test_wrapper_prefixes_legacy_names_and_resized_segments(tmp_path):
    torch.manual_seed(2)
    hf = BertForMaskedLM(bert_config()).eval()
    hf.save_pretrained(tmp_path / "ref")
    state = load_file(str(tmp_path / "ref" / "model.safetensors"))
    # a torch.compile'd DDP model, with TF-era gamma/beta LayerNorm names
    mangled = {"module._orig_mod." + k.replace("LayerNorm.weight", "LayerNorm.gamma")
               .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    (tmp_path / "wrapped").mkdir()
    save_file(mangled, str(tmp_path / "wrapped" / "model.safetensors"))
    (tmp_path / "wrapped" / "config.json").write_text(
        (tmp_path / "ref" / "config.json").read_text())
    model, report = import_bert(tmp_path / "wrapped")
    assert report.ok, report.summary()
    x, mask, _ = batch()
    with torch.no_grad():
        close(model.eval()(x, mask).logits, hf(x, mask).logits)
    # 3 segment types where the checkpoint has 2: rows 0-1 copied, row 2 fresh, reported
    model3, report = import_bert(tmp_path / "ref", type_vocab_size=3)
    assert any("token_type" in m and "2 -> 3" in m for m in report.mismatched)
    torch.testing.assert_close(model3.backbone.embeddings.token_type.weight[:2],
                               hf.bert.embeddings.token_type_embeddings.weight)


def test_export_bert_shaped_loads_natively(tmp_path):
    torch.manual_seed(3)
    cfg = preset("tiny", vocab_size=V, hidden=32, heads=4, ffn=48, max_positions=64)
    x, mask, types = batch()
    for motian_cls, hf_cls, field in [(MaskedLM, BertForMaskedLM, "logits"),
                                      (PreTrainingModel, BertForPreTraining, "prediction_logits")]:
        model = motian_cls(cfg).eval()
        out = export_hf(model, tmp_path / motian_cls.__name__)
        hf, info = hf_cls.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info  # no missing / unexpected / mismatched key
        with torch.no_grad():
            close(getattr(hf.eval()(x, mask, types), field), model(x, mask, types).logits)
    with torch.no_grad():
        close(hf(x, mask, types).seq_relationship_logits, model(x, mask, types).pair_logits)


@pytest.mark.parametrize("position", ["rope", "t5", "nezha"])
def test_export_other_configs_as_remote_code(tmp_path, position):
    torch.manual_seed(4)
    cfg = preset("tiny", vocab_size=V, hidden=32, heads=4, ffn=48, norm="pre",
                 position=position, activation="geglu")
    model = MaskedLM(cfg).eval()
    out = export_hf(model, tmp_path / f"remote_{position}")
    assert json.loads((out / "config.json").read_text())["model_type"] == "motian"
    source = (out / "modeling_motian.py").read_text()  # self-contained: torch + transformers only
    assert not re.search(r"^\s*(from|import) motian", source, flags=re.M)
    hf = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    x, mask, types = batch()
    with torch.no_grad():
        close(hf(x, attention_mask=mask, token_type_ids=types).logits,
              model(x, mask, types).logits)


def test_export_decoder_and_backbone_as_remote_code(tmp_path):
    torch.manual_seed(5)
    lm = CausalLM(preset("tiny", vocab_size=V, hidden=32, heads=4, ffn=48, causal=True,
                         norm="pre", position="alibi", type_vocab_size=0)).eval()
    hf = AutoModelForCausalLM.from_pretrained(export_hf(lm, tmp_path / "gpt"),
                                              trust_remote_code=True).eval()
    x, mask, _ = batch()
    with torch.no_grad():
        close(hf(x, attention_mask=mask).logits, lm(x, mask).logits)
    backbone = MotianModel(preset("tiny", vocab_size=V, hidden=32, heads=4, ffn=48,
                                  position="deberta")).eval()
    hf = AutoModel.from_pretrained(export_hf(backbone, tmp_path / "deb"),
                                   trust_remote_code=True).eval()
    with torch.no_grad():
        close(hf(x, attention_mask=mask).last_hidden_state, backbone(x, mask))


def test_cli_converts_both_ways(tmp_path, capsys):
    torch.manual_seed(6)
    hf = BertForSequenceClassification(bert_config(num_labels=3)).eval()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    assert cli_main(["hf-convert", "--source", str(tmp_path / "hf"),
                     "--out", str(tmp_path / "motian")]) == 0
    model = from_pretrained(tmp_path / "motian").eval()
    x, mask, types = batch()
    with torch.no_grad():
        close(model(x, mask, types).logits, hf(x, mask, types).logits)
    assert cli_main(["hf-convert", "--source", str(tmp_path / "motian"), "--out",
                     str(tmp_path / "back"), "--tokenizer", str(tmp_path / "vocab.txt")]) == 0
    assert (tmp_path / "back" / "vocab.txt").is_file()
    again = BertForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        close(again(x, mask, types).logits, hf(x, mask, types).logits)
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match="model_type"):
        import_bert(tmp_path / "gpt")
    assert cli_main(["hf-convert", "--source", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "x")]) == 1
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("norm,position,remote", [("post", "absolute", False),
                                                  ("pre", "alibi", True)])
def test_export_loads_the_usual_way_tokenizer_included(tmp_path, reviews, norm, position,
                                                       remote):
    """`AutoTokenizer.from_pretrained(dir)` and `AutoModelFor...from_pretrained(dir)`
    (trust_remote_code only for the remote-code kind) load an export of a real WordPiece
    tokenizer and a tiny classifier: the same token ids as motian's tokenizer (case kept: the
    vocabulary has 'iPhone', which a lower-casing tokenizer would turn into [UNK]), and the same
    logits within 1e-4 on padded real reviews."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from motian.data.tokenizer import load_tokenizer
    from motian.model import SequenceClassification

    texts = reviews[0][:3] + reviews[1][:3] + ["我的iPhone很好用"]
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "iPhone"] + chars
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = load_tokenizer(tmp_path / "vocab.txt")
    torch.manual_seed(8)
    cfg = preset("tiny", vocab_size=len(vocab), hidden=32, heads=4, ffn=48, norm=norm,
                 position=position, max_positions=64)
    model = SequenceClassification(cfg, num_labels=2).eval()
    out = export_hf(model, tmp_path / "hf", tmp_path / "vocab.txt")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (out / name).is_file(), name
    assert (json.loads((out / "config.json").read_text())["model_type"] == "motian") == remote
    hf_tok = AutoTokenizer.from_pretrained(out)
    slow = AutoTokenizer.from_pretrained(out, use_fast=False)
    enc = hf_tok(texts, padding=True, return_tensors="pt")
    for row, mask, text in zip(enc["input_ids"], enc["attention_mask"], texts):
        assert row[mask.bool()].tolist() == tok.encode(text).ids == slow(text)["input_ids"]
    assert tok.token_to_id("iPhone") in enc["input_ids"][-1].tolist()
    assert (enc["attention_mask"] == 0).any()  # padding is part of the comparison
    hf = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=remote)
    with torch.no_grad():
        close(hf.eval()(**enc).logits,
              model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits)
    with pytest.raises(UserError, match="no such tokenizer"):
        export_hf(model, tmp_path / "hf2", tmp_path / "missing-vocab.txt")
