"""`motian export`: a motian checkpoint -> an ONNX serving directory and/or a Hugging Face one,
each checked against PyTorch on real text before it is kept.

The ONNX contract (what `motian predict --backend onnx` and any other runtime feed and read):

| head | inputs (int64) | outputs (float32) |
|---|---|---|
| MotianModel | input_ids, attention_mask, token_type_ids* (B, L) | hidden_states (B, L, hidden) |
| MaskedLM | same | logits (B, L, vocab) |
| PreTrainingModel | same | logits (B, L, vocab), pair_logits (B, P) |
| SequenceClassification | same | logits (B, labels) |
| TokenClassification | same | logits (B, L, labels) |
| SpanExtraction | same | start_logits, end_logits (B, L), padding at -1e4 |
| MultipleChoice | input_ids, attention_mask, token_type_ids* (B, C, L) | logits (B, C) |
| CausalLM | input_ids, attention_mask (B, L) | logits (B, L, vocab) |

A CausalLM also gets decoder_kv.onnx, the same decoder with a KV cache (past keys and values
in, present ones out: motian/serving/onnx_decoder.py), checked by decoding greedily with it.

(*) only when the model has segment embeddings (type_vocab_size > 0). B, C and L are dynamic.
MLM logits cover every position, not only the masked ones: a served fill-mask request names its
[MASK] positions by token, so a second "positions" input would only move that lookup into every
client; at serving lengths the full output layer costs little next to the encoder.

The serving directory holds model.onnx, the checkpoint itself (config.json + model.safetensors,
so `--backend torch` reads the same directory), the tokenizer files (tokenizer.json,
vocab.txt, tokenizer_config.json, special_tokens_map.json: `AutoTokenizer` loads them), and
export.json with the parity measured at export time; `hf/` holds the Hugging Face directory
when asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from motian.data.sources import iter_reviews
from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.errors import UserError
from motian.io import write_json_atomic
from motian.model.artifact import (
    CONFIG,
    TASK_CARD,
    WEIGHTS,
    TaskCard,
    find_tokenizer,
    resolve_model_dir,
)
from motian.model.hf import write_hf_tokenizer
from motian.model.io import from_pretrained
from motian.serving.onnx import INT8_FILE, ONNX_FILE, onnx_session, run_session
from motian.serving.onnx_decoder import (
    KV_FILE,
    check_onnx_decoder,
    export_onnx_decoder,
    has_kv_graph,
)
from motian.tasks.features import Featurizer, collate
from motian.tasks.types import Example, Task, tag_names

MANIFEST = "export.json"
EXPORT_LENGTH = 16  # sequence length of the traced example; checks run at other lengths
# (batch size, longest sequence) of the parity batches: one unpadded example, then batches
# longer than the traced example, so a shape frozen at export time would show up as an error.
CHECK_SHAPES = ((1, 12), (3, 40), (8, 128))

# head -> ONNX output names, in order; each is a field of ModelOutput (see `named_outputs`).
OUTPUTS: dict[str, tuple[str, ...]] = {
    "MotianModel": ("hidden_states",),
    "MaskedLM": ("logits",),
    "PreTrainingModel": ("logits", "pair_logits"),
    "SequenceClassification": ("logits",),
    # PyTorch only: ONNX and Hugging Face get its full-depth SequenceClassification (`export`)
    "EarlyExitClassification": ("logits", "exit_layers"),
    "TokenClassification": ("logits",),
    "SpanExtraction": ("start_logits", "end_logits"),
    "MultipleChoice": ("logits",),
    "CausalLM": ("logits",),
}
_FIELD = {"start_logits": "logits", "pair_logits": "pair_logits", "end_logits": "end_logits",
          "logits": "logits", "hidden_states": "hidden_states", "exit_layers": "exit_layers"}


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The inputs a head takes from a tokenised batch (see the table above)."""
    head = type(model).__name__
    if head == "CausalLM" or model.config.type_vocab_size == 0:
        return ("input_ids", "attention_mask")
    return ("input_ids", "attention_mask", "token_type_ids")


