"""GraphService end to end: a real gRPC server over the real embedded store."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ingest.attribution.artifact import save_artifact
from ingest.errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from ingest.graph import AttributionGraph
from ingest.store.base import GraphStore
from service.client import CircuitsClient
from tests.service import builders
from tests.service.conftest import (
    ALL_GRAPH_IDS,
    ARTIFACT_GRAPH,
    ARTIFACT_GRAPH_KWARGS,
    GRAPHS,
)

pytestmark = pytest.mark.integration


def _edge_set(graph: AttributionGraph) -> dict[tuple[str, str], float]:
    return {(s, t): w for s, t, w in graph.edge_list()}


def test_get_graph_round_trips_the_stored_graph(client: CircuitsClient, store: GraphStore) -> None:
    served = client.get_graph("g-beta")
    stored = store.get_graph("g-beta")
    assert served.metadata.prompt == "gamma delta"
    assert served.metadata.tokens == stored.metadata.tokens
    assert served.metadata.completeness_score == pytest.approx(0.75)
    assert [n for n in served.nodes] == [n for n in stored.nodes]
    assert _edge_set(served) == _edge_set(stored)
    assert served.n_edges == builders.layered_graph("x", n_layers=3).n_edges


def test_stream_graph_edges_reassembles_the_graph_in_chunks(client: CircuitsClient) -> None:
    whole = client.get_graph("g-delta")
    streamed = client.stream_graph("g-delta", chunk_size=7)
    assert streamed.nodes == whole.nodes
    assert _edge_set(streamed) == _edge_set(whole)
    np.testing.assert_array_equal(streamed.weights, whole.weights)


def _stored_ids(store: GraphStore) -> list[str]:
    ids, cursor = [], None
    while True:
        page = store.list_graphs(limit=1000, cursor=cursor)
        ids.extend(s.graph_id for s in page.items)
        if page.next_cursor is None:
            return sorted(ids)
        cursor = page.next_cursor


def test_list_graphs_pages_through_every_graph_once(
    client: CircuitsClient, store: GraphStore
) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = client.list_graphs(page_size=2, page_token=token)
        assert len(page.items) <= 2
        seen.extend(g.graph_id for g in page.items)
        if page.next_cursor is None:
            break
        token = page.next_cursor
    assert sorted(seen) == _stored_ids(store) and len(seen) == len(set(seen))
    assert set(ALL_GRAPH_IDS) <= set(seen)


def test_list_graphs_filters(client: CircuitsClient) -> None:
    other = [g.graph_id for g in client.iter_graphs(model_id="other-model")]
    assert other == ["g-gamma"]
    toy = {g.graph_id for g in client.iter_graphs(task="toy")}
    assert toy == {gid for gid, kw in GRAPHS.items() if kw["task"] == "toy"}
    alpha = {g.graph_id for g in client.iter_graphs(prompt_contains="alpha")}
    assert alpha == {"g-alpha", "g-gamma"}
    summary = next(iter(client.iter_graphs(model_id="other-model")))
    assert summary.n_edges == builders.layered_graph("x").n_edges


def test_get_subgraph_keeps_top_k_edges(client: CircuitsClient, store: GraphStore) -> None:
    graph = store.get_graph("g-alpha")
    center = "0_0_1"
    sub = client.get_subgraph("g-alpha", center, depth=1, top_k=2, direction="out")
    out = sorted(((t, w) for t, w in graph.out_edges(center)), key=lambda e: -abs(e[1]))[:2]
    expected = {(center, graph.nodes[t].node_id) for t, _ in out}
    assert set(_edge_set(sub)) == expected
    assert center in {n.node_id for n in sub.nodes}


def test_find_paths_are_strongest_first(client: CircuitsClient) -> None:
    paths = client.find_paths("g-alpha", "E_100_0", "3_500_1", top_k=3, max_length=4)
    assert paths, "a token reaches the logit through every layer"
    assert all(p.node_ids[0] == "E_100_0" and p.node_ids[-1] == "3_500_1" for p in paths)
    scores = [p.score for p in paths]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(np.prod([abs(w) for w in paths[0].weights])), rel=1e-5)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.get_graph("no-such-graph"), NotFoundError),
        (lambda c: c.stream_graph("no-such-graph"), NotFoundError),
        (lambda c: c.get_subgraph("g-alpha", "no-such-node"), NotFoundError),
        (lambda c: c.get_subgraph("no-such-graph", "E_100_0"), NotFoundError),
        (lambda c: c.find_paths("no-such-graph", "E_100_0", "3_500_1"), NotFoundError),
        (lambda c: c.get_graph(""), InvalidArgumentError),
        (lambda c: c.get_subgraph("g-alpha", "E_100_0", depth=9), InvalidArgumentError),
        (lambda c: c.get_subgraph("g-alpha", "E_100_0", top_k=-1), InvalidArgumentError),
        (
            lambda c: c.find_paths("g-alpha", "E_100_0", "3_5_1", max_length=11),
            InvalidArgumentError,
        ),
        (lambda c: c.stream_graph("g-alpha", chunk_size=-5), InvalidArgumentError),
        (lambda c: c.list_graphs(page_size=-1), InvalidArgumentError),
        (lambda c: c.list_graphs(page_token="not-a-token"), InvalidArgumentError),
    ],
)
def test_bad_requests_get_their_status(client: CircuitsClient, call, error) -> None:
    with pytest.raises(error):
        call(client)


def test_find_paths_to_an_unknown_node_is_not_found(client: CircuitsClient) -> None:
    with pytest.raises(NotFoundError, match="has no node 'no-such-node'"):
        client.find_paths("g-alpha", "E_100_0", "no-such-node")


def test_page_token_is_bound_to_its_filters(client: CircuitsClient) -> None:
    page = client.list_graphs(task="toy", page_size=1)
    assert page.next_cursor
    with pytest.raises(InvalidArgumentError, match="page_token"):
        client.list_graphs(task="other", page_size=1, page_token=page.next_cursor)


def test_oversized_page_is_clamped(client: CircuitsClient, store: GraphStore) -> None:
    page = client.list_graphs(page_size=10**6)
    assert len(page.items) == len(_stored_ids(store)) and page.next_cursor is None


def test_get_graph_reprunes_the_artifact_at_requested_thresholds(client: CircuitsClient) -> None:
    result = builders.layered_result(ARTIFACT_GRAPH, **ARTIFACT_GRAPH_KWARGS)
    stored = client.get_graph(ARTIFACT_GRAPH)
    assert _edge_set(stored) == _edge_set(result.to_graph(pruned=True))
    for node_threshold, edge_threshold in ((1.0, 1.0), (0.5, 0.6)):
        served = client.get_graph(
            ARTIFACT_GRAPH, node_threshold=node_threshold, edge_threshold=edge_threshold
        )
        expected = result.to_graph(
            pruned=True, node_threshold=node_threshold, edge_threshold=edge_threshold
        )
        assert [n.node_id for n in served.nodes] == [n.node_id for n in expected.nodes]
        assert _edge_set(served) == pytest.approx(_edge_set(expected))
        assert served.metadata.node_threshold == node_threshold
        assert served.metadata.completeness_score == pytest.approx(
            expected.metadata.completeness_score
        )
    loose = client.get_graph(ARTIFACT_GRAPH, node_threshold=1.0, edge_threshold=1.0)
    tight = client.get_graph(ARTIFACT_GRAPH, node_threshold=0.5, edge_threshold=0.6)
    assert tight.n_edges < loose.n_edges


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_invalid_thresholds_are_invalid_arguments(client: CircuitsClient, threshold: float) -> None:
    with pytest.raises(InvalidArgumentError, match="node_threshold"):
        client.get_graph(ARTIFACT_GRAPH, node_threshold=threshold)


def test_a_damaged_or_missing_artifact_is_reported_without_the_servers_paths(
    client: CircuitsClient, store: GraphStore, tmp_path: Path
) -> None:
    result = builders.layered_result("g-damaged", task="damaged", prompt="damaged artifact")
    artifact = save_artifact(result, tmp_path / "artifact")
    pruned = result.to_graph(pruned=True)
    pruned.metadata.artifact_uri = artifact.resolve().as_uri()
    store.write_graph(pruned)
    try:
        tensors = artifact / "graph.safetensors"
        whole = tensors.read_bytes()
        # a torn tensor file (not a domain error inside the loader), then broken JSON
        tensors.write_bytes(whole[: len(whole) // 2])
        for damaged in ("tensors", "json"):
            if damaged == "json":
                tensors.write_bytes(whole)
                (artifact / "graph.json").write_text("{broken")
            with pytest.raises(DataLossError, match="'g-damaged' on this server is damaged") as hit:
                client.get_graph("g-damaged", node_threshold=0.9)
            assert str(tmp_path) not in str(hit.value) and "delete the graph" in str(hit.value)
        shutil.rmtree(artifact)
        with pytest.raises(FailedPreconditionError, match="missing from this server's disk"):
            client.get_graph("g-damaged", node_threshold=0.9)
    finally:
        store.delete_graph("g-damaged")


def test_repruning_a_graph_without_artifact_is_a_failed_precondition(
    client: CircuitsClient,
) -> None:
    with pytest.raises(FailedPreconditionError, match="no full-graph artifact"):
        client.get_graph("g-alpha", edge_threshold=0.9)
