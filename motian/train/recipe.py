"""Pretraining recipes: typed dataclasses for *what* is trained and *how* a run executes.

A `Recipe` (model, data, objective, optimiser, stages, evaluation) decides the result; a
`RunSettings` (device, precision, micro-batch, compile, activation recomputation, threads)
decides only speed and memory, so changing it must not change the result beyond floating-point
noise (the split follows cramming's `arch/data/train` vs `impl`). Recipes live as YAML files in
`motian/configs/` (package data, listed by `shipped_recipes`) and load with `load_recipe("demo")`
or a path; `save_recipe` writes the fully resolved form next to every run so it can be
reproduced.

Gradient accumulation is never configured: it is derived per stage as
``global_batch / (micro_batch * world_size)`` by `accumulation`, which refuses a split that does
not divide (a silently different global batch is a different experiment).
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml

from motian.data.masking import MaskingConfig
from motian.data.pairs import ClickSettings
from motian.errors import UserError
from motian.model.config import ModelConfig, preset
from motian.train.settings import (
    OptimSettings,
    Precision,
    RunSettings,
    Stage,
    accumulation,
    depth_plan,
    stage_bounds,
)

OptimSpec = OptimSettings  # the recipe's `optim:` section (older name)
__all__ = ["OptimSettings", "OptimSpec", "Precision", "RunSettings", "Stage", "accumulation"]


def shipped_configs() -> Traversable:
    """The folder of shipped recipe YAML files (package data `motian/configs/`, so it is found
    from an editable checkout, a wheel or a `pip install --target` copy alike)."""
    return files("motian") / "configs"


def shipped_recipes() -> list[str]:
    """The names of the shipped recipes (`demo`, `bert-base`, ...), sorted."""
    return sorted(entry.name.removesuffix(".yaml") for entry in shipped_configs().iterdir()
                  if entry.is_file() and entry.name.endswith(".yaml"))


@dataclass(frozen=True)
class ModelSpec:
    """A model preset plus field overrides (any `ModelConfig` field)."""

    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)

    def build(self, vocab_size: int | None = None) -> ModelConfig:
        extra = {} if vocab_size is None else {"vocab_size": vocab_size}
        return preset(self.preset, **{**self.overrides, **extra})


@dataclass(frozen=True)
class DataSpec:
    """How batches are made from the encoded shards (see `motian.data.loader`)."""

    masking: str = "motian"  # a `MaskingConfig.preset` name
    masking_overrides: dict = field(default_factory=dict)
    pair_task: Literal["none", "sop", "nsp", "click"] = "sop"
    # Share of each batch's rows that are pair rows: 1 = every row a pair (BERT's NSP, ALBERT's
    # SOP); below 1, corpus rows and pair rows in every step (the Motian click task).
    pair_fraction: float = 1.0
    # Click logs (files, or pd98 for the bundled People's Daily stand-in) for training, and
    # held-out ones (e.g. pd98:heldout) whose pair accuracy is evaluated with the MLM eval.
    click_files: tuple[str, ...] = ()
    click_eval_files: tuple[str, ...] = ()
    # Click counts -> label and weight: label 1 needs clicks / impressions >= min_ctr; pairs
    # shown fewer than min_impressions times are left out; weight = min(1, impressions / full).
    click_min_ctr: float = 0.0
    click_min_impressions: int = 1
    click_full_weight_impressions: int = 10
    cross_document_attention: bool = True
    seed: int = 0
    # ERNIE 2.0's sentence reordering task (stages' tasks: reorder): a row is a document
    # window cut into this many parts at sentence ends, shuffled; its label is the permutation
    # (parts! classes; motian.data.discourse).
    reorder_parts: int = 3

    def __post_init__(self) -> None:
        if self.pair_task == "click" and not self.click_files:
            raise ValueError("data.pair_task is click but data.click_files is empty; list click "
                             "logs (query<TAB>title<TAB>impressions<TAB>clicks), or pd98 for "
                             "the bundled stand-in")
        if not 0.0 < self.pair_fraction <= 1.0:
            raise ValueError(f"data.pair_fraction must be in (0, 1], got {self.pair_fraction}")

    def masking_config(self) -> MaskingConfig:
        return MaskingConfig.preset(self.masking, **self.masking_overrides)

    def click_settings(self) -> ClickSettings:
        return ClickSettings(self.click_min_ctr, self.click_min_impressions,
                             self.click_full_weight_impressions)


@dataclass(frozen=True)
class ObjectiveSpec:
    """How the task losses combine. `kind="causal"` trains a decoder (next-token loss);
    `electra` and `mc-bert` train a discriminator beside a small generator
    (motian.train.replaced; docs/objectives.md)."""

    kind: Literal["mlm", "causal", "electra", "mc-bert", "unilm", "mass",
                  "transformer-xl", "xlnet", "elmo"] = "mlm"
    weighting: Literal["uncertainty", "fixed"] = "uncertainty"
    weights: dict = field(default_factory=lambda: {"mlm": 1.0, "pair": 1.0})  # fixed weighting
    # Learned (uncertainty) weighting only: every weight kept in [lo, hi] (None: unbounded),
    # and the fraction of the run before the weights start to learn (see TaskWeighting).
    weight_bounds: tuple[float, float] | None = None
    weight_warmup: float = 0.0
    # electra / mc-bert only: the generator's width (heads, hidden, FFN) and depth (layers) as
    # fractions of the discriminator's, the weight of replaced-token detection (lambda, 50 in
    # both papers) and MC-BERT's candidates per masked position (k, 10 in the paper).
    generator_width: float = 0.25
    generator_depth: float = 1.0
    rtd_weight: float = 50.0
    candidates: int = 10
    # SpanBERT's span boundary objective beside MLM (motian.train.sbo; needs span masking):
    # its loss weight is weights["sbo"] (1 by default, as in the paper) and sbo_max_span the
    # relative positions it learns (tokens; positions further into a span share the last).
    sbo: bool = False
    sbo_max_span: int = 32
    # Taking Notes on the Fly (motian.train.notes): a rare word occurs at least notes_min_count
    # and fewer than notes_threshold times in the training documents; its note is the mean
    # output over the word and notes_window tokens each side, kept as note = (1 - gamma) note
    # + gamma new, and enters its input embedding with weight notes_lambda.
    notes: bool = False
    notes_threshold: int = 100
    notes_min_count: int = 5
    notes_window: int = 16
    notes_gamma: float = 0.1
    notes_lambda: float = 0.5
    # unilm only (motian.train.unilm): the share of rows trained under each attention mask
    # (UNILM's 1/3 bidirectional, 1/3 seq2seq, 1/6 left-to-right, 1/6 right-to-left; a mode
    # left out gets 0). mass only (motian.train.mass): the masked fragment's share of a row.
    unilm_modes: dict = field(default_factory=lambda: {
        "bidirectional": 1 / 3, "seq2seq": 1 / 3, "left_to_right": 1 / 6,
        "right_to_left": 1 / 6})
    mass_span: float = 0.5
    # transformer-xl only (motian.train.xl): tokens of the previous segments each layer keeps
    # as memory (Dai et al. 2019's M; 0 = none).
    memory: int = 0
    # xlnet only (motian.train.xlnet): partial prediction's K, each row predicts the last
    # ceil(n / K) tokens of its factorisation order (6 or 7 in XLNet).
    xlnet_k: int = 6

    def __post_init__(self) -> None:
        # Checked whatever the kind, so a bad value fails where it is written, naming its field.
        for name in ("generator_width", "generator_depth"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 < value <= 1.0:
                raise ValueError(f"objective.{name} must be a number in (0, 1], a fraction of "
                                 f"the discriminator's size (ELECTRA: width 1/4 to 1/3, depth "
                                 f"1), got {value!r}")
        if not _is_number(self.rtd_weight) or not self.rtd_weight > 0:
            raise ValueError(f"objective.rtd_weight must be a number > 0 (the weight lambda of "
                             f"replaced-token detection; 50 in ELECTRA), got {self.rtd_weight!r}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) \
                or self.candidates < 2:
            raise ValueError(f"objective.candidates must be an integer >= 2 (MC-BERT's k: the "
                             f"original token and k - 1 others; 10 in the paper), got "
                             f"{self.candidates!r}")
        _check_sbo_notes(self)
        _check_unilm_mass(self)
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 0:
            raise ValueError(f"objective.memory must be an integer >= 0 (tokens of earlier "
                             f"segments kept per layer, Transformer-XL), got {self.memory!r}")
        if not _is_int(self.xlnet_k) or self.xlnet_k < 2:
            raise ValueError(f"objective.xlnet_k must be an integer >= 2 (XLNet predicts the "
                             f"last 1/K of each factorisation order; K = 6 or 7 in the paper), "
                             f"got {self.xlnet_k!r}")


def unilm_mode_shares(spec: ObjectiveSpec) -> tuple[float, ...]:
    """`objective.unilm_modes` as shares in the order of motian.model.masks.MODES."""
    from motian.model.masks import MODES

    return tuple(float(spec.unilm_modes.get(mode, 0.0)) for mode in MODES)


def _check_unilm_mass(spec: ObjectiveSpec) -> None:
    from motian.model.masks import MODES

    modes = spec.unilm_modes
    if not isinstance(modes, dict) or set(modes) - set(MODES) or not all(
            _is_number(v) and v >= 0 for v in modes.values()):
        raise ValueError(f"objective.unilm_modes must map some of {', '.join(MODES)} to shares "
                         f">= 0, got {modes!r}")
    if abs(sum(modes.values()) - 1.0) > 1e-3:
        raise ValueError(f"objective.unilm_modes must sum to 1 (UNILM: 1/3 bidirectional, 1/3 "
                         f"seq2seq, 1/6 left_to_right, 1/6 right_to_left), got "
                         f"{sum(modes.values()):g} from {modes!r}")
    if not _is_number(spec.mass_span) or not 0.0 < spec.mass_span < 1.0:
        raise ValueError(f"objective.mass_span must be a number in (0, 1), the share of a row "
                         f"the masked fragment covers (0.5 in MASS), got {spec.mass_span!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sbo_notes(spec: ObjectiveSpec) -> None:
    """The span boundary objective's and the note dictionary's fields (motian.train.sbo,
    motian.train.notes), each error naming its field."""
    if not _is_int(spec.sbo_max_span) or spec.sbo_max_span < 1:
        raise ValueError(f"objective.sbo_max_span must be an integer >= 1 (relative positions "
                         f"in a span, in tokens), got {spec.sbo_max_span!r}")
    if not _is_int(spec.notes_threshold) or spec.notes_threshold < 1:
        raise ValueError(f"objective.notes_threshold must be an integer >= 1 (a rare word "
                         f"occurs fewer times than this), got {spec.notes_threshold!r}")
    if not _is_int(spec.notes_min_count) or not 1 <= spec.notes_min_count:
        raise ValueError(f"objective.notes_min_count must be an integer >= 1, got "
                         f"{spec.notes_min_count!r}")
    if spec.notes and spec.notes_min_count >= spec.notes_threshold:
        raise ValueError(f"objective.notes_min_count ({spec.notes_min_count}) must be below "
                         f"objective.notes_threshold ({spec.notes_threshold}), or no word is rare")
    if not _is_int(spec.notes_window) or spec.notes_window < 0:
        raise ValueError(f"objective.notes_window must be an integer >= 0 (tokens each side of "
                         f"the word), got {spec.notes_window!r}")
    if not _is_number(spec.notes_gamma) or not 0.0 < spec.notes_gamma <= 1.0:
        raise ValueError(f"objective.notes_gamma must be in (0, 1] (the weight of a new note; "
                         f"0.1 in TNF), got {spec.notes_gamma!r}")
    if not _is_number(spec.notes_lambda) or not 0.0 <= spec.notes_lambda < 1.0:
        raise ValueError(f"objective.notes_lambda must be in [0, 1) (the note's weight in the "
                         f"input embedding; 0.5 in TNF), got {spec.notes_lambda!r}")
    if (spec.sbo or spec.notes) and spec.kind != "mlm":
        field_name = "sbo" if spec.sbo else "notes"
        raise ValueError(f"objective.{field_name} adds to masked-LM pretraining; it needs "
                         f"objective.kind: mlm, got {spec.kind}")
    if spec.sbo and spec.notes:
        raise ValueError("objective.sbo and objective.notes cannot be combined yet; choose one")


@dataclass(frozen=True)
class EvalSpec:
    """The common held-out evaluation. Keep it identical across recipes to compare them: every
    `holdout_every`-th document of the encoded data is never trained on, and `rows` rows of
    `seq_len` tokens from them are masked with BERT token masking at 15% with a fixed seed."""

    # between evaluations (and at the start and the end): steps (100; 0 = only at the end),
    # minutes of training ("2m") or a share of the run ("10%"); motian.train.intervals
    every: int | str = 100
    holdout_every: int = 50
    seq_len: int = 128
    rows: int = 256
    batch: int = 32
    seed: int = 1234


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights."""

    name: str = "custom"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    stages: tuple[Stage, ...] = (Stage(),)
    steps: int = 1000  # optimizer steps over all stages (unless budget_minutes is set)
    budget_minutes: float = 0.0  # > 0: the schedule is keyed to wall-clock time instead
    # The clock of budget_minutes: "wall", or "cpu" (the process's CPU seconds: the same work
    # whatever else loads the machine; see motian.train.schedule.CLOCKS)
    budget_clock: Literal["wall", "cpu"] = "wall"
    eval: EvalSpec = field(default_factory=EvalSpec)
    checkpoint_every: int | str = 500  # steps (0 = only at the end), "2m" or "10%": as eval.every
    keep_last: int = 3
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    seed: int = 0  # model initialisation and dropout

    def __post_init__(self) -> None:
        total = sum(s.fraction for s in self.stages)
        if not self.stages or abs(total - 1.0) > 1e-6:
            raise UserError(f"recipe {self.name}: stage fractions must sum to 1, got {total:g}")
        for s in self.stages:
            if s.seq_len < 8 or s.global_batch < 1 or not 0 <= s.warmup < 1:
                raise UserError(f"recipe {self.name}: stage {s} needs seq_len >= 8, "
                                "global_batch >= 1 and 0 <= warmup < 1")
        if self.steps < 1 and self.budget_minutes <= 0:
            raise UserError(f"recipe {self.name}: set steps >= 1 or budget_minutes > 0")
        from motian.train.intervals import parse_every

        parse_every(self.checkpoint_every, f"recipe {self.name}: checkpoint_every")
        parse_every(self.eval.every, f"recipe {self.name}: eval.every")
        masking = self.data.masking_config()
        if self.objective.sbo and masking.strategy != "span":
            raise UserError(f"recipe {self.name}: objective.sbo predicts masked spans from their "
                            f"boundaries and needs span masking; set data.masking: spanbert (or "
                            f"data.masking_overrides: {{strategy: span}}), got strategy "
                            f"{masking.strategy!r} (data.masking: {self.data.masking})")
        if any(s.layers for s in self.stages):  # progressive stacking: a plan that can run
            depth_plan(self.stages, self.model.build().layers, f"recipe {self.name}")
        from motian.train.continual import check_schedule

        check_schedule(self)  # stages' tasks: ERNIE 2.0's continual multi-task schedule

    def stage_bounds(self) -> list[tuple[float, float]]:
        """[(start, end)] of each stage as fractions of the whole run."""
        return stage_bounds(self.stages)

    def fingerprint(self) -> str:
        """A hash of everything that decides the result (resume refuses another recipe)."""
        d = to_dict(self)
        d.pop("budget_minutes")  # a resumed run may be given more time
        d.pop("budget_clock")  # the checkpoint's progress refuses another clock itself
        d.pop("steps")
        for stage in d["stages"]:  # a stage at full depth hashes as before stacking existed
            if not stage.get("layers"):
                stage.pop("layers", None)
            if not stage.get("tasks"):  # no task schedule: hash as before it existed
                stage.pop("tasks", None)
        if not any(stage.get("tasks") for stage in d["stages"]):
            d["data"].pop("reorder_parts", None)
        if d["objective"]["kind"] not in ("electra", "mc-bert"):  # unused: hash as before
            for key in ("generator_width", "generator_depth", "rtd_weight", "candidates"):
                d["objective"].pop(key, None)
        if not d["objective"].get("sbo"):  # unused: hash as before
            d["objective"].pop("sbo", None)
            d["objective"].pop("sbo_max_span", None)
        if d["objective"]["kind"] != "unilm":  # unused: hash as before
            d["objective"].pop("unilm_modes", None)
        if d["objective"]["kind"] != "mass":
            d["objective"].pop("mass_span", None)
        if not d["objective"].get("memory"):  # unused: hash as before
            d["objective"].pop("memory", None)
        if d["objective"]["kind"] != "xlnet":
            d["objective"].pop("xlnet_k", None)
        if not d["objective"].get("notes"):
            for key in ("notes", "notes_threshold", "notes_min_count", "notes_window",
                        "notes_gamma", "notes_lambda"):
                d["objective"].pop(key, None)
        if d["optim"]["decay"] != "stlr":  # unused: hash as before
            d["optim"].pop("cut_frac", None)
            d["optim"].pop("ratio", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- YAML


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain dicts/lists (tuples become lists), for YAML and JSON."""
    if is_dataclass(obj):
        return {k: to_dict(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass `cls` from a YAML mapping, naming unknown keys and the file."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(known)}")
    nested = {"model": ModelSpec, "data": DataSpec, "objective": ObjectiveSpec,
              "optim": OptimSpec, "eval": EvalSpec}
    kwargs = {}
    for key, value in data.items():
        if cls is Recipe and key in nested:
            value = _build(nested[key], value or {}, f"{where}: {key}")
        elif cls is Recipe and key == "stages":
            value = tuple(_build(Stage, s, f"{where}: stages[{i}]") for i, s in enumerate(value))
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    # A choice field (Literal) takes one of its values only: a misspelled objective.kind or
    # data.pair_task would otherwise train something else without a word.
    hints = typing.get_type_hints(cls)
    for key, value in kwargs.items():
        choices = typing.get_args(hints.get(key)) if typing.get_origin(
            hints.get(key)) is Literal else ()
        if choices and value not in choices:
            raise UserError(f"{where}: {key} is {value!r}; choose one of "
                            f"{', '.join(map(str, choices))}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def recipe_path(name_or_path: str | Path) -> Path | Traversable:
    """A recipe name (`demo` -> motian/configs/demo.yaml, a package resource) or a path to a
    YAML file. A shipped recipe comes back as a `Traversable` (a `Path` for an ordinary install);
    read it with `.read_text()`."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = shipped_configs() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise UserError(f"no recipe {name_or_path!r}: not a file, and not one of the shipped "
                        f"recipes ({', '.join(shipped_recipes())})")
    return candidate


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read a recipe YAML; the model spec is checked by building its `ModelConfig`."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    data.setdefault("name", Path(path.name).stem)
    recipe = _build(Recipe, data, str(path))
    recipe.model.build()  # fail now, naming the file, rather than after data loading
    recipe.data.masking_config()
    recipe.data.click_settings()
    return recipe