def named_outputs(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Run `model` on `batch` and name its outputs as the ONNX graph does: the ONE mapping from
    a head's ModelOutput to serving outputs, used by the exporter and the torch backend."""
    head = type(model).__name__
    inputs = [batch[n] for n in input_names(model)]
    if head == "MotianModel":
        return {"hidden_states": model(*inputs)}
    if head == "CausalLM":  # its third positional argument is position_ids
        out = model(inputs[0], attention_mask=inputs[1])
    else:
        out = model(*inputs)
    return {name: getattr(out, _FIELD[name]) for name in OUTPUTS[head]}


class _Traceable(nn.Module):
    """Positional tensors in, a tuple of tensors out: the form `torch.onnx.export` traces."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = input_names(model)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(named_outputs(self.model, dict(zip(self.names, inputs))).values())


@dataclass
class Parity:
    """Largest |onnx - torch| per output over all check batches, and the shapes run."""

    max_abs_diff: dict[str, float]
    shapes: list[list[int]]

    def worst(self) -> float:
        return max(self.max_abs_diff.values())


# --------------------------------------------------------------------------- ONNX export


def export_onnx(model: nn.Module, path: Path, opset: int = 17) -> Path:
    """Trace `model` (eval mode) to ONNX at `path` with dynamic batch/choice/sequence axes.

    The TorchScript exporter (`dynamo=False`) is used on purpose. torch 2.13 defaults to the
    dynamo exporter, which needs `onnxscript` and runs `torch.export`; that refuses the
    backbone's `bool(attention_mask.all())` (a data-dependent branch that skips the mask for
    unpadded batches, keeping SDPA on its fastest kernels in eager mode). Tracing records
    one branch: the example below always contains padding, so the graph always applies the
    mask, which is exact (all zeros) for unpadded batches as well.
    """
    model.eval()
    example = _trace_example(model)
    names = input_names(model)
    axes = {0: "batch", 1: "choices", 2: "sequence"} if _is_choice(model) else \
        {0: "batch", 1: "sequence"}
    outputs = OUTPUTS[type(model).__name__]
    dynamic = {n: axes for n in names} | {n: _output_axes(model, n) for n in outputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Traceable(model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings name the shape-dependent Python branches discussed above; the
        # deprecation notice of the TorchScript exporter is acknowledged in the docstring.
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(example[n] for n in names), str(path), dynamo=False,
                          opset_version=opset, input_names=list(names),
                          output_names=list(outputs), dynamic_axes=dynamic)
    model.eval()  # the exporter restores the wrapper's mode onto every child
    return path


def _output_axes(model: nn.Module, name: str) -> dict[int, str]:
    head = type(model).__name__
    if head == "MultipleChoice":
        return {0: "batch", 1: "choices"}  # (B, C)
    if name == "pair_logits" or head == "SequenceClassification":
        return {0: "batch"}  # (B, labels)
    return {0: "batch", 1: "sequence"}  # (B, L, ...)


def _is_choice(model: nn.Module) -> bool:
    return type(model).__name__ == "MultipleChoice"


def _trace_example(model: nn.Module) -> dict[str, Tensor]:
    """Batch 2 x EXPORT_LENGTH (x 2 choices), the second row padded after 10 tokens."""
    shape = (2, 2, EXPORT_LENGTH) if _is_choice(model) else (2, EXPORT_LENGTH)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, shape, generator=gen)
    mask = torch.ones(shape, dtype=torch.long)
    mask[1, ..., 10:] = 0
    types = torch.zeros(shape, dtype=torch.long)
    types[..., 6:10] = 1 if model.config.type_vocab_size > 1 else 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


# --------------------------------------------------------------------------- parity check


def check_batches(model: nn.Module, tokenizer_dir: Path) -> list[dict[str, Tensor]]:
    """Real inputs for the parity check: bundled product reviews, tokenised by the model's own
    tokenizer and laid out for its head the way `motian predict` lays them out (pairs with
    segment B, NER-style single texts, question + context windows, 2-3 candidates), padded to
    the longest row of each batch, at the shapes of CHECK_SHAPES."""
    tok = load_tokenizer(tokenizer_dir)
    special = special_token_ids(tok)
    texts = [t for t, _, _ in islice(iter_reviews(), 0, 400, 7)]  # varied lengths, both labels
    task_type = {"TokenClassification": "token", "SpanExtraction": "span",
                 "MultipleChoice": "choice"}.get(type(model).__name__, "pair")
    batches = []
    for n, (size, length) in enumerate(CHECK_SHAPES):
        length = min(length, model.config.max_positions)
        rows = texts[n * 10: n * 10 + size + 3]
        examples = [_check_example(task_type, i, rows) for i in range(size)]
        task = Task("export-check", task_type)
        features = Featurizer(task, tok, special, max_length=length)(examples)[:size]
        batch = collate(task_type, features, special["pad"])
        batch.pop("choice_mask", None)
        batches.append({k: v for k, v in batch.items() if k in input_names(model)})
    top = max(int(b["input_ids"].max()) for b in batches)
    if top >= model.config.vocab_size:
        raise UserError(f"{tokenizer_dir}: the tokenizer gives id {top} but the model has "
                        f"vocab_size={model.config.vocab_size}; give the tokenizer it was "
                        "trained with (--tokenizer)")
    return batches


def _check_example(task_type: str, i: int, rows: list[str]) -> Example:
    text, other = rows[i], rows[i + 1]
    if task_type == "span":
        return Example(str(i), text=text, text_b=other[:6])
    if task_type == "choice":  # 2 or 3 candidates, so some rows carry an empty padding choice
        return Example(str(i), text=text, choices=[r[:10] for r in rows[i + 1: i + 3 + i % 2]])
    if task_type == "pair" and i % 2:
        return Example(str(i), text=text, text_b=other)
    return Example(str(i), text=text)


def torch_outputs(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {k: v.float().numpy() for k, v in named_outputs(model.eval(), batch).items()}


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray],
            worst: dict[str, float]) -> None:
    """Fold max |reference - other| per output into `worst` (shapes must agree)."""
    for name, ref in reference.items():
        if name not in other:
            continue
        got = np.asarray(other[name], dtype=np.float32)
        if got.shape != ref.shape:
            raise UserError(f"export check: output {name} has shape {got.shape}, PyTorch gives "
                            f"{ref.shape}")
        worst[name] = max(worst.get(name, 0.0), float(np.abs(got - ref).max()))


def check_onnx(model: nn.Module, path: Path, batches: list[dict[str, Tensor]]) -> Parity:
    """Run onnxruntime and PyTorch on every batch; the largest difference per output."""
    session = onnx_session(path)
    worst: dict[str, float] = {}
    for batch in batches:
        compare(torch_outputs(model, batch), run_session(session, batch), worst)
    return Parity(worst, [list(b["input_ids"].shape) for b in batches])


def require_parity(parity: Parity, tolerance: float, what: str) -> None:
    """Raise (loudly, with every output's difference) if any exceeds `tolerance`."""
    if parity.worst() > tolerance:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in parity.max_abs_diff.items())
        raise UserError(f"export check failed: {what} differs from PyTorch by more than "
                        f"{tolerance:g} (max abs difference: {diffs}; shapes {parity.shapes}). "
                        "Re-export with another --opset, or report it with the checkpoint")


