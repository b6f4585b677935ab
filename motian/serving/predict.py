"""`motian predict` and `motian fill-mask`: batch inference for every head, JSON lines in and out,
with PyTorch or onnxruntime behind one interface.

Input: one JSON object per line, or a plain text line (taken as {"text": line}). The fields a
head reads:

| head | fields | output fields |
|---|---|---|
| SequenceClassification | text, text_pair (optional) | label, probs (or score for 1 label) |
| TokenClassification | text | tokens, tags, entities [{text, start, end, type}] |
| SpanExtraction | question, context (or text) | answer, start, end, score |
| MultipleChoice | choices, text/context and question (both optional) | choice, answer, probs |
| MaskedLM, PreTrainingModel | text with [MASK] | text (top-1 filled in), masks [[{token, score}]] |
| CausalLM | text | next [{token, score}] (the most likely next tokens) |
| MotianModel | text (text_pair) | embedding (mean of the last hidden states) |

An input "id" is copied to its output. Texts are laid out for the model by the same code as
fine-tuning (`motian.tasks.features`), so a served model sees exactly what it was trained on.
Label names come from the task.json `motian finetune` saves beside the model (class names,
or entity types and tagging scheme), else LABEL_i.

In memory, without files: ``motian.predict(model, ["text", ("text", "text_pair"), ...])``
returns the list of output dicts; ``p = Predictor.load(model)`` keeps the model loaded and
``p(texts)`` does the same for each call.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Literal, TextIO

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from motian.data.tokenizer import load_tokenizer, special_token_ids
from motian.errors import UserError
from motian.io import AtomicFile
from motian.model.artifact import CONFIG, TaskCard, find_tokenizer, resolve_model_dir
from motian.model.config import ModelConfig
from motian.model.io import FORMAT, from_pretrained
from motian.serving.export import input_names, output_labels
from motian.serving.export import torch_outputs as run_torch
from motian.serving.onnx import INT8_FILE, ONNX_FILE, onnx_session, run_session
from motian.tasks.features import Featurizer, best_span, collate, decode_tokens
from motian.tasks.types import Example, Task

Backend = Literal["torch", "onnx", "onnx-int8"]
MASK = "[MASK]"
TASK_TYPE = {"SequenceClassification": "pair", "TokenClassification": "token",
             "SpanExtraction": "span", "MultipleChoice": "choice", "MotianModel": "pair",
             "EarlyExitClassification": "pair"}
LM_HEADS = ("MaskedLM", "PreTrainingModel", "CausalLM")


@dataclass
class Predictor:
    """A loaded model behind either backend: `run` maps a padded batch to named outputs
    (the names of export.OUTPUTS) as numpy arrays."""

    head: str
    config: ModelConfig
    tokenizer: Tokenizer
    special: dict[str, int]
    labels: list[str] | None
    run: Callable[[dict[str, Tensor]], dict[str, np.ndarray]]
    max_length: int
    input_names: tuple[str, ...]
    task: dict  # the task card (task.json) of a fine-tuned model as a dict; {} otherwise
    # Featurizers by (task type, max_length), built on first use: building one copies the
    # tokenizer (a JSON round trip, ~4 ms of CPU for a 7k vocabulary, more than the demo
    # student's forward pass), which `motian serve` would otherwise pay on every batch.
    featurizers: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, model: str | Path, backend: Backend = "torch",
             tokenizer: str | Path | None = None, max_length: int | None = None,
             threads: int = 0) -> Predictor:
        """The model at `model`, loaded once (`load_predictor`): keep it for many calls."""
        return load_predictor(Path(model), backend, Path(tokenizer) if tokenizer else None,
                              max_length, threads)

    def __call__(self, inputs: Iterable[Input] | Input, batch_size: int = 32,
                 top_k: int = 5) -> list[dict]:
        """Predictions in memory, one dict per input in order (the fields of `motian predict`'s
        JSON lines). An input is a text, a (text, text_pair) pair, or a dict with the fields
        the head reads (see the module's table); a single text or pair gives a list of one."""
        if isinstance(inputs, str | dict) or _is_pair(inputs):
            inputs = [inputs]
        return list(iter_predictions(self, as_records(inputs), batch_size, top_k))


Input = str | tuple[str, str] | dict


def _is_pair(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str)
                                                                 for v in value)


