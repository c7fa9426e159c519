"""The ``mlxterp`` command: its subcommands come from plugins (the ``mlxterp_commands`` hook),
mlxterp's own from the mlxterp_tools plugin, registered like a third party's."""

from __future__ import annotations

import importlib.metadata

import pytest

import mlxterp
from mlxterp import hookimpl
from mlxterp_core.cli import build_parser, main


def subcommands(parser) -> dict:
    return next(action.choices for action in parser._actions if action.dest == "command")


def test_version_prints_mlxterps_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlxterp {importlib.metadata.version('mlxterp')}"


def test_mlxterps_own_commands_come_from_the_tools_plugin():
    commands = subcommands(build_parser())
    assert {"bench", "info", "demo", "cache"} <= set(commands)
    assert commands["bench"].get_default("handler").__module__ == "mlxterp_tools.commands"


def test_a_plugin_adds_a_command_whose_handler_gives_the_exit_code(capsys):
    class Greeter:
        @hookimpl
        def mlxterp_commands(self, subparsers):
            hello = subparsers.add_parser("hello", help="greet someone")
            hello.add_argument("--name", default="world")
            hello.set_defaults(handler=lambda args: print(f"hello {args.name}") or 3)

    mlxterp.register_plugin(Greeter(), name="greeter")
    try:
        assert main(["hello", "--name", "Paris"]) == 3
        assert capsys.readouterr().out == "hello Paris\n"
        assert "bench" in subcommands(build_parser())  # the others are still there
    finally:
        mlxterp.load_plugins([])


def test_an_mlxterp_error_in_a_command_is_exit_2_with_one_line(capsys):
    class Failing:
        @hookimpl
        def mlxterp_commands(self, subparsers):
            def fail(args):
                raise mlxterp.InputError("no such thing: try another")

            subparsers.add_parser("fail").set_defaults(handler=fail)

    mlxterp.register_plugin(Failing(), name="failing")
    try:
        assert main(["fail"]) == 2
        assert capsys.readouterr().err == "mlxterp fail: no such thing: try another\n"
    finally:
        mlxterp.load_plugins([])


def test_bench_help_lists_every_row_and_repeats(capsys):
    from mlxterp_tools.bench import all_rows

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "--repeats" in text
    listed = text.split("rows (in the order they run):", 1)[1]
    for key in all_rows():
        assert f"\n  {key} " in listed, key


def test_the_bench_table_stays_aligned_with_long_names():
    from mlxterp_tools.harness import WIDTHS, _line

    header = _line("workload", "figure", "target", "met")
    long = _line("x" * (WIDTHS[0] + 10), "1.0 ms", "<= 1x", "yes").splitlines()
    assert len(long) == 2 and long[1].index("1.0 ms") == header.index("figure")
    assert long[1].index("<= 1x") == header.index("target") and long[1].index("yes") == header.index("met")


def test_cache_help_shows_its_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in text and "(default: 8)" in text