# --------------------------------------------------------------------------- Hugging Face


def check_hf(model: nn.Module, directory: Path, batches: list[dict[str, Tensor]]) -> Parity:
    """Load the exported directory with `transformers` (trust_remote_code for motian's own
    code) and compare its outputs at real (unpadded) positions: BERT's QA head does not push
    padding to -1e4 as motian's does, and no one reads a padding position's output."""
    hf = load_hf(directory)
    worst: dict[str, float] = {}
    for batch in batches:
        with torch.no_grad():
            out = hf(**batch)
        theirs = {"logits": getattr(out, "logits", None) if not hasattr(out, "prediction_logits")
                  else out.prediction_logits,
                  "pair_logits": getattr(out, "seq_relationship_logits", None),
                  "start_logits": getattr(out, "start_logits", None),
                  "end_logits": getattr(out, "end_logits", None),
                  "hidden_states": getattr(out, "last_hidden_state", None)}
        mask = batch["attention_mask"].bool().numpy()
        ours = _zero_padding(model, torch_outputs(model, batch), mask)
        theirs = _zero_padding(model, {k: v.float().numpy() for k, v in theirs.items()
                                       if v is not None}, mask)
        compare(ours, theirs, worst)
    return Parity(worst, [list(b["input_ids"].shape) for b in batches])


def load_hf(directory: Path) -> nn.Module:
    """The exported directory as `transformers` loads it (remote code trusted: it is motian's)."""
    try:
        import transformers
    except ImportError:
        raise UserError("checking the Hugging Face export needs transformers: pip install "
                        "'motian[hf]' (or export with --no-check)") from None
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if "auto_map" in config:
        auto = next(k for k in config["auto_map"] if k != "AutoConfig")
        return getattr(transformers, auto).from_pretrained(directory,
                                                           trust_remote_code=True).eval()
    return getattr(transformers, config["architectures"][0]).from_pretrained(directory).eval()


