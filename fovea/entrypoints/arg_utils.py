"""Command-line flags generated from a dataclass, so a config and its command line never drift apart.

Used for `EngineConfig` (`fovea serve/generate/bench`) and `TrainConfig` (`fovea train`):

    add_dataclass_options(parser, EngineConfig, skip={"model"})
    EngineConfig.from_kwargs(args.model, **dataclass_kwargs(args, EngineConfig, skip={"model"}))

One flag per field, `--field-name`. The help is the docstring written under the field, ending in its default
(or "required"). The field's type picks how a value is read:

    bool                 --x / --no-x
    dict                 a JSON object (--limit-mm-per-prompt '{"image": 2}')
    int, float, str      that type; `X | None` is read as X (None stays the default)

Any other type is a TypeError when the parser is built, so a new field cannot silently become a string flag.
With `fill_defaults=False` a flag left out is absent from the parsed namespace (so values from a config file
are not overwritten by defaults); otherwise it holds the field's default.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Collection
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (a string statement right after the annotated assignment)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def json_object(text: str) -> dict:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def add_dataclass_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Collection[str] = (),
    fill_defaults: bool = True,
    aliases: dict[str, list[str]] | None = None,
) -> None:
    """Add one flag per field of the dataclass `cls` (but those in `skip`) to `parser` (or an argument group);
    `aliases`: more spellings of a field's flag (`{"tensor_parallel_size": ["-tp"]}`)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *(aliases or {}).get(f.name, ())]
        value_type = _value_type(cls, f.name, hints[f.name])
        doc = docs.get(f.name, f.name.replace("_", " ")).replace("%", "%%")
        options: dict[str, Any] = {"dest": f.name}
        if _is_required(f):
            # without fill_defaults it may be left out (absent: the config loader names what is missing)
            options.update(required=fill_defaults, default=argparse.SUPPRESS)
            help_text = f"{doc} (required)"
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            options["default"] = default if fill_defaults else argparse.SUPPRESS
            # "%(default)r" is argparse's own substitution: ArgumentDefaultsHelpFormatter sees it and adds nothing
            shown = "%(default)r" if fill_defaults else repr(default).replace("%", "%%")
            help_text = f"{doc} (default: {shown})"
        if value_type is bool:
            action = parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **options)
        elif value_type is dict:
            action = parser.add_argument(*flags, type=json_object, metavar="JSON", **options)
        else:
            action = parser.add_argument(*flags, type=value_type, metavar=value_type.__name__.upper(), **options)
        action.help = help_text  # after construction: Python 3.11's BooleanOptionalAction appends its own default


def dataclass_kwargs(args: argparse.Namespace, cls: type, *, skip: Collection[str] = ()) -> dict[str, Any]:
    """The fields of `cls` (but `skip`) that `args` holds, by name: what `cls(**...)` or a config loader takes."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and hasattr(args, f.name)}


def _value_type(cls: type, name: str, hint: Any) -> type:
    """The type a flag's value is read as: the hint without None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [t for t in typing.get_args(hint) if t is not type(None)]
        if len(members) != 1:
            raise TypeError(f"{cls.__name__}.{name}: {hint} has no single type to read a flag as")
        hint = members[0]
    value_type = typing.get_origin(hint) or hint
    if value_type not in (bool, int, float, str, dict):
        raise TypeError(f"{cls.__name__}.{name}: type {hint} has no command-line form; "
                        f"supported: bool, int, float, str, dict (JSON), each optionally | None")
    return value_type


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
