"""One registry (`motian.api.VERBS`) serves both `motian.<name>(...)` and `motian <verb>`.

Every verb is a plain function on the package, no module shadows one, every verb's parser
builds, and a dataclass parameter becomes one CLI option per field.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

import motian
from motian import api, cli
from motian.train.settings import OptimSettings, RunSettings

PYTHON_NAMES = {
    "clean", "train_tokenizer", "encode", "prepare", "demo", "pretrain", "inspect_batch",
    "convert_hf", "export", "predict", "fill_mask", "generate", "serve", "finetune", "evaluate",
    "multitask", "report", "distill", "distill_corpus", "longformer_convert", "long_data",
    "prune", "early_exit", "early_exit_curve", "consolidate", "adapt", "plan",
}
# The verbs whose function name is not the verb with "-" -> "_" (documented in motian/api.py).
RENAMED = {"tokenizer": "train_tokenizer", "hf-convert": "convert_hf"}


def _assert_every_verb_is_a_function() -> None:
    for name, verb in api.python_names().items():
        func = getattr(motian, name)
        assert inspect.isfunction(func), f"motian.{name} (`motian {verb}`) is {func!r}"
        assert func.__name__ == name


def test_python_names_are_the_function_names():
    assert set(api.python_names()) == PYTHON_NAMES
    for verb in api.VERBS:
        assert api.python_name(verb) == RENAMED.get(verb, verb.replace("-", "_"))
    _assert_every_verb_is_a_function()
    assert set(motian.__all__) == PYTHON_NAMES and PYTHON_NAMES <= set(dir(motian))


def test_a_verb_spelling_that_is_not_a_python_name_says_which_is():
    with pytest.raises(AttributeError, match="motian.train_tokenizer"):
        motian.tokenizer  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'$"):
        motian.nope  # noqa: B018


def test_no_module_shadows_a_verb():
    package = Path(motian.__file__).parent
    for name in PYTHON_NAMES:
        assert not (package / f"{name}.py").exists() and not (package / name).is_dir(), name
    # Importing a submodule sets it as an attribute of its package; after importing all of
    # them, every verb must still be its function.
    for info in pkgutil.walk_packages(motian.__path__, "motian."):
        importlib.import_module(info.name)
    _assert_every_verb_is_a_function()


def test_import_motian_stays_light():
    code = ("import sys, motian; heavy = {'torch', 'numpy', 'jieba', 'tokenizers'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("verb", list(api.VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([verb, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: motian {verb}") and "unavailable" not in out
    assert cli._summary(api.load(verb)).split(".")[0] in " ".join(out.split())


# --- dataclass parameters: one option per field --------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """How examples are drawn."""

    name: Literal["uniform", "weighted"] = field(default="uniform", metadata={
        "cli": "sampler", "help": "how to pick examples"})
    window: tuple[float, float] = field(default=(0.0, 1.0), metadata={"help": "kept range"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle each epoch"})
    max_items: int | None = None


received: list[dict] = []


def train_example(data: Path, sampling: Sampling = Sampling(shuffle=False),
                  optim: OptimSettings = OptimSettings(lr=5e-5, name="adamw"),
                  run: RunSettings | None = None, seed: int = 0) -> None:
    """Train on an example.

    Args:
        data: where the examples are.
        sampling: how examples are drawn.
    """
    received.append(dict(data=data, sampling=sampling, optim=optim, run=run, seed=seed))


def _parse(argv: list[str], func=train_example) -> dict:
    parser = argparse.ArgumentParser()
    cli.add_function_arguments(parser, func)
    return vars(parser.parse_args(argv))


def test_dataclass_fields_become_options_and_rebuild_the_instance():
    args = _parse(["--data", "d", "--sampler", "weighted", "--window", "0.2", "0.8",
                   "--shuffle", "--max-items", "7", "--optimizer", "lamb", "--betas", "0.8",
                   "0.9", "--micro-batch", "4", "--dist-timeout", "30", "--no-progress"])
    assert args["sampling"] == Sampling(name="weighted", window=(0.2, 0.8), shuffle=True,
                                        max_items=7)
    # untouched fields keep the parameter default's values (lr=5e-5, not the class's 1e-3)
    assert args["optim"] == dataclasses.replace(OptimSettings(lr=5e-5), name="lamb",
                                                betas=(0.8, 0.9))
    # an `X | None = None` dataclass parameter gets X() with the options applied
    assert args["run"] == RunSettings(micro_batch=4, dist_timeout_s=30.0, progress=False)
    assert set(args) == {"data", "sampling", "optim", "run", "seed"}


def test_dataclass_defaults_are_the_parameter_defaults():
    args = _parse(["--data", "d"])
    assert args["sampling"] == Sampling(shuffle=False)
    assert args["optim"] == OptimSettings(lr=5e-5, name="adamw")
    assert args["run"] == RunSettings()


def test_dataclass_help_uses_field_metadata_and_parameter_defaults():
    parser = argparse.ArgumentParser()
    cli.add_function_arguments(parser, train_example)
    text = " ".join(parser.format_help().split())
    assert "sampling (Sampling): how examples are drawn." in text
    assert "--sampler {uniform,weighted} how to pick examples (default: uniform)" in text
    assert "--shuffle, --no-shuffle shuffle each epoch (default: False)" in text
    assert "--window WINDOW WINDOW kept range (default: 0.0 1.0)" in text
    assert "--lr LR peak learning rate (default: 5e-05)" in text
    assert "--optimizer {lamb,adamw}" in text and "--dist-timeout DIST_TIMEOUT" in text


def test_main_passes_the_rebuilt_dataclass(monkeypatch):
    monkeypatch.setitem(api.VERBS, "train-example", "tests.test_api:train_example")
    received.clear()
    assert cli.main(["train-example", "--data", "d", "--lr", "0.01", "--device", "cpu"]) == 0
    (got,) = received
    assert got["optim"] == OptimSettings(lr=0.01, name="adamw")
    assert got["run"] == RunSettings(device="cpu") and got["sampling"] == Sampling(shuffle=False)


def _clash_with_plain(optimizer: str = "adamw", optim: OptimSettings = OptimSettings()):
    """OptimSettings.name is --optimizer, so a plain `optimizer` parameter clashes."""


def _clash_two_fields(a: Sampling = Sampling(), b: Sampling = Sampling()):
    """Two parameters of one dataclass type make the same options."""


def _clash_with_negation(no_shuffle: bool = False, s: Sampling = Sampling()):
    """A bool field also makes --no-<field>."""


@pytest.mark.parametrize("func, message", [
    (_clash_with_plain, "option --optimizer of field OptimSettings.name of parameter 'optim' "
                        "of _clash_with_plain clashes with parameter 'optimizer'"),
    (_clash_two_fields, "option --sampler of field Sampling.name of parameter 'b' .* clashes "
                        "with field Sampling.name of parameter 'a'"),
    (_clash_with_negation, "option --no-shuffle of field Sampling.shuffle .* clashes with "
                           "parameter 'no_shuffle'"),
])
def test_option_clashes_fail_when_the_parser_is_built(func, message):
    with pytest.raises(TypeError, match=message):
        _parse([], func)


SCRIPT_WITHOUT_MAIN_GUARD = """\
import motian
print("script body runs", flush=True)
motian.prepare(["corpus/"], "runs/api", text_field="content", workers=2, vocab_size=300,
               progress=False)
print("DONE", flush=True)
"""


def test_the_api_at_the_top_level_of_a_script_without_a_main_guard(tmp_path):
    """`python api_test.py` whose top level calls motian.prepare (no `if __name__ ==
    "__main__":`): the spawned clean and encode workers must not run the script again (which
    multiprocessing answers with an error in every worker, over and over). Two workers each,
    a real subprocess, a bounded time."""
    import json

    from motian.data.sources import iter_documents

    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "news.jsonl", "w", encoding="utf-8") as f:
        for doc, _ in zip(iter_documents(["pd98"]), range(60)):
            f.write(json.dumps({"content": doc.text}, ensure_ascii=False) + "\n")
    (tmp_path / "api_test.py").write_text(SCRIPT_WITHOUT_MAIN_GUARD, encoding="utf-8")
    done = subprocess.run([sys.executable, "api_test.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("script body runs") == 1  # no worker ran the script
    assert done.stdout.count("[1/3] clean") == 1 and done.stdout.rstrip().endswith("DONE")
    assert "RuntimeError" not in done.stderr
    assert (tmp_path / "runs" / "api" / "encoded" / "manifest.json").is_file()
