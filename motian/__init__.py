"""motian: efficient pretraining of Transformer language models, Chinese first.

Every pipeline stage is a function here and a verb of the `motian` command with the same
arguments: ``motian.clean`` / ``motian clean``, ``motian.pretrain`` / ``motian pretrain``,
``motian.distill_corpus`` / ``motian distill-corpus``, ... The one table of verbs is
`motian.api.VERBS`; its docstring lists the two verbs whose Python names differ
(``motian.train_tokenizer`` / ``motian tokenizer``, ``motian.convert_hf`` / ``motian hf-convert``).
"""

from __future__ import annotations

from motian import api

__version__ = "0.1.0"

__all__ = list(api.python_names())


def __getattr__(name: str):
    # Lazy so `import motian` does not import torch, jieba or tokenizers until a verb is used.
    # Not cached in globals(): the module cache already makes the second lookup cheap.
    verbs = api.python_names()
    if name in verbs:
        return api.load(verbs[name])
    verb = name.replace("_", "-")
    hint = f"; `motian {verb}` is motian.{api.python_name(verb)}" if verb in api.VERBS else ""
    raise AttributeError(f"module 'motian' has no attribute {name!r}{hint}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
