"""An ingest job takes turns with analysis calls on the model thread: an Attribute call
made while a job runs is answered after at most the job's current prompt, and a job
waiting out a store outage holds no model thread at all. A real server on loopback,
the tiny real model, embedded stores (one of them stopped under the job)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ingest.store.base import GraphStore
from ingest.store.config import StoreConfig
from ingest.store.embedded import stop
from service.client import CircuitsClient
from service.config import ServerConfig
from service.models import ModelSpec
from service.results import JobStatus
from service.server import serve_in_background
from tests.service.conftest import TOKEN

MODEL = "tiny-gpt2"
# Far longer than one prompt of the tiny model takes, far shorter than a whole job.
ATTRIBUTE_TIMEOUT_S = 20.0


def _config(model_dirs: tuple[Path, Path], artifacts: Path) -> ServerConfig:
    spec = ModelSpec(MODEL, str(model_dirs[0]), model_dirs[1])
    return ServerConfig(port=0, tokens=frozenset({TOKEN}), models=(spec,), artifacts_dir=artifacts)


def _wait_for(
    client: CircuitsClient, job_id: str, ready: Callable[[JobStatus], bool], timeout_s: float
) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job(job_id)
        if ready(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not get there in {timeout_s} s: {status}")


def _unique_prompts(n: int) -> list[dict[str, str]]:
    rng = random.Random(os.urandom(8))
    return [{"prompt": " ".join(f"w{w}" for w in rng.sample(range(2, 40), 6))} for _ in range(n)]


@pytest.mark.integration
def test_an_attribute_call_waits_for_one_prompt_of_a_running_job_not_the_job(
    store: GraphStore, model_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    n = 400
    with (
        serve_in_background(_config(model_dirs, tmp_path / "a"), store) as running,
        CircuitsClient(f"127.0.0.1:{running.port}", token=TOKEN, timeout_s=120) as client,
    ):
        job = client.submit_ingest(MODEL, _unique_prompts(n), node_threshold=0.9)
        _wait_for(client, job.job_id, lambda s: s.processed_count >= 2, 120)
        answer = client.attribute(MODEL, "w3 w8 w2", timeout_s=ATTRIBUTE_TIMEOUT_S)
        during = client.get_job(job.job_id)
        cancelling = client.cancel_job(job.job_id)
        final = _wait_for(client, job.job_id, lambda s: s.state != "running", 60)
    assert answer.graph.nodes  # a real graph, computed between two of the job's prompts
    assert during.state == "running" and during.processed_count < n, during
    # running until its current prompt is done, and saying so
    assert cancelling.state == "running" and cancelling.message.startswith("cancelling")
    assert final.state == "cancelled" and final.processed_count < n


@pytest.mark.integration
def test_a_job_waiting_out_a_store_outage_leaves_the_model_thread_free(
    own_store: tuple[StoreConfig, GraphStore], model_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    store_config, store = own_store
    data_dir = store_config.data_dir
    assert data_dir is not None
    waiting = lambda s: s.state == "running" and s.message.startswith("waiting: ")  # noqa: E731
    with (
        serve_in_background(_config(model_dirs, tmp_path / "a"), store) as running,
        CircuitsClient(f"127.0.0.1:{running.port}", token=TOKEN, timeout_s=120) as client,
    ):
        stop(data_dir, timeout_s=10.0)
        job = client.submit_ingest(MODEL, _unique_prompts(2), node_threshold=0.9)
        _wait_for(client, job.job_id, waiting, 60)
        # Attribute needs no store: it is answered while the job waits for one
        answer = client.attribute(MODEL, "w3 w8 w2", timeout_s=ATTRIBUTE_TIMEOUT_S)
        still = client.get_job(job.job_id)
        client.cancel_job(job.job_id)
        final = _wait_for(client, job.job_id, lambda s: s.state != "running", 30)
    assert answer.graph.nodes
    assert waiting(still), still
    assert final.state == "cancelled" and final.processed_count == 0
