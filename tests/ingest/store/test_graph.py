"""Unit tests of the graph types, node ids, store config and query building."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.graph import (
    AttributionGraph,
    GraphMetadata,
    Node,
    NodeKind,
    cantor_pair,
    circuit_tracer_node_id,
    error_node_id,
    feature_node_id,
    logit_node_id,
    token_node_id,
)
from ingest.store import cypher
from ingest.store.config import EMBEDDED_DATABASE, StoreConfig, default_data_dir
from tests.ingest.store.helpers import make_graph

pytestmark = pytest.mark.unit


def test_node_ids_follow_circuit_tracer() -> None:
    assert feature_node_id(3, 117, 5) == "3_117_5"
    assert token_node_id(464, 0) == "E_464_0"
    assert logit_node_id(12, 262, 7) == "13_262_7"
    assert error_node_id(2, 4) == "err_2_4"
    assert cantor_pair(0, 0) == 0 and cantor_pair(1, 0) == 1 and cantor_pair(0, 1) == 2
    assert len({cantor_pair(a, b) for a in range(30) for b in range(30)}) == 900


def test_error_ids_do_not_collide_and_export_maps_them_when_free() -> None:
    feature = Node(feature_node_id(0, 2, 4), NodeKind.FEATURE, 0, 4, feature=2)
    error = Node(error_node_id(2, 4), NodeKind.ERROR, 2, 4)
    assert feature.node_id != error.node_id
    # circuit-tracer's id for this error node is the feature's id: keep ours then.
    assert circuit_tracer_node_id(error, {feature.node_id}) == error.node_id
    assert circuit_tracer_node_id(error, set()) == "0_2_4"
    assert circuit_tracer_node_id(feature, {feature.node_id}) == feature.node_id


def test_node_validation() -> None:
    assert Node("x", "token", None, 0, token_id=3).kind is NodeKind.TOKEN  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="unknown kind"):
        Node("x", "neuron", 0, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="feature index"):
        Node("x", NodeKind.FEATURE, 0, 0)
    with pytest.raises(InvalidArgumentError, match="token_id"):
        Node("x", NodeKind.LOGIT, 3, 0)
    with pytest.raises(InvalidArgumentError, match="position"):
        Node("x", NodeKind.ERROR, 0, -1)


def test_graph_helpers_and_validation() -> None:
    graph = make_graph("g", seed=0)
    graph.validate()
    nid = graph.nodes[5].node_id
    assert graph.nodes[graph.node_index(nid)].node_id == nid
    outs = graph.out_edges(nid)
    ins = graph.in_edges(nid)
    assert len(outs) == int((graph.sources == 5).sum()) and len(ins) == int(
        (graph.targets == 5).sum()
    )
    for t, w in outs:
        assert (nid, graph.nodes[t].node_id, w) in graph.edge_list()
    with pytest.raises(NotFoundError):
        graph.node_index("nope")

    meta = GraphMetadata("g", "m", "s", "p", tokens=["a"], token_ids=[1])
    nodes = [Node("E_1_0", NodeKind.TOKEN, None, 0, token_id=1), Node("err_0_0", "error", 0, 0)]  # type: ignore[arg-type]
    ok = AttributionGraph(meta, nodes, np.array([0]), np.array([1]), np.array([0.5]))
    ok.validate()
    assert ok.sources.dtype == np.int64 and ok.weights.dtype == np.float32
    for sources, targets, weights, match in (
        ([0], [2], [0.5], "out of range"),
        ([-1], [1], [0.5], "out of range"),
        ([0], [1], [np.nan], "non-finite"),
        ([0, 1], [1], [0.5], "one length"),
    ):
        bad = AttributionGraph(meta, nodes, np.array(sources), np.array(targets), np.array(weights))
        with pytest.raises(InvalidArgumentError, match=match):
            bad.validate()
    with pytest.raises(InvalidArgumentError, match="twice"):
        AttributionGraph(meta, [nodes[0], nodes[0]]).validate()
    with pytest.raises(InvalidArgumentError, match="token ids"):
        GraphMetadata("g", "m", "s", "p", tokens=["a"], token_ids=[])


def test_store_config_from_env() -> None:
    embedded = StoreConfig.from_env({})
    assert embedded.embedded and embedded.database == EMBEDDED_DATABASE
    remote = StoreConfig.from_env(
        {
            "NEO4J_URI": "bolt://db:7687",
            "NEO4J_USER": "u",
            "NEO4J_PASSWORD": "pw",
            "NEO4J_DATABASE": "circuits",
        },
        batch_size=1000,
    )
    assert (remote.uri, remote.user, remote.password, remote.database, remote.batch_size) == (
        "bolt://db:7687",
        "u",
        "pw",
        "circuits",
        1000,
    )
    assert "pw" not in remote.redacted()
    # a command's first line names the store; the embedded one says how to stop it
    reached = replace(embedded, uri="bolt://127.0.0.1:7000", data_dir=Path("/data/db"))
    line = embedded.describe(reached)
    assert "bolt://127.0.0.1:7000" in line and "/data/db" in line
    assert "`circuitscope db stop --data-dir /data/db` stops it" in line
    default = replace(reached, data_dir=default_data_dir().resolve())
    assert "`circuitscope db stop` stops it" in embedded.describe(default)
    assert remote.describe(remote) == remote.redacted() and "db stop" not in remote.describe(remote)
    assert StoreConfig.from_env({"NEO4J_URI": "bolt://x"}).database == "neo4j"
    # a URI given as an override (serve's --store-uri) picks the database as NEO4J_URI does
    assert StoreConfig.from_env({}, uri="bolt://x").database == "neo4j"
    assert StoreConfig.from_env({"NEO4J_URI": "bolt://x"}, uri=None).database == EMBEDDED_DATABASE
    with pytest.raises(InvalidArgumentError):
        StoreConfig(batch_size=0)
    for retry_time_s in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgumentError, match="retry_time_s"):
            StoreConfig(retry_time_s=retry_time_s)


def test_a_printed_store_config_hides_the_password() -> None:
    config = StoreConfig(uri="bolt://db:7687", user="u", password="s3cret-pw")
    assert "s3cret-pw" not in repr(config) and "s3cret-pw" not in str(config)
    assert "password" not in repr(config) and "bolt://db:7687" in repr(config)
    assert config.password == "s3cret-pw"  # still there for the driver
    assert "s3cret-pw" not in repr(StoreConfig.from_env({"NEO4J_PASSWORD": "s3cret-pw"}))


def test_paths_query_bound_is_validated() -> None:
    assert "*1..4]" in cypher.paths_query(4, "product")
    with pytest.raises(ValueError):
        cypher.paths_query(0, "product")
    with pytest.raises(ValueError):
        cypher.paths_query("3; MATCH (n) DELETE n", "product")  # type: ignore[arg-type]
