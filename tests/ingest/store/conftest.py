"""Store test fixtures: one real server per backend per test session.

``store`` is parametrized over the backends: the embedded ArcadeDB Bolt server
(always; started once, data in a session temp dir, stopped at the end) and Neo4j 5
through testcontainers (pinned image) when the package is installed and a Docker
engine answers; otherwise that parameter is skipped with the reason. Tests isolate
themselves by unique graph ids, model ids and set ids, so they share one database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ingest.store import StoreConfig, open_store
from ingest.store.base import GraphStore
from ingest.store.embedded import embedded_server

NEO4J_IMAGE = "neo4j:5.26.2"
TEST_HEAP = "1g"


@pytest.fixture(scope="session")
def arcadedb_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreConfig]:
    data_dir = tmp_path_factory.mktemp("arcadedb")
    with embedded_server(data_dir, heap=TEST_HEAP, batch_size=500) as config:
        yield config


@pytest.fixture(scope="session")
def neo4j_config() -> Iterator[StoreConfig]:
    try:  # testcontainers >= 4.14 moved the module; older releases have only the first
        from testcontainers.community.neo4j import Neo4jContainer  # type: ignore[import-not-found]
    except ImportError:
        try:
            from testcontainers.neo4j import Neo4jContainer  # type: ignore[import-not-found]
        except ImportError:
            pytest.skip("Neo4j backend: testcontainers is not installed (pip install -e '.[dev]')")
    try:
        import docker  # type: ignore[import-not-found]

        docker.from_env().ping()
    except Exception as exc:
        pytest.skip(f"Neo4j backend: no Docker engine answers ({exc})")
    with Neo4jContainer(NEO4J_IMAGE) as container:
        yield StoreConfig(
            uri=container.get_connection_url(),
            user="neo4j",
            password=container.password,
            database="neo4j",
            batch_size=500,
        )


@pytest.fixture(scope="session", params=["arcadedb", "neo4j"])
def store(request: pytest.FixtureRequest) -> Iterator[GraphStore]:
    config = request.getfixturevalue(f"{request.param}_config")
    with open_store(config) as s:
        yield s


@pytest.fixture
def uid() -> str:
    """A short unique prefix for the ids a test writes."""
    return uuid.uuid4().hex[:8]
