"""An ingest job waits out a graph-store outage, says so, and can be cancelled while it
waits: a real server on loopback over an embedded store of its own, stopped and started
again under the job."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ingest.store.base import GraphStore
from ingest.store.config import StoreConfig
from ingest.store.embedded import start, stop
from service.client import CircuitsClient
from service.config import ServerConfig
from service.models import ModelSpec
from service.results import JobStatus
from service.server import serve_in_background
from tests.service.conftest import TOKEN

MODEL = "tiny-gpt2"


def _wait_for(client: CircuitsClient, job_id: str, ready: object, timeout_s: float) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job(job_id)
        if ready(status):  # type: ignore[operator]
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not get there in {timeout_s} s: {status}")


@pytest.mark.integration
def test_a_job_waits_out_a_store_outage_and_a_cancel_ends_the_wait(
    own_store: tuple[StoreConfig, GraphStore], model_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    store_config, store = own_store
    spec = ModelSpec(MODEL, str(model_dirs[0]), model_dirs[1])
    config = ServerConfig(
        port=0, tokens=frozenset({TOKEN}), models=(spec,), artifacts_dir=tmp_path / "a"
    )
    data_dir = store_config.data_dir
    assert data_dir is not None
    waiting = lambda s: s.state == "running" and s.message.startswith("waiting: ")  # noqa: E731
    with (
        serve_in_background(config, store) as running,
        CircuitsClient(f"127.0.0.1:{running.port}", token=TOKEN, timeout_s=120) as client,
    ):
        stop(data_dir, timeout_s=10.0)
        prompts = [{"prompt": "w3 w8 w2"}, {"prompt": "w4 w9 w5"}]
        job = client.submit_ingest(MODEL, prompts, node_threshold=0.9)
        status = _wait_for(client, job.job_id, waiting, 60)
        assert "graph store unavailable" in status.message and "retrying" in status.message

        assert start(data_dir, heap="512m").uri == store_config.uri
        final = _wait_for(client, job.job_id, lambda s: s.state != "running", 120)
        assert final.state == "succeeded", final
        assert final.processed_count == 2 and final.message == ""
        assert len(final.graph_ids) == 2
        for graph_id in final.graph_ids:
            assert client.get_graph(graph_id).graph_id == graph_id

        # A cancel ends a wait, instead of the retry budget (minutes) running out: at
        # once during a backoff sleep, or when the store call in flight gives up (the
        # driver's own retries bound it at StoreConfig.retry_time_s, 5 s).
        stop(data_dir, timeout_s=10.0)
        other = client.submit_ingest(MODEL, [{"prompt": "w5 w6 w7"}], node_threshold=0.9)
        _wait_for(client, other.job_id, waiting, 60)
        asked = time.monotonic()
        client.cancel_job(other.job_id)
        ended = _wait_for(client, other.job_id, lambda s: s.state != "running", 30)
        assert ended.state == "cancelled" and time.monotonic() - asked < 25
