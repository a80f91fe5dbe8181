"""Ingest jobs survive a server restart: the journal on its own, then real servers on
loopback over the embedded store, stopped and started again on one artifacts directory."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ingest.errors import NotFoundError
from ingest.store.base import GraphStore
from ingest.worker.keys import GraphSettings
from service.client import CircuitsClient
from service.config import ServerConfig
from service.job_journal import EVENTS_FILE, JOB_FILE, JobJournal
from service.jobs import Job, JobManager, JobState
from service.models import ModelRegistry, ModelSpec
from service.results import JobStatus
from service.server import RunningServer, serve_in_background
from tests.service.conftest import TOKEN

MODEL = "tiny-gpt2"


def _job(n_prompts: int = 3, model: str = MODEL) -> Job:
    prompts = [{"prompt": f"w{2 + i} w{9 + i} w4", "task": "journal"} for i in range(n_prompts)]
    return Job(f"job{n_prompts}{model}".replace("-", ""), model, prompts, GraphSettings(0.9))


def _progress(journal: JobJournal, job: Job, graph_id: str, error: str | None = None) -> None:
    job.processed += 1
    job.graph_ids.append(graph_id)
    if error:
        job.errors.append(error)
    job.version += 1
    journal.record(job)


@pytest.mark.unit
def test_journal_replays_a_job_as_its_last_change_left_it(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path)
    job = _job()
    journal.create(job)
    job.state = JobState.RUNNING
    _progress(journal, job, "g1")
    _progress(journal, job, "g2", error="prompt 2: too long")
    [loaded] = journal.load()
    assert loaded == job
    assert loaded.settings == GraphSettings(0.9)
    # each line holds only what its change added
    lines = (tmp_path / job.job_id / EVENTS_FILE).read_text().splitlines()
    assert [json.loads(line)["graph_ids"] for line in lines] == [[], ["g1"], ["g2"]]


@pytest.mark.unit
def test_journal_cuts_off_a_line_a_crash_left_unfinished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = JobJournal(tmp_path)
    job = _job()
    journal.create(job)
    _progress(journal, job, "g1")
    events = tmp_path / job.job_id / EVENTS_FILE
    with events.open("a") as f:
        f.write('{"version": 9, "state": "succ')  # the process died mid-write
    with caplog.at_level(logging.WARNING):
        [loaded] = journal.load()
    assert loaded == job and "cutting off" in caplog.text
    # the next change starts a line of its own
    _progress(journal, loaded, "g2")
    [again] = journal.load()
    assert again.graph_ids == ["g1", "g2"] and again.processed == 2


# A child process whose file size limit (RLIMIT_FSIZE) lets the journal write only part
# of a line, as a full disk does; SIGXFSZ ignored, the write fails with EFBIG.
_FULL_DISK_CHILD = """
import resource, signal, sys
from pathlib import Path
from ingest.worker.keys import GraphSettings
from service.job_journal import EVENTS_FILE, JobJournal
from service.jobs import Job, JobState

journal = JobJournal(Path(sys.argv[1]))
job = Job("full", "m", [{"prompt": "a"}, {"prompt": "b"}], GraphSettings())
journal.create(job)
events = journal.job_dir(job.job_id) / EVENTS_FILE
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (events.stat().st_size + 40, hard))
job.state, job.processed, job.version = JobState.RUNNING, 1, 1
job.graph_ids.append("g-first")
try:
    journal.record(job)
except OSError as exc:
    print("refused:", exc.strerror)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space comes back
