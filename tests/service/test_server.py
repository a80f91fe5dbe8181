"""Server-wide behaviour on a live server: auth, health, reflection, robustness, TLS."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ingest.errors import ResourceExhaustedError, UnauthenticatedError, UnavailableError
from ingest.store.base import GraphStore
from ingest.store.bolt import BoltGraphStore
from ingest.store.config import StoreConfig
from service import convert
from service._generated.circuits.v1 import (
    feature_service_pb2,
    feature_service_pb2_grpc,
    graph_service_pb2,
    graph_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
)
from service.client import CircuitsClient, RetryPolicy
from service.config import ServerConfig
from service.errors import RETRIED_KEY
from service.pagination import MAX_CURSOR_CHARS, encode_page_token
from service.server import SERVICE_NAMES, RunningServer, serve_in_background
from tests.service import builders
from tests.service.conftest import TOKEN

pytestmark = pytest.mark.integration


@pytest.fixture
def channel(target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target) as ch:
        yield ch


def test_calls_without_or_with_a_wrong_token_are_unauthenticated(
    target: str, channel: grpc.Channel
) -> None:
    stub = graph_service_pb2_grpc.GraphServiceStub(channel)
    request = graph_service_pb2.ListGraphsRequest()
    for metadata in ((), (("authorization", "Bearer " + "x" * 32),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as info:
            stub.ListGraphs(request, metadata=metadata, timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in (info.value.details() or "")
    stream = stub.StreamGraphEdges(graph_service_pb2.StreamGraphEdgesRequest(graph_id="g-alpha"))
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with CircuitsClient(target, token="y" * 32) as bad, pytest.raises(UnauthenticatedError):
        bad.list_graphs()


def test_health_is_serving_without_credentials_while_the_store_answers(
    channel: grpc.Channel,
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", *SERVICE_NAMES):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
    assert set(listed) == {"", *SERVICE_NAMES}
    assert {r.status for r in listed.values()} == {health_pb2.HealthCheckResponse.SERVING}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_store_means_not_serving_and_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A real Bolt store object whose server is not there: connections are refused.
    # The driver's retries give up after half a second, well inside the call's deadline.
    config = StoreConfig(uri=f"bolt://127.0.0.1:{_free_port()}", password="x", retry_time_s=0.5)
    store = BoltGraphStore(config)
    server_config = ServerConfig(port=0, health_interval_s=0.5, default_timeout_s=5.0)
    caplog.set_level(logging.INFO, logger="service.errors")
    try:
        with serve_in_background(server_config, store) as running:
            target = f"127.0.0.1:{running.port}"
            retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
            with CircuitsClient(target, retry=retry, timeout_s=20) as client:
                assert client.health() == "NOT_SERVING"
                assert client.health(SERVICE_NAMES[0]) == "NOT_SERVING"
                asked = time.monotonic()
                with pytest.raises(UnavailableError, match="unreachable") as info:
                    client.get_graph("g-alpha")
                # One attempt, ending when the driver's retries give up (not the 15 s the
                # driver would retry for by default): the answer says the server retried
                # for 0.5 s already, so the client does not call again.
                assert time.monotonic() - asked < 10
                assert "\n" not in str(info.value)
            answers = [r for r in caplog.records if "GetGraph -> UNAVAILABLE" in r.getMessage()]
            assert len(answers) == 1
            stub = graph_service_pb2_grpc.GraphServiceStub(grpc.insecure_channel(target))
            with pytest.raises(grpc.RpcError) as raw:
                stub.GetGraph(graph_service_pb2.GetGraphRequest(graph_id="g-alpha"), timeout=20)
            assert (RETRIED_KEY, "0.5") in tuple(raw.value.trailing_metadata())
    finally:
        store.close()


def test_client_retries_then_reports_an_unreachable_server() -> None:
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    client = CircuitsClient(f"127.0.0.1:{_free_port()}", retry=retry, timeout_s=5)
    with client, pytest.raises(UnavailableError):
        client.list_graphs()


def test_reflection_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert set(SERVICE_NAMES) <= services
    assert "grpc.health.v1.Health" in services
    pool = descriptor_pool.DescriptorPool(database)
    method = pool.FindServiceByName("circuits.v1.GraphService").FindMethodByName("GetSubgraph")
    assert method.input_type.full_name == "circuits.v1.GetSubgraphRequest"
    assert method.input_type.fields_by_name["top_k"].number == 4


def _all_methods() -> list[tuple[str, bool]]:
    from service._generated.circuits.v1 import (
        analysis_service_pb2,
        feature_service_pb2,
        job_service_pb2,
    )

    methods = []
    files = (graph_service_pb2, feature_service_pb2, analysis_service_pb2, job_service_pb2)
    for file in (f.DESCRIPTOR for f in files):
        for service in file.services_by_name.values():
            for m in service.methods:
                methods.append((f"/{service.full_name}/{m.name}", m.server_streaming))
    methods.append(("/grpc.health.v1.Health/Check", False))
    return methods


def _payloads(rng: random.Random, n: int) -> list[bytes]:
    valid = [
        graph_service_pb2.GetSubgraphRequest(graph_id="g-alpha", node_id="0_0_1", depth=2, top_k=3),
        graph_service_pb2.FindPathsRequest(
            graph_id="g-alpha", source_node_id="E_100_0", target_node_id="3_500_1"
        ),
        graph_service_pb2.ListGraphsRequest(task="toy", page_size=2, page_token="abc"),
    ]
    out = [b"", b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x02\xc3\x28"]  # bad varint, bad utf-8
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            out.append(rng.randbytes(rng.randint(1, 64)))
        else:
            data = rng.choice(valid).SerializeToString()
            cut = data[: rng.randint(0, len(data))]
            if kind > 0.7 and cut:
                cut = bytes(b ^ rng.choice((0, 0, 1, 0x80)) for b in cut)
            out.append(cut)
    return out


@pytest.mark.parametrize(("method", "streaming"), _all_methods())
def test_fuzzed_requests_never_get_internal(
    channel: grpc.Channel, method: str, streaming: bool
) -> None:
    rng = random.Random(zlib.crc32(method.encode()))  # hash() of a str varies per process
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    seen: set[grpc.StatusCode] = set()
    for payload in _payloads(rng, 25):
        if streaming:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            responses = call(payload, metadata=metadata, timeout=20)
            try:
                for _ in responses:
                    pass
                seen.add(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                seen.add(exc.code())
        else:
            unary = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            try:
                unary(payload, metadata=metadata, timeout=20)
                seen.add(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                seen.add(exc.code())
    assert grpc.StatusCode.INTERNAL not in seen and grpc.StatusCode.UNKNOWN not in seen, seen
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def _paginated_calls(channel: grpc.Channel) -> dict[str, tuple[object, object, dict[str, object]]]:
    """Per paginated RPC: (its stub method, a request, the filters the servicer digests)."""
    graphs = graph_service_pb2_grpc.GraphServiceStub(channel)
    features = feature_service_pb2_grpc.FeatureServiceStub(channel)
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    listing = {"model_id": None, "task": "toy", "prompt_contains": None}
    key = {"set_id": builders.SET_ID, "layer": 1, "index": 2}
    return {
        "ListGraphs": (
            graphs.ListGraphs,
            graph_service_pb2.ListGraphsRequest(task="toy"),
            {**listing, "newest_first": False},
        ),
        "ListGraphs newest_first": (
            graphs.ListGraphs,
            graph_service_pb2.ListGraphsRequest(task="toy", newest_first=True),
            {**listing, "newest_first": True},
        ),
        "SearchFeatures": (
            features.SearchFeatures,
            feature_service_pb2.SearchFeaturesRequest(set_id=builders.SET_ID),
            {"set_id": builders.SET_ID, "layer": None, "label_contains": None, "token": None},
        ),
        "ListFeatureOccurrences": (
            features.ListFeatureOccurrences,
            feature_service_pb2.ListFeatureOccurrencesRequest(key=key),
            {"set_id": builders.SET_ID, "layer": 1, "index": 2},
        ),
        "ListJobs": (jobs.ListJobs, job_service_pb2.ListJobsRequest(), {"state": 0, "model": ""}),
    }


# Cursors of the right kind for each RPC: with them the forged tokens are accepted,
# so the digests below are right and only the cursors make the others invalid.
_GOOD_CURSORS = {
    "ListGraphs": "g-alpha",
    "ListGraphs newest_first": "0:g-alpha",
    "SearchFeatures": "0:0",
    "ListFeatureOccurrences": "g-alpha",
    "ListJobs": ["2026-01-01T00:00:00+00:00", "x"],
}


@pytest.mark.parametrize("rpc", list(_GOOD_CURSORS))
def test_page_tokens_with_forged_cursors_are_invalid_arguments(
    channel: grpc.Channel, rpc: str
) -> None:
    """A well-formed token with the right filter digest (anyone can compute it) but a
    cursor the server never hands out: INVALID_ARGUMENT, never INTERNAL or a page."""
    call, request, filters = _paginated_calls(channel)[rpc]
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    def ask(cursor: object) -> None:
        forged = type(request)()
        forged.CopyFrom(request)  # type: ignore[attr-defined]
        forged.page_token = encode_page_token(cursor, filters)  # type: ignore[attr-defined]
        call(forged, metadata=metadata, timeout=20)  # type: ignore[operator]

    ask(_GOOD_CURSORS[rpc])
    for cursor in (5, 1.5, True, [1], {"a": 1}, "", "x" * (MAX_CURSOR_CHARS + 1)):
        with pytest.raises(grpc.RpcError) as info:
            ask(cursor)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (cursor, info.value)
        # the service's own advice (a store that rejects the cursor too says otherwise)
        assert "next_page_token of the previous response" in (info.value.details() or "")


def test_fuzzed_reflection_stream_never_gets_internal(channel: grpc.Channel) -> None:
    rng = random.Random(7)
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
    seen: set[grpc.StatusCode] = set()
    for payload in _payloads(rng, 20):
        try:
            for _ in call(iter([payload]), timeout=20):
                pass
            seen.add(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            seen.add(exc.code())
    assert grpc.StatusCode.INTERNAL not in seen and grpc.StatusCode.UNKNOWN not in seen, seen
    assert grpc.StatusCode.INVALID_ARGUMENT in seen  # the truncated messages


def test_store_is_still_consistent_after_fuzzing(store: GraphStore) -> None:
    assert store.get_graph_summary("g-alpha").n_edges > 0


def test_message_size_limit_and_streaming_alternative(store: GraphStore) -> None:
    graph = store.get_graph("g-beta")
    limit = 1024
    assert convert.graph_to_proto(graph).ByteSize() > limit
    config = ServerConfig(port=0, tokens=frozenset({TOKEN}), max_message_bytes=limit)
    with (
        serve_in_background(config, store) as running,
        CircuitsClient(f"127.0.0.1:{running.port}", token=TOKEN) as client,
    ):
        with pytest.raises(ResourceExhaustedError):
            client.get_graph("g-beta")
        streamed = client.stream_graph("g-beta", chunk_size=10)
        assert streamed.edge_list() == graph.edge_list()


def test_a_taken_port_is_unavailable_with_advice(store: GraphStore) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = ServerConfig(port=taken.getsockname()[1])
        with (
            pytest.raises(UnavailableError, match="choose another port"),
            serve_in_background(config, store),
        ):
            pass


def test_a_port_another_server_serves_on_is_unavailable(
    store: GraphStore, server: RunningServer
) -> None:
    # gRPC servers set SO_REUSEPORT by default, so two of them could share a port
    config = ServerConfig(port=server.port)
    with (
        pytest.raises(UnavailableError, match="choose another port"),
        serve_in_background(config, store),
    ):
        pass


def test_health_turns_not_serving_when_the_store_goes_away(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import os
    import signal

    from ingest.store import open_store
    from ingest.store.embedded import PID_FILE, embedded_server

    data_dir = tmp_path_factory.mktemp("vanishing-db")
    with embedded_server(data_dir, heap="256m") as store_config, open_store(store_config) as db:
        config = ServerConfig(port=0, health_interval_s=1.0)
        with (
            serve_in_background(config, db) as running,
            CircuitsClient(f"127.0.0.1:{running.port}", timeout_s=5) as client,
        ):
            deadline = time.monotonic() + 30  # a loaded machine may miss the first probe
            while client.health() != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.health() == "SERVING"
            # The graph server crashes.
            os.kill(int((data_dir / PID_FILE).read_text()), signal.SIGKILL)
            deadline = time.monotonic() + 30
            while client.health() == "SERVING" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.health() == "NOT_SERVING"
            assert client.health(SERVICE_NAMES[0]) == "NOT_SERVING"


def test_call_deadlines_become_store_timeouts() -> None:
    """BlockingRunner hands the callee the call's remaining deadline, capped by the default."""
    import asyncio
    import struct
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from grpc import aio

    from service.runner import BlockingRunner

    runner = BlockingRunner(ThreadPoolExecutor(1), default_timeout_s=10.0)

    def seen_timeout(*, timeout: float) -> float:
        return timeout

    async def handle(request: bytes, context: aio.ServicerContext) -> bytes:
        return struct.pack("d", await runner.call(context, seen_timeout))

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[aio.Server, int]:
        server = aio.server()
        handler = grpc.unary_unary_rpc_method_handler(handle)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("t.T", {"M": handler})]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/t.T/M")
            (with_deadline,) = struct.unpack("d", call(b"", timeout=3.0))
            (capped,) = struct.unpack("d", call(b"", timeout=60.0))
            (without,) = struct.unpack("d", call(b""))
        # The server measures the remaining time on its own clock: allow it 0.1 s of skew
        # (and a loaded machine most of the 3 s to deliver the call).
        assert 0.0 < with_deadline <= 3.1
        assert capped == without == 10.0
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_shutdown_is_bounded_when_grpc_stop_never_returns(
    store: GraphStore, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc.aio's stop has been seen to hang, ignoring its cancellation too; the server's
    shutdown leaves it behind after the grace period and its slack, and the rest runs."""
    import asyncio

    from service import server as server_module

    release = threading.Event()

    with serve_in_background(ServerConfig(port=0), store) as running:
        real_stop = running.server.stop

        async def stuck_stop(grace: float | None) -> None:
            await real_stop(grace)
            while not release.is_set():  # what asyncio.wait_for would wait for forever
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.05)

        running.server.stop = stuck_stop  # type: ignore[method-assign]
        stopping = time.monotonic()
    elapsed = time.monotonic() - stopping
    release.set()
    # every step's bound (no hang: asyncio.wait_for waits on such a stop for ever)
    bound = 0.5 + 3 * server_module.STEP_WAIT_S + server_module.JOB_STOP_WAIT_S
    assert elapsed < bound, (elapsed, caplog.text)
    assert "stopping the gRPC server did not finish" in caplog.text, caplog.text
    # the steps after it ran: the threads were joined and the journal let go
    assert "ingest journal stays locked" not in caplog.text, caplog.text


def test_shutdown_says_when_it_left_a_busy_thread_behind(
    store: GraphStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that could not join its threads says so, so that ``circuitscope serve``
    exits without the interpreter waiting for them; a stop that could says that too."""
    import asyncio

    from service import server as server_module

    monkeypatch.setattr(server_module, "JOB_STOP_WAIT_S", 0.5)
    release = threading.Event()

    async def stop_one(busy: bool) -> bool:
        config = ServerConfig(port=0, grace_s=0.1, artifacts_dir=tmp_path / str(busy))
        running = await server_module.start_server(config, store)
        if busy:  # a store call that does not return in time
            running.executors[0].submit(release.wait, 60)
        return await running.stop()

    stopping = time.monotonic()
    try:
        assert asyncio.run(stop_one(busy=True)) is False
        # not held until the busy thread ends (60 s): the join runs off the loop's
        # default executor, which asyncio.run waits for
        assert time.monotonic() - stopping < 30
    finally:
        release.set()
    assert asyncio.run(stop_one(busy=False)) is True
