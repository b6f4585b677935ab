"""`motian export --int8`: int8 dynamic quantisation of the exported ONNX graph, checked the way
the fp32 graph is (largest |logit - PyTorch| on real text) and, for a fine-tuned model, by its
score on the task's test split next to the fp32 model's.

What is quantised, and why:

- **MatMul only, weights int8 (signed, per tensor), activations uint8 quantised at run time.**
  The weight MatMuls (Q/K/V, attention output, both FFN layers) are where an encoder spends its
  time; onnxruntime turns each into DynamicQuantizeLinear + MatMulInteger, which runs on the
  CPU's int8 dot-product instructions (VNNI). Only MatMuls with a constant weight are touched
  (`MatMulConstBOnly`, onnxruntime's default for dynamic mode): the attention products
  Q·Kᵀ and P·V multiply two activations and stay fp32.
- **Not Gather (the embedding tables).** int8 embeddings would shrink the file most (the
  vocabulary table is most of a small model's weights) but make nothing faster -- a lookup
  has no int8 kernel, it only adds a dequantise -- and rare tokens' rows are the ones a
  per-tensor scale fits worst. Not Gemm: onnxruntime's dynamic mode has no integer Gemm, and
  the classifier's few weights cost nothing.
- **Per tensor, not per channel**: measured on the distilled reviews student (docs/serving.md,
  `benchmarks/int8.py`), per-channel scales gave the same test accuracy (78.77 vs 78.83
  per tensor, fp32 78.77), so the simpler graph is kept; `quantize_int8(per_channel=True)`
  stays available from Python.

The quantised graph is written beside model.onnx as model.int8.onnx; `motian predict` and
`motian serve` read it with `--backend onnx-int8`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from motian.errors import UserError
from motian.model.artifact import TaskCard
from motian.serving.onnx import INT8_FILE, onnx_session, run_session

OP_TYPES = ("MatMul",)
ACCURACY_SLACK = 0.01  # the int8 score may trail the fp32 score by at most 1 point
CHECK_EXAMPLES = 2000  # test examples scored per model at export (the first N of the split)


def quantize_int8(fp32: Path, out: Path, per_channel: bool = False) -> Path:
    """Write the int8 dynamic quantisation of the ONNX graph `fp32` to `out` (see above)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise UserError("--int8 needs onnxruntime: pip install 'motian[onnx]'") from None
    if not Path(fp32).is_file():
        raise UserError(f"{fp32}: no such ONNX graph; --int8 quantises the model.onnx that "
                        "`motian export` writes (use --format onnx or both)")
    # onnxruntime logs (on the root logger) a suggestion to run its pre-processing (symbolic
    # shape inference + graph optimisation) first. Not done: the graph is quantised as it was
    # checked in fp32, and the numbers in docs/serving.md are measured without it.
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR
    try:
        quantize_dynamic(str(fp32), str(out), op_types_to_quantize=list(OP_TYPES),
                         per_channel=per_channel, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    import onnx

    ops = {n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node}
    if "MatMulInteger" not in ops:
        out.unlink()
        raise UserError(f"{fp32}: no weight MatMul to quantise in this graph (ops: "
                        f"{', '.join(sorted(ops))}); serve it in fp32 (--backend onnx)")
    return out


class SessionModule(nn.Module):
    """An onnxruntime session behind a motian head's call (keyword tensors in, an output with
    .logits / .end_logits out), so `motian.tasks.heads.predict` scores ONNX as it does PyTorch."""

    def __init__(self, path: Path):
        super().__init__()
        self.session = onnx_session(path)

    def forward(self, **batch: Tensor) -> SimpleNamespace:
        out = run_session(self.session, batch)
        fields = {"start_logits": "logits", "logits": "logits", "end_logits": "end_logits"}
        return SimpleNamespace(loss=None, **{fields[k]: torch.from_numpy(v)
                                             for k, v in out.items() if k in fields})


def fp32_test_scores(model: nn.Module, card: TaskCard, tokenizer_dir: Path,
                     data: Path | None) -> tuple | None:
    """(task, examples, {metric: fp32 score}) of `model` on the first CHECK_EXAMPLES of the
    test split of the task its card names; None (with the reason printed) where there is no
    labelled test split to read."""
    from motian.finetuning import _all_gold, load_card_task
    from motian.tasks.builtin import BUILTIN_TASKS

    if data is None and card.name not in BUILTIN_TASKS:
        _note(f"int8 accuracy not checked: task {card.name!r} is not bundled; give its files "
              "with --check-data DIR")
        return None
    if card.type == "generation":
        _note("int8 accuracy not checked: a generation task is scored by decoding")
        return None
    task = load_card_task(card, data)
    examples = task.splits.get("test", [])[:CHECK_EXAMPLES]
    if not examples or not _all_gold(task, examples):
        _note(f"int8 accuracy not checked: {task.name} has no labelled test split")
        return None
    return task, examples, task_scores(model, task, examples, tokenizer_dir, card.max_length)


def task_scores(model: nn.Module, task, examples: list, tokenizer_dir: Path,
                max_length: int) -> dict[str, float]:
    """The task's metrics of `model` (a PyTorch head or a `SessionModule`) on `examples`,
    laid out and predicted by the code `motian evaluate` runs."""
    from motian.data.tokenizer import load_tokenizer, special_token_ids
    from motian.finetuning import score
    from motian.tasks.features import Featurizer
    from motian.tasks.heads import predict

    tok = load_tokenizer(tokenizer_dir)
    special = special_token_ids(tok)
    features = Featurizer(task, tok, special, max_length)(examples)
    predictions = predict(model, task, features, examples, special["pad"],
                          torch.device("cpu"), batch_size=64)
    return score(task, examples, predictions)


def check_int8(model: nn.Module, out: Path, batches: list[dict[str, Tensor]],
               card: TaskCard | None, tokenizer_dir: Path, data: Path | None) -> dict:
    """The manifest entry of model.int8.onnx: its logit difference from PyTorch on the parity
    batches and, where a test split can be read, the fp32 and int8 scores on it. A score more
    than ACCURACY_SLACK below fp32 is warned about on stderr (and recorded), not fatal: int8 is
    an opt-in trade, and the numbers are there to decide on."""
    from motian.serving.export import _report, check_onnx

    result: dict = {"file": INT8_FILE, "op_types": list(OP_TYPES), "per_channel": False,
                    "weights": "int8", "activations": "uint8, dynamic", "checked": bool(batches)}
    if batches:
        parity = check_onnx(model, out / INT8_FILE, batches)
        result.update(asdict(parity))
        _report("int8 onnx", parity)
    if card is None:
        if data is not None:
            raise UserError(f"--check-data {data}: the model has no task.json, so there is no "
                            "task to score; export a fine-tuned model (out/seed-N/model)")
        return result
    found = fp32_test_scores(model, card, tokenizer_dir, data)
    if found is None:
        return result
    task, examples, fp32 = found
    int8 = task_scores(SessionModule(out / INT8_FILE), task, examples, tokenizer_dir,
                       card.max_length)
    metric = next((m for m in ("accuracy", "f1") if m in fp32), next(iter(fp32)))
    drop = fp32[metric] - int8[metric]
    result["test"] = {"task": task.name, "examples": len(examples), "metric": metric,
                      "fp32": fp32[metric], "int8": int8[metric], "drop": drop,
                      "within_1_point": drop <= ACCURACY_SLACK}
    print(f"motian: {task.name} test ({len(examples)} examples) {metric}: fp32 "
          f"{fp32[metric] * 100:.2f}, int8 {int8[metric] * 100:.2f}", flush=True)
    if drop > ACCURACY_SLACK:
        _note(f"WARNING: int8 {metric} is {drop * 100:.2f} points below fp32 on {task.name} "
              f"test (more than {ACCURACY_SLACK * 100:g}); {out / INT8_FILE} is kept, but serve "
              "the fp32 model.onnx (--backend onnx) unless the speed is worth it")
    return result


def _note(message: str) -> None:
    print(f"motian: {message}", file=sys.stderr, flush=True)