job.processed, job.version = 2, 2
job.graph_ids.append("g-second")
journal.record(job)
"""


@pytest.mark.unit
def test_a_write_the_disk_refuses_part_way_loses_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert "refused: File too large" in done.stdout  # the write really failed part way
    lines = (tmp_path / "full" / EVENTS_FILE).read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # no half line left behind
    [job] = JobJournal(tmp_path).load()
    assert job.processed == 2 and job.state is JobState.RUNNING
    # the ids of the change whose line failed came with the next line
    assert job.graph_ids == ["g-first", "g-second"]


@pytest.mark.unit
def test_a_bad_line_in_the_middle_is_skipped_not_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = JobJournal(tmp_path)
    job = _job()
    journal.create(job)
    job.state = JobState.RUNNING
    _progress(journal, job, "g1")
    events = tmp_path / job.job_id / EVENTS_FILE
    with events.open("a") as f:
        f.write('{"version": 9, "state": "succ')  # half a line an old server left
    _progress(journal, job, "g2")  # glued to it
    with events.open("a") as f:
        f.write("#garbage#\n")
    _progress(journal, job, "g3")
    with caplog.at_level(logging.WARNING):
        [loaded] = journal.load()
    assert loaded == job and loaded.graph_ids == ["g1", "g2", "g3"]
    assert "line 3 is not JSON" in caplog.text and "line 4 is not JSON" in caplog.text


@pytest.mark.unit
def test_journal_skips_unreadable_records_and_keeps_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = JobJournal(tmp_path)
    good = _job(2)
    journal.create(good)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / JOB_FILE).write_text("{not json")
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / JOB_FILE).write_text((tmp_path / good.job_id / JOB_FILE).read_text())
    (tmp_path / "work-only").mkdir()  # a directory without a record is not a job
    with caplog.at_level(logging.WARNING):
        loaded = list(journal.load())
    assert [j.job_id for j in loaded] == [good.job_id]
    assert "broken" in caplog.text and "renamed" in caplog.text
    assert "work-only" not in caplog.text


@pytest.mark.unit
def test_one_owner_per_journal(tmp_path: Path) -> None:
    first, second = JobJournal(tmp_path), JobJournal(tmp_path)
    assert first.lock()
    assert not second.lock()
    first.unlock()
    assert second.lock()
    second.unlock()


# ---------------------------------------------------------------- real servers


def _config(model_dirs: tuple[Path, Path], artifacts: Path, *models: str) -> ServerConfig:
    specs = tuple(ModelSpec(name, str(model_dirs[0]), model_dirs[1]) for name in models)
    return ServerConfig(port=0, tokens=frozenset({TOKEN}), models=specs, artifacts_dir=artifacts)


def _client(running: RunningServer) -> CircuitsClient:
    return CircuitsClient(f"127.0.0.1:{running.port}", token=TOKEN, timeout_s=120)


@pytest.fixture
def restartable(
    store: GraphStore, model_dirs: tuple[Path, Path], tmp_path: Path
) -> Iterator[tuple[ServerConfig, Path]]:
    artifacts = tmp_path / "artifacts"
    yield _config(model_dirs, artifacts, MODEL), artifacts


def _final(client: CircuitsClient, job_id: str) -> JobStatus:
    return list(client.watch_job(job_id))[-1]


@pytest.mark.integration
def test_finished_job_answers_after_a_restart(
    store: GraphStore, restartable: tuple[ServerConfig, Path]
) -> None:
    config, _ = restartable
    prompts = [
        {"prompt": "w3 w8 w2 w12"},
        {"prompt": "w4 w9", "correct": "w2 w3", "incorrect": "w5"},
    ]
    with serve_in_background(config, store) as running, _client(running) as client:
        job = client.submit_ingest(MODEL, prompts, node_threshold=0.9)
        before = _final(client, job.job_id)
    assert before.state == "succeeded" and before.processed_count == 2
    with serve_in_background(config, store) as running, _client(running) as client:
        assert client.get_job(job.job_id) == before
        assert [j.job_id for j in client.iter_jobs()] == [job.job_id]


@pytest.mark.integration
def test_job_stopped_by_a_shutdown_resumes_at_the_next_start(
    store: GraphStore, restartable: tuple[ServerConfig, Path]
) -> None:
    config, artifacts = restartable
    n = 40
    prompts = [{"prompt": f"w{2 + i % 30} w{5 + i // 30} w{3 + i % 7} w9"} for i in range(n)]
    with serve_in_background(config, store) as running, _client(running) as client:
        job = client.submit_ingest(MODEL, prompts, node_threshold=0.9)
        while client.get_job(job.job_id).processed_count < 1:
            time.sleep(0.02)
    # what the stopped server left: queued, part done, saying why
    [left] = JobJournal(artifacts / "jobs").load()
    assert left.state is JobState.QUEUED and 1 <= left.processed < n
    assert "interrupted by a server shutdown" in left.message

    with serve_in_background(config, store) as running, _client(running) as client:
        final = _final(client, job.job_id)
        assert final.state == "succeeded" and final.processed_count == n
        assert final.message == ""
        # every prompt's graph is stored once and counted once
        assert len(set(final.graph_ids)) == len(final.graph_ids)
        assert len(final.graph_ids) + final.already_stored_count == n
        assert final.already_stored_count <= 1  # at most the prompt in flight at the stop
        for graph_id in final.graph_ids:
            assert client.get_graph(graph_id).graph_id == graph_id


@pytest.mark.integration
def test_jobs_of_a_crashed_server_resume_fail_or_end_as_asked(
    store: GraphStore, model_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    journal = JobJournal(artifacts / "jobs")
    # what a killed server leaves: a running job one prompt in, its last line cut short
    running_job = _job(3)
    journal.create(running_job)
    running_job.state = JobState.RUNNING
    _progress(journal, running_job, "not-a-stored-graph")
    with (journal.job_dir(running_job.job_id) / EVENTS_FILE).open("a") as f:
        f.write('{"version": 7, "sta')
    gone = _job(2, model="retired-model")
    journal.create(gone)
    cancelling = _job(4)
    cancelling.job_id = "cancelling"
    cancelling.cancel_requested = True
    journal.create(cancelling)

    config = _config(model_dirs, artifacts, MODEL)
    with serve_in_background(config, store) as running, _client(running) as client:
        resumed = _final(client, running_job.job_id)
        assert resumed.state == "succeeded" and resumed.processed_count == 3
        # the prompt recorded before the crash is not computed again
        assert resumed.graph_ids[0] == "not-a-stored-graph"
        assert len(resumed.graph_ids) + resumed.already_stored_count == 3
        failed = client.get_job(gone.job_id)
        assert failed.state == "failed" and "'retired-model'" in failed.message
        assert "resubmit" in failed.message
        assert client.get_job("cancelling").state == "cancelled"


@pytest.mark.integration
def test_a_second_server_on_the_same_directory_keeps_its_jobs_in_memory(
    store: GraphStore, restartable: tuple[ServerConfig, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config, artifacts = restartable
    with serve_in_background(config, store) as first, _client(first) as client:
        job = client.submit_ingest(MODEL, [{"prompt": "w7 w3 w5"}])
        _final(client, job.job_id)
        with (
            caplog.at_level(logging.WARNING),
            serve_in_background(config, store) as second,
            _client(second) as other,
        ):
            with pytest.raises(NotFoundError, match="no job"):
                other.get_job(job.job_id)  # the first server's job is not taken over
            mine = other.submit_ingest(MODEL, [{"prompt": "w7 w3 w6"}])
            assert _final(other, mine.job_id).state == "succeeded"
        assert "another server owns the job journal" in caplog.text
        assert not (artifacts / "jobs" / mine.job_id / JOB_FILE).exists()
        assert client.get_job(job.job_id).state == "succeeded"


@pytest.mark.integration
def test_forgotten_jobs_leave_the_journal_too(
    store: GraphStore, model_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Beyond ``max_jobs`` the oldest finished job is forgotten on disk as in memory, so
    the journal stays bounded and a restart brings back only the jobs kept."""
    registry = ModelRegistry((ModelSpec(MODEL, str(model_dirs[0]), model_dirs[1]),))
    artifacts = tmp_path / "artifacts"
    ids = []
    with ThreadPoolExecutor(1) as pool:
        jobs = JobManager(store, registry, pool, artifacts, max_jobs=2)
        jobs.open()
        for i in range(3):
            job = jobs.submit(MODEL, [{"prompt": f"w{20 + i} w3"}], GraphSettings())
            ids.append(job.job_id)
            while not jobs.get(job.job_id).state.finished:
                time.sleep(0.02)
        jobs.close()
    assert sorted(p.name for p in (artifacts / "jobs").iterdir() if p.is_dir()) == sorted(ids[1:])
    with ThreadPoolExecutor(1) as pool:
        again = JobManager(store, registry, pool, artifacts, max_jobs=2)
        assert again.open() == 0  # nothing to resume
        listed, _ = again.list_jobs(state=None, model=None, limit=10)
        assert [j.job_id for j in listed] == ids[:0:-1]
        again.close()


@pytest.mark.integration
def test_a_job_that_cannot_load_its_model_fails_saying_why(
    store: GraphStore, model_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    missing = tmp_path / "no-transcoders"
    spec = ModelSpec("broken", str(model_dirs[0]), missing)
    config = ServerConfig(
        port=0, tokens=frozenset({TOKEN}), models=(spec,), artifacts_dir=tmp_path / "a"
    )
    with serve_in_background(config, store) as running, _client(running) as client:
        job = client.submit_ingest("broken", [{"prompt": "w3 w4"}])
        final = _final(client, job.job_id)
    assert final.state == "failed" and str(missing) in final.message, final.message