def as_records(inputs: Iterable[Input]) -> Iterator[tuple[str, dict]]:
    """("input N", record) for in-memory inputs: a text is {"text"}, a (text, text_pair) pair
    {"text", "text_pair"}, a dict is taken as it is; anything else is a UserError naming its
    position."""
    for i, item in enumerate(inputs):
        where = f"input {i}"
        if isinstance(item, str):
            yield where, {"text": item}
        elif _is_pair(item) or (isinstance(item, list) and len(item) == 2
                                and all(isinstance(v, str) for v in item)):
            yield where, {"text": item[0], "text_pair": item[1]}
        elif isinstance(item, dict):
            yield where, item
        else:
            raise UserError(f"{where}: expected a text, a (text, text_pair) pair or a dict of "
                            f"fields, got {type(item).__name__} {item!r:.40}")


def load_predictor(model: Path, backend: Backend = "torch", tokenizer: Path | None = None,
                   max_length: int | None = None, threads: int = 0) -> Predictor:
    """Load `model` (a `motian export` directory, or for torch any motian model directory,
    checkpoint or training run). `max_length` defaults to the length the model was fine-tuned
    at (its task card), else 128."""
    model = resolve_model_dir(model)
    meta_path = model / CONFIG
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    tok = load_tokenizer(find_tokenizer(model, tokenizer))
    if backend in ("onnx", "onnx-int8"):
        graph = ONNX_FILE if backend == "onnx" else INT8_FILE
        if not (model / graph).is_file():
            flag = "" if backend == "onnx" else " --int8"
            raise UserError(f"{model}: no {graph}; run `motian export --checkpoint {model} "
                            f"--out DIR{flag}` and predict from DIR")
        if meta.get("format") != FORMAT or "head" not in meta:
            raise UserError(f"{meta_path}: not a motian model config; give a directory "
                            "written by `motian export`")
        session = onnx_session(model / graph, threads)
        config = ModelConfig.from_dict(meta["model"])
        names = tuple(i.name for i in session.get_inputs())
        run = lambda batch: run_session(session, batch)  # noqa: E731
    else:
        torch_model = from_pretrained(model).eval()
        if threads:
            torch.set_num_threads(threads)
        config, names = torch_model.config, input_names(torch_model)
        run = lambda batch: run_torch(torch_model, batch)  # noqa: E731
    card = TaskCard.read_optional(model)
    max_length = max_length or (card and card.max_length) or 128
    return Predictor(meta["head"], config, tok, special_token_ids(tok), output_labels(card),
                     run, min(max_length, config.max_positions), names,
                     asdict(card) if card else {})


# --------------------------------------------------------------------------- input


def read_records(inputs: Path | None, stream: TextIO | None = None
                 ) -> Iterator[tuple[str, dict]]:
    """("file:line", record) for every non-blank line of `inputs` (stdin when None)."""
    name = str(inputs) if inputs is not None else "<stdin>"
    if inputs is not None and not Path(inputs).is_file():
        raise UserError(f"{inputs}: no such input file; give a JSON lines or text file")
    f = open(inputs, "rb") if inputs is not None else (stream or sys.stdin)
    try:
        for lineno, line in enumerate(f, 1):
            if isinstance(line, bytes):
                try:
                    line = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{name}:{lineno}: not UTF-8 (byte {e.start} of the line); "
                                    "give UTF-8 text (convert with e.g. iconv -f GB18030 -t "
                                    "UTF-8)") from None
            line = line.strip()
            if not line:
                continue
            where = f"{name}:{lineno}"
            if not line.startswith("{"):
                yield where, {"text": line}
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); give "
                                "one JSON object per line, or plain text") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
    finally:
        if inputs is not None:
            f.close()


def _field(record: dict, where: str, *names: str, required: bool = True,
           kind: type | None = str):
    """The first of `names` present in `record` (a `kind`, str by default), else a UserError
    (or None when not `required`)."""
    for name in names:
        value = record.get(name)
        if value is not None:
            if kind is not None and not isinstance(value, kind):
                raise UserError(f"{where}: {name} must be a {kind.__name__}, got "
                                f"{type(value).__name__} {value!r:.40}; put it in quotes")
            return value
    if required:
        raise UserError(f"{where}: no {' or '.join(repr(n) for n in names)} field; this model "
                        "needs it (see `motian predict --help`)")
    return None


