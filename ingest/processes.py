"""Recognising a process by its pid, for pid files that may be stale; leaving a process
without waiting for its threads."""

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn


def live_command_line(pid: int) -> list[bytes] | None:
    """The command line (arguments, as bytes) of the live process ``pid``; None when there
    is none, it is a zombie, or the system has no ``/proc`` (then nothing is recognised).

    A stale pid file's pid may since belong to any other process: callers check the
    arguments before they reuse or signal it. An exited child of this process is reaped.
    """
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    state = stat.rsplit(")", 1)[-1].split()[0]
    return None if state in ("Z", "X") else args


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_now(code: int) -> NoReturn:
    """Flush the logs and standard streams, then leave without waiting for other threads
    (``os._exit``): for a process whose work is done or safely abandoned while a thread
    it cannot stop (a JVM's, a busy worker's) would keep it alive."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
