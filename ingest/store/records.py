"""Converters between the graph types of :mod:`ingest.graph` and stored properties.

Graph database properties are scalars or homogeneous lists of scalars: maps are
stored as JSON strings (``extra_json``, ``top_examples_json``), and None values and
empty lists are left out (a missing property reads back as None or ``[]``), because
neither server keeps a null property and empty lists have no element type.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from ingest.graph import FeatureRecord, GraphMetadata, Node, NodeKind
from ingest.store.base import GraphStatus, GraphSummary


def _compact(props: dict[str, Any]) -> dict[str, Any]:
    """Drop None values and empty lists."""
    return {k: v for k, v in props.items() if v is not None and v != []}


def node_props(node: Node, idx: int, graph_id: str, set_id: str) -> dict[str, Any]:
    """The ``:GNode`` properties of ``node``, the ``idx``-th node of its graph."""
    return _compact(
        {
            "graph_id": graph_id,
            "node_id": node.node_id,
            "idx": idx,
            "kind": node.kind.value,
            "layer": node.layer,
            "pos": node.pos,
            "feature": node.feature,
            "set_id": set_id if node.kind is NodeKind.FEATURE else None,
            "token_id": node.token_id,
            "token": node.token,
            "activation": node.activation,
            "influence": node.influence,
            "token_prob": node.token_prob,
            "label": node.label,
        }
    )


def node_from_props(p: dict[str, Any]) -> Node:
    return Node(
        node_id=p["node_id"],
        kind=NodeKind(p["kind"]),
        layer=p.get("layer"),
        pos=int(p["pos"]),
        feature=p.get("feature"),
        token_id=p.get("token_id"),
        token=p.get("token"),
        activation=p.get("activation"),
        influence=p.get("influence"),
        token_prob=p.get("token_prob"),
        label=p.get("label"),
    )


def graph_props(meta: GraphMetadata, status: GraphStatus, write_id: str) -> dict[str, Any]:
    """The ``:Graph`` properties at the start of a write (sizes are set on completion,
    ``created_at`` and ``updated_at`` by the claim)."""
    return _compact(
        {
            "graph_id": meta.graph_id,
            "status": status.value,
            "write_id": write_id,
            "model_id": meta.model_id,
            "set_id": meta.set_id,
            "task": meta.task,
            "prompt": meta.prompt,
            "tokens": list(meta.tokens),
            "token_ids": [int(t) for t in meta.token_ids],
            "node_threshold": meta.node_threshold,
            "edge_threshold": meta.edge_threshold,
            "replacement_score": meta.replacement_score,
            "completeness_score": meta.completeness_score,
            "artifact_uri": meta.artifact_uri,
            "extra_json": json.dumps(meta.extra, sort_keys=True) if meta.extra else None,
        }
    )


def _time(epoch_ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC) if epoch_ms is not None else None


def summary_from_props(p: dict[str, Any]) -> GraphSummary:
    meta = GraphMetadata(
        graph_id=p["graph_id"],
        model_id=p.get("model_id", ""),
        set_id=p.get("set_id", ""),
        prompt=p.get("prompt", ""),
        tokens=list(p.get("tokens") or []),
        token_ids=[int(t) for t in p.get("token_ids") or []],
        node_threshold=p.get("node_threshold"),
        edge_threshold=p.get("edge_threshold"),
        replacement_score=p.get("replacement_score"),
        completeness_score=p.get("completeness_score"),
        artifact_uri=p.get("artifact_uri"),
        task=p.get("task"),
        extra=json.loads(p["extra_json"]) if p.get("extra_json") else {},
    )
    return GraphSummary(
        metadata=meta,
        status=GraphStatus(p.get("status", GraphStatus.WRITING)),
        n_nodes=int(p.get("n_nodes") or 0),
        n_edges=int(p.get("n_edges") or 0),
        created_at=_time(p.get("created_at")),
        updated_at=_time(p.get("updated_at")),
    )


def feature_props(f: FeatureRecord) -> dict[str, Any]:
    """The ``:Feature`` statistics of ``f`` (its key excluded); unset values are left out
    so an upsert never clears a label or statistic set earlier."""
    return _compact(
        {
            "density": f.density,
            "max_activation": f.max_activation,
            "label": f.label,
            "top_tokens": list(f.top_tokens),
            "top_examples_json": json.dumps(f.top_examples) if f.top_examples else None,
            "de_embedding_tokens": list(f.de_embedding_tokens),
            "output_tokens": list(f.output_tokens),
        }
    )


def feature_from_props(p: dict[str, Any]) -> FeatureRecord:
    return FeatureRecord(
        set_id=p["set_id"],
        layer=int(p["layer"]),
        index=int(p["index"]),
        density=p.get("density"),
        max_activation=p.get("max_activation"),
        label=p.get("label") or None,
        top_tokens=list(p.get("top_tokens") or []),
        top_examples=json.loads(p["top_examples_json"]) if p.get("top_examples_json") else [],
        de_embedding_tokens=list(p.get("de_embedding_tokens") or []),
        output_tokens=list(p.get("output_tokens") or []),
    )
