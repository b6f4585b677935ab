"""The `motian` command line, generated from the typed Python API.

Each sub-command is a plain Python function (``motian.clean``, ``motian.pretrain``, ...),
registered once, by verb, in `motian.api.VERBS`. Its signature and the ``Args:`` section of its
docstring *are* the CLI: `add_function_arguments` turns each parameter into an option, so the
CLI and the Python API cannot drift apart (the habit litgpt is praised for).

Supported parameter types: str, int, float, bool (``--flag/--no-flag``), pathlib.Path,
``list[X]`` (several values), ``tuple[X, X]`` (exactly that many values), ``X | None`` of those,
``Literal[...]`` (choices), and dataclasses. A parameter annotated with a dataclass (``run:
RunSettings = RunSettings()``) becomes one option per field, named by the field's metadata
``"cli"`` or else the field's name (``--micro-batch``, ``--optimizer`` for
``OptimSettings.name``), with the field's metadata ``"help"`` as help and the parameter
default's field value as default; the options set fields of a copy of that default
(`dataclasses.replace`) and the function gets the copy. A ``X | None = None`` dataclass
parameter gets ``X()`` with the options applied. Two parameters or fields that would make the
same option are a programming error: building the parser raises `TypeError` naming both.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from motian import api
from motian.errors import UserError
from motian.io import is_out_of_space

_SCALARS = (int, float, str, Path)


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


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _value_kwargs(tp, where: str) -> dict[str, Any]:
    """argparse ``type``/``nargs``/``choices`` for a non-bool annotation."""
    origin = get_origin(tp)
    if origin is Literal:
        return {"choices": list(get_args(tp)), "type": type(get_args(tp)[0])}
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis] or [str]
        if len(set(args)) > 1:
            raise TypeError(f"{where}: {tp} mixes element types; the CLI supports one type")
        fixed = origin is tuple and Ellipsis not in get_args(tp)
        return {"nargs": len(args) if fixed else "+",
                "type": args[0] if args[0] in _SCALARS else str}
    return {"type": tp if tp in _SCALARS else str}


def _show(default) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(default, list | tuple):
        return " ".join(str(v) for v in default)
    return str(default)


class _Store(argparse.Action):
    """Store an option's value: as a tuple where the annotation is a tuple, and, for a field of
    a flattened dataclass parameter, into a copy of the dataclass instance held at `dest`."""

    def __init__(self, option_strings, dest, field: str | None = None, as_tuple=False, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.field, self.as_tuple = field, as_tuple

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.nargs == 0:  # a --flag/--no-flag pair
            values = not option_string.startswith("--no-")
        elif self.as_tuple:
            values = tuple(values)
        if self.field is not None:
            values = dataclasses.replace(getattr(namespace, self.dest), **{self.field: values})
        setattr(namespace, self.dest, values)


def _add_option(target, owners: dict[str, str], owner: str, *, option: str, dest: str, tp,
                default, shown, required: bool, help_text: str, field: str | None = None) -> None:
    """Add ``--option`` (and ``--no-option`` for a bool) to `target`, a parser or group.

    `owners` maps every option added so far to what made it; a second owner is a TypeError.
    `default` is the value at `dest` when the option is absent, `shown` the default in the help
    (they differ for a dataclass field: the whole instance vs the field's value).
    """
    flag = "--" + option.replace("_", "-")
    flags = [flag, "--no-" + flag[2:]] if tp is bool else [flag]
    for f in flags:
        if f in owners:
            raise TypeError(f"option {f} of {owner} clashes with {owners[f]}; rename one "
                            f"(a dataclass field can name its option with metadata 'cli')")
        owners[f] = owner
    help_text = help_text.replace("%", "%%")
    if not required and shown is not None:
        help_text += f" (default: {_show(shown)})".replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": help_text,
                              "action": _Store, "field": field}
    if tp is bool:
        kwargs["nargs"] = 0
    else:
        kwargs.update(_value_kwargs(tp, owner), required=required,
                      as_tuple=get_origin(tp) is tuple)
        if "choices" not in kwargs:  # named by the option: a field's dest is its parameter
            kwargs["metavar"] = flag[2:].upper().replace("-", "_")
    target.add_argument(*flags, **kwargs)


def _add_dataclass_options(parser, owners, where: str, name: str, cls, default,
                           doc: str) -> None:
    """The options of one dataclass parameter, in an argument group titled by it."""
    if default is None:
        try:
            default = cls()
        except TypeError as err:
            raise TypeError(f"parameter {name!r} of {where}: the CLI needs a default "
                            f"{cls.__name__} instance or a default for every field ({err})"
                            ) from None
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{name} ({cls.__name__})", doc or _summary(cls))
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        owner = f"field {cls.__name__}.{f.name} of parameter {name!r} of {where}"
        if _is_dataclass_type(tp):
            raise TypeError(f"{owner}: nested dataclasses are not supported by the CLI")
        # Every field's option writes into one instance at `name`, starting from the default.
        _add_option(group, owners, owner, option=f.metadata.get("cli", f.name), dest=name,
                    tp=tp, default=default, shown=getattr(default, f.name), required=False,
                    help_text=f.metadata.get("help", ""), field=f.name)


def add_function_arguments(parser: argparse.ArgumentParser, func) -> None:
    """Add one ``--option`` per parameter of `func` (all parameters are options), and one per
    field of each dataclass-typed parameter; raise TypeError if two would share an option."""
    hints = typing.get_type_hints(func)
    docs = _param_docs(func)
    where = getattr(func, "__qualname__", repr(func))
    owners = {f: "an option the parser already has" for a in parser._actions
              for f in a.option_strings}
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        tp, _ = _unwrap_optional(hints.get(name, str))
        required = param.default is inspect.Parameter.empty
        if _is_dataclass_type(tp):
            _add_dataclass_options(parser, owners, where, name, tp,
                                   None if required else param.default, docs.get(name, ""))
            continue
        default = None if required else param.default
        if tp is bool:
            required = False  # a flag always has a value
        _add_option(parser, owners, f"parameter {name!r} of {where}", option=name, dest=name,
                    tp=tp, default=default, shown=default, required=required,
                    help_text=docs.get(name, ""))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, import just that verb's module (fast, and a verb whose optional
    dependency is missing does not break the others)."""
    parser = argparse.ArgumentParser(
        prog="motian",
        description="Efficient pretraining of Transformer language models, Chinese first.",
    )
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in api.VERBS:
        if only is not None and verb != only:
            continue
        try:
            func = api.load(verb)
        except ImportError as err:
            sub.add_parser(verb, help=f"(unavailable: {err})")
            continue
        p = sub.add_parser(verb, help=_summary(func), description=inspect.getdoc(func),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_function_arguments(p, func)
        p.set_defaults(_func=func)
    return parser


def version() -> str:
    """What `motian --version` prints: the package version and where it is imported from."""
    import motian

    return f"motian {motian.__version__} ({Path(motian.__file__).parent})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:  # without building every verb's parser (imports torch)
        print(version())
        return 0
    verb = argv[0] if argv and argv[0] in api.VERBS else None
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
    except Exception as err:  # out of space anywhere else (final model, encoding, ...)
        if not is_out_of_space(err):
            raise
        what = getattr(err, "strerror", None) or str(err).splitlines()[0][:200]
        where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
        print(f"motian: error: {what}{where}. Free disk space and run the same command "
              "again: finished work is kept (checkpoints, encoded shards and cleaned shards are "
              "committed atomically; pretrain needs --resume).", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        again = ("run the same command with --resume" if verb == "pretrain"
                 else "run the same command again")
        # a training loop stopped by SIGTERM/SIGINT after saving a checkpoint (fit.Interrupted)
        signum, checkpoint = getattr(err, "signum", 0), getattr(err, "checkpoint", None)
        if checkpoint is not None:
            name = signal.Signals(signum).name
            print(f"motian: stopped by {name} at step {err.step}; checkpoint saved: "
                  f"{checkpoint}. To continue from it, {again}.", file=sys.stderr)
        else:
            print(f"motian: interrupted; {again} to continue where it stopped.",
                  file=sys.stderr)
        return 128 + (signum or signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