def with_fields(recipe: Recipe, items: list[str] | tuple[str, ...]) -> Recipe:
    """The recipe with ``section.field=value`` changes applied (the value in YAML syntax, e.g.
    ``data.click_min_ctr=0.05``, ``objective.weight_bounds=[0.5, 2]``,
    ``data.pair_task=none``): `motian pretrain --override`. Checked like a recipe file."""
    data = to_dict(recipe)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--override {item!r}: expected section.field=value, e.g. "
                            "data.click_min_ctr=0.05")
        *parents, last = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise UserError(f"--override {item!r}: the recipe has no section {part!r}")
            node = node[part]
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--override {item!r}: the value is not YAML ({e})") from None
    where = f"{recipe.name} with --override {' '.join(items)}"
    changed = _build(Recipe, data, where)
    changed.model.build()
    changed.data.masking_config()
    changed.data.click_settings()
    return changed


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True),
                    encoding="utf-8")


def with_overrides(recipe: Recipe, steps: int | None = None,
                   budget_minutes: float | None = None) -> Recipe:
    """The recipe with the run length changed (the CLI's --steps / --budget-minutes). `steps`
    alone replaces a recipe's time budget (a step count is what was asked for); with both, the
    budget keys the run (as it does whenever a recipe has one)."""
    changes: dict = {}
    if steps is not None:
        changes["steps"] = steps
        if budget_minutes is None:
            changes["budget_minutes"] = 0.0
    if budget_minutes is not None:
        changes["budget_minutes"] = budget_minutes
    return replace(recipe, **changes)
