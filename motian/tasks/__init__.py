"""Downstream tasks, no training code: task types and examples (`types`), CLUE readers and
submission writers (`clue`), tasks built from the bundled corpora (`builtin`), the user's own
JSON-lines tasks (`user`), metrics, tokenisation into model inputs (`features`) and a head per
task type with its loss and predictions (`heads`). Training on a task is `motian.task_training`
(the one loop); the `finetune` / `evaluate` verbs live in `motian.finetuning`.

Modules are imported on demand so reading a CLUE file does not import torch.
"""
