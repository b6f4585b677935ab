"""The run report: one Markdown page with PNG plots that says what a pretraining run did.

`write_report` reads a pretraining run directory (``metrics.jsonl`` written by the fit loop,
``summary.json``, ``run.json``) and, when given, the ``results.json`` of downstream runs
(`motian finetune`, `motian distill`), and writes ``report.md`` beside four plots:

- ``loss_lr.png``: training loss per task (MLM, pair, LM) and the learning rate over steps;
- ``throughput.png``: input tokens per second over steps;
- ``eval.png``: the held-out masked-token accuracy and loss over steps (the common evaluation,
  step 0 being the untrained model);
- ``downstream.png``: one point per arm (teacher / student / random init ...) and task, mean ±
  std over seeds as error bars, on an axis zoomed to the scores, with the majority-class floor
  of a classification task as a dashed line.

The page embeds them with relative links (so the directory can be moved or zipped), states the
machine and library versions from ``run.json`` and gives every plotted number as a Markdown
table too. Plots use matplotlib's Agg backend: no display is needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from motian.errors import UserError
from motian.io import write_text_atomic

TASK_LOSSES = (("loss_mlm", "MLM"), ("loss_pair", "pair"), ("loss_lm", "LM"))
# Which metric stands for a task in the bar chart, first present wins (fractions in [0, 1]).
MAIN_METRICS = ("accuracy", "f1", "em", "macro_f1")
MAX_TRAIN_ROWS = 20  # the training table samples this many records evenly (all if fewer)
MAJORITY_ARM = "majority class"  # the arm of a classification result's majority-class floor


@dataclass
class RunRecords:
    """What a pretraining run directory holds, de-duplicated by step."""

    train: list[dict]
    evals: list[dict]
    summary: dict | None
    meta: dict | None


@dataclass
class DownstreamRow:
    """One arm on one task: mean ± std of a metric over seeds."""

    arm: str
    task: str
    split: str
    metric: str
    mean: float
    std: float
    n: int
    source: Path


# --------------------------------------------------------------------------- reading


def _last_per_step(records: list[dict]) -> list[dict]:
    """A resumed run re-logs the steps after its last checkpoint; the later record is the one
    the final weights descend from, so it wins. Sorted by step."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); {what}") from err


def load_run(run_dir: Path) -> RunRecords:
    """The records of a pretraining run; UserError if it has no metrics."""
    from motian.train.metrics import read_metrics

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics}: not found; --run must be a directory written by `motian "
                        "pretrain` (it writes metrics.jsonl as it trains)")
    records = read_metrics(metrics)
    train = _last_per_step([r for r in records if r.get("kind") == "train"])
    evals = _last_per_step([r for r in records if r.get("kind") == "eval"])
    if not train and not evals:
        raise UserError(f"{metrics}: no train or eval records yet; the run logs every 10 steps, "
                        "so let it run longer (or resume it) before asking for a report")
    summary = meta = None
    if (run_dir / "summary.json").is_file():
        summary = _read_json(run_dir / "summary.json", "it is rewritten when the run finishes")
    if (run_dir / "run.json").is_file():
        meta = _read_json(run_dir / "run.json", "it is written when the run starts")
    return RunRecords(train, evals, summary, meta)


def _summary_rows(arm: str, task: str, result: dict, source: Path) -> list[DownstreamRow]:
    """Rows from a fine-tuning style result: {"summary": {split: {metric: [mean, std, n]}}}
    (computed from its "runs" when the summary is missing), or from one model's {"scores":
    {split: {metric: value}}} (a distillation run's teacher: one model, n = 1)."""
    summary = result.get("summary")
    if summary is None and "runs" in result:
        from motian.reporting.tables import summarise

        summary = summarise(result["runs"])
    if summary is None and isinstance(result.get("scores"), dict):
        summary = {split: {m: [v, 0.0, 1] for m, v in metrics.items()}
                   for split, metrics in result["scores"].items() if isinstance(metrics, dict)}
    rows = []
    for split, metrics in (summary or {}).items():
        if not isinstance(metrics, dict):
            continue
        for metric, value in metrics.items():
            if isinstance(value, list | tuple) and len(value) == 3:
                rows.append(DownstreamRow(arm, task, split, metric, float(value[0]),
                                          float(value[1]), int(value[2]), source))
    return rows


