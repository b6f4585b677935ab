"""The `motian` command line, generated from the typed Python API.

Each sub-command is a plain Python function (``motian.clean``, ``motian.encode``, ...). Its
signature and the ``Args:`` section of its docstring *are* the CLI: `add_function_arguments`
turns each parameter into an option, so the CLI and the Python API cannot drift apart (the
habit litgpt is praised for). A function registers itself here by name in `COMMANDS`.

Supported parameter types: str, int, float, bool (``--flag/--no-flag``), pathlib.Path,
``list[str]``/``list[Path]`` (several values), ``X | None`` of those, and ``Literal[...]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from motian.errors import UserError

# verb -> "module:function". Imported lazily so `motian --help` stays fast and a missing
# optional dependency breaks only the verb that needs it.
COMMANDS: dict[str, str] = {
    "clean": "motian.data.clean:clean",
    "tokenizer": "motian.data.tokenizer:train_tokenizer",
    "encode": "motian.data.encode:encode",
    "prepare": "motian.pipeline:prepare",
    "demo": "motian.pipeline:demo",
    "pretrain": "motian.pretraining:pretrain",
    "inspect-batch": "motian.data.inspect:inspect_batch",
    "hf-convert": "motian.model.hf:convert_hf",
    "export": "motian.serving.export:export",
    "predict": "motian.serving.predict:predict",
    "fill-mask": "motian.serving.predict:fill_mask",
    "finetune": "motian.finetuning:finetune",
    "evaluate": "motian.finetuning:evaluate",
    "report": "motian.reporting.run:report",
    "distill": "motian.distillation:distill",
    "distill-corpus": "motian.distillation:distill_corpus",
}


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _param_docs(func) -> dict[str, str]:
    """Parameter descriptions from a Google-style ``Args:`` docstring section."""
    docs: dict[str, str] = {}
    lines = inspect.getdoc(func) or ""
    in_args, current = False, None
    for line in lines.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
            continue
        if in_args:
            if line and not line.startswith(" "):
                break  # next section
            stripped = line.strip()
            if ":" in stripped and line.startswith("    ") and not line.startswith("     "):
                current, _, text = stripped.partition(":")
                current = current.split(" ")[0]
                docs[current] = text.strip()
            elif current and stripped:
                docs[current] += " " + stripped
    return docs


def _summary(func) -> str:
    doc = inspect.getdoc(func) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def _unwrap_optional(tp):
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_function_arguments(parser: argparse.ArgumentParser, func) -> None:
    """Add one ``--option`` per parameter of `func` (positional-only: none; all are options)."""
    hints = typing.get_type_hints(func)
    docs = _param_docs(func)
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        tp, _ = _unwrap_optional(hints.get(name, str))
        flag = "--" + name.replace("_", "-")
        required = param.default is inspect.Parameter.empty
        default = None if required else param.default
        help_text = docs.get(name, "")
        if not required and default is not None and tp is not bool:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": name, "help": help_text, "required": required}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=default, **{k: v for k, v in kwargs.items()
                                                    if k != "required"})
            continue
        origin = get_origin(tp)
        if origin is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif origin in (list, tuple):
            (inner,) = get_args(tp)[:1]
            kwargs["nargs"] = "+"
            kwargs["type"] = Path if inner is Path else inner
        elif tp in (int, float, str, Path):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        parser.add_argument(flag, default=default, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, import just that verb's module (fast, and a verb whose optional
    dependency is missing does not break the others)."""
    parser = argparse.ArgumentParser(
        prog="motian",
        description="Efficient pretraining of Transformer language models, Chinese first.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb, target in COMMANDS.items():
        if only is not None and verb != only:
            continue
        try:
            func = _load(target)
        except ImportError as err:
            sub.add_parser(verb, help=f"(unavailable: {err})")
            continue
        p = sub.add_parser(verb, help=_summary(func), description=inspect.getdoc(func),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_function_arguments(p, func)
        p.set_defaults(_func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=verb)
    args = vars(parser.parse_args(argv))
    func = args.pop("_func", None)
    args.pop("command", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        func(**args)
    except UserError as err:
        print(f"motian: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("motian: interrupted; run the same command again to continue where it stopped.",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
