"""motian: efficient pretraining of Transformer language models, Chinese first.

Each pipeline stage is a function here and a verb of the `motian` command with the same
arguments: ``motian.clean`` / ``motian clean``, ``motian.train_tokenizer`` /
``motian tokenizer``, ``motian.encode`` / ``motian encode``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "clean": "motian.data.clean",
    "train_tokenizer": "motian.data.tokenizer",
    "encode": "motian.data.encode",
    "prepare": "motian.pipeline",
    "demo": "motian.pipeline",
}


def __getattr__(name: str):
    # Lazy so `import motian` does not import torch, jieba or tokenizers until needed.
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'motian' has no attribute {name!r}")


__all__ = list(_API)
