"""What the size-aware fine-tuning defaults buy (docs/finetune.md, "Defaults chosen for the
model"): one checkpoint fine-tuned on reviews-sentiment with the settings `motian finetune`
now chooses when none are given, with the old defaults (lr 5e-5, [CLS]), and with only the
learning rate changed, same seeds and data; prints test/dev accuracy per arm and the majority
class.

    python benchmarks/finetune_defaults.py --model runs/demo/pretrain/final --seeds 1 2 3 \
        --max-train 2000 --out runs/finetune_defaults
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motian.finetuning import finetune  # noqa: E402
from motian.train.settings import OptimSettings, RunSettings  # noqa: E402

ARMS = {
    "chosen for the model": {},
    "old defaults: lr 5e-5, [CLS]": dict(optim=OptimSettings(lr=5e-5), pooling="cls"),
    "lr 1e-3, [CLS]": dict(optim=OptimSettings(lr=1e-3), pooling="cls"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/demo/pretrain/final"))
    p.add_argument("--task", default="reviews-sentiment")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/finetune_defaults"))
    args = p.parse_args()
    run = RunSettings(device="cpu", threads=args.threads, progress=False)
    rows = []
    for i, (arm, settings) in enumerate(ARMS.items()):
        result = finetune(args.task, args.out / f"arm-{i}", model=args.model, seeds=args.seeds,
                          max_train=args.max_train, save_model=False, run=run, **settings)
        summary = result["summary"]
        cells = [f"{100 * summary[s]['accuracy'][0]:.2f} ± {100 * summary[s]['accuracy'][1]:.2f}"
                 for s in ("test", "dev")]
        rows.append(f"| {arm} | {cells[0]} | {cells[1]} |")
        majority = result.get("majority_class")
    print("| settings | test accuracy | dev accuracy |\n|---|---:|---:|")
    print(f"| majority class ({majority['label']}) | {100 * majority['test']['accuracy']:.2f} | "
          f"{100 * majority['dev']['accuracy']:.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
