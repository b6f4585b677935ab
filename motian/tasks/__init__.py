"""Downstream tasks: task types and examples (`types`), CLUE readers and submission writers
(`clue`), tasks built from the bundled corpora (`builtin`), metrics, tokenisation into model
inputs (`features`), the fine-tuning loop (`engine`), the `finetune` / `evaluate` verbs
(`finetune`) and results tables (`report`).

Modules are imported on demand (`from motian.finetuning import finetune`) so reading a CLUE
file does not import torch.
"""
