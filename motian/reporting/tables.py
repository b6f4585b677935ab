"""Markdown results pages and tables, each built from a run's result dict: the page of a
fine-tuning run (every seed, mean ± std, dev and test labelled, the model's weight hash and the
resolved settings), the page of a distillation run (teacher, distilled student and baseline side
by side) and a comparison table for benchmarks that put several runs side by side."""

from __future__ import annotations

import json

from motian.tasks.metrics import mean_std

# The metric that stands for a task type in the distillation page.
PRIMARY = {"single": "accuracy", "pair": "accuracy", "choice": "accuracy", "token": "f1",
           "span": "f1", "generation": "rouge_l"}


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
             f"- seeds: {', '.join(str(r['seed']) for r in runs)}",
             *_defaults_lines(result.get("defaults") or {}), "",
             "| split | metric | mean ± std (×100) | per seed |", "|---|---|---|---|"]
    majority = result.get("majority_class") or {}
    for split, metrics in summarise(runs).items():
        for metric, (mean, std, _) in metrics.items():
            per_seed = ", ".join(f"{r[split][metric] * 100:.2f}" for r in runs
                                 if metric in r.get(split, {}))
            lines.append(f"| {split} | {metric} | {fmt(mean, std)} | {per_seed} |")
    for split, metric, value in majority_rows(majority):
        lines.append(f"| {split} | {metric}, majority class ({majority['label']}) | "
                     f"{value * 100:.2f} | — |")
    lead = result.get("lead_baseline") or {}  # a generation task's floor
    for split, metric, value in majority_rows(lead):
        lines.append(f"| {split} | {metric}, baseline: {lead['label']} | {value * 100:.2f} | — |")
    return "\n".join(lines + _settings_lines(result["config"]))


def majority_rows(majority: dict) -> list[tuple[str, str, float]]:
    """(split, metric, score) of always answering the most frequent training label: the
    floor beside every classification result (`majority_class` of a results.json)."""
    return [(split, metric, value) for split in ("dev", "test")
            for metric, value in (majority.get(split) or {}).items()]


def _defaults_lines(defaults: dict) -> list[str]:
    """What the run chose for the user (learning rate, pooling), and why."""
    auto = [f"{name} {c['value']:g} ({c['why']})" if isinstance(c["value"], float) else
            f"{name} {c['value']} ({c['why']})" for name, c in defaults.items()
            if c.get("chosen") == "auto"]
    return [f"- chosen for this model (not given): {'; '.join(auto)}"] if auto else []


def distill_results_page(result: dict) -> str:
    """The results.md of `motian distill`: teacher, distilled student and baseline side by
    side per split, from its results.json."""
    metric = PRIMARY[result["task"]["type"]]
    t = result["teacher"]
    lines = [f"# {result['task']['name']} — distillation results", "",
             f"- teacher: {t['path']} (sha256 {t['sha256'][:16]}…)",
             f"- student compute: {result['compute_ratio']:.3f} × the teacher's (encoder matmul "
             f"FLOPs per token at length {t['flops_seq_len']})",
             f"- layer map (student block <- teacher block): {result['config']['layer_map']}",
             "", f"| model | layers × hidden | params | FLOPs/token | split | {metric} (×100) "
             "| % of teacher | seeds |", "|---|---|---|---|---|---|---|---|"]
    for split, scores in t["scores"].items():
        top = scores[metric]
        rows = [("teacher", t, [top])] + [(n, result[n], [r[split][metric] for r in
                                                         result[n]["runs"] if split in r])
                                          for n in ("student", "baseline") if n in result]
        for name, d, values in rows:
            mean, std = mean_std(values)
            share = f"{mean / top * 100:.1f}" if top else "-"
            lines.append(f"| {name} | {d['layers']} × {d['hidden']} | {d['params']:,} | "
                         f"{d['flops_per_token'] / 1e6:.2f} M | {split} | {fmt(mean, std)} | "
                         f"{share} | {len(values)} |")
    return "\n".join(lines + _settings_lines(result["config"]))


def summary_text(page: str) -> str:
    """A results page without its resolved settings: what the verbs print."""
    return page.split("Resolved settings")[0]


def _settings_lines(config: dict) -> list[str]:
    return ["", "Resolved settings:", "", "```json",
            json.dumps(config, indent=2, ensure_ascii=False), "```", ""]


def comparison_table(rows: list[tuple[str, str, str, list[float]]]) -> str:
    """rows of (setting, split, metric, per-seed values) -> a Markdown table."""
    lines = ["| setting | split | metric | mean ± std (×100) | seeds |", "|---|---|---|---|---|"]
    for name, split, metric, values in rows:
        mean, std = mean_std(values)
        lines.append(f"| {name} | {split} | {metric} | {fmt(mean, std)} | {len(values)} |")
    return "\n".join(lines)
