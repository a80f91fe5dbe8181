"""The ``circuitscope`` console script.

One entry point with subcommands. Each subsystem owns a small command module that
exposes ``register(subparsers)``; the module must stay cheap to import (heavy imports
such as torch go inside the function that runs the command). Every command handler
takes the parsed namespace and returns an exit code.

Domain errors (:class:`ingest.errors.CircuitscopeError`) and file-system errors
(``OSError``) are printed as one line on stderr with exit code 2, never as a traceback.
"""

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from ingest.errors import CircuitscopeError

# Command modules, in the order their subcommands appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "service.demo_cli",
    "ingest.zoo.cli",
    "ingest.models.cli",
    "ingest.transcoders.cli",
    "ingest.attribution.cli",
    "ingest.store.cli",
    "ingest.worker.cli",
    "service.serve_cli",
)

VERBOSE_HELP = "more logging (-v info, -vv debug)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitscope",
        description=(
            "Circuit analysis for transformers: train task-zoo models and transcoders, "
            "compute attribution graphs, store them in a graph database, serve them over gRPC."
        ),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    _verbose_after_command(parser)
    return parser


def _verbose_after_command(parser: argparse.ArgumentParser) -> None:
    """Accept ``-v`` after a command too (``circuitscope ingest ... -v``, ``circuitscope
    query -v graphs list``): every command below ``parser`` gets the option; given there,
    it sets the count (the last one given counts)."""
    for command in _subcommands(parser):
        command.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
        _verbose_after_command(command)


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = {
        id(command): command
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for command in action.choices.values()
    }
    return list(found.values())


def exit_status(program: str, run: Callable[[], int | None]) -> int:
    """``run()``'s exit status for a command-line ``program``: a domain error, or a
    file-system error no check foresaw (a full disk, a permission changed mid-run), is
    one line on stderr and status 2, not a traceback; Ctrl-C is status 130."""
    try:
        return int(run() or 0)
    except CircuitscopeError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        logging.getLogger(__name__).debug("file-system error", exc_info=True)
        names = [str(n) for n in (exc.filename, exc.filename2) if n]
        where = "".join(f"{n}: " for n in names)
        print(f"{program}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return exit_status("circuitscope", lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