def _task_name(result: dict, fallback: str) -> str:
    task = result.get("task")
    if isinstance(task, dict):
        return str(task.get("name", fallback))
    return str(task) if isinstance(task, str) else fallback


def read_downstream(downstream: dict[str, Path]) -> list[DownstreamRow]:
    """Rows of the downstream table. Keys name the arm ("teacher", "student", "random init");
    "arm/anything" lets one arm appear for several tasks (the task is read from the file).
    A results.json holding several arms as sub-objects (`motian distill`: "teacher" with its
    scores, "student" and "baseline" with their seeds) gives one arm per sub-object, named
    "<arm> <sub-key>" (e.g. "distilled student")."""
    rows: list[DownstreamRow] = []
    for key, path in downstream.items():
        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise UserError(f"{path}: not found; --downstream wants label=DIR of a `motian "
                            "finetune` / `motian distill` run (or its results.json)")
        result = _read_json(path, "re-run the fine-tuning to rewrite it")
        arm = key.split("/")[0]
        task = _task_name(result, key)
        found = _summary_rows(arm, task, result, path)
        if not found:  # several arms in one file
            for sub, value in result.items():
                if isinstance(value, dict) and ({"summary", "runs", "scores"} & value.keys()):
                    found += _summary_rows(f"{arm} {sub}", _task_name(value, task), value, path)
        if not found:
            raise UserError(f"{path}: no results in it (expected \"summary\": {{split: {{metric: "
                            "[mean, std, n]}}}} or \"runs\"); is the run finished?")
        rows += found + _majority_rows(task, result, path, rows + found)
    return rows


def _majority_rows(task: str, result: dict, source: Path,
                   rows: list[DownstreamRow]) -> list[DownstreamRow]:
    """The "majority class" arm of a classification result (always its most frequent
    training label), once per task: the floor the other arms are read against."""
    from motian.reporting.tables import majority_rows

    majority = result.get("majority_class")
    if not isinstance(majority, dict):
        return []
    seen = {(r.arm, r.task, r.split, r.metric) for r in rows}
    return [DownstreamRow(MAJORITY_ARM, task, split, metric, float(value), 0.0, 1, source)
            for split, metric, value in majority_rows(majority)
            if (MAJORITY_ARM, task, split, metric) not in seen]


def main_rows(rows: list[DownstreamRow]) -> list[DownstreamRow]:
    """Per (arm, task): the test split if there is one, else dev; the task's main metric."""
    chosen: dict[tuple[str, str], DownstreamRow] = {}
    for row in rows:
        key = (row.arm, row.task)
        old = chosen.get(key)
        if old is None or _rank(row) < _rank(old):
            chosen[key] = row
    return list(chosen.values())


def _rank(row: DownstreamRow) -> tuple[int, int]:
    split = {"test": 0, "dev": 1}.get(row.split, 2)
    metric = MAIN_METRICS.index(row.metric) if row.metric in MAIN_METRICS else len(MAIN_METRICS)
    return split, metric


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _stage_starts(train: list[dict]) -> list[int]:
    """Steps where the stage changed (first record of each later stage)."""
    return [b["step"] for a, b in zip(train, train[1:]) if b.get("stage") != a.get("stage")]


def plot_loss_lr(train: list[dict], path: Path) -> Path:
    """Two panels sharing the step axis: loss per task (top) and learning rate (bottom)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    steps = [r["step"] for r in train]
    for key, label in TASK_LOSSES:
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            top.plot(*zip(*points), marker=".", label=f"{label} loss")
    top.set_ylabel("training loss (nats)")
    top.legend()
    bottom.plot(steps, [r.get("lr", math.nan) for r in train], color="tab:green")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    for start in _stage_starts(train):
        for ax in (top, bottom):
            ax.axvline(start, color="grey", linestyle=":", linewidth=1)
    top.set_title("training loss per task and learning rate (dotted: first record of a new stage)")
    return _save(fig, plt, path)


def plot_throughput(train: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    points = [(r["step"], r["tokens_per_s"]) for r in train if "tokens_per_s" in r]
    if points:
        ax.plot(*zip(*points), marker=".")
    for start in _stage_starts(train):
        ax.axvline(start, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("input tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title("training throughput (all processes; per logging window)")
    return _save(fig, plt, path)


def plot_eval(evals: list[dict], path: Path) -> Path:
    """Held-out masked-token accuracy (left) and loss (right) over steps."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [e["step"] for e in evals]
    left.plot(steps, [100 * e["accuracy"] for e in evals], marker="o")
    left.set_ylabel("held-out MLM accuracy (%)")
    right.plot(steps, [e["loss"] for e in evals], marker="o", color="tab:red")
    right.set_ylabel("held-out MLM loss (nats)")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
    fig.suptitle("common held-out evaluation (BERT token masking, fixed seed)")
    return _save(fig, plt, path)


