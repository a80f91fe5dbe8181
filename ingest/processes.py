"""Recognising a process by its pid, for pid files that may be stale."""

import contextlib
import os
from pathlib import Path


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
