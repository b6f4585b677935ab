"""Hugging Face interop: the ONE place where BERT weight names are mapped to motian's.

- `import_bert(directory)`: a `transformers` BERT directory (BertForPreTraining / BertForMaskedLM
  / BertModel / BertFor{Sequence,Token}Classification, safetensors or `.bin` read with
  `weights_only=True`, sharded or not) -> motian Post-LN + absolute model, with a loud report of
  every key that did not load (the MLM head included).
- `export_hf(model, directory)`: a BERT-shaped model -> a directory `transformers` loads natively
  (BertForMaskedLM, ...); a GPT-2-shaped decoder (`gpt2_mismatches` is empty: Pre-LN, learned
  absolute positions, no embedding LayerNorm) -> a native `GPT2LMHeadModel`; any other
  configuration (Pre-LN encoders, relative positions, GEGLU, other decoders) -> a directory that
  loads with `trust_remote_code=True` from a `modeling_motian.py` generated from motian's own
  model source files, so no model code is written twice. Either kind gets the
  tokenizer files `AutoTokenizer.from_pretrained(directory)` loads (`write_hf_tokenizer`).
- `convert_hf(source, out)`: either direction, directory to directory (`motian hf-convert`).
"""

from __future__ import annotations

import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from motian.errors import UserError
from motian.model.artifact import is_hf_bert
from motian.model.config import ModelConfig
from motian.model.heads import HEADS
from motian.model.io import (
    LoadReport,
    from_pretrained,
    load_weights,
    read_state_dict,
    save_pretrained,
    strip_wrapper_prefixes,
    unwrap_model,
)

# BERT name (inside `bert.` / a bare BertModel) <-> motian name (inside `backbone.`), per layer i.
# q/k/v are three Linear layers in BERT and one fused `qkv` in motian (one matmul instead of 3).
_LAYER = [
    ("attention.output.dense", "attention.out"),
    ("attention.output.LayerNorm", "attention_norm"),
    ("intermediate.dense", "ffn.up"),
    ("output.dense", "ffn.down"),
    ("output.LayerNorm", "ffn_norm"),
]
_EMBEDDINGS = [
    ("embeddings.word_embeddings", "embeddings.word"),
    ("embeddings.position_embeddings", "embeddings.position"),
    ("embeddings.token_type_embeddings", "embeddings.token_type"),
    ("embeddings.LayerNorm", "embeddings.norm"),
]
# Head modules: BERT name -> motian name, per motian head class.
_HEADS = {
    "MaskedLM": [("cls.predictions.transform.dense", "mlm.dense"),
                 ("cls.predictions.transform.LayerNorm", "mlm.norm"),
                 ("cls.predictions.decoder", "mlm.decoder"),
                 ("cls.predictions", "mlm")],  # cls.predictions.bias -> mlm.bias
    "PreTrainingModel": [("cls.predictions.transform.dense", "mlm.dense"),
                         ("cls.predictions.transform.LayerNorm", "mlm.norm"),
                         ("cls.predictions.decoder", "mlm.decoder"),
                         ("cls.predictions", "mlm"),
                         ("bert.pooler.dense", "pair.pooler"),
                         ("cls.seq_relationship", "pair.classifier")],
    "SequenceClassification": [("bert.pooler.dense", "head.pooler"),
                               ("classifier", "head.classifier")],
    "TokenClassification": [("classifier", "classifier")],
    "SpanExtraction": [("qa_outputs", "span")],
    "MultipleChoice": [("bert.pooler.dense", "head.pooler"), ("classifier", "head.classifier")],
    "MotianModel": [],
}
_ARCHITECTURES = {
    "BertForPreTraining": "PreTrainingModel", "BertForMaskedLM": "MaskedLM",
    "BertModel": "MotianModel", "BertForSequenceClassification": "SequenceClassification",
    "BertForTokenClassification": "TokenClassification",
    "BertForQuestionAnswering": "SpanExtraction", "BertForMultipleChoice": "MultipleChoice",
}
_HEAD_TO_BERT = {v: k for k, v in _ARCHITECTURES.items()}
Head = Literal["auto", "MotianModel", "MaskedLM", "PreTrainingModel", "SequenceClassification",
               "TokenClassification", "SpanExtraction", "MultipleChoice"]


# --- import ------------------------------------------------------------------------------------

