"""Flat keyword settings (epochs=1, lr=1e-3, progress=False, ...) turned into the typed settings
the training verbs take (`training: TaskTraining`, `optim: OptimSettings`, `run: RunSettings`),
so tests read as short as the CLI does."""

from __future__ import annotations

from dataclasses import fields

from motian.task_training import TaskTraining
from motian.train.settings import OptimSettings, RunSettings

RUN = {f.name for f in fields(RunSettings)}
OPTIM = {f.name for f in fields(OptimSettings)} - {"name"}
TRAINING = {f.name for f in fields(TaskTraining)}


def typed(verb: str = "finetune", **flat) -> dict:
    """Keyword arguments for `verb` (finetune, distill, distill_corpus) from flat settings; the
    optimiser's default lr is the verb's own."""
    lr = {"finetune": 5e-5, "distill": 1e-4, "distill_corpus": 5e-4}[verb]
    run = {k: flat.pop(k) for k in list(flat) if k in RUN}
    optim = {k: flat.pop(k) for k in list(flat) if k in OPTIM}
    if "optimizer" in flat:
        optim["name"] = flat.pop("optimizer")
    out = {"optim": OptimSettings(**{"lr": lr, **optim}),
           "run": RunSettings(**{"progress": False, **run})}
    if verb == "finetune":
        out["training"] = TaskTraining(**{k: flat.pop(k) for k in list(flat) if k in TRAINING})
    return {**flat, **out}