def to_example(task_type: str, record: dict, where: str) -> Example:
    """A JSON record -> the `Example` the fine-tuning features are made from."""
    if task_type == "span":
        return Example(where, text=_field(record, where, "context", "text"),
                       text_b=_field(record, where, "question"), where=where)
    if task_type == "choice":
        choices = _field(record, where, "choices", kind=None)
        if not isinstance(choices, list) or not choices or \
                not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: 'choices' must be a non-empty list of strings")
        return Example(where, text=_field(record, where, "text", "context", required=False) or "",
                       text_b=_field(record, where, "question", required=False),
                       choices=choices, where=where)
    return Example(where, text=_field(record, where, "text"),
                   text_b=_field(record, where, "text_pair", "text_b", required=False),
                   where=where)


# --------------------------------------------------------------------------- prediction


def iter_predictions(p: Predictor, records: Iterable[tuple[str, dict]], batch_size: int = 32,
                     top_k: int = 5) -> Iterator[dict]:
    """One output dict per input record, in order, computed `batch_size` examples at a time."""
    records = iter(records)
    while chunk := list(islice(records, batch_size)):
        if p.head in LM_HEADS:
            results = _language_model(p, chunk, top_k)
        else:
            results = _task(p, chunk, batch_size)
        for (_, record), result in zip(chunk, results):
            yield ({"id": record["id"]} if "id" in record else {}) | result


def _task(p: Predictor, chunk: list[tuple[str, dict]], batch_size: int) -> list[dict]:
    task_type = TASK_TYPE[p.head]
    examples = [to_example(task_type, record, where) for where, record in chunk]
    key = (task_type, p.max_length)
    if key not in p.featurizers:
        p.featurizers[key] = Featurizer(Task("predict", task_type), p.tokenizer, p.special,
                                        p.max_length)
    features = p.featurizers[key](examples)
    # Span: an example's context may need several windows; keep the best answer over them.
    results: list[dict] = [{"answer": "", "start": 0, "end": 0, "score": None}
                           if task_type == "span" else {} for _ in examples]
    for part in length_groups(features, batch_size):
        out, batch = _forward(p, task_type, part)
        for row, f in enumerate(part):
            result = _decode(p, task_type, examples[f.example], f, out, batch, row)
            previous = results[f.example].get("score")
            if task_type != "span" or previous is None or \
                    (result.get("score") is not None and result["score"] > previous):
                results[f.example] = result
    return results


def length_groups(features: list, batch_size: int, spread: float = 1.5) -> Iterator[list]:
    """The features in batches of similar length: sorted by length (stable), a batch ends at
    `batch_size` features or before one more than `spread` times as long as its shortest.

    A batch is padded to its longest feature, and on a CPU padding costs as much as text. The
    bundled reviews (median 46 tokens, cut at 128) padded in arrival order cost 2.15x their
    tokens at batch 32; grouped, the demo student spends ~40% less CPU per review with either
    backend (docs/serving.md, "Load test"). Results are keyed by `Feature.example`, so the
    order they are computed in does not matter."""
    def tokens(f) -> int:  # a choice feature holds one sequence per candidate
        ids = f.input_ids
        return max(map(len, ids), default=0) if ids and isinstance(ids[0], list) else len(ids)

    part: list = []
    for f in sorted(features, key=tokens):
        if part and (len(part) == batch_size or tokens(f) > spread * tokens(part[0])):
            yield part
            part = []
        part.append(f)
    if part:
        yield part


def _forward(p: Predictor, task_type: str, features: list) -> tuple[dict, dict]:
    batch = collate(task_type, features, p.special["pad"])
    return p.run({k: batch[k] for k in p.input_names}), batch


def _decode(p: Predictor, task_type: str, e: Example, f, out: dict[str, np.ndarray],
            batch: dict[str, Tensor], row: int) -> dict:
    """The output of one feature (one window, for span) from its row of the batch."""
    if task_type == "span":
        found = best_span(torch.from_numpy(out["start_logits"][row]),
                          torch.from_numpy(out["end_logits"][row]), f.offsets)
        if found is None:
            return {"answer": "", "start": 0, "end": 0, "score": None}
        score, start, end = found
        return {"answer": e.text[start:end], "start": start, "end": end,
                "score": round(score, 6)}
    if task_type == "token":
        return _tokens(p, e, f, out["logits"][row])
    if task_type == "choice":
        return _choice(e, out["logits"][row], batch["choice_mask"][row].numpy())
    if p.head == "MotianModel":
        mask = batch["attention_mask"][row].numpy().astype(bool)
        vector = out["hidden_states"][row][mask].mean(axis=0)
        return {"embedding": [round(float(x), 6) for x in vector]}
    result = _classify(p, out["logits"][row])
    if "exit_layers" in out:  # an early-exit model: the block this row left at (1-based)
        result["exit_layer"] = int(out["exit_layers"][row])
    return result


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _names(p: Predictor, n: int) -> list[str]:
    if p.labels and len(p.labels) == n:
        return p.labels
    return [f"LABEL_{i}" for i in range(n)]