def config_from_bert(hf: dict, source: str) -> ModelConfig:
    """A BERT config.json dict -> motian Post-LN + learned-absolute ModelConfig."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; motian's "
                        "BERT import expects exact 'gelu'")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{source}: position_embedding_type={hf['position_embedding_type']!r}; "
                        "only 'absolute' BERT checkpoints can be imported")
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"], ffn=hf["intermediate_size"], activation="gelu",
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1), norm="post",
        position="absolute", max_positions=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        initializer_range=hf.get("initializer_range", 0.02))


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    """model.safetensors, pytorch_model.bin, or their sharded `*.index.json` forms."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_state_dict(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(directory / shard))
            return state
    raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin (nor a sharded "
                    "index) found; point at a directory written by save_pretrained")


def bert_to_motian(state: dict[str, Tensor], head: str, layers: int) -> tuple[dict, list[str]]:
    """Rename BERT keys to motian keys (fusing q/k/v). Returns (state, BERT keys not mapped)."""
    state = {_legacy_name(k): v for k, v in strip_wrapper_prefixes(state).items()}
    if not any(k.startswith("bert.") for k in state):  # a bare BertModel: no prefix
        state = {(f"bert.{k}" if k.split(".")[0] in ("embeddings", "encoder", "pooler") else k): v
                 for k, v in state.items()}
    # HF keeps copies that are tied in motian (decoder.bias = predictions.bias; the decoder
    # weight = word embeddings, checked in `_tied`) and position_ids buffers: skipping them
    # loses nothing.
    state = {k: v for k, v in state.items()
             if not k.endswith("position_ids") and k != "cls.predictions.decoder.bias"}
    if head not in ("MaskedLM", "PreTrainingModel") or _tied(state):
        state.pop("cls.predictions.decoder.weight", None)
    out, used = {}, set()
    renames = [(f"bert.{a}", f"backbone.{b}") for a, b in _EMBEDDINGS] + _HEADS[head]
    for i in range(layers):
        renames += [(f"bert.encoder.layer.{i}.{a}", f"backbone.blocks.{i}.{b}") for a, b in _LAYER]
        qkv = [f"bert.encoder.layer.{i}.attention.self.{n}" for n in ("query", "key", "value")]
        for part in ("weight", "bias"):
            names = [f"{q}.{part}" for q in qkv]
            if all(n in state for n in names):
                out[f"backbone.blocks.{i}.attention.qkv.{part}"] = torch.cat([state[n] for n in names])
                used.update(names)
    for key, value in state.items():
        for bert, ours in renames:
            if key.startswith(bert + ".") and key.count(".") == bert.count(".") + 1:
                out[ours + key[len(bert):]] = value
                used.add(key)
                break
    if head == "MotianModel":  # the backbone alone has no `backbone.` level
        out = {k.removeprefix("backbone."): v for k, v in out.items()}
    return out, sorted(set(state) - used)


def _legacy_name(key: str) -> str:
    # Checkpoints converted from the original TF BERT name LayerNorm parameters gamma/beta.
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$",
                                                                   "LayerNorm.bias", key))


def _tied(state: dict[str, Tensor]) -> bool:
    word = state.get("bert.embeddings.word_embeddings.weight")
    decoder = state.get("cls.predictions.decoder.weight")
    return word is not None and decoder is not None and torch.equal(word, decoder)


def import_bert(directory: str | Path, head: Head = "auto", strict: bool = False,
                **config_overrides) -> tuple[nn.Module, LoadReport]:
    """Load a `transformers` BERT directory into a motian model.

    `head="auto"` picks the motian head from config.json's `architectures`. Every weight that did
    not load is printed to stderr and returned in the report (`strict=True` raises instead).
    `config_overrides` may change dropout etc., and `type_vocab_size` / `vocab_size`: the rows the
    checkpoint has are copied, the new ones keep their fresh initialisation (and are reported).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no config.json; not a Hugging Face model directory")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    if not is_hf_bert(directory):
        raise UserError(f"{config_path}: model_type={hf.get('model_type')!r}; import_bert reads "
                        "BERT checkpoints (model_type 'bert')")
    if head == "auto":
        arch = (hf.get("architectures") or ["BertForPreTraining"])[0]
        head = _ARCHITECTURES.get(arch, "PreTrainingModel")
    config = config_from_bert(hf, str(config_path)).replace(**config_overrides)
    kwargs = {"num_labels": len(hf.get("id2label") or {0: 0, 1: 1})} if head in (
        "SequenceClassification", "TokenClassification") else {}
    model = HEADS[head](config, **kwargs)
    state, unmapped = bert_to_motian(read_hf_weights(directory), head, config.layers)
    resized = _copy_overlapping_rows(model, state)
    report = load_weights(model, state, str(directory), strict=False, quiet=True)
    report.unexpected = sorted(set(report.unexpected) | set(unmapped))
    report.mismatched += resized
    if not report.ok:
        if strict:
            raise UserError(report.summary() + "\n(strict import)")
        print("motian: warning: " + report.summary(), file=sys.stderr)
    return model, report


def _copy_overlapping_rows(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Vocabulary / segment tables of another size: keep the checkpoint's rows, init the rest."""
    notes = []
    own = model.state_dict()
    resizable = ("embeddings.word.weight", "embeddings.token_type.weight", "mlm.bias",
                 "mlm.decoder.weight")
    for key in [k for k in state if k.endswith(resizable)]:
        if key in own and state[key].shape[1:] == own[key].shape[1:] \
                and state[key].shape[0] != own[key].shape[0]:
            n = min(state[key].shape[0], own[key].shape[0])
            merged = own[key].clone()
            merged[:n] = state[key][:n]
            notes.append(f"{key}: resized rows {state[key].shape[0]} -> {own[key].shape[0]} "
                         f"(first {n} copied)")
            state[key] = merged
    return notes


