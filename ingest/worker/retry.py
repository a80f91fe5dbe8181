"""Retrying store calls while the database is unreachable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from ingest.errors import UnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How often a wait checks whether its caller wants to stop (seconds).
POLL_S = 0.1


def with_retry(
    call: Callable[[], T],
    *,
    what: str,
    max_wait_s: float = 300.0,
    first_delay_s: float = 0.5,
    max_delay_s: float = 10.0,
    on_retry: Callable[[str], None] | None = None,
    interrupted: Callable[[], bool] | None = None,
) -> T:
    """Run ``call``; on :class:`UnavailableError` wait (exponential backoff) and retry.

    Gives up, re-raising the last error, once ``max_wait_s`` seconds have been spent
    waiting, or as soon as ``interrupted()`` turns true during a wait (a cancelled job, a
    server shutting down; checked every ``POLL_S``). ``on_retry`` receives a one-line
    message each time (the CLI shows it; a server job reports it as its message).
    """
    delay, waited = first_delay_s, 0.0
    while True:
        try:
            return call()
        except UnavailableError as exc:
            if waited >= max_wait_s or (interrupted is not None and interrupted()):
                raise
            message = f"{what}: graph store unavailable ({exc}); retrying in {delay:.1f}s"
            log.warning(message)
            if on_retry is not None:
                on_retry(message)
            if _sleep(delay, interrupted):
                raise
            waited += delay
            delay = min(delay * 2.0, max_delay_s)


def _sleep(seconds: float, interrupted: Callable[[], bool] | None) -> bool:
    """Sleep ``seconds``, or less when ``interrupted()`` turns true (returns True then)."""
    if interrupted is None:
        time.sleep(seconds)
        return False
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if interrupted():
            return True
        time.sleep(min(POLL_S, left))
    return bool(interrupted())
