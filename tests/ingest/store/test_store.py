"""The graph store against real servers: schema, atomic writes, reads, catalog, pagination."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import networkx as nx
import numpy as np
import pytest

from ingest.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from ingest.graph import AttributionGraph, FeatureRecord, ModelRecord, TranscoderSetRecord
from ingest.store.base import GraphStore
from tests.ingest.store.helpers import catalog, crash_in_edges, make_graph, to_networkx

pytestmark = pytest.mark.integration

OUR_CONSTRAINTS = {
    "graph_id_unique",
    "gnode_key_unique",
    "feature_key_unique",
    "model_id_unique",
    "transcoder_set_id_unique",
}


def assert_same_graph(got: AttributionGraph, want: AttributionGraph) -> None:
    assert got.metadata == want.metadata
    assert got.nodes == want.nodes
    np.testing.assert_array_equal(got.sources, want.sources)
    np.testing.assert_array_equal(got.targets, want.targets)
    np.testing.assert_array_equal(got.weights, want.weights)
    assert got.weights.dtype == np.float32


def test_schema_setup_is_idempotent(store: GraphStore) -> None:
    def ours() -> list[str]:
        rows = store.query("SHOW CONSTRAINTS")
        return sorted(r["name"] for r in rows if r["name"] in OUR_CONSTRAINTS)

    store.ensure_schema()
    first = ours()
    store.ensure_schema()
    assert ours() == first == sorted(OUR_CONSTRAINTS)
    indexes = {r["name"] for r in store.query("SHOW INDEXES")}
    assert {"gnode_graph", "gnode_feature", "graph_model"} <= indexes


def test_write_read_round_trip(store: GraphStore, uid: str) -> None:
    graph = make_graph(f"{uid}-rt", seed=1)
    summary = store.write_graph(graph)
    assert (summary.n_nodes, summary.n_edges) == (graph.n_nodes, graph.n_edges)
    assert summary.status == "complete" and summary.created_at is not None
    assert_same_graph(store.get_graph(graph.graph_id), graph)
    assert store.get_graph_summary(graph.graph_id).metadata == graph.metadata


def test_rewriting_a_complete_graph_needs_replace(store: GraphStore, uid: str) -> None:
    graph = make_graph(f"{uid}-dup", seed=2)
    store.write_graph(graph)
    with pytest.raises(FailedPreconditionError, match="replace=True"):
        store.write_graph(graph)
    other = make_graph(f"{uid}-dup", seed=3)
    store.write_graph(other, replace=True)
    assert_same_graph(store.get_graph(graph.graph_id), other)


def test_interrupted_write_is_invisible_and_a_rerun_repairs_it(store: GraphStore, uid: str) -> None:
    graph = make_graph(f"{uid}-crash", seed=4)
    gid = graph.graph_id

    def crash(phase: str, done: int, total: int) -> None:
        if phase == "edges" and done >= 40:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        store.write_graph(graph, batch_size=20, on_batch=crash)
    # Half the graph is in the database, but nothing presents it as complete.
    stored = store.query("MATCH (n:GNode {graph_id: $g}) RETURN count(n) AS c", {"g": gid})
    assert stored[0]["c"] == graph.n_nodes
    with pytest.raises(NotFoundError):
        store.get_graph(gid)
    with pytest.raises(NotFoundError):
        store.get_graph_summary(gid)
    assert gid not in {s.graph_id for s in store.list_graphs(task="synthetic", limit=1000).items}
    status = store.query("MATCH (g:Graph {graph_id: $g}) RETURN g.status AS s", {"g": gid})
    assert status == [{"s": "writing"}]

    store.write_graph(graph)  # no replace needed: an incomplete graph is repaired
    assert_same_graph(store.get_graph(gid), graph)
    counts = store.query(
        "MATCH (n:GNode {graph_id: $g}) OPTIONAL MATCH (n)-[r:ATTR]->() "
        "RETURN count(DISTINCT n) AS n, count(r) AS e",
        {"g": gid},
    )
    assert counts == [{"n": graph.n_nodes, "e": graph.n_edges}]


def test_concurrent_reader_never_sees_half_a_graph(store: GraphStore, uid: str) -> None:
    graph = make_graph(f"{uid}-conc", seed=5, n_layers=4, n_pos=5, density=0.6)
    gid = graph.graph_id
    outcomes: list[str] = []
    writing = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(3):
                store.write_graph(
                    graph, replace=True, batch_size=25, on_batch=lambda *a: writing.set()
                )
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    writing.wait(60)
    while not done.is_set():
        try:
            got = store.get_graph(gid)
        except (NotFoundError, FailedPreconditionError):
            outcomes.append("absent")
            continue
        assert_same_graph(got, graph)
        outcomes.append("whole")
    thread.join(120)
    assert not thread.is_alive() and not errors, errors
    assert "absent" in outcomes  # the reader did run while batches were being written
    assert_same_graph(store.get_graph(gid), graph)


def _reference_subgraph(
    g: nx.DiGraph, centre: str, depth: int, k: int, direction: str
) -> tuple[set[str], set[tuple[str, str]]]:
    """Breadth-first expansion keeping per expanded node its k strongest edges."""
    visited, frontier = {centre}, [centre]
    edges: set[tuple[str, str]] = set()
    for _ in range(depth):
        nxt: list[str] = []
        for u in frontier:
            incident = []
            if direction in ("out", "both"):
                incident += [(u, v, d["weight"]) for v, d in g.succ[u].items()]
            if direction in ("in", "both"):
                incident += [(v, u, d["weight"]) for v, d in g.pred[u].items()]
            incident.sort(key=lambda e: (-abs(e[2]), e[0], e[1]))
            for s, t, _ in incident[:k]:
                edges.add((s, t))
                for end in (s, t):
                    if end not in visited:
                        visited.add(end)
                        nxt.append(end)
        frontier = nxt
    return visited, edges


def test_subgraph_matches_networkx(store: GraphStore, uid: str) -> None:
    graph = make_graph(f"{uid}-sub", seed=6)
    store.write_graph(graph)
    g = to_networkx(graph)
    rng = np.random.default_rng(0)
    centres = [graph.nodes[i].node_id for i in rng.choice(graph.n_nodes, 4, replace=False)]
    for centre in centres:
        for depth, k, direction in ((1, 3, "both"), (2, 2, "out"), (2, 3, "in"), (3, 2, "both")):
            sub = store.subgraph(graph.graph_id, centre, depth=depth, top_k=k, direction=direction)
            want_nodes, want_edges = _reference_subgraph(g, centre, depth, k, direction)
            assert {n.node_id for n in sub.nodes} == want_nodes
            got = {(s, t): w for s, t, w in sub.edge_list()}
            assert set(got) == want_edges
            for (s, t), w in got.items():
                assert w == g.edges[s, t]["weight"]
    with pytest.raises(NotFoundError):
        store.subgraph(graph.graph_id, "no_such_node")
    with pytest.raises(InvalidArgumentError):
        store.subgraph(graph.graph_id, centres[0], depth=0)


@pytest.mark.parametrize("score", ["product", "sum"])
def test_strongest_paths_match_networkx(store: GraphStore, uid: str, score: str) -> None:
    graph = make_graph(f"{uid}-paths-{score}", seed=7, n_layers=3, n_pos=3, density=0.35)
    store.write_graph(graph)
    g = to_networkx(graph)
    source = graph.nodes[0].node_id  # the first token
    target = graph.nodes[-1].node_id  # a logit at the last position
    max_length = 4

    def value(path: list[str]) -> float:
        ws = [abs(g.edges[a, b]["weight"]) for a, b in itertools.pairwise(path)]
        return float(np.prod(ws)) if score == "product" else float(np.sum(ws))

    paths = list(nx.all_simple_paths(g, source, target, cutoff=max_length))
    want = sorted(paths, key=value, reverse=True)[:5]
    assert len(paths) > 5
    got = store.strongest_paths(
        graph.graph_id,
        source,
        target,
        top_k=5,
        max_length=max_length,
        score=score,  # type: ignore[arg-type]
    )
    assert [p.node_ids for p in got] == want
    for p in got:
        assert p.score == pytest.approx(value(p.node_ids), rel=1e-9)
        assert p.weights == [g.edges[a, b]["weight"] for a, b in itertools.pairwise(p.node_ids)]
    # an unknown end is an error (a typo would otherwise read as "no path")
    with pytest.raises(NotFoundError, match="has no node 'no-such-node'"):
        store.strongest_paths(graph.graph_id, source, "no-such-node", score=score)  # type: ignore[arg-type]
    # a target that exists but cannot be reached from itself: empty
    assert store.strongest_paths(graph.graph_id, target, target, score=score) == []  # type: ignore[arg-type]


def test_graphs_with_feature(store: GraphStore, uid: str) -> None:
    set_id = f"{uid}-set"
    graphs = [make_graph(f"{uid}-feat-{i}", seed=10 + i, set_id=set_id) for i in range(4)]
    for graph in graphs[:3]:
        store.write_graph(graph)
    # The fourth graph is left incomplete: its features must not be reported.
    with pytest.raises(RuntimeError):
        store.write_graph(graphs[3], on_batch=crash_in_edges)
    for layer, index in ((0, 1), (2, 4)):
        want = sorted(
            (graph.graph_id, n.pos, n.node_id)
            for graph in graphs[:3]
            for n in graph.nodes
            if n.kind == "feature" and n.layer == layer and n.feature == index
        )
        assert want, "the synthetic graphs should contain the feature"
        got, cursor, pages = [], None, 0
        while True:
            page = store.graphs_with_feature(set_id, layer, index, limit=1, cursor=cursor)
            got += [(o.graph_id, o.pos, o.node_id) for o in page.items]
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        assert got == want
        assert pages == len({w[0] for w in want})


def test_feature_catalog(store: GraphStore, uid: str) -> None:
    set_id = f"{uid}-cat"
    store.upsert_model(ModelRecord(f"{uid}-model", "gpt2", 3, 64, "zoo"))
    store.upsert_transcoder_set(TranscoderSetRecord(set_id, f"{uid}-model", "per_layer", 128))
    records = catalog(set_id=set_id)
    assert store.upsert_features(records, batch_size=7) == len(records)
    assert store.upsert_features(records) == len(records)  # MERGE: no duplicates
    count = store.query("MATCH (f:Feature {set_id: $s}) RETURN count(f) AS c", {"s": set_id})
    assert count == [{"c": len(records)}]
    assert store.get_feature(set_id, 1, 2) == records[1 * 6 + 2]
    with pytest.raises(NotFoundError):
        store.get_feature(set_id, 9, 9)

    def search(**kw: object) -> list[tuple[int, int]]:
        out, cursor = [], None
        while True:
            page = store.search_features(set_id, limit=4, cursor=cursor, **kw)  # type: ignore[arg-type]
            out += [(f.layer, f.index) for f in page.items]
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    assert search() == [(r.layer, r.index) for r in records]
    assert search(layer=2) == [(2, i) for i in range(6)]
    assert search(label_contains="FEATURE 4") == [(layer, 4) for layer in range(3)]
    assert search(token="t3") == [(layer, i) for layer in range(3) for i in (2, 3)]
    assert search(layer=1, token="t3") == [(1, 2), (1, 3)]

    labelled = store.set_feature_label(set_id, 0, 1, "says 'hello' \"world\"")
    assert labelled.label == "says 'hello' \"world\""
    # A statistics upsert without a label keeps the human label.
    store.upsert_features([FeatureRecord(set_id, 0, 1, density=0.5)])
    again = store.get_feature(set_id, 0, 1)
    assert (again.label, again.density, again.top_tokens) == (labelled.label, 0.5, ["t1", "t2"])
    assert store.set_feature_label(set_id, 0, 1, "").label is None
    # A latent of the registered set without statistics yet gets a catalog entry; one
    # outside the set (or of a set the store does not know) is refused and creates none.
    assert store.set_feature_label(set_id, 2, 127, "late").label == "late"
    with pytest.raises(InvalidArgumentError, match=r"128 latents per layer; use index 0\.\.127"):
        store.set_feature_label(set_id, 0, 128, "x")
    with pytest.raises(InvalidArgumentError, match=r"3-layer model; use layer 0\.\.2"):
        store.set_feature_label(set_id, 3, 0, "x")
    with pytest.raises(NotFoundError, match=r"no transcoder set.*upsert_transcoder_set"):
        store.set_feature_label(f"{uid}-nosuchset", 0, 1, "x")
    count = store.query(
        "MATCH (f:Feature) WHERE f.set_id STARTS WITH $u RETURN count(f) AS c", {"u": uid}
    )
    assert count == [{"c": len(records) + 1}]


def test_list_graphs_keyset_pagination(store: GraphStore, uid: str) -> None:
    model = f"{uid}-pager"
    ids = [f"{uid}-page-{i:02d}" for i in range(7)]
    for i, gid in enumerate(ids):
        store.write_graph(
            make_graph(
                gid,
                seed=i,
                n_layers=1,
                n_pos=2,
                model_id=model,
                task="even" if i % 2 == 0 else "odd",
            )
        )

    def collect(**kw: object) -> list[str]:
        out, cursor = [], None
        while True:
            page = store.list_graphs(model_id=model, limit=3, cursor=cursor, **kw)  # type: ignore[arg-type]
            assert len(page.items) <= 3
            out += [s.graph_id for s in page.items]
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    assert collect() == ids
    assert collect(newest_first=True) == ids[::-1]
    assert collect(task="odd") == ids[1::2]
    assert collect(prompt_contains="PROMPT OF " + ids[3]) == [ids[3]]

    # A graph stored between two pages, before the cursor, is neither repeated nor
    # does it shift the rest.
    first = store.list_graphs(model_id=model, limit=3)
    store.write_graph(make_graph(f"{uid}-page-00a", seed=99, n_layers=1, n_pos=2, model_id=model))
    second = store.list_graphs(model_id=model, limit=3, cursor=first.next_cursor)
    assert [s.graph_id for s in first.items + second.items] == ids[:6]
    with pytest.raises(InvalidArgumentError):
        store.list_graphs(limit=0)
    with pytest.raises(InvalidArgumentError):
        store.list_graphs(newest_first=True, cursor="not-a-cursor")


def test_only_cursors_the_store_handed_out_are_taken(store: GraphStore, uid: str) -> None:
    model = f"{uid}-cursors"
    ids = [f"{uid}-cur-{i}" for i in range(4)]
    for i, gid in enumerate(ids):
        store.write_graph(make_graph(gid, seed=i, n_layers=1, n_pos=2, model_id=model))
    by_id = store.list_graphs(model_id=model, limit=1)
    newest = store.list_graphs(model_id=model, limit=1, newest_first=True)
    assert by_id.next_cursor and newest.next_cursor

    def refused(**kw: object) -> None:
        with pytest.raises(InvalidArgumentError, match=r"not a page token.*handed out") as info:
            store.list_graphs(model_id=model, limit=1, **kw)  # type: ignore[arg-type]
        assert "next_cursor" in str(info.value) and "first page" in str(info.value)

    # Made-up strings, an edited cursor, and one listing's cursor passed to the other.
    refused(cursor="abc")
    refused(cursor=f"{uid}-no-such-graph")
    refused(cursor=by_id.next_cursor.replace(ids[0], ids[1]))
    refused(cursor="", newest_first=True)
    refused(cursor="abc", newest_first=True)
    refused(cursor=f"1:{uid}-no-such-graph", newest_first=True)
    refused(cursor=by_id.next_cursor, newest_first=True)
    refused(cursor=newest.next_cursor)
    with pytest.raises(InvalidArgumentError, match="handed out"):
        store.graphs_with_feature("x", 0, 0, cursor="abc")

    def page(**kw: object) -> list[str]:
        got = store.list_graphs(model_id=model, limit=1, **kw)  # type: ignore[arg-type]
        return [s.graph_id for s in got.items]

    # Cursors handed out before they were tagged (a bare graph id; created_at:graph_id)
    # still work while their graph is stored, and give the same pages.
    created = store.query("MATCH (g:Graph {graph_id: $g}) RETURN g.created_at AS c", {"g": ids[3]})
    bare_newest = f"{created[0]['c']}:{ids[3]}"
    assert page(cursor=ids[0]) == page(cursor=by_id.next_cursor) == [ids[1]]
    assert page(cursor=bare_newest, newest_first=True) == [ids[2]]
    assert page(cursor=newest.next_cursor, newest_first=True) == [ids[2]]
    # A handed-out cursor outlives its graph.
    assert store.delete_graph(ids[0])
    assert page(cursor=by_id.next_cursor) == [ids[1]]
    refused(cursor=ids[0])


def test_errors_in_a_query_or_its_values_are_invalid_arguments(store: GraphStore, uid: str) -> None:
    def invalid(call: Callable[[], object], *needles: str) -> None:
        with pytest.raises(InvalidArgumentError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and all(n in message for n in needles), message

    invalid(
        lambda: store.query("MATCH (g:Graph {graph_id: $graph_id}) RETURN g.graph_id"),
        "could not run a query",
        "graph_id",
        "pass a value for every $parameter",
    )
    invalid(
        lambda: store.query("RETURN 1 + $x AS y", {"x": {"a": 1}}),
        "could not run a query",
        "check the types of the values passed",
    )
    invalid(lambda: store.query("RETURN $x AS y", {"x": object()}), "a value passed has a type")
    invalid(lambda: store.query("RETURN nosuch AS y"), "nosuch", "fix the Cypher")
    # A value of a type no property takes (a map), in a field the record does not check.
    bad = FeatureRecord(f"{uid}-set", 0, 1, density={"a": 1.0})  # type: ignore[arg-type]
    invalid(lambda: store.upsert_features([bad]), "could not store features", "record fields")
    rows = store.query("MATCH (f:Feature {set_id: $s}) RETURN count(f) AS c", {"s": bad.set_id})
    assert rows == [{"c": 0}]


def test_values_are_parameters_not_cypher(store: GraphStore, uid: str) -> None:
    nasty = "it's \"quoted\" '}) MATCH (n) DETACH DELETE n // RETURN $x \\ `tick` ;"
    graph = make_graph(f"{uid}-{nasty}", seed=8, n_layers=1, n_pos=2, prompt=nasty, task=nasty)
    before = store.query("MATCH (n:GNode) RETURN count(n) AS c")[0]["c"]
    store.write_graph(graph)
    assert_same_graph(store.get_graph(graph.graph_id), graph)
    after = store.query("MATCH (n:GNode) RETURN count(n) AS c")[0]["c"]
    assert after == before + graph.n_nodes
    found = store.list_graphs(prompt_contains=nasty, task=nasty).items
    assert [s.graph_id for s in found] == [graph.graph_id]


def test_delete_graph(store: GraphStore, uid: str) -> None:
    graph = make_graph(f"{uid}-del", seed=9)
    store.write_graph(graph)
    assert store.delete_graph(graph.graph_id)
    with pytest.raises(NotFoundError):
        store.get_graph(graph.graph_id)
    rows = store.query("MATCH (n:GNode {graph_id: $g}) RETURN count(n) AS c", {"g": graph.graph_id})
    assert rows == [{"c": 0}]
    assert not store.delete_graph(graph.graph_id)
