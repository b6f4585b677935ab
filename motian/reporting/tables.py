"""Markdown results tables: one per fine-tuning run (every seed, mean ± std, dev and test
labelled, the model's weight hash and the resolved settings) and a comparison table for
benchmarks that put several runs side by side."""

from __future__ import annotations

import json

from motian.tasks.metrics import mean_std


def fmt(mean: float, std: float, scale: float = 100.0) -> str:
    return f"{mean * scale:.2f} ± {std * scale:.2f}"


def summarise(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{split: {metric: [mean, std, n]}} over the seeds' results."""
    out: dict[str, dict[str, list[float]]] = {}
    for split in ("dev", "test"):
        metrics = sorted({m for r in runs for m in r.get(split, {})})
        for metric in metrics:
            values = [r[split][metric] for r in runs if metric in r.get(split, {})]
            mean, std = mean_std(values)
            out.setdefault(split, {})[metric] = [mean, std, len(values)]
    return out


def results_table(result: dict) -> str:
    """The Markdown page written next to results.json."""
    model = result["model"]
    runs = result["runs"]
    lines = [f"# {result['task']['name']} — fine-tuning results", "",
             f"- task: {result['task']['type']}, sizes {result['task']['sizes']}"
             + (f"; {result['task']['notes']}" if result["task"].get("notes") else ""),
             f"- model: {model['source']}" + (f" (sha256 {model['sha256'][:16]}…)"
                                               if model.get("sha256") else ""),
             f"- seeds: {', '.join(str(r['seed']) for r in runs)}", "",
             "| split | metric | mean ± std (×100) | per seed |", "|---|---|---|---|"]
    for split, metrics in summarise(runs).items():
        for metric, (mean, std, _) in metrics.items():
            per_seed = ", ".join(f"{r[split][metric] * 100:.2f}" for r in runs
                                 if metric in r.get(split, {}))
            lines.append(f"| {split} | {metric} | {fmt(mean, std)} | {per_seed} |")
    lines += ["", "Resolved settings:", "", "```json",
              json.dumps(result["config"], indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


def comparison_table(rows: list[tuple[str, str, str, list[float]]]) -> str:
    """rows of (setting, split, metric, per-seed values) -> a Markdown table."""
    lines = ["| setting | split | metric | mean ± std (×100) | seeds |", "|---|---|---|---|---|"]
    for name, split, metric, values in rows:
        mean, std = mean_std(values)
        lines.append(f"| {name} | {split} | {metric} | {fmt(mean, std)} | {len(values)} |")
    return "\n".join(lines)
