"""The one registry of motian's verbs: each command-line verb and the function that implements it.

``motian <verb>`` on the command line and ``motian.<name>(...)`` in Python are the same function
with the same arguments: `motian.cli` builds each verb's options from the function's signature,
and `motian/__init__.py` exposes the function as ``motian.<name>``. The Python name is always
the function's own name (the part after ``:``), so ``motian.X.__name__ == "X"``. It is the verb
with ``-`` spelled ``_`` (``distill-corpus`` -> ``motian.distill_corpus``) except for two verbs
whose function names say more than the verb: ``tokenizer`` -> ``motian.train_tokenizer`` and
``hf-convert`` -> ``motian.convert_hf``.

A verb's module is imported only when the verb is used, so ``import motian`` does not import
torch, and a missing optional dependency (transformers, onnx) breaks only the verbs that need it.
No module or package directly under ``motian/`` may be named like a Python name here: importing
it would replace the function on the package (``tests/test_api.py`` checks this).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# verb -> "module:function", in pipeline order (the order of `motian --help`).
VERBS: dict[str, str] = {
    "clean": "motian.pipeline:clean",
    "tokenizer": "motian.data.tokenizer:train_tokenizer",
    "encode": "motian.data.encode:encode",
    "prepare": "motian.pipeline:prepare",
    "demo": "motian.pipeline:demo",
    "pretrain": "motian.pretraining:pretrain",
    "consolidate": "motian.train.sharded:consolidate",
    "inspect-batch": "motian.pretraining:inspect_batch",
    "plan": "motian.train.plan:plan",
    "hf-convert": "motian.model.hf:convert_hf",
    "longformer-convert": "motian.model.longformer:longformer_convert",
    "long-data": "motian.long_text:long_data",
    "export": "motian.serving.export:export",
    "predict": "motian.serving.predict:predict",
    "fill-mask": "motian.serving.predict:fill_mask",
    "generate": "motian.serving.generate:generate",
    "serve": "motian.serving.server:serve",
    "adapt": "motian.adaptation:adapt",
    "finetune": "motian.finetuning:finetune",
    "evaluate": "motian.finetuning:evaluate",
    "multitask": "motian.multitasking:multitask",
    "report": "motian.reporting.run:report",
    "distill": "motian.distillation:distill",
    "distill-corpus": "motian.distillation:distill_corpus",
    "early-exit": "motian.early_exiting:early_exit",
    "early-exit-curve": "motian.early_exiting:early_exit_curve",
    "prune": "motian.pruning:prune",
}


def python_name(verb: str) -> str:
    """The name of `verb`'s function, which is also its attribute on the `motian` package."""
    return VERBS[verb].partition(":")[2]


def python_names() -> dict[str, str]:
    """Python name -> verb, for every verb."""
    return {python_name(verb): verb for verb in VERBS}


def load(verb: str) -> Callable:
    """Import `verb`'s module and return its function (ImportError if an extra is missing)."""
    module, _, name = VERBS[verb].partition(":")
    return getattr(importlib.import_module(module), name)
