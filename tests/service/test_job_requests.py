"""What SubmitIngest accepts, what a job poll costs, what ``query jobs submit`` sends:
a real server on loopback serving the tiny model (no job here needs it loaded), and a
real :class:`JobManager` whose jobs are held queued."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.store.base import GraphStore
from ingest.worker.keys import GraphSettings
from service._generated.circuits.v1 import job_service_pb2 as pb
from service.cli import main
from service.client import CircuitsClient
from service.config import ServerConfig
from service.jobs import MAX_PROMPTS, JobManager, JobState
from service.models import ModelRegistry, ModelSpec
from service.server import RunningServer, serve_in_background
from service.servicers.jobs import JobServicer
from tests.service.conftest import TOKEN

MODEL = "tiny-gpt2"


@pytest.fixture(scope="module")
def served(
    store: GraphStore, model_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    config = ServerConfig(
        port=0,
        tokens=frozenset({TOKEN}),
        models=(ModelSpec(MODEL, str(model_dirs[0]), model_dirs[1]),),
        artifacts_dir=tmp_path_factory.mktemp("job-requests"),
    )
    with serve_in_background(config, store) as running:
        yield running


@pytest.fixture
def client(served: RunningServer) -> Iterator[CircuitsClient]:
    with CircuitsClient(f"127.0.0.1:{served.port}", token=TOKEN, timeout_s=30) as c:
        yield c


# ---------------------------------------------------------------- SubmitIngest


@pytest.mark.integration
def test_model_and_count_are_checked_before_the_prompts(client: CircuitsClient) -> None:
    too_many = [{"prompt": "w" * 5000}] + [{"prompt": "w3"}] * MAX_PROMPTS
    with pytest.raises(NotFoundError, match="no-such-model"):
        client.submit_ingest("no-such-model", too_many)
    with pytest.raises(InvalidArgumentError, match=f"give 1 to {MAX_PROMPTS} prompts, got 10001"):
        client.submit_ingest(MODEL, too_many)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("field", "name", "limit"),
    [
        ("prompt", "prompt", 4096),
        ("counterfactual", "counterfactual", 4096),
        ("task", "task", 256),
        ("id", "prompt_id", 256),
        ("correct", "correct", 256),
        ("incorrect", "incorrect", 256),
    ],
)
def test_every_prompt_field_is_capped(
    client: CircuitsClient, served: RunningServer, field: str, name: str, limit: int
) -> None:
    long = {"prompt": "w3 w4", "correct": "w5", "incorrect": "w6", field: "w7 " * limit}
    before, _ = served.jobs.list_jobs(state=None, model=None, limit=1000)
    with pytest.raises(
        InvalidArgumentError,
        match=f"prompt 2: {name} has {3 * limit} characters; keep it to at most {limit}",
    ):
        client.submit_ingest(MODEL, [{"prompt": "w3"}, long])
    after, _ = served.jobs.list_jobs(state=None, model=None, limit=1000)
    assert len(after) == len(before)  # no job was queued


# ---------------------------------------------------------------- query jobs submit


@pytest.mark.integration
def test_query_jobs_submit_reads_prompts_as_the_worker_does(
    served: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{served.port}"
    base = ["query", "--target", target, "--token-file", str(tmp_path / "token")]
    (tmp_path / "token").write_text(TOKEN)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w3 w4"}\n{"prompt": "w5", "task": 7}\n')
    assert main([*base, "jobs", "submit", MODEL, str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 2: field 'task' must be a string, got int" in err, err

    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"prompt": "w3 w4", "task": null, "id": null}\n')
    before, _ = served.jobs.list_jobs(state=None, model=None, limit=1000)
    assert main([*base, "jobs", "submit", MODEL, str(nulls)]) == 0
    capsys.readouterr()
    after, _ = served.jobs.list_jobs(state=None, model=None, limit=1000)
    [job] = [j for j in after if j.job_id not in {b.job_id for b in before}]
    served.jobs.cancel(job.job_id)
    assert served.jobs.get(job.job_id).prompts == [{"prompt": "w3 w4"}]  # no "None" task


# ---------------------------------------------------------------- polling a job


class _Held(Executor):
    """Takes jobs and never runs them: they stay queued until cancelled."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return Future()


@pytest.fixture
def held_jobs(
    store: GraphStore, model_dirs: tuple[Path, Path], tmp_path: Path
) -> Iterator[JobManager]:
    registry = ModelRegistry((ModelSpec(MODEL, str(model_dirs[0]), model_dirs[1]),))
    jobs = JobManager(store, registry, _Held(), tmp_path / "artifacts")
    jobs.open()
    yield jobs
    jobs.close()


@pytest.mark.integration
def test_a_snapshot_shares_the_prompts_and_copies_the_rest(held_jobs: JobManager) -> None:
    prompts = [{"prompt": f"w{2 + i % 30} " * 100, "task": "t"} for i in range(MAX_PROMPTS)]
    job = held_jobs.submit(MODEL, prompts, GraphSettings())
    first, second = held_jobs.get(job.job_id), held_jobs.get(job.job_id)
    assert first.prompts is second.prompts and len(first.prompts) == MAX_PROMPTS
    first.graph_ids.append("mine")
    first.errors.append("mine")
    assert held_jobs.get(job.job_id).graph_ids == [] and held_jobs.get(job.job_id).errors == []
    # a deep copy of these prompts takes tens of milliseconds
    costs = []
    for _ in range(5):
        started = time.perf_counter()
        held_jobs.get(job.job_id)
        costs.append(time.perf_counter() - started)
    assert min(costs) < 0.005, costs


@pytest.mark.integration
def test_watch_job_takes_a_snapshot_only_when_the_job_changed(
    held_jobs: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.servicers.jobs as servicer_module

    monkeypatch.setattr(servicer_module, "WATCH_POLL_S", 0.005)
    job = held_jobs.submit(MODEL, [{"prompt": "w3 w4"}], GraphSettings())
    snapshots = 0
    real_get = held_jobs.get

    def counted_get(job_id: str) -> Any:
        nonlocal snapshots
        snapshots += 1
        return real_get(job_id)

    monkeypatch.setattr(held_jobs, "get", counted_get)

    async def watch() -> list[pb.WatchJobResponse]:
        stream = JobServicer(held_jobs).WatchJob(pb.WatchJobRequest(job_id=job.job_id), None)  # type: ignore[arg-type]
        first = await anext(stream)
        rest = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.1)  # about 20 polls of an unchanged job
        assert snapshots == 1  # the first message's, none since
        held_jobs.cancel(job.job_id)
        return [first, await rest]

    sent = asyncio.run(watch())
    assert [m.job.state for m in sent] == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_CANCELLED]
    assert held_jobs.get(job.job_id).state is JobState.CANCELLED
