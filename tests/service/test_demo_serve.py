"""The demo's queries and serve stages on their own, against real stores and real
server processes: a server that cannot start is an error (not "SERVING"), a stale pid
file never signals an unrelated process, and the queries find this run's graphs
however many others the store holds."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.errors import UnavailableError
from ingest.store import open_store
from ingest.store.base import GraphStore
from ingest.store.config import StoreConfig
from service import demo_pipeline
from service.client import CircuitsClient
from service.demo_cli import DemoContext
from service.demo_pipeline import queries_stage, serve_stage
from service.server import RunningServer
from tests.service import builders
from tests.service.processes import gone, stop_process

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_home(store: GraphStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of the test's own; the demo's server process uses the session store."""
    config = store.config  # type: ignore[attr-defined]
    for name, value in (
        ("NEO4J_URI", config.uri),
        ("NEO4J_USER", config.user),
        ("NEO4J_PASSWORD", config.password),
        ("NEO4J_DATABASE", config.database),
        ("PYTHONPATH", str(REPO)),
        ("CIRCUITSCOPE_HOME", str(tmp_path / "home")),
    ):
        monkeypatch.setenv(name, value)
    return tmp_path / "home"


def _ctx(store: GraphStore, port: int) -> DemoContext:
    ctx = DemoContext(device="cpu", tiny=True, progress=False, port=port)
    ctx.results["store"] = open_store(store.config)  # type: ignore[attr-defined]
    return ctx


def _store_is_closed(ctx: DemoContext) -> bool:
    try:
        ctx.results["store"].list_graphs(limit=1)
    except Exception:
        return True
    return False


def test_a_port_held_by_another_server_is_an_error_not_serving(
    demo_home: Path, store: GraphStore, server: RunningServer
) -> None:
    # The session's server holds the port (its own tokens; health answers anyone).
    ctx = _ctx(store, server.port)
    with pytest.raises(UnavailableError) as caught:
        serve_stage(ctx)
    message = str(caught.value)
    assert "\n" not in message
    assert f"did not start on 127.0.0.1:{server.port}" in message
    assert "cannot listen" in message and "--port 0" in message
    assert "server_pid" not in ctx.results
    assert _store_is_closed(ctx)
    pid = int((demo_home / "demo-tiny" / "serve" / "server.pid").read_text())
    assert gone(pid)


def test_a_stale_pid_file_never_signals_another_process_and_old_servers_are_waited_for(
    demo_home: Path, store: GraphStore
) -> None:
    unrelated = subprocess.Popen(["sleep", "300"])
    started: list[int] = []
    try:
        run_dir = demo_home / "demo-tiny" / "serve"
        run_dir.mkdir(parents=True)
        (run_dir / "server.pid").write_text(str(unrelated.pid))

        ctx = _ctx(store, 0)
        lines = serve_stage(ctx)
        started.append(ctx.results["server_pid"])
        assert ": SERVING" in lines[0] and not any("stopped" in line for line in lines)
        assert unrelated.poll() is None, "the demo signalled a process it did not start"
        assert _store_is_closed(ctx)
        token = ctx.results["token_file"].read_text().strip()
        with CircuitsClient(ctx.results["target"], token=token, timeout_s=10) as client:
            assert client.list_graphs(page_size=1).items

        # A second run stops the first run's server and waits until it has exited.
        again = _ctx(store, 0)
        lines = serve_stage(again)
        started.append(again.results["server_pid"])
        assert lines[0] == f"stopped the previous demo server (pid {started[0]})"
        assert gone(started[0])
        assert ": SERVING" in lines[1]
    finally:
        for pid in started:
            stop_process(pid)
        unrelated.kill()
        unrelated.wait()


def test_a_ctrl_c_while_waiting_for_the_server_stops_it(
    demo_home: Path, store: GraphStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interrupt lands in the wait for the server's first answer, as a Ctrl-C does
    # (the server runs in a session of its own, so the terminal's SIGINT misses it).
    def interrupted(*args: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_pipeline, "_log_since", interrupted)
    ctx = _ctx(store, 0)
    pid_file = demo_home / "demo-tiny" / "serve" / "server.pid"
    try:
        with pytest.raises(KeyboardInterrupt):
            serve_stage(ctx)
        assert gone(int(pid_file.read_text()))
        assert _store_is_closed(ctx)
    finally:
        if pid_file.is_file():
            stop_process(int(pid_file.read_text()))


@pytest.fixture
def paging_store(own_store: tuple[StoreConfig, GraphStore]) -> Iterator[GraphStore]:
    """A store where an earlier transcoder set of the demo's model left a full page of
    graphs whose ids sort before this run's."""
    _, graph_store = own_store
    for i in range(100):
        graph = builders.layered_graph(
            f"0old-{i:03d}", model_id="demo-model", task="greater_than", prompt=f"old {i}",
            n_layers=1, width=1,
        )  # fmt: skip
        graph.metadata.set_id = "older-set"
        graph_store.write_graph(graph)
    for i in range(2):
        graph = builders.layered_graph(
            f"this-{i}", model_id="demo-model", task="greater_than", prompt=f"this {i}"
        )
        graph.metadata.set_id = "this-set"
        graph_store.write_graph(graph)
    yield graph_store


def test_queries_find_this_runs_graphs_past_the_first_page(paging_store: GraphStore) -> None:
    ctx = DemoContext(device="cpu", tiny=True, progress=False)
    ctx.results.update(store=paging_store, model_id="demo-model", set_id="this-set")
    lines = queries_stage(ctx)
    assert lines[0] == "2 greater-than graphs stored for this set; the first three:"
    assert "this-0" in lines[1] and "this-1" in lines[2]
