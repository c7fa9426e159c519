"""The ``mlxterp`` command (also ``python -m mlxterp``): its subcommands come from plugins
through the ``mlxterp_commands`` hook (mlxterp's own, ``bench``, ``info``, ``demo`` and
``cache``, from the ``mlxterp_tools`` plugin)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = "Mechanistic interpretability for MLX language models: trace, intervene, analyse."


def build_parser() -> argparse.ArgumentParser:
    """The ``mlxterp`` parser, with every plugin's commands."""
    from .plugins import call_each

    parser = argparse.ArgumentParser(prog="mlxterp", description=DESCRIPTION)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mlxterp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    call_each("mlxterp_commands", subparsers=commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command: its handler's exit code, or 2 with a one-line message on an MlxterpError."""
    from .errors import MlxterpError

    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.error(f"command {args.command!r} has no handler: its plugin must set_defaults(handler=...)")
    try:
        return handler(args)
    except MlxterpError as e:
        print(f"mlxterp {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