def _classify(p: Predictor, logits: np.ndarray) -> dict:
    if logits.shape[-1] == 1:  # regression head
        return {"score": round(float(logits[0]), 6)}
    probs = _softmax(logits.astype(np.float64))
    names = _names(p, len(probs))
    return {"label": names[int(probs.argmax())],
            "probs": {name: round(float(q), 6) for name, q in zip(names, probs)}}


def _tokens(p: Predictor, e: Example, f, logits: np.ndarray) -> dict:
    """Tags per token of the text (per character for Chinese) and the entities they spell."""
    names = _names(p, logits.shape[-1])
    tags = [names[int(i)] for i in logits[:len(f.input_ids)].argmax(-1)]
    tags = [t if o is not None else "O" for t, o in zip(tags, f.offsets)]
    kept = [(e.text[o[0]:o[1]], t) for o, t in zip(f.offsets, tags) if o is not None]
    entities = [{"text": e.text[s:x], "start": s, "end": x, "type": kind}
                for s, x, kind in decode_tokens(tags, f.offsets)]
    return {"tokens": [w for w, _ in kept], "tags": [t for _, t in kept], "entities": entities}


def _choice(e: Example, logits: np.ndarray, present: np.ndarray) -> dict:
    n = len(e.choices)
    probs = _softmax(np.where(present, logits, -np.inf).astype(np.float64))[:n]
    best = int(probs.argmax())
    return {"choice": best, "answer": e.choices[best],
            "probs": [round(float(q), 6) for q in probs]}


# --------------------------------------------------------------------------- language models


def _lm_ids(p: Predictor, text: str, where: str) -> list[int]:
    """MLM: [CLS] text [SEP] with each literal [MASK] as the mask token (split by hand, so a
    vocabulary whose tokenizer does not know [MASK] as a special token works too). Causal:
    the text's tokens, the last `max_length` kept."""
    encode = lambda s: p.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    if p.head == "CausalLM":
        ids = encode(text)[-p.max_length:]
        if not ids:
            raise UserError(f"{where}: empty text; a language model continues some text")
        return ids
    pieces = text.split(MASK)
    if len(pieces) < 2:
        raise UserError(f"{where}: no {MASK} in the text; mark the tokens to predict with {MASK}")
    ids = [p.special["cls"]]
    for i, piece in enumerate(pieces):
        ids += ([p.special["mask"]] if i else []) + encode(piece)
    ids.append(p.special["sep"])
    if len(ids) > p.max_length:
        raise UserError(f"{where}: {len(ids)} tokens, more than max_length={p.max_length}; "
                        "shorten the text around the [MASK]s")
    return ids


