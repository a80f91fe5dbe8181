"""Writers, deletes and readers of one graph id racing each other, made deterministic by
running the other party's real store calls at a chosen point (``on_batch``, or just
before a statement is sent); pages across a rewrite; malformed cursors; a wrong
database name. Nothing of the store is mocked."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from neo4j import ManagedTransaction

from ingest.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from ingest.graph import AttributionGraph
from ingest.store import cypher, open_store
from ingest.store.base import GraphStore
from ingest.store.bolt import BoltGraphStore
from tests.ingest.store.helpers import make_graph
from tests.ingest.store.test_store import assert_same_graph

pytestmark = pytest.mark.integration


@pytest.fixture
def bolt(store: GraphStore) -> BoltGraphStore:
    assert isinstance(store, BoltGraphStore)
    return store


def _before_statement(
    monkeypatch: pytest.MonkeyPatch,
    store: BoltGraphStore,
    statement: str,
    graph_id: str,
    run: Callable[[], None],
) -> None:
    """Run ``run`` once, just before ``store`` next sends ``statement`` for ``graph_id``."""
    real = store.write_rows
    fired = threading.Event()

    def write_rows(query: str, params: Any, timeout: float | None, what: str) -> Any:
        if query == statement and params.get("graph_id") == graph_id and not fired.is_set():
            fired.set()
            run()
        return real(query, params, timeout, what)

    monkeypatch.setattr(store, "write_rows", write_rows)


def _count_gnodes(store: GraphStore, graph_id: str) -> int:
    rows = store.query("MATCH (n:GNode {graph_id: $g}) RETURN count(n) AS c", {"g": graph_id})
    return int(rows[0]["c"])


def test_replace_false_never_overwrites_a_graph_stored_meanwhile(
    bolt: BoltGraphStore, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gid = f"{uid}-claim"
    mine, theirs = make_graph(gid, seed=1, prompt="mine"), make_graph(gid, seed=2, prompt="theirs")
    # The other writer stores its complete graph after this writer looked for one and
    # before it claims the id.
    _before_statement(monkeypatch, bolt, cypher.CLAIM_GRAPH, gid, lambda: bolt.write_graph(theirs))
    with pytest.raises(AlreadyExistsError, match="replace=True"):
        bolt.write_graph(mine)
    assert_same_graph(bolt.get_graph(gid), theirs)


def test_delete_during_a_write_stops_the_writer_and_leaves_nothing(
    store: GraphStore, uid: str
) -> None:
    graph = make_graph(f"{uid}-orphans", seed=1)
    gid = graph.graph_id
    deleted: list[bool] = []

    def delete_midway(phase: str, done: int, total: int) -> None:
        if phase == "nodes" and done == 5:
            deleted.append(store.delete_graph(gid))

    with pytest.raises(FailedPreconditionError) as lost:
        store.write_graph(graph, batch_size=5, on_batch=delete_midway)
    assert not isinstance(lost.value, AlreadyExistsError)
    assert deleted == [True]
    graphs = store.query("MATCH (g:Graph {graph_id: $g}) RETURN count(g) AS c", {"g": gid})
    assert graphs == [{"c": 0}]
    assert _count_gnodes(store, gid) == 0  # the writer wrote no batch after the delete


def test_a_write_claiming_a_graph_being_deleted_stops_the_delete(
    bolt: BoltGraphStore, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = make_graph(f"{uid}-redo", seed=1, n_layers=3, n_pos=4)
    gid = graph.graph_id
    bolt.write_graph(graph)
    marked, resume = threading.Event(), threading.Event()
    real = bolt.write_rows
    deleter_errors: list[BaseException] = []

    def write_rows(query: str, params: Any, timeout: float | None, what: str) -> Any:
        out = real(query, params, timeout, what)
        if query == cypher.MARK_DELETING and threading.current_thread() is deleter:
            marked.set()  # the graph is hidden; the deleter stalls before its batches
            resume.wait(60)
        return out

    def delete() -> None:
        try:
            bolt.delete_graph(gid)
        except BaseException as exc:
            deleter_errors.append(exc)

    monkeypatch.setattr(bolt, "write_rows", write_rows)
    deleter = threading.Thread(target=delete)
    deleter.start()
    assert marked.wait(60)

    def let_the_delete_go_on(phase: str, done: int, total: int) -> None:
        if phase == "nodes" and done == 5:
            resume.set()
            deleter.join(60)

    # The worker rewrites the graph it sees half-deleted (no replace needed).
    bolt.write_graph(graph, batch_size=5, on_batch=let_the_delete_go_on)
    assert not deleter.is_alive()
    assert_same_graph(bolt.get_graph(gid), graph)
    assert len(deleter_errors) == 1 and isinstance(deleter_errors[0], FailedPreconditionError)
    assert "delete it again" in str(deleter_errors[0])


def test_of_two_racing_writers_the_last_claimant_completes(store: GraphStore, uid: str) -> None:
    graph = make_graph(f"{uid}-two", seed=1, n_layers=3, n_pos=4)
    gid = graph.graph_id
    paused = {name: threading.Event() for name in "AB"}
    go = {name: threading.Event() for name in "AB"}
    outcome: dict[str, BaseException | None] = {}

    def run(name: str) -> None:
        def pause(phase: str, done: int, total: int) -> None:
            if phase == "nodes" and done == 5:
                paused[name].set()
                go[name].wait(60)

        try:
            store.write_graph(graph, batch_size=5, on_batch=pause)
            outcome[name] = None
        except BaseException as exc:
            outcome[name] = exc
        finally:
            paused[name].set()

    threads = {name: threading.Thread(target=run, args=(name,)) for name in "AB"}
    threads["A"].start()
    assert paused["A"].wait(60)  # A claimed and wrote a batch of nodes
    threads["B"].start()
    assert paused["B"].wait(60)  # B claimed over A, deleted A's nodes, wrote a batch
    go["A"].set()
    threads["A"].join(60)
    go["B"].set()
    threads["B"].join(60)

    lost = outcome["A"]
    assert isinstance(lost, FailedPreconditionError) and not isinstance(lost, AlreadyExistsError)
    assert outcome["B"] is None
    assert_same_graph(store.get_graph(gid), graph)
    assert _count_gnodes(store, gid) == graph.n_nodes


def test_an_edge_whose_nodes_vanished_fails_the_write(bolt: BoltGraphStore, uid: str) -> None:
    graph = make_graph(f"{uid}-vanish", seed=1)
    gid = graph.graph_id

    def delete_a_node(phase: str, done: int, total: int) -> None:
        if phase == "edges" and done == 0:  # someone ignoring claims deletes a node
            bolt.write_rows(
                "MATCH (n:GNode {graph_id: $graph_id, idx: $i}) DETACH DELETE n",
                {"graph_id": gid, "i": int(graph.sources[0])},
                None,
                "delete a node",
            )

    with pytest.raises(FailedPreconditionError, match="were not written"):
        bolt.write_graph(graph, on_batch=delete_a_node)
    with pytest.raises(NotFoundError):
        bolt.get_graph_summary(gid)


def _rewrite_before_reads(
    monkeypatch: pytest.MonkeyPatch,
    bolt: BoltGraphStore,
    fires: Callable[[str, dict[str, Any]], bool],
    versions: list[AttributionGraph],
) -> None:
    """Inside every read transaction, just before each statement for which ``fires``
    holds, replace the graph with the next of ``versions`` (cyclically): a rewrite that
    completes while a reader is between two statements of one transaction."""
    real = bolt.transaction
    turn = itertools.cycle(versions)

    def transaction(work: Any, *, write: bool, **kwargs: Any) -> Any:
        if write:
            return real(work, write=write, **kwargs)

        def wrapped(tx: ManagedTransaction) -> Any:
            class Interleaved:
                def run(self, query: str, params: Any = None) -> Any:
                    if fires(query, params or {}):
                        bolt.write_graph(next(turn), replace=True)
                    return tx.run(query, params)

            return work(Interleaved())

        return real(wrapped, write=write, **kwargs)

    monkeypatch.setattr(bolt, "transaction", transaction)


def test_strongest_paths_never_mixes_two_versions_of_a_graph(
    bolt: BoltGraphStore, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gid = f"{uid}-paths"
    one, two = (make_graph(gid, seed=s, n_layers=2, n_pos=3) for s in (1, 2))
    bolt.write_graph(one)
    src, dst = one.nodes[0].node_id, one.nodes[-1].node_id
    _rewrite_before_reads(monkeypatch, bolt, lambda q, p: "$source_id" in q, [two, one])
    with pytest.raises(FailedPreconditionError, match="changed while it was read"):
        bolt.strongest_paths(gid, src, dst, max_length=3)


def test_subgraph_under_a_rewrite_is_a_failed_precondition(
    bolt: BoltGraphStore, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gid = f"{uid}-sub"
    one, two = (make_graph(gid, seed=s, n_layers=2, n_pos=3) for s in (1, 2))
    bolt.write_graph(one)
    centre = "err_0_1"  # in both versions; most feature node ids differ between them

    def final_node_lookup(query: str, params: dict[str, Any]) -> bool:
        return query == cypher.NODES_BY_ID and params["node_ids"] != [centre]

    _rewrite_before_reads(monkeypatch, bolt, final_node_lookup, [two, one])
    with pytest.raises(FailedPreconditionError, match="changed while it was read"):
        bolt.subgraph(gid, centre, depth=2, top_k=5)


def test_newest_first_pages_keep_a_graph_replaced_between_pages(
    store: GraphStore, uid: str
) -> None:
    model = f"{uid}-newest"
    ids = [f"{uid}-new-{i}" for i in range(3)]
    for i, gid in enumerate(ids):
        store.write_graph(make_graph(gid, seed=i, n_layers=1, n_pos=2, model_id=model))
        time.sleep(0.005)  # distinct created_at
    first = store.list_graphs(model_id=model, newest_first=True, limit=1)
    before = store.get_graph_summary(ids[0])
    # The oldest graph is re-ingested between two pages.
    store.write_graph(make_graph(ids[0], seed=7, n_layers=1, n_pos=2, model_id=model), replace=True)
    seen, cursor = [s.graph_id for s in first.items], first.next_cursor
    while cursor is not None:
        page = store.list_graphs(model_id=model, newest_first=True, limit=1, cursor=cursor)
        seen += [s.graph_id for s in page.items]
        cursor = page.next_cursor
    assert seen == ids[::-1]
    after = store.get_graph_summary(ids[0])
    assert after.created_at == before.created_at
    assert after.updated_at is not None and before.updated_at is not None
    assert after.updated_at >= before.updated_at


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.search_features("x", cursor={"a": 1}),
        lambda s: s.search_features("x", cursor="1:99999999999999999999"),
        lambda s: s.list_graphs(newest_first=True, cursor="99999999999999999999:z"),
        lambda s: s.list_graphs(newest_first=True, cursor=["1:a"]),
        lambda s: s.list_graphs(cursor=12),
        lambda s: s.graphs_with_feature("x", 0, 0, cursor=[1]),
    ],
    ids=["object", "index-overflow", "time-overflow", "list", "int", "occurrences-list"],
)
def test_malformed_cursors_are_invalid_arguments(
    store: GraphStore, call: Callable[[GraphStore], object]
) -> None:
    with pytest.raises(InvalidArgumentError, match="page token"):
        call(store)


def test_a_missing_database_says_to_fix_neo4j_database(bolt: BoltGraphStore, uid: str) -> None:
    config = dataclasses.replace(bolt.config, database=f"missing{uid}", connect_timeout_s=5.0)
    with pytest.raises(UnavailableError, match=f"'missing{uid}'.*fix NEO4J_DATABASE"):
        open_store(config)
