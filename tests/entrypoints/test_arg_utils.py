"""Flags generated from a dataclass (what `fovea serve/generate/bench` and `fovea train` are built with): one
per field, read as the field's type, the docstring and default in --help, bools as --x/--no-x, dicts as JSON,
and every mistake an argparse error."""
from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from fovea.config import EngineConfig
from fovea.entrypoints import cli
from fovea.entrypoints.arg_utils import add_dataclass_options, dataclass_kwargs
from fovea.training import __main__ as train_cli
from fovea.training.config import TrainConfig


@dataclasses.dataclass
class Options:
    name: str
    """Who runs (no default: required)."""
    steps: int = 10
    """Steps to take, at 100% effort."""
    rate: float | None = None
    """Learning rate; None: the schedule's."""
    verbose: bool = False
    """Say more."""
    cache: bool = True
    """Keep results."""
    limits: dict[str, int] | None = None
    """Per-kind limits."""
    tags: dict = dataclasses.field(default_factory=dict)


def parser_for(fill_defaults: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_options(parser, Options, fill_defaults=fill_defaults)
    return parser


def help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    """flag -> its help block, whitespace collapsed."""
    text = parser.format_help()
    blocks = re.split(r"\n  (?=--)", text.split("options:", 1)[1])
    return {block.split()[0].rstrip(","): " ".join(block.split()) for block in blocks if block.strip().startswith("--")}


def test_values_are_read_as_the_field_types():
    args = parser_for().parse_args(["--name", "ann", "--steps", "3", "--rate", "0.5", "--verbose", "--no-cache",
                                    "--limits", '{"image": 2}', "--tags", "{}"])
    assert dataclass_kwargs(args, Options) == {"name": "ann", "steps": 3, "rate": 0.5, "verbose": True,
                                               "cache": False, "limits": {"image": 2}, "tags": {}}
    assert Options(**dataclass_kwargs(args, Options)).rate == 0.5


def test_defaults_are_the_fields_and_left_out_flags_can_stay_absent():
    filled = dataclass_kwargs(parser_for().parse_args(["--name", "x"]), Options)
    assert filled == {"name": "x", "steps": 10, "rate": None, "verbose": False, "cache": True, "limits": None,
                      "tags": {}}
    given = dataclass_kwargs(parser_for(fill_defaults=False).parse_args(["--steps", "4", "--no-verbose"]), Options)
    assert given == {"steps": 4, "verbose": False}  # a config file's values are not overwritten by defaults


def test_help_gives_each_docstring_and_default_once():
    for fill_defaults in (True, False):
        lines = help_lines(parser_for(fill_defaults))
        assert set(lines) == {"--name", "--steps", "--rate", "--verbose", "--cache", "--limits", "--tags"}
        assert lines["--steps"].endswith("Steps to take, at 100% effort. (default: 10)")
        assert lines["--rate"].endswith("(default: None)") and "Learning rate; None" in lines["--rate"]
        assert lines["--cache"].startswith("--cache, --no-cache") and lines["--cache"].endswith("(default: True)")
        assert lines["--limits"].startswith("--limits JSON") and lines["--tags"].endswith("(default: {})")
        assert lines["--name"].endswith("(required)")
        assert all(line.count("(default:") <= 1 for line in lines.values()), lines


def test_mistakes_are_argparse_errors_that_name_them(capsys):
    cases = [(["--name", "x", "--stepz", "3"], "unrecognized arguments: --stepz 3"),
             (["--name", "x", "--steps", "three"], "argument --steps: invalid int value: 'three'"),
             (["--name", "x", "--limits", "[1]"], "argument --limits: must be a JSON object"),
             (["--name", "x", "--limits", "{"], "argument --limits: not JSON"),
             (["--name", "x", "--verbose=yes"], "ignored explicit argument 'yes'"),
             ([], "the following arguments are required: --name")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            parser_for().parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_a_type_without_a_command_line_form_is_refused_when_building():
    @dataclasses.dataclass
    class Bad:
        sizes: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass
    class Ambiguous:
        value: int | str = 0

    with pytest.raises(TypeError, match=r"Bad.sizes: type list\[int\] has no command-line form; supported: bool"):
        add_dataclass_options(argparse.ArgumentParser(), Bad)
    with pytest.raises(TypeError, match="Ambiguous.value: .* has no single type"):
        add_dataclass_options(argparse.ArgumentParser(), Ambiguous)


def test_fovea_commands_have_a_flag_for_every_config_field():
    engine_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(EngineConfig)} - {"--model"}
    serve = cli.build_parser()._subparsers._group_actions[0].choices["serve"]
    assert engine_flags <= set(serve._option_string_actions)
    train_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)} - {"--stage"}
    stage1 = train_cli.build_parser()._subparsers._group_actions[0].choices["stage1"]
    assert train_flags <= set(stage1._option_string_actions)
    args = stage1.parse_args(["--lr", "0.001", "--no-shuffle", "--max-grad-norm", "1.5"])
    assert dataclass_kwargs(args, TrainConfig, skip={"stage"}) == {"lr": 0.001, "shuffle": False,
                                                                   "max_grad_norm": 1.5}