def check_hf_generation(model: nn.Module, directory: Path, tokenizer_dir: Path,
                        new_tokens: int = 8) -> bool:
    """A decoder's export, decoded: greedy `generate()` of transformers (the exported
    generation_config.json: stop at [SEP], special tokens banned, its KV cache) on three real
    left-padded prompts against motian's own `generate_ids`. True if every token agrees;
    logits within 1e-4 can still flip a near-tie, so a mismatch is reported, not fatal."""
    from motian.serving.generate import Decoding, generate_ids, left_pad

    special = special_token_ids(tokenizer_dir)
    prompts = generation_prompts(tokenizer_dir)
    new_tokens = generation_steps(model, prompts, new_tokens)
    c = model.config
    banned = [special[k] for k in ("pad", "cls", "mask", "unk")]
    decoding = Decoding(max_new_tokens=new_tokens, cache=c.position not in ("tupe", "deberta"))
    ours = generate_ids(model, prompts, decoding, special["pad"], [special["sep"]], banned)
    ids, mask = left_pad(prompts, special["pad"], torch.device("cpu"))
    with torch.no_grad():
        out = load_hf(directory).generate(ids, attention_mask=mask, max_new_tokens=new_tokens)
    theirs = [row[:row.index(special["sep"])] if special["sep"] in row else row
              for row in out[:, ids.shape[1]:].tolist()]
    return theirs == ours.tokens


def generation_prompts(tokenizer_dir: Path) -> list[list[int]]:
    """The generation checks' prompts: the starts (4, 9 and 6 characters) of three bundled
    reviews as `motian generate` reads them, [CLS] + tokens; decoded left-padded."""
    tok = load_tokenizer(tokenizer_dir)
    cls = special_token_ids(tok)["cls"]
    texts = [t for t, _, _ in islice(iter_reviews(), 0, 30, 10)]
    return [[cls] + tok.encode(t[:n], add_special_tokens=False).ids
            for t, n in zip(texts, (4, 9, 6))]


def generation_steps(model: nn.Module, prompts: list[list[int]], wanted: int) -> int:
    """`wanted` new tokens, fewer where learned absolute positions end at max_positions."""
    c = model.config
    return wanted if c.extrapolates else min(wanted, c.max_positions - max(map(len, prompts)))


def _zero_padding(model: nn.Module, outputs: dict[str, np.ndarray],
                  mask: np.ndarray) -> dict[str, np.ndarray]:
    """Zero the outputs at padding positions (outputs with a sequence axis only)."""
    out = {}
    for name, value in outputs.items():
        if "sequence" in _output_axes(model, name).values():
            value = np.where(mask.reshape(mask.shape + (1,) * (value.ndim - mask.ndim)), value, 0)
        out[name] = value
    return out


def output_labels(card: TaskCard | None) -> list[str] | None:
    """Names of a classifier's outputs: the task's class names, or for token tasks the tag
    names derived from its entity types and scheme (O, B-PER, I-PER, ...); None for a model
    without a task card (not fine-tuned) and for heads whose outputs are not classes."""
    if card is None:
        return None
    if card.type == "token":
        return tag_names(list(card.labels), card.scheme)
    if card.type in ("single", "pair") and card.labels:
        return list(card.labels)
    return None


def _name_hf_labels(directory: Path, labels: list[str]) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    write_json_atomic(path, config)


# --------------------------------------------------------------------------- the verb


def _copy_checkpoint(checkpoint: Path, out: Path) -> None:
    for name in (CONFIG, WEIGHTS, TASK_CARD):
        if (checkpoint / name).is_file() and \
                (checkpoint / name).resolve() != (out / name).resolve():
            shutil.copyfile(checkpoint / name, out / name)


