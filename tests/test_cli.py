"""The CLI is generated from typed functions: options, types, defaults and help come from them."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from motian import api, cli
from motian.errors import UserError


def example(inputs: list[str], out: Path, size: int = 8, rate: float = 0.5,
            mode: Literal["line", "blank"] = "line", resume: bool = True,
            user_dict: Path | None = None) -> dict:
    """Do an example thing.

    Args:
        inputs: the inputs,
            over two lines.
        out: where to write.
        size: how many.
    """
    if size < 0:
        raise UserError("size must be >= 0")
    return dict(inputs=inputs, out=out, size=size, rate=rate, mode=mode, resume=resume,
                user_dict=user_dict)


def _parser():
    p = argparse.ArgumentParser()
    cli.add_function_arguments(p, example)
    return p


def test_types_defaults_and_lists():
    args = vars(_parser().parse_args(["--inputs", "a", "b", "--out", "x", "--size", "3",
                                      "--no-resume", "--mode", "blank"]))
    assert args == dict(inputs=["a", "b"], out=Path("x"), size=3, rate=0.5, mode="blank",
                        resume=False, user_dict=None)


def test_required_and_choices_are_enforced(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--out", "x"])  # --inputs missing
    with pytest.raises(SystemExit):
        _parser().parse_args(["--inputs", "a", "--out", "x", "--mode", "nope"])


def test_help_comes_from_docstring():
    help_text = _parser().format_help()
    assert "the inputs, over two lines." in help_text
    assert "how many. (default: 8)" in help_text


def test_user_error_exits_1_without_traceback(monkeypatch, capsys):
    monkeypatch.setitem(api.VERBS, "example", "tests.test_cli:example")
    assert cli.main(["example", "--inputs", "a", "--out", "x", "--size", "-1"]) == 1
    err = capsys.readouterr().err
    assert "motian: error: size must be >= 0" in err and "Traceback" not in err


def test_every_registered_verb_builds():
    for verb in api.VERBS:
        parser = cli.build_parser(only=verb)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        # an unavailable verb (import failed) has only -h; a real one has its options
        assert len(sub.choices[verb]._actions) > 1, f"{verb}: {sub.choices[verb].format_help()}"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "motian.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for verb in api.VERBS:
        assert verb in out
