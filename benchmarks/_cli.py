"""What every benchmark script's command line shares.

- argparse types that refuse a bad value with the flag named and exit code 2 before
  any work (``ingest.arguments``' types, and the few list and float types the scripts
  need besides);
- :func:`check_out`: an output path checked writable before any work
  (``ingest.paths.check_output``);
- :func:`command_line`: the command as it was run, for the results file;
- :func:`write_results`: the results file written, and where it went said;
- :func:`run`: ``main`` run with the package's user errors (``ingest.errors``) and
  unforeseen file-system errors printed as one line, exit code 2, as the console
  script does.

The scripts run as files (``python3 benchmarks/x.py``), so they import this module as
``_cli``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from ingest.arguments import finite, finite_at_least, int_in, path, share
from ingest.errors import CircuitscopeError
from ingest.paths import check_output
from service.cli import exit_status

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

__all__ = [
    "REPO",
    "RESULTS",
    "check_out",
    "command_line",
    "device_name",
    "finite",
    "finite_at_least",
    "int_in",
    "int_list",
    "path",
    "positive",
    "positive_float",
    "run_main",
    "share",
    "share_list",
    "write_results",
]

#: An argparse type: an integer >= 1.
positive = int_in(1)


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


def int_list(low: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each at least ``low`` (``0,256``)."""
    one = int_in(low)

    def parse(text: str) -> list[int]:
        return [one(part.strip()) for part in text.split(",")]

    parse.__name__ = "list of integers"
    return parse


def share_list(text: str) -> list[float]:
    """An argparse type: comma-separated fractions in [0, 1] (``0,0.65``)."""
    return [share(part.strip()) for part in text.split(",")]


def check_out(out: Path, flag: str = "--out", *, directory: bool = False) -> Path:
    """``out``, once checked writable (a file, or with ``directory`` a directory);
    :class:`~ingest.errors.InvalidArgumentError` naming ``flag`` otherwise."""
    check_output(out, flag, directory=directory)
    return out


def device_name(name: str) -> str:
    """An argparse type: a device name ``ingest.devices.resolve_device`` finds on this
    machine (its message says what to use instead); imports torch."""
    from ingest.devices import resolve_device

    try:
        resolve_device(name)
    except CircuitscopeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, shell-quoted, the script's path relative to the repository."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join(["python3", str(shown), *argv[1:]])


def write_results(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` (its directory created) and say so on stderr."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)


def run_main(main: Callable[[], int | None]) -> None:
    """Exit with ``main()``'s status; a user error is one line on stderr and exit code 2
    (:func:`service.cli.exit_status`, as the console script does)."""
    sys.exit(exit_status(Path(sys.argv[0]).name, main))