def export(checkpoint: Path, out: Path, format: Literal["onnx", "hf", "both"] = "onnx",
           opset: int = 17, check: bool = True, tolerance: float = 1e-4,
           tokenizer: Path | None = None, int8: bool = False,
           check_data: Path | None = None) -> dict:
    """Export a motian checkpoint for serving: ONNX and/or a Hugging Face directory.

    out/ receives model.onnx, a copy of the checkpoint and its tokenizer (so `motian predict`
    needs nothing else, with either backend) and export.json; out/hf/ the Hugging Face
    directory. Each export is run against PyTorch on tokenised bundled text at several batch
    sizes and lengths, padding included, and rejected if any output differs by more than
    `tolerance`.

    Args:
        checkpoint: motian model directory (config.json + model.safetensors), any head; a
            checkpoint or a training run directory (its latest checkpoint) also works.
        out: directory to write.
        format: onnx, hf (out/hf) or both.
        opset: ONNX opset version (17 has LayerNormalization as one op).
        check: compare the export with PyTorch on real inputs (--no-check skips it).
        tolerance: largest accepted absolute difference of any output (fp32).
        tokenizer: the model's tokenizer (directory, tokenizer.json or vocab.txt); default:
            the one in the checkpoint directory, else the one its pretraining run used.
        int8: also write model.int8.onnx, the int8 dynamic quantisation of model.onnx
            (motian/serving/quantize.py), with its logit difference from PyTorch and, for a
            fine-tuned model, fp32 vs int8 test scores (a warning if int8 trails by > 1 point).
        check_data: directory with the task's files, for the int8 test score of a CLUE task
            or your own (bundled tasks need none), as `motian evaluate --data`.
    """
    checkpoint, out = resolve_model_dir(checkpoint), Path(out)
    if int8 and format == "hf":
        raise UserError("--int8 quantises the ONNX graph, and --format hf writes none; use "
                        "--format onnx or both")
    model = from_pretrained(checkpoint).eval()
    early_exit = getattr(model, "exit_threshold", None)
    if early_exit is not None:  # a static graph runs every row through every block
        model = model.full_depth()
    if type(model).__name__ not in OUTPUTS:
        raise UserError(no_export_path(type(model).__name__, checkpoint))
    card = TaskCard.read_optional(checkpoint)
    tokenizer_dir = find_tokenizer(checkpoint, tokenizer)
    load_tokenizer(tokenizer_dir)  # fails early, naming the file, if it is not a tokenizer
    batches = check_batches(model, tokenizer_dir) if check else []
    out.mkdir(parents=True, exist_ok=True)
    _copy_checkpoint(checkpoint, out)
    write_hf_tokenizer(tokenizer_dir, out, model.config.max_positions)  # AutoTokenizer loads it
    head = type(model).__name__
    manifest = {"kind": "export", "source": str(checkpoint), "head": head,
                "inputs": list(input_names(model)), "outputs": list(OUTPUTS[head]),
                "opset": opset, "tolerance": tolerance, "torch": torch.__version__}
    if early_exit is not None:
        manifest["early_exit"] = {
            "threshold": early_exit, "exported": "full depth (every block, the last head)",
            "early_exit_backend": "torch: `motian serve --backend torch` / `motian predict` on "
                                  "this directory (docs/serving.md, Early exit)"}
        print(f"motian: {checkpoint} exits early (threshold {early_exit:g}); the exported "
              "graphs run the full depth: serve this directory with --backend torch for early "
              "exit", flush=True)
    if format in ("onnx", "both"):
        manifest["onnx"] = _export_onnx_checked(model, out, opset, batches, tolerance)
        if has_kv_graph(model):
            manifest["onnx_kv"] = _export_kv_checked(model, out, opset, tokenizer_dir,
                                                     tolerance, check)
    if int8:
        from motian.serving.quantize import check_int8, quantize_int8

        quantize_int8(out / ONNX_FILE, out / INT8_FILE)
        manifest["int8"] = check_int8(model, out, batches, card, tokenizer_dir,
                                      Path(check_data) if check_data else None)
        print(f"motian: wrote {out / INT8_FILE} "
              f"({(out / INT8_FILE).stat().st_size / 1e6:.1f} MB)", flush=True)
    if format in ("hf", "both"):
        manifest["hf"] = _export_hf_checked(model, out / "hf", tokenizer_dir, batches,
                                            tolerance, output_labels(card))
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def no_export_path(head: str, checkpoint: Path) -> str:
    """Why a head has no ONNX / Hugging Face export, and what to do instead."""
    instead = {
        "UnifiedLM": "a UNILM decodes as a prefix LM, re-reading a [MASK] at every step, which "
                     f"neither format's classes express: serve it with `motian generate "
                     f"--model {checkpoint}`",
        "Seq2SeqLM": "a MASS encoder-decoder decodes through its own decoder state: serve it "
                     f"with `motian generate --model {checkpoint}`",
        "ReplacedTokenDetection": "an ELECTRA discriminator is a pretraining head: fine-tune "
                                  f"it (`motian finetune --model {checkpoint} ...`) and export "
                                  "the task model",
    }.get(head, "fine-tune it into one of those heads first")
    return (f"{checkpoint}: no export path for a {head} model (exportable heads: "
            f"{', '.join(OUTPUTS)}); {instead}")


