"""Ingest jobs on disk, so that a server restart (or crash) loses none.

Each job has a directory ``ROOT/<job_id>/`` (ROOT is the server's ``artifacts_dir/jobs``)
holding

- ``job.json``: what the job was asked to do (id, model, prompts, graph settings, creation
  time), written once at submission, atomically;
- ``events.jsonl``: one line per change of the job, appended: the state, progress counts,
  message and cancel flag as they stand after the change, and the graph ids and errors
  that change added (so a line stays small however long the job is).

Replaying the lines rebuilds the job. A line cut short by a crash mid-write can only be
the last one; it is cut off the file (the change it recorded is redone: a resumed job
recomputes at most the prompt it was on, and graph ids are content hashes, so that prompt
is found stored). A write that fails (a full disk) is cut off at once, and the graph ids
and errors it carried go into the next line that is written, so a later line never
follows half a line. Should a line in the middle not parse anyway, it is skipped with a
warning (an event glued after a cut-off one is still read) and the job is kept: each
line holds the whole state, so only that line's graph ids and errors are lost.
A directory whose ``job.json`` is missing or unreadable is skipped with a warning; the
server starts regardless.

One server at a time owns a journal: :meth:`JobJournal.lock` takes an exclusive lock on
``ROOT/.lock`` (``flock``), so that two servers given the same artifacts directory do not
resume each other's jobs or interleave their lines.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.jobs import Job

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
#: ``job.json``'s format; a different one is skipped with a warning.
FORMAT_VERSION = 1
#: how every line of ``events.jsonl`` starts (``record`` writes ``version`` first)
_EVENT_START = '{"version"'


class JobJournal:
    """Writes and reads the jobs under ``root`` (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_file: IO[bytes] | None = None
        # per job, how many of its graph ids and errors are on disk: a change whose line
        # could not be written leaves its additions to the next line
        self._written: dict[str, tuple[int, int]] = {}

    def lock(self) -> bool:
        """Own the journal; False if another process (or server) does."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = (self.root / ".lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, job: Job) -> None:
        """Record a new job: its request, then its first state."""
        directory = self.job_dir(job.job_id)
        directory.mkdir(parents=True, exist_ok=True)
        request = {
            "format": FORMAT_VERSION,
            "job_id": job.job_id,
            "model": job.model,
            "prompts": job.prompts,
            "settings": dataclasses.asdict(job.settings),
            "created_at": job.created_at.isoformat(),
        }
        tmp = directory / (JOB_FILE + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(request, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / JOB_FILE)
        self._written[job.job_id] = (0, 0)
        self.record(job)

    def record(self, job: Job) -> None:
        """Append the job's state after a change, with the graph ids and errors added
        since the last line written. A failed write (OSError, raised) is cut off the
        file, so the next line starts where this one would have."""
        graph_ids_before, errors_before = self._written.get(job.job_id, (0, 0))
        event = {
            "version": job.version,
            "state": job.state.value,
            "processed": job.processed,
            "already_stored": job.already_stored,
            "message": job.message,
            "cancel_requested": job.cancel_requested,
            "updated_at": job.updated_at.isoformat(),
            "graph_ids": job.graph_ids[graph_ids_before:],
            "errors": job.errors[errors_before:],
        }
        line = (json.dumps(event) + "\n").encode("utf-8")
        fd = os.open(self.job_dir(job.job_id) / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:  # a full disk may take part of the line, then refuse the rest
                    view = view[os.write(fd, view) :]
            except OSError:
                os.ftruncate(fd, size)  # shrinking needs no space
                raise
        finally:
            os.close(fd)
        self._written[job.job_id] = (len(job.graph_ids), len(job.errors))

    def remove(self, job_id: str) -> None:
        self._written.pop(job_id, None)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def load(self) -> Iterator[Job]:
        """Every recorded job, as its last complete event left it."""
        if not self.root.is_dir():
            return
        for directory in sorted(self.root.iterdir()):
            if not (directory / JOB_FILE).is_file():
                continue  # a work directory without a record (or one being created)
            try:
                job = self._read(directory)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("skipping job record %s: %s", directory, exc)
                continue
            yield job

    def _read(self, directory: Path) -> Job:
        from ingest.worker.keys import GraphSettings
        from service.jobs import Job, JobState

        request = json.loads((directory / JOB_FILE).read_text(encoding="utf-8"))
        if request.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {request.get('format')!r}, expected {FORMAT_VERSION}")
        if request["job_id"] != directory.name:
            raise ValueError(f"it names job {request['job_id']!r}")
        job = Job(
            job_id=request["job_id"],
            model=request["model"],
            prompts=request["prompts"],
            settings=GraphSettings(**request["settings"]),
            created_at=datetime.fromisoformat(request["created_at"]),
        )
        for event in _events(directory / EVENTS_FILE):
            job.version = int(event["version"])
            job.state = JobState(event["state"])
            job.processed = int(event["processed"])
            job.already_stored = int(event["already_stored"])
            job.message = str(event["message"])
            job.cancel_requested = bool(event["cancel_requested"])
            job.updated_at = datetime.fromisoformat(event["updated_at"])
            job.graph_ids.extend(event["graph_ids"])
            job.errors.extend(event["errors"])
        self._written[job.job_id] = (len(job.graph_ids), len(job.errors))
        return job


def _events(path: Path) -> Iterator[dict[str, Any]]:
    """The events of ``path``, after cutting off a last line a crash left unfinished."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        complete = data.rfind(b"\n") + 1
        logger.warning("%s: cutting off its last line, left unfinished", path)
        with path.open("r+b") as f:
            f.truncate(complete)
        data = data[:complete]
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            yield json.loads(line)
            continue
        except json.JSONDecodeError:
            pass
        # An event always starts with its version, a key no string value can contain
        # unescaped: a whole event written after a cut-off one is read still.
        glued = line.rfind(_EVENT_START, 1)
        try:
            event = json.loads(line[glued:]) if glued > 0 else None
        except json.JSONDecodeError:
            event = None
        logger.warning(
            "%s line %d is not JSON: skipping %s (the job's later lines still hold its "
            "state; graph ids and errors that line added are lost)",
            path,
            i,
            "the cut-off event before the one that follows it" if event else "it",
        )
        if event is not None:
            yield event
