"""Stopping the server processes the service tests start."""

from __future__ import annotations

import contextlib
import os
import signal
import time


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a child of this process is reaped first)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def stop_process(pid: int, wait_s: float = 15.0) -> None:
    """SIGTERM ``pid``, wait up to ``wait_s`` for it to exit, then SIGKILL it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if gone(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