def _language_model(p: Predictor, chunk: list[tuple[str, dict]], top_k: int) -> list[dict]:
    rows = [_lm_ids(p, _field(record, where, "text"), where) for where, record in chunk]
    L = max(map(len, rows))
    ids = torch.tensor([r + [p.special["pad"]] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    logits = p.run({"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(ids)})["logits"]  # (B, L, vocab)
    results = []
    for b, ((_, record), r) in enumerate(zip(chunk, rows)):
        if p.head == "CausalLM":
            results.append({"next": _top(p, logits[b, len(r) - 1], top_k)})
            continue
        masks = [_top(p, logits[b, i], top_k) for i, t in enumerate(r) if t == p.special["mask"]]
        filled = record["text"].split(MASK)
        text = filled[0] + "".join(m[0]["token"] + rest for m, rest in zip(masks, filled[1:]))
        results.append({"text": text, "masks": masks})
    return results


def _top(p: Predictor, logits: np.ndarray, k: int) -> list[dict]:
    probs = _softmax(logits.astype(np.float64))
    best = np.argsort(-probs, kind="stable")[:k]
    return [{"token": p.tokenizer.id_to_token(int(i)).removeprefix("##"),
             "score": round(float(probs[i]), 6)} for i in best]


# --------------------------------------------------------------------------- the verbs


def _write(results: Iterable[dict], out: Path | None) -> int:
    """Write `results` as JSON lines to `out` (stdout when None). A file is written to
    ``out.tmp`` beside it and renamed over `out` only when every result is written, so an
    error at line 101 leaves an existing `out` as it was (and no temporary file)."""
    if out is None:
        n = 0
        for result in results:
            sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
            n += 1
        sys.stdout.flush()
        return n
    n = 0
    with AtomicFile(out, "w", encoding="utf-8", durable=True) as f:
        for result in results:
            f.file.write(json.dumps(result, ensure_ascii=False) + "\n")
            n += 1
    return n


def predict(model: Path, inputs: Path | None = None, out: Path | None = None,
            backend: Backend = "torch", batch_size: int = 32, max_length: int | None = None,
            top_k: int = 5, tokenizer: Path | None = None, threads: int = 0
            ) -> int | list[dict]:
    """Batch inference with any motian head: JSON lines (or plain text lines) in, JSON lines out.

    Reads `text` (+ `text_pair`) for classification, `text` for tagging, `question` +
    `context` for span extraction, `choices` (+ `text`, `question`) for multiple choice, text
    with [MASK] for masked LMs; copies an input `id` to its output. Returns the number of
    lines written.

    From Python, `inputs` may also be the texts themselves: a list of strings, (text,
    text_pair) pairs or dicts of the fields above. Then the predictions come back as a list of
    dicts, in order, and nothing is printed (they are written to `out` only when it is given):
    ``motian.predict("run/seed-1/model", ["质量很好", "太差了"])`` -> ``[{"label": ...,
    "probs": {...}}, ...]``. To load the model once for many calls, use
    ``Predictor.load(model)`` from `motian.serving.predict` and call it with the texts.

    Args:
        model: a `motian export` directory (or, for --backend torch, any motian checkpoint).
        inputs: JSON lines or plain text file; stdin when not given (in Python also a list of
            texts, pairs or dicts: see above).
        out: file to write the JSON lines to; stdout when not given.
        backend: torch (PyTorch), onnx (onnxruntime, needs model.onnx from `motian export`)
            or onnx-int8 (model.int8.onnx from `motian export --int8`).
        batch_size: examples per forward pass.
        max_length: longest input in tokens (longer texts are cut; span contexts are
            windowed); default: the fine-tuning length from task.json, else 128.
        top_k: masked / causal LMs: how many candidate tokens to list.
        tokenizer: the model's tokenizer, when the directory holds none.
        threads: CPU threads (0: the backend's default).
    """
    predictor = load_predictor(Path(model), backend, tokenizer, max_length, threads)
    if inputs is not None and not isinstance(inputs, str | Path):  # texts in memory
        results = predictor(inputs, batch_size, top_k)
        if out is not None:
            _write(results, Path(out))
        return results
    records = read_records(Path(inputs) if inputs is not None else None)
    return _write(iter_predictions(predictor, records, batch_size, top_k),
                  Path(out) if out is not None else None)


def fill_mask(model: Path, text: str | None = None, inputs: Path | None = None,
              out: Path | None = None, top_k: int = 5, backend: Backend = "torch",
              batch_size: int = 32, tokenizer: Path | None = None) -> list[dict]:
    """Fill in [MASK] tokens with a masked language model (MaskedLM or PreTrainingModel).

    Prints (or writes) one JSON line per text: the text with the best token in each [MASK],
    and the top_k candidates per [MASK] with their probabilities. Returns the results.

    Args:
        model: a `motian export` directory or a motian MLM checkpoint.
        text: one text with [MASK], e.g. "今天[MASK]气很好"; otherwise lines of `inputs` / stdin.
        inputs: JSON lines ({"text": ...}) or plain text lines.
        out: file to write the JSON lines to; stdout when not given.
        top_k: candidates listed per [MASK].
        backend: torch, onnx or onnx-int8.
        batch_size: texts per forward pass.
        tokenizer: the model's tokenizer, when the directory holds none.
    """
    predictor = load_predictor(model, backend, tokenizer)
    if predictor.head not in ("MaskedLM", "PreTrainingModel"):
        raise UserError(f"{model}: a {predictor.head} cannot fill masks; use a MaskedLM or "
                        "PreTrainingModel checkpoint (or `motian predict` for this head)")
    records = ([("<text>", {"text": text})] if text is not None
               else read_records(Path(inputs) if inputs is not None else None))
    results = list(iter_predictions(predictor, records, batch_size, top_k))
    _write(results, Path(out) if out is not None else None)
    return results