def _export_onnx_checked(model: nn.Module, out: Path, opset: int,
                         batches: list[dict[str, Tensor]], tolerance: float) -> dict:
    draft = export_onnx(model, out / "model.unchecked.onnx", opset)
    result: dict = {"file": ONNX_FILE, "checked": bool(batches)}
    if batches:
        parity = check_onnx(model, draft, batches)
        result.update(asdict(parity))
        _report("onnx", parity)
        if parity.worst() > tolerance:
            os.replace(draft, out / "model.rejected.onnx")  # kept for inspection
            require_parity(parity, tolerance, f"ONNX ({out / 'model.rejected.onnx'})")
    os.replace(draft, out / ONNX_FILE)
    print(f"motian: wrote {out / ONNX_FILE} ({(out / ONNX_FILE).stat().st_size / 1e6:.1f} MB)",
          flush=True)
    return result


def _export_kv_checked(model: nn.Module, out: Path, opset: int, tokenizer_dir: Path,
                       tolerance: float, check: bool) -> dict:
    """decoder_kv.onnx, kept if greedy decoding with it in onnxruntime gives PyTorch's cached
    logits within `tolerance` at every step (tokens that differ are reported, not fatal: logits
    within it may still flip a near-tie)."""
    path = export_onnx_decoder(model, out / KV_FILE, opset)
    result: dict = {"file": KV_FILE, "checked": check}
    if check:
        prompts = generation_prompts(tokenizer_dir)
        steps = generation_steps(model, prompts, 8)
        result |= check_onnx_decoder(model, path, prompts,
                                     special_token_ids(tokenizer_dir)["pad"], steps)
        worst = result["max_abs_diff"]["logits"]
        print(f"motian: onnx with KV cache vs PyTorch cached decoding, greedy on "
              f"{len(prompts)} real prompts x {steps} steps: max |diff| logits {worst:.1e}, "
              f"{'same tokens' if result['same_tokens'] else 'DIFFERENT tokens'}", flush=True)
        if worst > tolerance:
            os.replace(path, out / "decoder_kv.rejected.onnx")  # kept for inspection
            require_parity(Parity(result["max_abs_diff"], [[len(prompts), steps]]), tolerance,
                           f"the KV-cache ONNX decoder ({out / 'decoder_kv.rejected.onnx'})")
    print(f"motian: wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
    return result


def _export_hf_checked(model: nn.Module, directory: Path, tokenizer_dir: Path,
                       batches: list[dict[str, Tensor]], tolerance: float,
                       labels: list[str] | None) -> dict:
    from motian.model.hf import export_hf, gpt2_mismatches, is_bert_shaped

    export_hf(model, directory, tokenizer_dir)
    if labels and "num_labels" in getattr(model, "head_kwargs", {}):
        _name_hf_labels(directory, labels)
    result: dict = {"directory": "hf", "native_bert": is_bert_shaped(model),
                    "native_gpt2": not gpt2_mismatches(model), "checked": bool(batches)}
    if batches:
        parity = check_hf(model, directory, batches)
        result.update(asdict(parity))
        _report("hugging face", parity)
        require_parity(parity, tolerance, f"the Hugging Face export ({directory})")
        if type(model).__name__ == "CausalLM":
            result["generate_matches"] = check_hf_generation(model, directory, tokenizer_dir)
            print("motian: hugging face generate() vs motian generate, greedy on 3 real "
                  f"prompts: {'same tokens' if result['generate_matches'] else 'DIFFERENT tokens'}",
                  flush=True)
    kind = ("native BERT" if result["native_bert"] else
            "native GPT2LMHeadModel" if result["native_gpt2"] else "trust_remote_code")
    print(f"motian: wrote {directory} ({kind})", flush=True)
    return result


def _report(what: str, parity: Parity) -> None:
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in parity.max_abs_diff.items())
    shapes = " ".join("x".join(map(str, s)) for s in parity.shapes)
    print(f"motian: {what} vs PyTorch on real text, shapes {shapes}: max |diff| {diffs}",
          flush=True)
