"""Fixtures: one embedded graph server per session, synthetic graphs, a live gRPC server.

The embedded ArcadeDB server (a real Bolt server in a child process) starts once per
test session; the graphs of :mod:`tests.service.builders` are written through the
store API; the gRPC server runs on a loopback port chosen by the OS.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.attribution.artifact import save_artifact
from ingest.graph import ModelRecord, TranscoderSetRecord
from ingest.models import load_model
from ingest.store import open_store
from ingest.store.base import GraphStore
from ingest.store.config import StoreConfig
from ingest.store.embedded import embedded_server, start, stop
from ingest.transcoders.formats import save
from service.client import CircuitsClient
from service.config import ServerConfig
from service.models import ModelSpec
from service.server import RunningServer, serve_in_background
from tests.ingest.attribution import models as tiny
from tests.service import builders

TOKEN = secrets.token_urlsafe(24)
# graph id -> builder kwargs; g-big is the ~1k-edge neighbourhood graph of the benchmark.
GRAPHS: dict[str, dict[str, object]] = {
    "g-alpha": {"prompt": "alpha beta", "task": "toy"},
    "g-beta": {"prompt": "gamma delta", "task": "toy", "n_layers": 3},
    "g-gamma": {"prompt": "alpha omega", "task": "other", "model_id": "other-model"},
    "g-delta": {"prompt": "delta", "task": "toy", "width": 4},
    "g-epsilon": {"prompt": "epsilon", "task": "toy"},
}


ARTIFACT_GRAPH = "g-artifact"
ARTIFACT_GRAPH_KWARGS: dict[str, object] = {
    "n_layers": 3,
    "width": 3,
    "n_logits": 2,
    "task": "artifact",
    "prompt": "with artifact",
}
ALL_GRAPH_IDS = sorted([*GRAPHS, ARTIFACT_GRAPH])


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GraphStore]:
    data_dir = tmp_path_factory.mktemp("service-db")
    with embedded_server(data_dir, heap="512m") as config, open_store(config) as graph_store:
        graph_store.upsert_model(ModelRecord(builders.MODEL_ID, "gpt2", 3, 16))
        graph_store.upsert_model(ModelRecord("other-model", "gpt2", 2, 16))
        graph_store.upsert_transcoder_set(TranscoderSetRecord(builders.SET_ID, builders.MODEL_ID))
        graph_store.upsert_features(builders.features(n_layers=3, width=4))
        for graph_id, kwargs in GRAPHS.items():
            graph_store.write_graph(builders.layered_graph(graph_id, **kwargs))  # type: ignore[arg-type]
        # A graph stored pruned, with its full artifact on disk (as the worker leaves it).
        result = builders.layered_result(ARTIFACT_GRAPH, **ARTIFACT_GRAPH_KWARGS)
        artifact = save_artifact(result, data_dir / "artifacts" / ARTIFACT_GRAPH)
        pruned = result.to_graph(pruned=True)
        pruned.metadata.artifact_uri = artifact.resolve().as_uri()
        graph_store.write_graph(pruned)
        yield graph_store


@pytest.fixture
def own_store(tmp_path: Path) -> Iterator[tuple[StoreConfig, GraphStore]]:
    """An embedded store of the test's own, for tests that stop and start it."""
    config = start(tmp_path / "db", heap="512m")
    try:
        with open_store(config) as store:
            yield config, store
    finally:
        stop(config.data_dir)


@pytest.fixture(scope="session")
def server(store: GraphStore) -> Iterator[RunningServer]:
    config = ServerConfig(
        host="127.0.0.1", port=0, tokens=frozenset({TOKEN}), health_interval_s=2.0
    )
    with serve_in_background(config, store) as running:
        yield running


@pytest.fixture(scope="session")
def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def client(target: str) -> Iterator[CircuitsClient]:
    with CircuitsClient(target, token=TOKEN, timeout_s=20.0) as c:
        yield c


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny real GPT-2 and a transcoder set for it, saved for a server to load."""
    root = tmp_path_factory.mktemp("served-model")
    hf = tiny.hf_model("gpt2", seed=3)
    hf.save_pretrained(root / "model")
    tiny.word_tokenizer().save_pretrained(root / "model")
    adapter = load_model(str(root / "model")).adapter
    save(tiny.transcoder_set(adapter, seed=3), root / "transcoders")
    return root / "model", root / "transcoders"


@pytest.fixture(scope="session")
def analysis_target(store: GraphStore, model_dirs: tuple[Path, Path]) -> Iterator[str]:
    """A server with the tiny model and its transcoders loaded: the analysis calls."""
    spec = ModelSpec("tiny-gpt2", str(model_dirs[0]), model_dirs[1])
    config = ServerConfig(
        port=0,
        tokens=frozenset({TOKEN}),
        models=(spec,),
        artifacts_dir=model_dirs[0].parent / "artifacts",
    )
    with serve_in_background(config, store) as running:
        yield f"127.0.0.1:{running.port}"
