"""argparse types shared by the command lines: a bad value is refused by the parser, with
the flag named and exit code 2, before any model loads or any work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

#: how a command line names a token by its id instead of its text: ``id:42``
TOKEN_ID_PREFIX = "id:"


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            wanted = f"be at least {low}" if high is None else f"lie in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must {wanted}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def finite(text: str) -> float:
    """An argparse type: a finite float (NaN and infinities mean nothing as settings)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def finite_at_least(low: float) -> Callable[[str], float]:
    """An argparse type: a finite float no smaller than ``low``."""

    def parse(text: str) -> float:
        value = finite(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def share(text: str) -> float:
    """An argparse type: a fraction in [0, 1] (pruning's cumulative thresholds)."""
    value = finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value:g}")
    return value


def positive_share(text: str) -> float:
    """An argparse type: a fraction in (0, 1], the thresholds a stored graph may carry
    (the server's re-pruning reads 0 as unset)."""
    value = finite(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value:g}")
    return value


def token_id(text: str) -> int:
    """An argparse type for commands that reach the vocabulary only by id (a client of
    the server): ``id:N``. Bare text is refused rather than read as a number, because
    where a tokenizer is at hand (``circuitscope attribute``) ``99`` is the token "99"."""
    number = text.removeprefix(TOKEN_ID_PREFIX)
    if number == text:
        raise argparse.ArgumentTypeError(
            f"give a token id as {TOKEN_ID_PREFIX}N, got {text!r} (this command cannot "
            "encode text; `circuitscope attribute` takes tokens as text)"
        )
    return int_in(0, 2**63 - 1)(number)  # an int64 field of the request


def path(text: str) -> Path:
    """An argparse type: a file system path, ``~`` expanded (a quoted ``"~/x"`` reaches
    the program unexpanded). An empty string is refused: ``Path("")`` would silently be
    the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give a file or directory")
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # ~name of an unknown user
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
