"""Progressive stacking: what happens to the optimizer when the model grows, and what stacking
costs or buys against training at full depth from the start, at an equal number of steps.

    python benchmarks/stacking.py --data runs/demo/encoded --steps 300 --arm restart
    python benchmarks/stacking.py --data runs/demo/encoded --steps 300 --arm copy
    python benchmarks/stacking.py --data runs/demo/encoded --steps 300 --arm full
    python benchmarks/stacking.py --data runs/demo/encoded --arm step-time

Arms (one per command, so each stays a few minutes on a small CPU):

- restart: the stacking-demo recipe; a new optimizer when the model grows (Gong et al. 2019);
- copy: the same, but every tensor keeps its AdamW moments and step count and each copied
  block starts with a copy of its source's (`FitConfig.grown_optimizer="copy"`);
- full: demo.yaml's stages at full depth from the first step (the same model and data);
- step-time: forward + backward of one real 32 x 128 batch at 1 and at 2 blocks, alternated,
  best of 8 each (what a shallow step saves; the best of several resists a loaded machine).

Every arm runs `--steps` steps (not minutes: the steps are the same whatever the machine's
load, so restart vs copy is a comparison of weights, not of timing) and ends with the common
held-out MLM evaluation. Wall-clock seconds of training are printed too; on a shared machine
read them as rough. Results are appended to --out/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from motian.pretraining import PretrainBatches, build_objective, fit_config  # noqa: E402
from motian.train.distributed import DistInfo  # noqa: E402
from motian.train.fit import fit  # noqa: E402
from motian.train.objectives import build_model  # noqa: E402
from motian.train.recipe import load_recipe, with_overrides  # noqa: E402
from motian.train.settings import RunSettings  # noqa: E402


def run_arm(arm: str, data: Path, steps: int, out: Path, threads: int) -> dict:
    recipe = load_recipe("stacking-demo")
    if arm == "full":  # the same stages, every one at full depth
        recipe = replace(recipe, stages=tuple(replace(s, layers=0) for s in recipe.stages))
    recipe = replace(with_overrides(recipe, steps=steps), checkpoint_every=0,
                     eval=replace(recipe.eval, every=0))
    run = RunSettings(device="cpu", threads=threads, progress=False)
    config = replace(fit_config(recipe), grown_optimizer="copy" if arm == "copy" else "restart")
    objective = build_objective(recipe, data, run)
    run_dir = out / arm
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    summary = fit(objective, PretrainBatches(data, recipe), config, run, run_dir, DistInfo())
    result = {"arm": arm, "steps": summary["steps"], "seconds": round(time.time() - started, 1),
              "train_seconds": round(summary["seconds"], 1),
              "stages": [(s.name, s.layers) for s in recipe.stages],
              "eval": summary["eval"], "last_train": summary["last"]}
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def step_time(data: Path, threads: int) -> dict:
    recipe = load_recipe("stacking-demo")
    torch.set_num_threads(threads)
    source = PretrainBatches(data, recipe)
    batch = next(source.start(0, recipe.stages[0], recipe.stages[0].global_batch, DistInfo(),
                              None))
    config = recipe.model.build(vocab_size=len(source.loader.vocab))
    models = {n: build_model(config.replace(layers=n), recipe.objective, "none") for n in (1, 2)}
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(8):
        for n, model in models.items():
            started = time.perf_counter()
            model(**batch).loss.backward()
            times[n].append(time.perf_counter() - started)
    best = {n: min(t) for n, t in times.items()}
    print(f"forward + backward, best of 8: 1 block {best[1]:.3f} s, 2 blocks {best[2]:.3f} s "
          f"(ratio {best[1] / best[2]:.2f})")
    return {"arm": "step-time", "seconds": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/demo/encoded"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--arm", choices=("restart", "copy", "full", "step-time"),
                        required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/stacking"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.arm == "step-time":
        step_time(args.data, args.threads)
        return
    result = run_arm(args.arm, args.data, args.steps, args.out, args.threads)
    with open(args.out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    e = result["eval"]
    print(f"{args.arm}: {result['steps']} steps, {result['train_seconds']} s of training: "
          f"held-out loss {e['loss']:.3f}, accuracy {e['accuracy']:.2%}")


if __name__ == "__main__":
    main()
