"""Export to the circuit-tracer / Neuronpedia graph JSON, field for field."""

import json

import pytest

from ingest.attribution.export import export_circuit_tracer_json, to_circuit_tracer_json
from ingest.graph import AttributionGraph, GraphMetadata, Node, NodeKind, cantor_pair

from .helpers import synthetic_result

pytestmark = pytest.mark.unit

NODE_FIELDS = {
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
}


@pytest.mark.parametrize("pruned", [False, True])
def test_schema_field_for_field(tmp_path, pruned: bool) -> None:
    result = synthetic_result()
    graph = result.to_graph(pruned=pruned, node_threshold=0.8, edge_threshold=0.98)
    path = export_circuit_tracer_json(graph, tmp_path / "graph.json", slug="toy-graph")
    doc = json.loads(path.read_text())
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    assert set(doc["metadata"]) == {
        "slug",
        "scan",
        "transcoder_list",
        "prompt_tokens",
        "prompt",
        "node_threshold",
        "schema_version",
    }
    assert doc["metadata"]["slug"] == "toy-graph"
    assert doc["metadata"]["prompt_tokens"] == ["t0", "t1", "t2"]
    assert doc["metadata"]["node_threshold"] == (0.8 if pruned else None)
    assert set(doc["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    assert len(doc["nodes"]) == graph.n_nodes and len(doc["links"]) == graph.n_edges
    by_id = {}
    feature_ids = {n.node_id for n in graph.nodes if n.kind is NodeKind.FEATURE}
    for node, out in zip(graph.nodes, doc["nodes"], strict=True):
        assert set(out) == NODE_FIELDS
        by_id[out["node_id"]] = out
        assert out["ctx_idx"] == node.pos
        assert out["reverse_ctx_idx"] == 2 - node.pos
        assert out["influence"] == pytest.approx(node.influence)
        if node.kind is NodeKind.FEATURE:
            assert out["node_id"] == f"{node.layer}_{node.feature}_{node.pos}"
            assert out["feature"] == cantor_pair(node.layer, node.feature)
            assert out["layer"] == str(node.layer)
            assert out["feature_type"] == "cross layer transcoder"
            assert out["activation"] == pytest.approx(node.activation)
        elif node.kind is NodeKind.ERROR:
            legacy = f"0_{node.layer}_{node.pos}"
            assert out["node_id"] == (node.node_id if legacy in feature_ids else legacy)
            assert out["feature_type"] == "mlp reconstruction error"
            assert out["layer"] == str(node.layer)
        elif node.kind is NodeKind.TOKEN:
            assert out["node_id"] == f"E_{node.token_id}_{node.pos}"
            assert out["layer"] == "E" and out["feature_type"] == "embedding"
        else:
            assert out["node_id"] == f"3_{node.token_id}_{node.pos}"
            assert out["layer"] == "3" and out["feature_type"] == "logit"
            assert out["is_target_logit"] is True
            assert out["token_prob"] == pytest.approx(node.token_prob)
    for link, (s, t, w) in zip(doc["links"], graph.edge_list(), strict=True):
        assert link["source"] in by_id and link["target"] in by_id
        assert link["weight"] == pytest.approx(w)
        assert link["source"] == s or s.startswith("err_")
        assert link["target"] == t


def test_pruned_is_subset_of_full() -> None:
    result = synthetic_result(seed=3)
    full = to_circuit_tracer_json(result.to_graph(pruned=False))
    pruned = to_circuit_tracer_json(result.to_graph(pruned=True, node_threshold=0.5))
    full_ids = {n["node_id"] for n in full["nodes"]}
    assert {n["node_id"] for n in pruned["nodes"]} <= full_ids
    full_links = {(x["source"], x["target"]): x["weight"] for x in full["links"]}
    for link in pruned["links"]:
        assert full_links[(link["source"], link["target"])] == link["weight"]
    assert len(pruned["links"]) < len(full["links"])


def test_error_id_collision_keeps_internal_id() -> None:
    meta = GraphMetadata(
        graph_id="g", model_id="m", set_id="s", prompt="x", tokens=["x"], token_ids=[0]
    )
    nodes = [
        Node("0_1_0", NodeKind.FEATURE, 0, 0, feature=1, activation=1.0),
        Node("err_1_0", NodeKind.ERROR, 1, 0),
        Node("err_0_0", NodeKind.ERROR, 0, 0),
    ]
    doc = to_circuit_tracer_json(AttributionGraph(metadata=meta, nodes=nodes))
    assert [n["node_id"] for n in doc["nodes"]] == ["0_1_0", "err_1_0", "0_0_0"]