def plot_downstream(rows: list[DownstreamRow], path: Path) -> Path:
    """One group per task (its main metric), a point per arm with ± std over seeds as error
    bars, on an axis zoomed to the scores: on 0-100, 93.5 and 94.6 look alike. Points, not bars,
    since bars on an axis that does not start at 0 would mislead. A classification task's
    majority-class floor (the MAJORITY_ARM rows) is a dashed line across its group."""
    plt = _pyplot()
    floors = {r.task: 100 * r.mean for r in rows if r.arm == MAJORITY_ARM}
    rows = [r for r in rows if r.arm != MAJORITY_ARM]
    tasks = sorted({r.task for r in rows} | set(floors))
    arms = list(dict.fromkeys(r.arm for r in rows))
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) * max(len(arms), 2)), 4))
    for i, arm in enumerate(arms):
        xs, means, stds = [], [], []
        for t, task in enumerate(tasks):
            row = next((r for r in rows if r.arm == arm and r.task == task), None)
            if row is not None:
                xs.append(t + (i - (len(arms) - 1) / 2) * width)
                means.append(100 * row.mean)
                stds.append(100 * row.std)
        ax.errorbar(xs, means, yerr=stds, fmt="o", markersize=7, capsize=4, label=arm)
        for x, mean in zip(xs, means):
            ax.annotate(f"{mean:.1f}", (x, mean), textcoords="offset points", xytext=(7, 0),
                        fontsize=8, va="center")
    for t, task in enumerate(tasks):
        if task in floors:
            ax.hlines(floors[task], t - 0.45, t + 0.45, colors="grey", linestyles="dashed",
                      label=MAJORITY_ARM if t == min(tasks.index(k) for k in floors) else None)
            ax.annotate(f"majority class {floors[task]:.1f}", (t + 0.45, floors[task]),
                        textcoords="offset points", xytext=(0, 3), fontsize=7, ha="right",
                        color="grey")
    ax.set_ylim(*downstream_ylim(rows, floors))
    labels = [f"{t}\n" + ", ".join(sorted({f"{r.split} {r.metric}" for r in rows if r.task == t}))
              for t in tasks]
    ax.set_xticks(range(len(tasks)), labels)
    ax.set_xlim(-0.6, len(tasks) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel("score (×100), mean ± std over seeds\n(axis zoomed to the scores)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, never on them
    ax.set_title("downstream")
    return _save(fig, plt, path)


def downstream_ylim(rows: list[DownstreamRow], floors: dict[str, float]) -> tuple[float, float]:
    """The score axis (×100) of the downstream plot: every mean ± std and floor, with 15% of
    their range (at least 1 point) above and below, within 0-100."""
    values = [*floors.values(), *(100 * (r.mean - r.std) for r in rows),
              *(100 * (r.mean + r.std) for r in rows)]
    if not values:
        return 0.0, 100.0
    lo, hi = min(values), max(values)
    pad = max(0.15 * (hi - lo), 1.0)
    return max(0.0, lo - pad), min(100.0, hi + pad)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- Markdown


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _sample(records: list[dict], n: int) -> list[dict]:
    """`n` records spread evenly, always the first and the last."""
    if len(records) <= n:
        return records
    picks = sorted({round(i * (len(records) - 1) / (n - 1)) for i in range(n)})
    return [records[i] for i in picks]


def _num(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    return "" if value is None else format(value, fmt)


def train_table(train: list[dict]) -> list[str]:
    tasks = [(k, label) for k, label in TASK_LOSSES if any(k in r for r in train)]
    header = ["step", "stage", "seq_len", "lr", *(f"{label} loss" for _, label in tasks),
              "MLM acc %", "grad norm", "tokens seen", "tokens/s"]
    rows = [[str(r["step"]), _num(r, "stage", "d"), _num(r, "seq_len", "d"),
             _num(r, "lr", ".3e"), *(_num(r, k, ".4f") for k, _ in tasks),
             "" if "acc_mlm" not in r else f"{100 * r['acc_mlm']:.2f}",
             _num(r, "grad_norm", ".3f"), _num(r, "tokens_seen", ","),
             _num(r, "tokens_per_s", ",.0f")] for r in _sample(train, MAX_TRAIN_ROWS)]
    note = (f"{len(rows)} of {len(train)} records (evenly spaced, first and last included); "
            "losses and accuracy are means over the logging window." if len(train) > len(rows)
            else "Every record; losses and accuracy are means over the logging window.")
    return [*_table(header, rows), "", note]


def eval_table(evals: list[dict]) -> list[str]:
    rows = [[str(e["step"]), f"{100 * e['accuracy']:.2f}", f"{e['loss']:.4f}",
             f"{math.exp(min(e['loss'], 50.0)):,.1f}", f"{e.get('tokens', 0):,}"] for e in evals]
    return _table(["step", "accuracy %", "loss", "perplexity", "masked tokens"], rows)


def downstream_table(rows: list[DownstreamRow]) -> list[str]:
    body = [[r.arm, r.task, r.split, r.metric, f"{100 * r.mean:.2f} ± {100 * r.std:.2f}",
             str(r.n)] for r in rows]
    return _table(["arm", "task", "split", "metric", "mean ± std (×100)", "seeds"], body)


def machine_lines(meta: dict | None) -> list[str]:
    """Where and with what the run ran, from run.json."""
    if meta is None:
        return ["run.json is missing: the machine and versions are unknown."]
    hw, versions = meta.get("hardware", {}), meta.get("versions", {})
    lines = [f"- machine: {hw.get('platform', '?')}, CPU {hw.get('cpu', '?')} "
             f"({hw.get('cpu_count', '?')} cores), {hw.get('torch_threads', '?')} torch "
             f"threads per process, {hw.get('world_size', 1)} process(es)"]
    if hw.get("gpus"):
        lines.append(f"- GPUs: {', '.join(hw['gpus'])}")
    lines += [f"- device {meta.get('device', '?')}, precision {meta.get('precision', '?')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
              f"- code: git {meta.get('git') or 'unknown (not a git checkout)'}",
              f"- started {meta.get('started', '?')}; command: "
              f"`{' '.join(meta.get('command', []))}`"]
    return lines


def recipe_lines(meta: dict | None) -> list[str]:
    recipe = (meta or {}).get("recipe")
    if not recipe:
        return []
    model, data = recipe.get("model", {}), recipe.get("data", {})
    stages = "; ".join(f"{s.get('fraction', 1):.0%} at {s.get('seq_len')} tokens × "
                       f"{s.get('global_batch')} rows" for s in recipe.get("stages", []))
    optim = recipe.get("optim", {})
    return [f"- recipe **{recipe.get('name', '?')}** (fingerprint "
            f"{meta.get('recipe_fingerprint', '?')}): model {model.get('preset')} "
            f"{json.dumps(model.get('overrides', {}), ensure_ascii=False)}",
            f"- data: masking {data.get('masking')}, pair task {data.get('pair_task')}; "
            f"objective {recipe.get('objective', {}).get('kind')} with "
            f"{recipe.get('objective', {}).get('weighting')} weighting",
            f"- optimizer {optim.get('name')} lr {optim.get('lr')} ({optim.get('decay')} decay); "
            f"stages: {stages}"]


def headline_lines(records: RunRecords) -> list[str]:
    s, evals = records.summary, records.evals
    lines = []
    if s is not None:
        lines.append(f"- trained {s['steps']:,} steps, {s['tokens_seen']:,} input tokens in "
                     f"{s['seconds']:.0f} s of training (evaluation and checkpoints excluded)")
    else:
        lines.append("- summary.json is missing: the run has not finished (or was killed); "
                     "the numbers below are as far as it got")
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"- held-out masked-token accuracy {100 * last['accuracy']:.2f}% and loss "
                     f"{last['loss']:.4f} at step {last['step']} (step {first['step']}: "
                     f"{100 * first['accuracy']:.2f}%, {first['loss']:.4f})")
    return lines


def draw_plots(records: RunRecords, rows: list[DownstreamRow], plots: Path) -> dict[str, Path]:
    """Draw the plots `run_page` embeds into the directory `plots`: {name: PNG path}, only
    those the records have data for ("loss_lr", "throughput", "eval", "downstream")."""
    plots.mkdir(parents=True, exist_ok=True)
    drawn = {}
    if records.train:
        drawn["loss_lr"] = plot_loss_lr(records.train, plots / "loss_lr.png")
        drawn["throughput"] = plot_throughput(records.train, plots / "throughput.png")
    if records.evals:
        drawn["eval"] = plot_eval(records.evals, plots / "eval.png")
    if rows:
        drawn["downstream"] = plot_downstream(main_rows(rows), plots / "downstream.png")
    return drawn


def run_page(run_dir: Path, records: RunRecords, rows: list[DownstreamRow],
             images: dict[str, str], appendix: Sequence[str] = ()) -> str:
    """The run report as Markdown, built in one go from the run's records, the downstream rows
    and the links (relative to the page) of the plots `draw_plots` drew; `appendix` holds
    further sections, built by the caller from its own data, that follow the run's (the demo
    puts its data-preparation section there)."""
    lines = [f"# Pretraining report: {Path(run_dir).resolve().name}", "",
             f"Run directory: `{run_dir}`", "", *headline_lines(records),
             *recipe_lines(records.meta), "", "## Machine", "", *machine_lines(records.meta), ""]
    if records.train:
        lines += ["## Training", "", _image(images["loss_lr"], "loss per task and learning rate"),
                  "", _image(images["throughput"], "throughput"), "",
                  *train_table(records.train), ""]
    if records.evals:
        lines += ["## Held-out evaluation", "", _image(images["eval"],
                                                       "held-out accuracy and loss"),
                  "", *eval_table(records.evals), ""]
    if rows:
        lines += ["## Downstream", "", _image(images["downstream"], "downstream scores"), "",
                  "The chart shows each task's main metric (test split when there is one).", "",
                  *downstream_table(rows), "", "Sources: " + ", ".join(
                      sorted({f"`{r.source}`" for r in rows})), ""]
    return "\n".join([*lines, *appendix])


def write_report(run_dir: Path, out: Path | None = None,
                 downstream: dict[str, Path] | None = None,
                 appendix: Sequence[str] = ()) -> Path:
    """Write ``report.md`` and its PNG plots for a pretraining run; returns the report's path.

    `out` is the report directory (default: the run directory); `downstream` maps an arm label
    ("teacher", "student", "random init", or "arm/task" for several tasks) to a `motian
    finetune` / `motian distill` run directory or its results.json; `appendix`: Markdown
    sections placed after the run's (see `run_page`).
    """
    run_dir = Path(run_dir)
    records = load_run(run_dir)
    rows = read_downstream(downstream or {})
    out = Path(out) if out is not None else run_dir
    plots = draw_plots(records, rows, out / "plots")
    images = {name: png.relative_to(out).as_posix() for name, png in plots.items()}
    path = out / "report.md"
    write_text_atomic(path, run_page(run_dir, records, rows, images, appendix))
    return path


def _image(link: str, alt: str) -> str:
    return f"![{alt}]({link})"


def report(run: Path, out: Path | None = None, downstream: list[str] | None = None) -> Path:
    """Write report.md with PNG plots (loss per task and learning rate, throughput, held-out
    evaluation, downstream bars) for a pretraining run.

    Args:
        run: a pretraining run directory (metrics.jsonl, summary.json, run.json).
        out: where report.md and plots/ go (default: the run directory).
        downstream: LABEL=DIR pairs of `motian finetune` / `motian distill` runs (or their
            results.json), e.g. teacher/reviews=runs/ft-reviews "random init/reviews"=runs/rand.
            The label before "/" names the bar; the task is read from the results.
    """
    pairs = {}
    for item in downstream or []:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise UserError(f"--downstream {item!r}: expected LABEL=DIR, e.g. "
                            "teacher/reviews=runs/ft-reviews")
        pairs[label] = Path(path)
    path = write_report(run, out, pairs)
    print(f"report: {path}")
    return path