# --- export ------------------------------------------------------------------------------------

def is_bert_shaped(model: nn.Module) -> bool:
    """True if `transformers`' own BERT classes compute exactly what `model` computes."""
    c: ModelConfig = model.config
    return (type(model).__name__ in _HEAD_TO_BERT and c.norm == "post" and c.position == "absolute"
            and c.activation == "gelu" and not c.causal and c.type_vocab_size > 0
            and c.classifier_pooling == "cls" and c.attention == "full" and c.embedding_norm
            and c.layer_heads is None and c.layer_ffn is None)  # BERT: one width for all layers


def gpt2_mismatches(model: nn.Module) -> list[str]:
    """Why `transformers`' GPT2LMHeadModel cannot compute what `model` computes, each with the
    setting that would change it; [] when it can. GPT-2 is a Pre-LN decoder with learned absolute
    positions, exact-GELU MLPs (activation_function "gelu"; the original's tanh "gelu_new" is
    another option of the same class), a final LayerNorm and a plain linear output layer, which
    is motian's CausalLM with these settings. Segment embeddings need no match: a CausalLM reads
    segment 0 everywhere, a constant that `motian_to_gpt2` adds to the position table."""
    head, c = type(model).__name__, model.config
    if head != "CausalLM":
        return [f"a {head} is not a decoder (GPT-2 exports a CausalLM)"]
    why = []
    if c.embedding_norm:
        why.append("its embeddings end in a LayerNorm, which GPT-2 has no place for "
                   "(embedding_norm: false)")
    if c.position != "absolute":
        why.append(f"'{c.position}' positions (GPT-2 learns absolute ones: position: absolute)")
    if c.norm != "pre":
        why.append("Post-LN blocks (GPT-2 is Pre-LN: norm: pre)")
    if c.activation != "gelu":
        why.append(f"{c.activation} feed-forward layers (GPT-2's MLP is one GELU: activation: "
                   "gelu)")
    if c.attention != "full":
        why.append(f"{c.attention} attention (GPT-2 attends to every earlier token: attention: "
                   "full)")
    if c.layer_heads is not None or c.layer_ffn is not None:
        why.append("pruned layers of different widths (GPT-2 has one width for all layers)")
    return why


def require_gpt2(model: nn.Module, source: str = "model") -> None:
    """Raise a UserError naming every setting that keeps `model` from being a GPT-2."""
    why = gpt2_mismatches(unwrap_model(model))
    if why:
        raise UserError(f"{source}: not GPT-2-compatible: {'; '.join(why)}. Train a decoder "
                        "with those settings (recipe gpt2-demo), or export it as remote code "
                        "(motian export --format hf does so by itself)")


