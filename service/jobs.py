"""Ingest jobs: the ingest worker run on request, tracked in memory and on disk.

:class:`JobManager` queues a job per SubmitIngest and runs the jobs one at a time on a
thread of their own. A job runs :class:`ingest.worker.worker.IngestWorker` with an
:class:`ingest.worker.compute.AttributionComputer` on a served model, one prompt at a
time, so progress is reported and cancellation takes effect between prompts. Its model
work (loading, each prompt's attribution) is handed to the model pool one prompt at a
time, the pool AnalysisService uses: one torch computation runs at a time, and an
Attribute or Intervene call waits for at most one prompt of a job, never for the whole
job. The job's own thread prunes, writes artifacts and talks to the store, so a slow or
unreachable store never holds the model pool. The model
and transcoder set records and the set's feature catalog are written to the store
first, as ``circuitscope ingest`` does. Store outages are waited out with the worker's
backoff, each wait reported in the job's message; a cancel or a shutdown ends a wait.
Artifacts go under ``artifacts_dir``; graph ids are the worker's content hashes, so
resubmitting a prompt does not recompute it.

Jobs live in memory (at most ``max_jobs``; the oldest finished ones are forgotten
first), and every change is journaled under ``artifacts_dir/jobs``
(:mod:`service.job_journal`). :meth:`JobManager.restore` reads the journal when a server
starts: finished jobs answer GetJob again, and unfinished ones resume after the last
prompt they finished (a job whose model is no longer served fails, saying so). At
shutdown (:meth:`JobManager.stop`) a running job stops after its current prompt and is
left queued for the next start; CancelJob is what ends a job for good.
``on_graph_written`` hears the id of every graph a job stores (the server's graph cache
forgets it). Every read returns a snapshot; a version number counts changes for
watchers, who read it (:meth:`JobManager.version`) before taking a snapshot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ingest.errors import (
    CircuitscopeError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from ingest.store.base import GraphStore
from service.job_journal import JobJournal
from service.models import ModelRegistry

if TYPE_CHECKING:
    from ingest.attribution.result import AttributionResult
    from ingest.graph import ModelRecord, TranscoderSetRecord
    from ingest.worker.compute import AttributionComputer
    from ingest.worker.prompts import PromptSpec

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PROMPTS = 10_000


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Job:
    """A job's state; :class:`JobManager` hands out snapshots, which share
    ``prompts`` (never changed once the job is submitted) and copy the rest."""

    job_id: str
    model: str
    prompts: list[dict[str, str]]
    settings: Any  # ingest.worker.keys.GraphSettings
    state: JobState = JobState.QUEUED
    processed: int = 0
    graph_ids: list[str] = field(default_factory=list)
    already_stored: int = 0
    errors: list[str] = field(default_factory=list)
    message: str = ""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    version: int = 0
    cancel_requested: bool = False


class JobManager:
    """Queues, runs and tracks ingest jobs (see module doc)."""

    def __init__(
        self,
        store: GraphStore,
        registry: ModelRegistry,
        executor: Executor,
        artifacts_dir: Path,
        *,
        model_executor: Executor | None = None,
        max_jobs: int = 1000,
        on_graph_written: Callable[[str], None] | None = None,
    ) -> None:
        """Jobs run in ``executor`` (give it one thread: jobs run in submission order),
        their model work in ``model_executor`` (None: in the job's own thread)."""
        self._store = store
        self._on_graph_written = on_graph_written
        self._registry = registry
        self._executor = executor
        self._model_executor = model_executor
        self._artifacts_dir = artifacts_dir
        self._max_jobs = max_jobs
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        # set by open(), when this server owns the journal; None: jobs in memory only
        self._journal: JobJournal | None = None
        self._journal_root = artifacts_dir / "jobs"
        self._journal_failed = False
        self._stopping = False

    # ------------------------------------------------------------------ API
    def check_request(self, model: str, n_prompts: int) -> None:
        """Raise unless a job of ``n_prompts`` prompts on ``model`` can be submitted
        (cheap: callers check this before looking at the prompts)."""
        self._registry.spec(model)  # NotFoundError naming the served models
        if not 1 <= n_prompts <= MAX_PROMPTS:
            raise InvalidArgumentError(
                f"give 1 to {MAX_PROMPTS} prompts, got {n_prompts}; split larger sets "
                "into several jobs"
            )

    def submit(self, model: str, prompts: list[dict[str, str]], settings: Any) -> Job:
        """Queue a job of ``prompts`` (worker JSONL records) on served ``model``."""
        self.check_request(model, len(prompts))
        for i, record in enumerate(prompts, start=1):
            if not record.get("prompt", "").strip():
                raise InvalidArgumentError(f"prompt {i} is empty; every prompt needs text")
            if ("correct" in record) != ("incorrect" in record):
                raise InvalidArgumentError(f"prompt {i}: give correct and incorrect together")
        job = Job(uuid.uuid4().hex, model, prompts, settings)
        with self._lock:
            self._evict()
            if self._journal is not None:
                try:
                    self._journal.create(job)
                except OSError as exc:
                    self._journal.remove(job.job_id)
                    raise UnavailableError(
                        f"cannot record the job under {self._journal.root}: {exc}; "
                        "the server's artifacts directory needs space and write access"
                    ) from None
            self._jobs[job.job_id] = job
        self._executor.submit(self._run, job.job_id)
        logger.info("job %s queued: %d prompts on %r", job.job_id, len(prompts), model)
        return self.get(job.job_id)

    def get(self, job_id: str) -> Job:
        """A snapshot of the job: its lists copied, its prompts shared (never changed
        after submission), so a poll costs little however many prompts the job has."""
        with self._lock:
            job = self._find(job_id)
            return dataclasses.replace(job, graph_ids=list(job.graph_ids), errors=list(job.errors))

    def version(self, job_id: str) -> int:
        """The job's change count: a watcher takes a snapshot only when it moved."""
        with self._lock:
            return self._find(job_id).version

    def list_jobs(
        self,
        *,
        state: JobState | None,
        model: str | None,
        limit: int,
        after: tuple[datetime, str] | None = None,
    ) -> tuple[list[Job], tuple[datetime, str] | None]:
        """A page of jobs, most recently submitted first (ties by id, descending), of the
        given state and model (None: any), after the keyset ``after`` (the last job's
        (created_at, job_id) of the previous page). Returns the page, without graph ids
        and errors, and the keyset of its last job when more follow."""
        with self._lock:
            chosen = sorted(
                (
                    j
                    for j in self._jobs.values()
                    if (state is None or j.state is state)
                    and (model is None or j.model == model)
                    and (after is None or (j.created_at, j.job_id) < after)
                ),
                key=lambda j: (j.created_at, j.job_id),
                reverse=True,
            )
            page = [dataclasses.replace(j, graph_ids=[], errors=[]) for j in chosen[:limit]]
        more = len(chosen) > limit
        return page, ((page[-1].created_at, page[-1].job_id) if more else None)

    def cancel(self, job_id: str) -> Job:
        self._update(job_id, self._request_cancel)
        return self.get(job_id)

    def open(self) -> int:
        """Server start: own the journal and take back its jobs, finished ones as they
        ended, unfinished ones queued again to resume after their last finished prompt.
        Returns how many were queued again. If another server owns the journal, this
        one keeps its jobs in memory only (and says so in the log)."""
        journal = JobJournal(self._journal_root)
        try:
            owned = journal.lock()
        except OSError as exc:
            logger.error(
                "cannot open the job journal %s (%s): jobs kept in memory only",
                self._journal_root,
                exc,
            )
            return 0
        if not owned:
            logger.warning(
                "another server owns the job journal %s: this one keeps its jobs in memory "
                "only; give each server its own artifacts directory",
                self._journal_root,
            )
            return 0
        self._journal = journal
        restored = sorted(journal.load(), key=lambda j: j.updated_at)
        resumed = []
        with self._lock:
            for job in restored:
                self._jobs[job.job_id] = job
            # beyond max_jobs, the oldest finished jobs are forgotten, as on submission
            while len(self._jobs) > self._max_jobs and self._evict_oldest_finished():
                pass
            for job in self._jobs.values():
                if job.state.finished:
                    continue
                if job.cancel_requested:
                    self._change(job, lambda j: _finish(j, JobState.CANCELLED, "cancelled"))
                    continue
                try:
                    self._registry.spec(job.model)
                except NotFoundError:
                    message = (
                        f"the server restarted without model {job.model!r}; resubmit the job "
                        "to a server that serves it"
                    )
                    self._change(job, partial(_finish, state=JobState.FAILED, message=message))
                    continue
                message = (
                    f"resumed after a server restart, at prompt {job.processed + 1} "
                    f"of {len(job.prompts)}"
                )
                self._change(job, partial(_resume, message=message))
                resumed.append(job.job_id)
        for job_id in resumed:
            self._executor.submit(self._run, job_id)
        logger.info("restored %d ingest job(s), %d resumed", len(restored), len(resumed))
        return len(resumed)

    def close(self) -> None:
        """Give up the journal (after the jobs' threads have ended)."""
        if self._journal is not None:
            self._journal.unlock()
            self._journal = None

    def stop(self) -> int:
        """Server shutdown: a running job stops after its current prompt and, like a
        queued one, is left queued in the journal for the next start. Returns how many
        jobs are unfinished."""
        with self._lock:
            self._stopping = True
            return sum(not j.state.finished for j in self._jobs.values())

    # ------------------------------------------------------------------ internals
    def _find(self, job_id: str) -> Job:
        """The job itself. Under the lock."""
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(
                f"no job {job_id!r} on this server (it keeps the last {self._max_jobs} "
                "jobs, forgetting the oldest finished ones first)"
            )
        return job

    def _cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return self._jobs[job_id].cancel_requested

    @staticmethod
    def _request_cancel(job: Job) -> None:
        if job.state.finished:
            return
        job.cancel_requested = True
        if job.state is JobState.QUEUED:
            job.state = JobState.CANCELLED
        else:
            job.message = "cancelling: the job stops after its current prompt"

    def _evict(self) -> None:
        if len(self._jobs) >= self._max_jobs and not self._evict_oldest_finished():
            raise ResourceExhaustedError(
                f"{self._max_jobs} jobs are queued or running; wait for some to finish"
            )

    def _evict_oldest_finished(self) -> bool:
        """Forget the finished job changed longest ago, in memory and on disk; False if
        no job has finished. Under the lock."""
        finished = [j for j in self._jobs.values() if j.state.finished]
        if not finished:
            return False
        oldest = min(finished, key=lambda j: j.updated_at)
        del self._jobs[oldest.job_id]
        if self._journal is not None:
            self._journal.remove(oldest.job_id)
        return True

    def _update(self, job_id: str, change: Callable[[Job], None]) -> Job:
        with self._lock:
            job = self._find(job_id)
            self._change(job, change)
            return job

    def _change(self, job: Job, change: Callable[[Job], None]) -> None:
        """Apply ``change``, count it, journal it. Under the lock. A journal that cannot
        be written is logged (once) and the job goes on in memory."""
        change(job)
        job.version += 1
        job.updated_at = datetime.now(UTC)
        if self._journal is None:
            return
        try:
            self._journal.record(job)
        except OSError as exc:
            if not self._journal_failed:
                self._journal_failed = True
                logger.error(
                    "cannot journal ingest jobs under %s (%s): they go on in memory and "
                    "will not survive a restart",
                    self._journal.root,
                    exc,
                )

    def _run(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state is not JobState.QUEUED or self._stopping:
                return
            # in the same locked section as the check: a cancel now finds it running
            self._change(job, lambda j: setattr(j, "state", JobState.RUNNING))
        try:
            self._ingest(job)
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            # domain errors say what is wrong and what to do; anything else stays in the log
            message = (
                str(exc)
                if isinstance(exc, CircuitscopeError)
                else f"{type(exc).__name__}: see the server log"
            )
            self._update(job_id, lambda j: _finish(j, JobState.FAILED, message))

    def _ingest(self, job: Job) -> None:
        from ingest.worker.compute import AttributionComputer, feature_records
        from ingest.worker.worker import IngestOptions, IngestWorker

        def load() -> AttributionComputer:
            loaded, transcoders = self._registry.get(job.model)
            return AttributionComputer(loaded, transcoders, job.settings)

        model_computer = self._on_model_pool(load)
        computer = _OnModelPool(model_computer, self._on_model_pool)
        catalog = feature_records(self._registry.spec(job.model).transcoders_path, computer.set_id)
        options = IngestOptions(
            artifacts_dir=self._artifacts_dir, settings=job.settings, progress=False
        )
        # Store outages are waited out (the worker's backoff, up to its retry budget),
        # each wait reported as the job's message; a cancel or a shutdown ends a wait.
        worker = IngestWorker(
            self._store,
            computer,
            options,
            on_message=partial(self._waiting, job.job_id),
            interrupted=lambda: self._stopping or self._cancel_requested(job.job_id),
        )
        work_dir = self._journal_root / job.job_id  # the job's journal directory too
        work_dir.mkdir(parents=True, exist_ok=True)
        done = job.processed
        try:
            worker.register(catalog)
            for i, record in enumerate(job.prompts, start=1):
                if i <= done:
                    continue  # finished before a restart
                if self._leave_if_asked(job, done):
                    return
                path = work_dir / f"prompt-{i:05d}.jsonl"
                path.write_text(json.dumps(record) + "\n", encoding="utf-8")
                summary = worker.run(path, first_line=i)
                path.unlink(missing_ok=True)
                if self._on_graph_written is not None:
                    for graph_id in summary.computed:
                        self._on_graph_written(graph_id)

                def progress(j: Job, s: Any = summary, n: int = i) -> None:
                    j.processed = n
                    j.graph_ids.extend(s.computed)
                    j.already_stored += s.already_done
                    j.errors.extend(f"prompt {n}: {bad.reason}" for bad in s.bad_lines)
                    if s.claimed_elsewhere:
                        j.errors.append(_claimed_elsewhere(n))
                    if not j.cancel_requested:
                        j.message = ""  # a wait for the store, if any, is over

                self._update(job.job_id, progress)
                done = i
        except UnavailableError:
            # the store wait was ended by a cancel or a shutdown, not by its budget, or the
            # model pool shut down under the job
            if self._leave_if_asked(job, done):
                return
            raise
        self._update(job.job_id, lambda j: _finish(j, JobState.SUCCEEDED, ""))

    def _leave_if_asked(self, job: Job, done: int) -> bool:
        """End the job as cancelled, or leave it queued for the next start when the
        server is stopping, after ``done`` prompts; False when neither was asked."""
        if self._cancel_requested(job.job_id):
            self._update(job.job_id, lambda j: _finish(j, JobState.CANCELLED, "cancelled"))
            return True
        if self._stopping:
            message = (
                f"interrupted by a server shutdown after prompt {done} of "
                f"{len(job.prompts)}; it resumes when the server starts again"
            )
            self._update(job.job_id, partial(_resume, message=message))
            return True
        return False

    def _on_model_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the model pool, waited for (in this thread without one)."""
        if self._model_executor is None:
            return fn(*args)
        try:
            future = self._model_executor.submit(fn, *args)
        except RuntimeError:  # the pool is shut down: the server is stopping
            raise UnavailableError(_MODEL_POOL_GONE) from None
        try:
            return future.result()
        except CancelledError:  # a stopping server cancels what waits in the pool
            raise UnavailableError(_MODEL_POOL_GONE) from None

    def _waiting(self, job_id: str, message: str) -> None:
        """The worker waits for the store: say so in the job's message."""
        self._update(job_id, lambda j: setattr(j, "message", f"waiting: {message}"))


_MODEL_POOL_GONE = "the server is shutting down; the job resumes when it starts again"


class _OnModelPool:
    """A job's graph computer whose attributions run in the model pool, one prompt at a
    time, taking turns with the Attribute and Intervene calls waiting there."""

    def __init__(
        self, computer: AttributionComputer, run: Callable[..., AttributionResult]
    ) -> None:
        self._computer = computer
        self._run = run
        self.model_id = computer.model_id
        self.model_fingerprint = computer.model_fingerprint
        self.set_id = computer.set_id

    def check(self, spec: PromptSpec) -> None:
        self._computer.check(spec)  # tokenizes only: no turn in the model pool needed

    def compute(self, spec: PromptSpec, graph_id: str) -> AttributionResult:
        return self._run(self._computer.compute, spec, graph_id)

    def model_record(self) -> ModelRecord:
        return self._computer.model_record()

    def set_record(self) -> TranscoderSetRecord:
        return self._computer.set_record()


def _claimed_elsewhere(n: int) -> str:
    """The error of prompt ``n`` when another worker (a ``circuitscope ingest`` run or
    another server on the same artifacts directory) holds its graph's claim: this job
    did not compute it, and the graph may not be stored yet."""
    return (
        f"prompt {n}: another worker is computing its graph (it holds the claim in the "
        "server's artifacts directory); resubmit the prompt after that worker finishes "
        "and it is counted as already stored"
    )


def _finish(job: Job, state: JobState, message: str) -> None:
    job.state = state
    job.message = message


def _resume(job: Job, message: str) -> None:
    job.state = JobState.QUEUED
    job.message = message


def settings_for(
    node_threshold: float | None, edge_threshold: float | None, max_feature_nodes: int | None
) -> Any:
    """The worker's GraphSettings, defaults where a value is None."""
    from ingest.worker.keys import GraphSettings

    values: dict[str, Any] = {}
    if node_threshold is not None:
        values["node_threshold"] = node_threshold
    if edge_threshold is not None:
        values["edge_threshold"] = edge_threshold
    if max_feature_nodes is not None:
        values["max_feature_nodes"] = max_feature_nodes
    return dataclasses.replace(GraphSettings(), **values)
