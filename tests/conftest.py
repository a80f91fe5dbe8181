"""Shared test configuration.

Tests are tiered by markers: ``unit`` (fast, no external process), ``integration``
(a real database server or a real gRPC server on loopback), ``slow`` (trains models
or runs long computations). Every test carries one of them.
"""

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # One torch thread: the tests' tensors are tiny, and on a 2-core machine shared with
    # the graph server's JVM a second spinning thread makes small ops far slower.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point CIRCUITSCOPE_HOME at a per-session temp dir so tests never touch the user's data."""
    home = tmp_path_factory.getbasetemp() / "circuitscope-home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("CIRCUITSCOPE_HOME", str(home))


@pytest.fixture(scope="session", autouse=True)
def _stop_default_embedded_server(tmp_path_factory: pytest.TempPathFactory):
    """Commands run without NEO4J_URI start the embedded server in the test home;
    stop it when the session ends so no graph server outlives the tests."""
    yield
    from ingest.store.embedded import status, stop

    data_dir = tmp_path_factory.getbasetemp() / "circuitscope-home" / "db"
    if data_dir.is_dir() and status(data_dir).running:
        stop(data_dir, timeout_s=15.0)