def export_hf(model: nn.Module, directory: str | Path,
              tokenizer: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face directory: native BERT when `is_bert_shaped`, otherwise
    motian's code as remote code (`trust_remote_code=True`). With `tokenizer` (a directory or a
    vocab.txt / tokenizer.json file) the tokenizer files `AutoTokenizer` loads are written too
    (`write_hf_tokenizer`), for both kinds."""
    model = unwrap_model(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_bert_shaped(model):
        _export_bert(model, directory)
    elif not gpt2_mismatches(model):
        _export_gpt2(model, directory)
    else:
        if type(model).__name__ == "CausalLM":
            print("motian: note: writing remote code (trust_remote_code), not a native "
                  f"GPT2LMHeadModel: {'; '.join(gpt2_mismatches(model))}", file=sys.stderr)
        _export_remote(model, directory)
    if tokenizer is not None:
        decoder = type(model).__name__ == "CausalLM"
        # A decoder reads no segments, and GPT-2 would look token_type_ids up in its word
        # embeddings: its tokenizer returns input_ids and attention_mask only.
        write_hf_tokenizer(tokenizer, directory, model.config.max_positions,
                           ["input_ids", "attention_mask"] if decoder else None)
        if decoder:
            write_generation_config(tokenizer, directory)
    return directory


def write_generation_config(tokenizer: str | Path, directory: str | Path) -> Path:
    """generation_config.json for a decoder, so transformers' `generate()` decodes as
    `motian generate` does by default: greedy, at most 50 new tokens, ending at [SEP] (which
    ends every document of the pretraining stream), never choosing [PAD], [CLS], [MASK] or
    [UNK]. The prompt is the caller's: [CLS] + its tokens, without a closing [SEP]
    (docs/generate.md, "Exporting a decoder")."""
    from motian.data.tokenizer import special_token_ids

    special = special_token_ids(tokenizer)
    path = Path(directory) / "generation_config.json"
    _write_json(path, {"do_sample": False, "num_beams": 1, "max_new_tokens": 50,
                       "bos_token_id": special["cls"], "eos_token_id": special["sep"],
                       "pad_token_id": special["pad"],
                       "bad_words_ids": [[special[k]] for k in ("pad", "cls", "mask", "unk")]})
    return path


HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                      "special_tokens_map.json")


def write_hf_tokenizer(source: str | Path, directory: str | Path,
                       max_length: int | None = None,
                       input_names: list[str] | None = None) -> list[Path]:
    """Write the tokenizer at `source` (a directory, tokenizer.json or vocab.txt) into
    `directory` as `transformers` loads it with `AutoTokenizer.from_pretrained(directory)`,
    remote-code exports included: tokenizer.json (the exact pipeline motian tokenises with),
    vocab.txt (for the slow BertTokenizer), tokenizer_config.json naming `BertTokenizer`
    (AutoTokenizer then gives BertTokenizerFast, or with use_fast=False the slow class: classes
    transformers has, so no remote code and no look-up through config.json's model_type) with
    the normaliser's own settings (BertTokenizerFast rebuilds a normaliser whose lowercase /
    strip_accents / chinese-character settings differ from its arguments; a tokenizer.json
    with another normaliser gets PreTrainedTokenizerFast, which runs it as it is), and
    special_tokens_map.json. `input_names`: what the tokenizer returns (`model_input_names`;
    default the class's, token_type_ids included). Returns the files written."""
    from motian.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, vocab_tokens
    from motian.io import write_text_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(source)
    normalizer = json.loads(tok.to_str()).get("normalizer") or {}
    special = {f"{key}_token": token for key, token in SPECIAL_TOKENS.items()
               if tok.token_to_id(token) is not None}
    if normalizer.get("type") == "BertNormalizer":  # every tokenizer motian makes
        settings = {"tokenizer_class": "BertTokenizer",  # fast by default, slow on request
                    "do_lower_case": bool(normalizer.get("lowercase", True)),
                    "strip_accents": normalizer.get("strip_accents"),
                    "tokenize_chinese_chars": bool(normalizer.get("handle_chinese_chars", True))}
    else:  # another pipeline: the generic class runs tokenizer.json exactly as it is
        settings = {"tokenizer_class": "PreTrainedTokenizerFast"}
    settings.update(clean_up_tokenization_spaces=False, **special)
    if max_length:
        settings["model_max_length"] = int(max_length)
    if input_names:
        settings["model_input_names"] = list(input_names)
    tok.save(str(directory / "tokenizer.json"))
    write_text_atomic(directory / "vocab.txt", "\n".join(vocab_tokens(tok)) + "\n")
    _write_json(directory / "tokenizer_config.json", settings)
    _write_json(directory / "special_tokens_map.json", special)
    return [directory / name for name in HF_TOKENIZER_FILES]


def _export_bert(model: nn.Module, directory: Path) -> None:
    head, c = type(model).__name__, model.config
    state = motian_to_bert(model.state_dict(), head, c.layers)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf = {"architectures": [_HEAD_TO_BERT[head]], "model_type": "bert",
          "vocab_size": c.vocab_size, "hidden_size": c.hidden, "num_hidden_layers": c.layers,
          "num_attention_heads": c.heads, "intermediate_size": c.ffn, "hidden_act": "gelu",
          "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.attention_dropout,
          "max_position_embeddings": c.max_positions, "type_vocab_size": c.type_vocab_size,
          "layer_norm_eps": c.layer_norm_eps, "initializer_range": c.initializer_range,
          "position_embedding_type": "absolute", "tie_word_embeddings": c.tie_word_embeddings,
          "pad_token_id": 0, "torch_dtype": "float32"}
    num_labels = getattr(model, "head_kwargs", {}).get("num_labels")
    if num_labels:
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    _write_json(directory / "config.json", hf)


def motian_to_bert(state: dict[str, Tensor], head: str, layers: int) -> dict[str, Tensor]:
    """Rename motian keys to BERT keys (splitting q/k/v); the inverse of `bert_to_motian`."""
    state = strip_wrapper_prefixes(state)
    if head == "MotianModel":
        state = {f"backbone.{k}": v for k, v in state.items()}
    renames = [(f"backbone.{b}", f"bert.{a}") for a, b in _EMBEDDINGS]
    renames += [(ours, bert) for bert, ours in _HEADS[head]]
    out = {}
    for i in range(layers):
        renames += [(f"backbone.blocks.{i}.{b}", f"bert.encoder.layer.{i}.{a}") for a, b in _LAYER]
        for part in ("weight", "bias"):
            q, k, v = state.pop(f"backbone.blocks.{i}.attention.qkv.{part}").chunk(3)
            for name, t in zip(("query", "key", "value"), (q, k, v)):
                out[f"bert.encoder.layer.{i}.attention.self.{name}.{part}"] = t
    for key, value in state.items():
        for ours, bert in renames:
            if key.startswith(ours + ".") and key.count(".") == ours.count(".") + 1:
                out[bert + key[len(ours):]] = value
                break
        else:
            raise UserError(f"export: motian weight {key!r} has no BERT name")
    if head == "MotianModel":  # BertModel is saved without the `bert.` prefix
        out = {k.removeprefix("bert."): v for k, v in out.items()}
    return out


# GPT-2 name (inside `transformer.h.{i}.`) <-> motian name (inside `backbone.blocks.{i}.`).
# GPT-2's Conv1D layers hold the transpose of a Linear's weight; c_attn is q, k, v fused in
# motian's order.
_GPT2_LAYER = [("ln_1", "attention_norm"), ("attn.c_attn", "attention.qkv"),
               ("attn.c_proj", "attention.out"), ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn.up"),
               ("mlp.c_proj", "ffn.down")]


def motian_to_gpt2(model: nn.Module) -> dict[str, Tensor]:
    """A GPT-2-shaped CausalLM's weights under GPT2LMHeadModel's names (see
    `gpt2_mismatches`). Segment 0's embedding, which a CausalLM adds at every position, is
    folded into the position table."""
    backbone, c = model.backbone, model.config
    embeddings = backbone.embeddings
    positions = embeddings.position.weight
    if embeddings.token_type is not None:
        positions = positions + embeddings.token_type.weight[0]
    out = {"transformer.wte.weight": embeddings.word.weight, "transformer.wpe.weight": positions,
           "transformer.ln_f.weight": backbone.final_norm.weight,
           "transformer.ln_f.bias": backbone.final_norm.bias}
    for i, block in enumerate(backbone.blocks):
        for theirs, ours in _GPT2_LAYER:
            layer = block.get_submodule(ours)
            conv = isinstance(layer, nn.Linear)  # a Conv1D in GPT-2: (in, out)
            out[f"transformer.h.{i}.{theirs}.weight"] = layer.weight.t() if conv else layer.weight
            out[f"transformer.h.{i}.{theirs}.bias"] = layer.bias
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = model.decoder.weight
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _export_gpt2(model: nn.Module, directory: Path) -> None:
    c = model.config
    save_file(motian_to_gpt2(model), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(directory / "config.json", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.max_positions, "n_embd": c.hidden, "n_layer": c.layers,
        "n_head": c.heads, "n_inner": c.ffn, "activation_function": "gelu",
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.attention_dropout,
        "layer_norm_epsilon": c.layer_norm_eps, "initializer_range": c.initializer_range,
        "scale_attn_weights": True, "tie_word_embeddings": c.tie_word_embeddings,
        # GPT-2's defaults name its own vocabulary's <|endoftext|>; generation_config.json
        # (written with the tokenizer) names this vocabulary's [CLS], [SEP] and [PAD]
        "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32"})


REMOTE_SOURCES = ("config.py", "dropout.py", "positions.py", "sparse_attention.py", "transformer.py",
                  "heads.py", "hf_remote.py")


def modeling_source() -> str:
    """One self-contained modeling_motian.py from motian's own model files: their `motian.*`
    imports are dropped (the names are defined earlier in the same file) and `UserError`
    becomes a local ValueError subclass."""
    parts = ['"""Generated by motian.model.hf.export_hf from motian/model/'
             f'{{{",".join(REMOTE_SOURCES)}}}; do not edit."""\n',
             "from __future__ import annotations\n",
             "\nclass UserError(ValueError):\n    pass\n"]
    package = resources.files("motian.model")
    for name in REMOTE_SOURCES:
        source = package.joinpath(name).read_text(encoding="utf-8")
        source = re.sub(r"^from __future__ import annotations\n", "", source, flags=re.M)
        source = re.sub(r"^from motian[\w.]* import \([^)]*\)\n", "", source, flags=re.M)
        source = re.sub(r"^from motian[\w.]* import [^\n(]*\n", "", source, flags=re.M)
        parts.append(f"\n# ---- motian/model/{name} " + "-" * 60 + "\n" + source)
    return "".join(parts)


def _export_remote(model: nn.Module, directory: Path) -> None:
    from motian.model.hf_remote import WRAPPERS  # needs transformers: imported only here

    head = type(model).__name__
    state = model.state_dict()
    if head == "PreTrainingModel":  # HF has no pair-task class: keep the MLM part
        print("motian: note: exporting PreTrainingModel as MaskedLM (the pair head is dropped)",
              file=sys.stderr)
        head = "MaskedLM"
        state = {k: v for k, v in state.items() if not k.startswith("pair.")}
    if head not in WRAPPERS:
        raise UserError(f"export: no Hugging Face class for a non-BERT {head}; exportable "
                        f"heads: {', '.join(WRAPPERS)}")
    wrapper, auto = WRAPPERS[head]
    save_file({f"motian.{k}": v.detach().contiguous().cpu() for k, v in state.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "modeling_motian.py").write_text(modeling_source(), encoding="utf-8")
    head_kwargs = getattr(model, "head_kwargs", {}) if head == type(model).__name__ else {}
    _write_json(directory / "config.json", {
        "architectures": [wrapper.__name__], "model_type": "motian",
        "auto_map": {"AutoConfig": "modeling_motian.MotianConfig",
                     auto: f"modeling_motian.{wrapper.__name__}"},
        "motian": model.config.to_dict(), "head": head, "head_kwargs": head_kwargs,
        "tie_word_embeddings": False, "torch_dtype": "float32"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- CLI verb ----------------------------------------------------------------------------------

def convert_hf(source: Path, out: Path, head: Head = "auto", strict: bool = False,
               tokenizer: Path | None = None) -> Path:
    """Convert between a Hugging Face BERT directory and a motian model directory.

    The direction follows `source`: a `transformers` BERT directory (config.json with
    model_type "bert") becomes a motian directory; a motian directory becomes a Hugging Face one
    (native BERT when the model is BERT-shaped, otherwise loadable with trust_remote_code=True).

    Args:
        source: directory to read (Hugging Face BERT, or motian model).
        out: directory to write.
        head: when importing, the motian head to build; auto follows config.json's architectures.
        strict: when importing, fail instead of warning when any weight does not load.
        tokenizer: when exporting, vocab.txt / tokenizer.json or a directory holding them;
            written alongside as AutoTokenizer loads it (tokenizer.json, vocab.txt,
            tokenizer_config.json, special_tokens_map.json).
    """
    source, out = Path(source), Path(out)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise UserError(f"{source}: no config.json; expected a Hugging Face BERT or a motian "
                        "model directory")
    if is_hf_bert(source):
        model, _ = import_bert(source, head=head, strict=strict)
        save_pretrained(model, out)
        print(f"motian: wrote motian {type(model).__name__} to {out}")
        return out
    model = from_pretrained(source)
    export_hf(model, out, tokenizer)
    kind = ("BERT (native)" if is_bert_shaped(model) else
            "GPT-2 (native)" if not gpt2_mismatches(model) else "trust_remote_code")
    print(f"motian: wrote {kind} Hugging Face model to {out}")
    return out
