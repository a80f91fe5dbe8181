"""Ingest jobs meeting other actors mid-way: a cancel while the job starts, a prompt
another worker is computing. A real :class:`JobManager` with its journal, the tiny real
model and the embedded store; the interleavings are forced through the manager's lock
and the worker's claims directory, not by sleeping."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import pytest

from ingest.store.base import GraphStore
from ingest.worker.keys import GraphSettings, graph_key
from ingest.worker.prompts import PromptSpec
from service.job_journal import EVENTS_FILE
from service.jobs import Job, JobManager, JobState
from service.models import ModelRegistry, ModelSpec

MODEL = "tiny-gpt2"
RUNNER = "job-runner"


class _HookedLock:
    """A lock that calls ``hook`` once, right after the job thread first lets go of it."""

    def __init__(self, hook: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._hook: Callable[[], None] | None = hook

    def __enter__(self) -> _HookedLock:
        self._lock.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
        if threading.current_thread().name.startswith(RUNNER):
            hook, self._hook = self._hook, None
            if hook is not None:
                hook()


@pytest.fixture
def registry(model_dirs: tuple[Path, Path]) -> ModelRegistry:
    return ModelRegistry((ModelSpec(MODEL, str(model_dirs[0]), model_dirs[1]),))


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1, thread_name_prefix=RUNNER) as executor:
        yield executor


def _finished(jobs: JobManager, job_id: str, timeout_s: float = 120) -> Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = jobs.get(job_id)
        if job.state.finished:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {job}")


def _unique_prompt() -> str:
    """A prompt no other test stores (the store lives for the whole session)."""
    words = random.Random(os.urandom(8)).sample(range(2, 40), 6)
    return " ".join(f"w{w}" for w in words)


@pytest.mark.integration
def test_a_cancel_while_the_job_starts_is_final(
    store: GraphStore, registry: ModelRegistry, pool: ThreadPoolExecutor, tmp_path: Path
) -> None:
    jobs = JobManager(store, registry, pool, tmp_path / "artifacts")
    answers: list[Job] = []

    def cancel() -> None:
        [only], _ = jobs.list_jobs(state=None, model=None, limit=1)
        answers.append(jobs.cancel(only.job_id))

    # CancelJob arrives just after the job thread checked that the job is queued
    jobs._lock = _HookedLock(cancel)  # type: ignore[assignment]
    jobs.open()
    try:
        job = jobs.submit(MODEL, [{"prompt": "w3 w4"}, {"prompt": "w5 w6"}], GraphSettings())
        final = _finished(jobs, job.job_id)
    finally:
        jobs.stop()
        pool.shutdown(wait=True)
        jobs.close()
    assert len(answers) == 1  # the cancel came in the window
    assert final.state is JobState.CANCELLED and final.processed == 0
    lines = (tmp_path / "artifacts" / "jobs" / job.job_id / EVENTS_FILE).read_text()
    states = [json.loads(line)["state"] for line in lines.splitlines()]
    # once cancelled, a job never runs again
    assert states[states.index("cancelled") :] == ["cancelled"], states


@pytest.mark.integration
def test_a_prompt_another_worker_claimed_is_an_error_not_a_silent_success(
    store: GraphStore, registry: ModelRegistry, pool: ThreadPoolExecutor, tmp_path: Path
) -> None:
    from ingest.worker.compute import AttributionComputer

    settings = GraphSettings(node_threshold=0.9)
    claimed, free = _unique_prompt(), _unique_prompt()
    loaded, transcoders = registry.get(MODEL)
    computer = AttributionComputer(loaded, transcoders, settings)
    graph_id = graph_key(
        computer.model_fingerprint, computer.set_id, PromptSpec(1, claimed), settings
    )
    # a live worker (this process) holds the claim on the first prompt's graph
    claims = tmp_path / "artifacts" / "claims"
    claims.mkdir(parents=True)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + 600}
    (claims / f"{graph_id}.claim").write_text(json.dumps(owner))

    jobs = JobManager(store, registry, pool, tmp_path / "artifacts")
    jobs.open()
    try:
        job = jobs.submit(MODEL, [{"prompt": claimed}, {"prompt": free}], settings)
        final = _finished(jobs, job.job_id)
    finally:
        jobs.stop()
        pool.shutdown(wait=True)
        jobs.close()
    assert final.state is JobState.SUCCEEDED and final.processed == 2
    assert graph_id not in final.graph_ids
    # every processed prompt has an outcome: stored, found stored, or an error
    assert len(final.graph_ids) + final.already_stored + len(final.errors) == 2
    [error] = final.errors
    assert error.startswith("prompt 1: another worker is computing its graph")
    assert "resubmit" in error
