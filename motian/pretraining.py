"""`motian pretrain`: train a recipe on encoded shards (one process, or every rank of torchrun).

    motian pretrain --recipe demo --data runs/demo/encoded --out runs/demo/pretrain
    torchrun --nproc_per_node 2 -m motian.cli pretrain --recipe demo ...   # several processes
    motian pretrain ... --resume                                            # after a kill

The recipe (a name in configs/ or a YAML path) fixes what is trained; the options below either
change the run's length or only how it runs (device, precision, micro-batch, compile, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from motian.errors import UserError


def pretrain(recipe: str = "demo", data: Path = Path("runs/demo/encoded"),
             out: Path = Path("runs/pretrain"), resume: bool = False,
             init_from: Path | None = None, steps: int | None = None,
             budget_minutes: float | None = None, device: str = "auto",
             precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
             micro_batch: int = 0, compile: bool = False, checkpoint_activations: bool = False,
             threads: int = 0, dist_timeout: float = 300.0, progress: bool = True) -> dict:
    """Pretrain a model on encoded shards with a recipe; writes checkpoints, metrics and the
    final model under --out.

    Args:
        recipe: a recipe name (demo, motian-base, motian-1b, bert-base) or a YAML file.
        data: a directory written by `motian encode` (or `motian prepare`'s out/encoded).
        out: run directory: checkpoints/, final/, metrics.jsonl, tensorboard/, run.json.
        resume: continue the run in --out from its latest checkpoint, exactly.
        init_from: start from these weights (motian checkpoint/model dir or a Hugging Face BERT
            dir); prints what was loaded and what is newly initialised.
        steps: total optimizer steps (overrides the recipe).
        budget_minutes: train for this many minutes instead of a step count; the learning-rate
            schedule follows the clock.
        device: auto, cpu, cuda or cuda:N.
        precision: auto (bf16 on a capable GPU, else fp32), fp32, bf16, or fp16 (CUDA only,
            with a loss scaler).
        micro_batch: rows per forward pass per process; gradient accumulation is derived from
            the stage's global batch. 0 = no accumulation.
        compile: torch.compile the model.
        checkpoint_activations: recompute activations in backward (less memory, more time).
        threads: torch CPU threads per process; 0 = torch's default.
        dist_timeout: seconds a rank waits for the others before reporting them dead.
        progress: show the progress bar.
    """
    from motian.train.loop import fit
    from motian.train.recipe import RunSettings, load_recipe, with_overrides

    if not Path(data).is_dir():
        raise UserError(f"--data {data}: not a directory; run `motian prepare` (or `motian "
                        "encode`) first and point --data at its encoded output")
    spec = with_overrides(load_recipe(recipe), steps=steps, budget_minutes=budget_minutes)
    settings = RunSettings(device=device, precision=precision, micro_batch=micro_batch,
                           compile=compile, checkpoint_activations=checkpoint_activations,
                           threads=threads, dist_timeout_s=dist_timeout)
    summary = fit(spec, settings, Path(data), Path(out), resume=resume, init_from=init_from,
                  progress_bar=progress)
    if summary["rank"] != 0:
        return summary
    if summary.get("eval"):
        e = summary["eval"]
        print(f"held-out masked-token accuracy {e['accuracy']:.2%}, loss {e['loss']:.3f} "
              f"({e['tokens']:,} tokens)")
    print(f"final model: {summary['final']}\ncheckpoint:  {summary['checkpoint']}\n"
          f"metrics:     {summary['metrics']} (tensorboard --logdir {Path(out) / 'tensorboard'})")
    return summary
