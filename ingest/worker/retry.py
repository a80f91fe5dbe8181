"""Retrying store calls while the database is unreachable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from ingest.errors import UnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")


def with_retry(
    call: Callable[[], T],
    *,
    what: str,
    max_wait_s: float = 300.0,
    first_delay_s: float = 0.5,
    max_delay_s: float = 10.0,
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """Run ``call``; on :class:`UnavailableError` wait (exponential backoff) and retry.

    Gives up, re-raising the last error, once ``max_wait_s`` seconds have been spent
    waiting. ``on_retry`` receives a one-line message each time (the CLI shows it).
    """
    delay, waited = first_delay_s, 0.0
    while True:
        try:
            return call()
        except UnavailableError as exc:
            if waited >= max_wait_s:
                raise
            message = f"{what}: graph store unavailable ({exc}); retrying in {delay:.1f}s"
            log.warning(message)
            if on_retry is not None:
                on_retry(message)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2.0, max_delay_s)
