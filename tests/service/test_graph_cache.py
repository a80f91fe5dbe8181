"""The graph cache answers exactly as the store does, and stays current.

Equivalence: :class:`GraphIndex` against the store's own ``subgraph`` and
``strongest_paths`` on the real embedded store, over many (node, depth, top_k,
direction) combinations, including graphs whose weights tie (the id tie-break
decides), cyclic graphs and self-loops; then the same through a real gRPC server.
Behaviour: single-flight loads, LRU budget, revisions (rewrites and deletes by
"another process", i.e. straight through the store), graphs being written never
cached. Time is a clock the test moves, never a sleep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ingest.errors import NotFoundError, ResourceExhaustedError
from ingest.graph import AttributionGraph
from ingest.store.base import Direction, GraphStatus, GraphStore, GraphSummary, PathScore
from service import convert
from service._generated.circuits.v1 import graph_service_pb2 as pb
from service.client import CircuitsClient
from service.config import ServerConfig
from service.graph_cache import GraphCache
from service.graph_index import BYTES_PER_UNIT, GraphIndex
from service.server import serve_in_background
from tests.service import builders
from tests.service.conftest import TOKEN

pytestmark = pytest.mark.integration

# graph id -> random_graph kwargs; task "cache" keeps them out of other tests' listings.
RANDOM_GRAPHS: dict[str, dict[str, object]] = {
    "cache-ties": {"n_nodes": 50, "n_edges": 400, "seed": 1, "weight_levels": 3},
    "cache-cyclic": {
        "n_nodes": 40,
        "n_edges": 300,
        "seed": 2,
        "acyclic": False,
        "self_loops": 3,
        "weight_levels": 4,
    },
    "cache-dense": {"n_nodes": 60, "n_edges": 700, "seed": 3},
    "cache-paths": {"n_nodes": 40, "n_edges": 110, "seed": 4},
}
DIRECTIONS: tuple[Direction, ...] = ("out", "in", "both")


@pytest.fixture(scope="module")
def graphs(store: GraphStore) -> Iterator[dict[str, AttributionGraph]]:
    made = {
        graph_id: builders.random_graph(graph_id, **kwargs)  # type: ignore[arg-type]
        for graph_id, kwargs in RANDOM_GRAPHS.items()
    }
    for graph in made.values():
        store.write_graph(graph, replace=True)
    yield made
    for graph_id in made:
        store.delete_graph(graph_id)


def _index(store: GraphStore, graph_id: str) -> GraphIndex:
    revision = store.graph_revisions([graph_id])[graph_id]
    return GraphIndex(store.get_graph(graph_id), revision.write_id)


def _edges(graph: AttributionGraph) -> dict[tuple[str, str], float]:
    found = {(s, t): w for s, t, w in graph.edge_list()}
    assert len(found) == graph.n_edges, "an edge appears twice"
    return found


def _combos(graph: AttributionGraph, n: int, seed: int) -> list[tuple[str, int, int, Direction]]:
    """(node, depth, top_k, direction): the best-connected nodes and random ones."""
    rng = random.Random(seed)
    degree = np.bincount(np.concatenate([graph.sources, graph.targets]), minlength=graph.n_nodes)
    hubs = [graph.nodes[i].node_id for i in np.argsort(-degree)[:3].tolist()]
    ids = [n.node_id for n in graph.nodes]
    return [
        (
            rng.choice(hubs + ids),
            rng.choice((1, 2, 3)),
            rng.choice((1, 2, 3, 5, 50)),
            rng.choice(DIRECTIONS),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("graph_id", [*RANDOM_GRAPHS, "g-alpha", "g-beta"])
def test_neighbourhoods_equal_the_stores(
    store: GraphStore, graphs: dict[str, AttributionGraph], graph_id: str
) -> None:
    index = _index(store, graph_id)
    assert index.simple
    whole = store.get_graph(graph_id)
    for node_id, depth, top_k, direction in _combos(whole, 40, seed=len(graph_id)):
        expected = store.subgraph(graph_id, node_id, depth=depth, top_k=top_k, direction=direction)
        found = index.subgraph_graph(
            index.subgraph(node_id, depth=depth, top_k=top_k, direction=direction)
        )
        case = f"{graph_id} {node_id} depth {depth} top_k {top_k} {direction}"
        assert found.nodes == expected.nodes, case
        assert _edges(found) == _edges(expected), case
        assert found.metadata == expected.metadata
        raw = index.subgraph_bytes(
            index.subgraph(node_id, depth=depth, top_k=top_k, direction=direction)
        )
        assert raw == _serialized(found), case
        assert _answer(pb.GetSubgraphResponse.FromString(raw)) == _edges(expected), case


def _serialized(graph: AttributionGraph) -> bytes:
    """What the store path of GetSubgraph sends for ``graph`` (same nodes, same edges)."""
    return pb.GetSubgraphResponse(
        nodes=[convert.node_to_proto(n) for n in graph.nodes], edges=convert.edges_to_proto(graph)
    ).SerializeToString()


def test_pre_serialized_answers_are_the_messages_bytes() -> None:
    """Byte for byte what a built message serializes to, also for zero weights (a
    default, left out), -0.0, and ids long enough for multi-byte length prefixes."""
    base = builders.random_graph("x", n_nodes=12, n_edges=40, seed=17)
    long_ids = [
        dataclasses.replace(n, node_id=n.node_id + "-" + "x" * (40 * i), label="l" * i)
        for i, n in enumerate(base.nodes)
    ]
    weights = base.weights.copy()
    weights[:3] = 0.0
    weights[3:5] = -0.0
    graph = AttributionGraph(base.metadata, long_ids, base.sources, base.targets, weights)
    index = GraphIndex(graph, "w")
    for node in long_ids:
        for direction in DIRECTIONS:
            found = index.subgraph(node.node_id, depth=3, top_k=50, direction=direction)
            raw = index.subgraph_bytes(found)
            assert raw == _serialized(index.subgraph_graph(found)), (node.node_id, direction)
    assert len(index.node_ids[-1]) > 128, "an id must need a two-byte length"
    # whole-graph answers: GetGraph's response and StreamGraphEdges' chunks
    created = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)
    stored = GraphSummary(
        graph.metadata, GraphStatus.COMPLETE, graph.n_nodes, graph.n_edges, created
    )
    summary = convert.stored_summary_to_proto(stored)
    expected = pb.GetGraphResponse(graph=convert.graph_to_proto(graph, stored))
    raw = index.graph_response_bytes(summary.SerializeToString())
    assert raw == expected.SerializeToString()
    for chunk in (1, 7, 40, 1000):
        chunks = list(index.stream_chunks(summary.SerializeToString(), chunk))
        messages = [
            pb.StreamGraphEdgesResponse(
                summary=summary if start == 0 else None,
                nodes=[convert.node_to_proto(n) for n in graph.nodes] if start == 0 else [],
                edges=convert.edges_to_proto(graph, start, start + chunk),
            )
            for start in range(0, max(graph.n_edges, 1), chunk)
        ]
        assert chunks == [m.SerializeToString() for m in messages], chunk


def test_ties_are_broken_by_node_id(store: GraphStore, graphs: dict[str, AttributionGraph]) -> None:
    """On the tied graph, top-1 picks the smallest other-end id among equal |weight|s."""
    index = _index(store, "cache-ties")
    graph = graphs["cache-ties"]
    node = graph.nodes[int(np.bincount(graph.sources).argmax())].node_id
    out = [(t, w) for t, w in graph.out_edges(node)]
    strongest = max(abs(w) for _, w in out)
    want = min(graph.nodes[t].node_id for t, w in out if abs(w) == strongest)
    assert sum(abs(w) == strongest for _, w in out) > 1, "the test graph must tie here"
    found = index.subgraph_graph(index.subgraph(node, depth=1, top_k=1, direction="out"))
    assert list(_edges(found)) == [(node, want)]


def _path_tuples(paths: list) -> list[tuple[list[str], list[float], float]]:  # type: ignore[type-arg]
    return [(p.node_ids, p.weights, p.score) for p in paths]


def test_strongest_paths_equal_the_stores(
    store: GraphStore, graphs: dict[str, AttributionGraph]
) -> None:
    index = _index(store, "cache-paths")
    assert index.acyclic
    graph = graphs["cache-paths"]
    has_out = sorted({graph.nodes[s].node_id for s in graph.sources.tolist()})
    has_in = sorted({graph.nodes[t].node_id for t in graph.targets.tolist()})
    rng = random.Random(5)
    nonempty = 0
    for _ in range(30):
        source, target = rng.choice(has_out), rng.choice(has_in)
        top_k, max_length = rng.choice((1, 3, 10)), rng.choice((2, 4, 6))
        score: PathScore = rng.choice(("product", "sum"))
        expected = store.strongest_paths(
            "cache-paths", source, target, top_k=top_k, max_length=max_length, score=score
        )
        found = index.strongest_paths(
            source, target, top_k=top_k, max_length=max_length, score=score
        )
        assert _path_tuples(found) == _path_tuples(expected), (source, target, top_k, score)
        nonempty += bool(expected)
    assert nonempty >= 5, "too few connected pairs to compare"


def test_graphs_the_index_cannot_answer_exactly_are_flagged(store: GraphStore) -> None:
    duplicated = builders.random_graph("x", n_nodes=10, n_edges=20, seed=6, duplicate_edges=1)
    assert not GraphIndex(duplicated, "w").simple
    cyclic = builders.random_graph("x", n_nodes=10, n_edges=20, seed=6, self_loops=1)
    assert not GraphIndex(cyclic, "w").acyclic
    assert _index(store, "cache-cyclic").acyclic is False


def test_unknown_node_is_not_found(store: GraphStore, graphs: dict[str, AttributionGraph]) -> None:
    index = _index(store, "cache-dense")
    with pytest.raises(NotFoundError, match="has no node"):
        index.subgraph("no-such-node", depth=1, top_k=3, direction="both")
    with pytest.raises(NotFoundError, match="has no node 'no-such-node'"):
        index.strongest_paths("no-such-node", "x", top_k=1, max_length=2, score="sum")


# ---------------------------------------------------------------------------- over gRPC


def test_served_neighbourhoods_and_paths_equal_the_stores(
    store: GraphStore, graphs: dict[str, AttributionGraph], client: CircuitsClient
) -> None:
    for graph_id in ("cache-ties", "cache-cyclic", "g-alpha"):
        whole = store.get_graph(graph_id)
        for node_id, depth, top_k, direction in _combos(whole, 12, seed=7):
            served = client.get_subgraph(
                graph_id, node_id, depth=depth, top_k=top_k, direction=direction
            )
            expected = store.subgraph(
                graph_id, node_id, depth=depth, top_k=top_k, direction=direction
            )
            assert served.nodes == expected.nodes
            assert _edges(served) == _edges(expected)
    graph = graphs["cache-paths"]
    source = graph.nodes[int(graph.sources[0])].node_id
    for target in {graph.nodes[t].node_id for t in graph.targets[:10].tolist()}:
        assert _path_tuples(client.find_paths("cache-paths", source, target, top_k=5)) == (
            _path_tuples(store.strongest_paths("cache-paths", source, target, top_k=5))
        )


def test_whole_graphs_are_served_from_memory_as_the_store_has_them(
    store: GraphStore, graphs: dict[str, AttributionGraph], client: CircuitsClient
) -> None:
    for graph_id in ("cache-ties", "cache-cyclic", "g-alpha"):
        expected = store.get_graph(graph_id)
        client.get_graph(graph_id)  # loads it into the cache if it was not there
        for answer in (client.get_graph(graph_id), client.stream_graph(graph_id, chunk_size=5)):
            assert answer.metadata == expected.metadata
            assert answer.nodes == expected.nodes
            assert answer.edge_list() == expected.edge_list()  # same order, same float32


def test_whole_graph_comes_from_memory_within_the_staleness_bound(store: GraphStore) -> None:
    """A rewrite by another writer is not seen before ``revalidate_s`` (an hour here):
    the answers came from the cached copy, not from the store."""
    first = builders.random_graph("cache-whole", n_nodes=20, n_edges=60, seed=11)
    second = builders.random_graph("cache-whole", n_nodes=20, n_edges=60, seed=12)
    store.write_graph(first, replace=True)
    config = ServerConfig(port=0, tokens=frozenset({TOKEN}), graph_cache_revalidate_s=3600)
    try:
        with (
            serve_in_background(config, store) as running,
            CircuitsClient(f"127.0.0.1:{running.port}", token=TOKEN) as c,
        ):
            assert c.get_graph("cache-whole").edge_list() == first.edge_list()
            store.write_graph(second, replace=True)
            assert c.get_graph("cache-whole").edge_list() == first.edge_list()
            assert c.stream_graph("cache-whole").edge_list() == first.edge_list()
            assert running.graph_cache is not None and running.graph_cache.stats().hits >= 2
    finally:
        store.delete_graph("cache-whole")


def test_graph_with_duplicate_edges_is_answered_by_the_store(
    store: GraphStore, client: CircuitsClient
) -> None:
    graph = builders.random_graph("cache-dup", n_nodes=12, n_edges=30, seed=8, duplicate_edges=2)
    store.write_graph(graph, replace=True)
    try:
        node = graph.nodes[int(graph.sources[0])].node_id
        served = client.get_subgraph("cache-dup", node, depth=2, top_k=3, direction="out")
        expected = store.subgraph("cache-dup", node, depth=2, top_k=3, direction="out")
        assert served.nodes == expected.nodes
        assert served.edge_list() == expected.edge_list()
    finally:
        store.delete_graph("cache-dup")


def test_server_without_cache_answers_from_the_store(
    store: GraphStore, graphs: dict[str, AttributionGraph]
) -> None:
    config = ServerConfig(port=0, tokens=frozenset({TOKEN}), graph_cache_edges=0)
    with serve_in_background(config, store) as running:
        assert running.graph_cache is None
        with CircuitsClient(f"127.0.0.1:{running.port}", token=TOKEN) as c:
            node = graphs["cache-dense"].nodes[0].node_id
            served = c.get_subgraph("cache-dense", node, depth=2, top_k=4)
    expected = store.subgraph("cache-dense", node, depth=2, top_k=4)
    assert _edges(served) == _edges(expected)


def test_strict_server_serves_a_rewrite_by_another_writer_at_once(store: GraphStore) -> None:
    """With revalidation 0 a rewrite through the store (as the ingest worker would do
    from its own process) shows on the very next call."""
    first = builders.random_graph("cache-rewrite", n_nodes=20, n_edges=60, seed=9)
    second = builders.random_graph("cache-rewrite", n_nodes=20, n_edges=60, seed=10)
    node = first.nodes[0].node_id
    store.write_graph(first, replace=True)
    config = ServerConfig(port=0, tokens=frozenset({TOKEN}), graph_cache_revalidate_s=0)
    try:
        with (
            serve_in_background(config, store) as running,
            CircuitsClient(f"127.0.0.1:{running.port}", token=TOKEN) as c,
        ):
            before = c.get_subgraph("cache-rewrite", node, depth=2, top_k=5)
            assert "cache-rewrite" in running.graph_cache  # type: ignore[operator]
            store.write_graph(second, replace=True)
            after = c.get_subgraph("cache-rewrite", second.nodes[0].node_id, depth=2, top_k=5)
            expected = store.subgraph("cache-rewrite", second.nodes[0].node_id, depth=2, top_k=5)
            assert _edges(after) == _edges(expected) != _edges(before)
            assert c.get_graph("cache-rewrite").edge_list() == second.edge_list()
            store.delete_graph("cache-rewrite")
            with pytest.raises(NotFoundError):
                c.get_subgraph("cache-rewrite", node)
            assert "cache-rewrite" not in running.graph_cache  # type: ignore[operator]
    finally:
        store.delete_graph("cache-rewrite")


# ---------------------------------------------------------------------------- the cache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _cache(store: GraphStore, pool: ThreadPoolExecutor, **kwargs: object) -> GraphCache:
    options: dict[str, object] = {"max_cost": 1_000_000, "revalidate_s": 5.0, **kwargs}
    return GraphCache(store, pool, **options)  # type: ignore[arg-type]


def test_concurrent_misses_load_once(
    store: GraphStore, graphs: dict[str, AttributionGraph], pool: ThreadPoolExecutor
) -> None:
    cache = _cache(store, pool)

    async def main() -> list[GraphIndex | None]:
        return await asyncio.gather(*(cache.get("cache-dense", 10.0) for _ in range(20)))

    found = asyncio.run(main())
    assert found[0] is not None and all(f is found[0] for f in found)
    stats = cache.stats()
    assert stats.loads == 1 and stats.misses == 20
    assert cache.cost == graphs["cache-dense"].n_edges + graphs["cache-dense"].n_nodes
    assert asyncio.run(cache.get("cache-dense", 10.0)) is found[0]
    assert cache.stats().hits == 1


class _SlowStore:
    """The real store, each read taking ``delay_s`` seconds and refused, as the store
    refuses a transaction past its time limit, when the caller gave less time."""

    def __init__(self, store: GraphStore, delay_s: float) -> None:
        self._store = store
        self.delay_s = delay_s

    def _wait(self, timeout: float | None, what: str) -> None:
        time.sleep(self.delay_s)
        if timeout is not None and timeout < self.delay_s:
            raise ResourceExhaustedError(f"{what} ran past its time limit of {timeout} s")

    def graph_revisions(self, graph_ids: list[str], timeout: float | None = None) -> object:
        self._wait(timeout, "graph_revisions")
        return self._store.graph_revisions(graph_ids, timeout=timeout)

    def get_graph(self, graph_id: str, timeout: float | None = None) -> AttributionGraph:
        self._wait(timeout, "get_graph")
        return self._store.get_graph(graph_id, timeout=timeout)


def test_a_shared_load_runs_under_the_caches_time_limit_not_the_first_callers(
    store: GraphStore, graphs: dict[str, AttributionGraph], pool: ThreadPoolExecutor
) -> None:
    slow = _SlowStore(store, delay_s=0.2)
    cache = GraphCache(slow, pool, max_cost=1_000_000, revalidate_s=5.0, flight_timeout_s=10.0)  # type: ignore[arg-type]

    async def main() -> list[GraphIndex | BaseException | None]:
        hasty = asyncio.ensure_future(cache.get("cache-dense", 0.1))  # starts the load
        await asyncio.sleep(0)
        patient = asyncio.ensure_future(cache.get("cache-dense", 10.0))  # joins it
        return list(await asyncio.gather(hasty, patient, return_exceptions=True))

    hasty, patient = asyncio.run(main())
    # the call that joined the load still gets the graph, and the cache keeps it
    assert isinstance(patient, GraphIndex), patient
    assert patient.n_edges == graphs["cache-dense"].n_edges
    assert "cache-dense" in cache and cache.stats().loads == 1
    # the caller with the short deadline gives up alone, saying why
    assert isinstance(hasty, ResourceExhaustedError), hasty
    assert "longer deadline" in str(hasty)


def test_budget_evicts_least_recently_used(
    store: GraphStore, graphs: dict[str, AttributionGraph], pool: ThreadPoolExecutor
) -> None:
    dense, ties = graphs["cache-dense"], graphs["cache-ties"]
    room = dense.n_edges + dense.n_nodes + ties.n_edges + ties.n_nodes
    cache = _cache(store, pool, max_cost=room)

    async def main() -> None:
        await cache.get("cache-dense", 10.0)
        await cache.get("cache-ties", 10.0)
        await cache.get("cache-dense", 10.0)  # now the most recent
        await cache.get("cache-cyclic", 10.0)

    asyncio.run(main())
    assert "cache-ties" not in cache and "cache-dense" in cache and "cache-cyclic" in cache
    assert cache.cost <= room and cache.stats().evicted == 1


def test_serialized_whole_graph_counts_in_the_budget(
    store: GraphStore, graphs: dict[str, AttributionGraph], pool: ThreadPoolExecutor
) -> None:
    """Making a graph's Graph fields (GetGraph, StreamGraphEdges) raises its cost, and
    the least recently used other graph leaves when the budget is exceeded."""
    dense, ties = graphs["cache-dense"], graphs["cache-ties"]
    room = dense.n_edges + dense.n_nodes + ties.n_edges + ties.n_nodes
    cache = _cache(store, pool, max_cost=room)

    async def load() -> tuple[GraphIndex, GraphIndex]:
        first = await cache.get("cache-ties", 10.0)
        second = await cache.get("cache-dense", 10.0)
        assert first is not None and second is not None
        return first, second

    ties_index, dense_index = asyncio.run(load())
    assert cache.cost == room
    nodes, edges, ends = dense_index.whole_fields()
    extra = -(-(len(nodes) + len(edges) + ends.nbytes) // BYTES_PER_UNIT)
    assert extra > 0 and dense_index.cost == dense.n_edges + dense.n_nodes + extra
    cache.recount(dense_index)
    assert "cache-ties" not in cache and "cache-dense" in cache
    assert cache.cost == dense_index.cost and cache.stats().evicted == 1
    cache.recount(dense_index)  # counted once
    cache.recount(ties_index)  # no longer an entry: nothing happens
    assert cache.cost == dense_index.cost


def test_graph_outgrowing_the_budget_with_its_serialized_fields_leaves(
    store: GraphStore, graphs: dict[str, AttributionGraph], pool: ThreadPoolExecutor
) -> None:
    """A graph that fits the budget only without its Graph fields leaves the cache once
    they are made, rather than keeping it over budget; other graphs stay."""
    dense, paths = graphs["cache-dense"], graphs["cache-paths"]
    room = dense.n_edges + dense.n_nodes + paths.n_edges + paths.n_nodes
    cache = _cache(store, pool, max_cost=room)

    async def load() -> GraphIndex:
        await cache.get("cache-paths", 10.0)
        index = await cache.get("cache-dense", 10.0)
        assert index is not None
        return index

    dense_index = asyncio.run(load())
    dense_index.whole_fields()
    assert dense_index.cost > room, "the test graph must outgrow the whole budget"
    cache.recount(dense_index)
    assert "cache-dense" not in cache and "cache-paths" in cache
    assert cache.cost == paths.n_edges + paths.n_nodes <= cache.max_cost
    assert cache.stats().too_big == 1 and cache.stats().evicted == 0


def test_graph_bigger_than_the_budget_is_left_to_the_store(
    store: GraphStore, graphs: dict[str, AttributionGraph], pool: ThreadPoolExecutor
) -> None:
    cache = _cache(store, pool, max_cost=100)
    assert asyncio.run(cache.get("cache-dense", 10.0)) is None
    assert "cache-dense" not in cache and cache.stats().too_big == 1
    with pytest.raises(NotFoundError, match="no complete graph"):
        asyncio.run(cache.get("no-such-graph", 10.0))


def test_rewrite_elsewhere_shows_within_the_staleness_bound(
    store: GraphStore, pool: ThreadPoolExecutor
) -> None:
    first = builders.random_graph("cache-stale", n_nodes=15, n_edges=40, seed=11)
    second = builders.random_graph("cache-stale", n_nodes=15, n_edges=41, seed=12)
    store.write_graph(first, replace=True)
    clock = Clock()
    cache = _cache(store, pool, revalidate_s=5.0, clock=clock)
    try:
        old = asyncio.run(cache.get("cache-stale", 10.0))
        assert old is not None and old.n_edges == 40
        store.write_graph(second, replace=True)
        clock.now += 4.0  # within the bound: the copy may still be served
        assert asyncio.run(cache.get("cache-stale", 10.0)) is old
        clock.now += 2.0  # past it: the call re-checks and reloads
        new = asyncio.run(cache.get("cache-stale", 10.0))
        assert new is not None and new.n_edges == 41 and new.write_id != old.write_id
        store.delete_graph("cache-stale")
        clock.now += 6.0
        with pytest.raises(NotFoundError):
            asyncio.run(cache.get("cache-stale", 10.0))
        assert "cache-stale" not in cache and cache.stats().dropped == 2
    finally:
        store.delete_graph("cache-stale")


def test_background_recheck_keeps_entries_fresh_and_drops_changed_ones(
    store: GraphStore, pool: ThreadPoolExecutor
) -> None:
    graph = builders.random_graph("cache-bg", n_nodes=15, n_edges=40, seed=13)
    store.write_graph(graph, replace=True)
    clock = Clock()
    cache = _cache(store, pool, revalidate_s=5.0, clock=clock)

    async def main() -> None:
        await cache.get("cache-bg", 10.0)
        await cache.get("cache-dense", 10.0)
        clock.now += 100.0
        store.delete_graph("cache-bg")
        await cache._check(["cache-bg", "cache-dense"], 10.0)  # one background round
        checks = cache.stats().checks
        assert await cache.get("cache-dense", 10.0) is not None
        assert cache.stats().checks == checks, "a fresh entry needs no check"

    try:
        asyncio.run(main())
        assert "cache-bg" not in cache and "cache-dense" in cache
    finally:
        store.delete_graph("cache-bg")


def test_graph_being_written_is_never_cached(store: GraphStore, pool: ThreadPoolExecutor) -> None:
    graph = builders.random_graph("cache-writing", n_nodes=20, n_edges=60, seed=14)
    store.write_graph(graph, replace=True)
    cache = _cache(store, pool, revalidate_s=0.0)
    writing, release = threading.Event(), threading.Event()

    def on_batch(phase: str, done: int, total: int) -> None:
        if phase == "edges" and done == 0:
            writing.set()
            release.wait(30)

    async def main() -> None:
        assert await cache.get("cache-writing", 10.0) is not None
        loop = asyncio.get_running_loop()
        rewrite = loop.run_in_executor(
            None,
            lambda: store.write_graph(graph, replace=True, batch_size=10, on_batch=on_batch),
        )
        try:
            await loop.run_in_executor(None, writing.wait, 30)
            with pytest.raises(NotFoundError):
                await cache.get("cache-writing", 10.0)
            assert "cache-writing" not in cache
        finally:
            release.set()
            await rewrite
        assert (await cache.get("cache-writing", 10.0)) is not None

    try:
        asyncio.run(main())
    finally:
        store.delete_graph("cache-writing")


def test_invalidate_drops_an_entry_at_once(
    store: GraphStore, graphs: dict[str, AttributionGraph], pool: ThreadPoolExecutor
) -> None:
    cache = _cache(store, pool)
    asyncio.run(cache.get("cache-ties", 10.0))
    cache.invalidate("cache-ties")
    assert "cache-ties" not in cache and cache.cost == 0
    assert asyncio.run(cache.get("cache-ties", 10.0)) is not None
    assert cache.stats().loads == 2


class _HeldLoad:
    """The real store, holding the ``held`` revision reads (counted from 1; a load's
    second read comes after the graph's) until their ``release`` is set: loads in
    flight while a write lands."""

    def __init__(self, store: GraphStore, held: tuple[int, ...]) -> None:
        self._store = store
        self._reads = 0
        self.reached = {n: threading.Event() for n in held}
        self.release = {n: threading.Event() for n in held}

    def graph_revisions(self, graph_ids: list[str], timeout: float | None = None) -> object:
        found = self._store.graph_revisions(graph_ids, timeout=timeout)
        self._reads += 1
        if self._reads in self.reached:
            self.reached[self._reads].set()
            self.release[self._reads].wait(30)
        return found

    def get_graph(self, graph_id: str, timeout: float | None = None) -> AttributionGraph:
        return self._store.get_graph(graph_id, timeout=timeout)


def test_a_call_after_invalidate_does_not_join_a_load_begun_before_it(
    store: GraphStore, pool: ThreadPoolExecutor
) -> None:
    old = builders.random_graph("cache-inflight", n_nodes=15, n_edges=40, seed=21)
    new = builders.random_graph("cache-inflight", n_nodes=15, n_edges=41, seed=22)
    store.write_graph(old, replace=True)
    held = _HeldLoad(store, held=(2, 4))  # both loads, each after reading the graph
    cache = GraphCache(held, pool, max_cost=1_000_000, revalidate_s=5.0)  # type: ignore[arg-type]

    async def main() -> list[GraphIndex | None]:
        loop = asyncio.get_running_loop()
        early = asyncio.ensure_future(cache.get("cache-inflight", 10.0))
        await loop.run_in_executor(None, held.reached[2].wait, 30)
        # the graph is rewritten through this process while the old one is loading
        await loop.run_in_executor(None, lambda: store.write_graph(new, replace=True))
        cache.invalidate("cache-inflight")
        late = asyncio.ensure_future(cache.get("cache-inflight", 10.0))
        await asyncio.sleep(0)  # the late call has started (or joined) its load
        held.release[2].set()
        # the old load ends while the late call's own one is in flight
        while not (late.done() or held.reached[4].is_set()):
            await asyncio.sleep(0.001)
        found = [await early]
        joining = asyncio.ensure_future(cache.get("cache-inflight", 10.0))
        await asyncio.sleep(0)
        held.release[4].set()
        found += [await late, await joining, await cache.get("cache-inflight", 10.0)]
        return found

    try:
        early, late, joining, after = asyncio.run(main())
        assert early is not None and early.n_edges == 40  # asked before the write
        assert late is not None and late.n_edges == 41, (
            "a call after invalidate() got the old graph"
        )
        assert joining is late, "a call during the new load must join it"
        assert after is late, "the load begun before invalidate() must not replace the new one"
        assert cache.stats().loads == 2
    finally:
        for release in held.release.values():
            release.set()
        store.delete_graph("cache-inflight")


def _answer(response: object) -> dict[tuple[str, str], float]:
    """The edges of a GetSubgraphResponse, given as a message or serialized."""
    if isinstance(response, bytes):
        response = pb.GetSubgraphResponse.FromString(response)
    return {(e.source_id, e.target_id): e.weight for e in response.edges}  # type: ignore[attr-defined]


def test_neighbourhood_answers_are_remembered_per_revision(
    store: GraphStore, graphs: dict[str, AttributionGraph], pool: ThreadPoolExecutor
) -> None:
    first = builders.random_graph("cache-memo", n_nodes=30, n_edges=120, seed=15)
    reweighted = np.random.default_rng(16).normal(size=first.n_edges).astype(np.float32)
    second = AttributionGraph(first.metadata, first.nodes, first.sources, first.targets, reweighted)
    node = first.nodes[int(first.sources[0])].node_id
    store.write_graph(first, replace=True)
    cache = _cache(store, pool, memo_cost=10_000, revalidate_s=0.0)

    async def ask(top_k: int) -> object:
        index = await cache.get("cache-memo", 10.0)
        assert index is not None
        return await cache.neighbourhood(index, node, depth=2, top_k=top_k, direction="both")

    try:
        a, b, other = (asyncio.run(ask(k)) for k in (3, 3, 4))
        assert a is b and other is not a and cache.stats().remembered == 1
        assert cache.stats().computed == 2
        assert _answer(a) == _edges(store.subgraph("cache-memo", node, depth=2, top_k=3))
        store.write_graph(second, replace=True)
        c = asyncio.run(ask(3))
        assert c is not a and cache.stats().remembered == 1
        assert _answer(c) == _edges(store.subgraph("cache-memo", node, depth=2, top_k=3))
        assert _answer(c) != _answer(a)
    finally:
        store.delete_graph("cache-memo")


def test_big_neighbourhoods_run_off_the_loop_with_the_same_answer(
    store: GraphStore, graphs: dict[str, AttributionGraph], pool: ThreadPoolExecutor
) -> None:
    inline, threaded = _cache(store, pool), _cache(store, pool, inline_edges=0)
    node = graphs["cache-dense"].nodes[0].node_id

    async def ask(cache: GraphCache) -> object:
        index = await cache.get("cache-dense", 10.0)
        assert index is not None
        return await cache.neighbourhood(index, node, depth=3, top_k=4, direction="in")

    assert asyncio.run(ask(inline)) == asyncio.run(ask(threaded))
