"""Claims: how several workers share one prompt file without duplicating work.

Before computing a graph a worker creates ``<claims_dir>/<graph_id>.claim`` with
``O_CREAT | O_EXCL`` (atomic on POSIX file systems). The file holds the owner's host,
pid and a lease expiry; the owner refreshes it while it works and removes it when the
graph is stored. Another worker that finds the claim skips that graph, unless the
claim is stale: its lease has run out, or its owner ran on this host and is no longer
alive (a worker killed with SIGKILL). A stale claim is taken over by renaming it aside
and creating a fresh one with ``O_EXCL``; two workers racing for the same stale claim
almost always leave one winner, and in the rare case both win the graph is computed
twice, which the store tolerates.

Claims only prevent duplicated *work*. Correctness never depends on them: the store
write is itself atomic and idempotent (a rerun repairs a half-written graph).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ingest.processes import pid_alive


@dataclass
class Claim:
    """A held claim; refresh it while working, release it when done."""

    path: Path
    lease_s: float

    def refresh(self) -> None:
        _write_claim(self.path, self.lease_s, exclusive=False)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _write_claim(path: Path, lease_s: float, *, exclusive: bool) -> None:
    body = json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + lease_s}
    ).encode()
    if exclusive:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
    else:
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)


def _is_stale(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        # Unreadable or half-written claim: treat it as stale once it is old enough.
        try:
            return time.time() - path.stat().st_mtime > 60.0
        except FileNotFoundError:
            return False
    if float(record.get("expires", 0.0)) < time.time():
        return True
    return record.get("host") == socket.gethostname() and not pid_alive(int(record["pid"]))


class ClaimBook:
    """The claims directory of one artifact root."""

    def __init__(self, directory: Path, *, lease_s: float = 600.0) -> None:
        self.directory = directory
        self.lease_s = lease_s
        directory.mkdir(parents=True, exist_ok=True)

    def try_claim(self, graph_id: str) -> Claim | None:
        """Claim ``graph_id``; None when another live worker holds it."""
        path = self.directory / f"{graph_id}.claim"
        for _ in range(2):
            try:
                _write_claim(path, self.lease_s, exclusive=True)
                return Claim(path, self.lease_s)
            except FileExistsError:
                if not _is_stale(path):
                    return None
                aside = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    pass  # another worker moved it first; race for the fresh claim
                else:
                    aside.unlink(missing_ok=True)
        return None
