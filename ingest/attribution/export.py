"""Export to the graph JSON that circuit-tracer's and Neuronpedia's frontends read.

Schema (circuit-tracer 0.5.0; DESIGN 8): ``{metadata, qParams, nodes, links}``.

- ``metadata``: ``slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold,
  schema_version``.
- ``qParams``: ``pinnedIds, supernodes, linkType, clickedId, sg_pos``.
- node: ``node_id, feature, layer`` (a string), ``ctx_idx, feature_type, token_prob,
  is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp, influence, activation``.

  ==========  ====================  ====================  =========================
  kind        node_id               layer                 feature_type
  ==========  ====================  ====================  =========================
  feature     ``{l}_{i}_{pos}``     ``"{l}"``             cross layer transcoder
  error       ``0_{l}_{pos}`` (*)   ``"{l}"``             mlp reconstruction error
  token       ``E_{tok}_{pos}``     ``"E"``               embedding
  logit       ``{L+1}_{tok}_{pos}`` ``"{L+1}"``           logit
  ==========  ====================  ====================  =========================

  A feature's ``feature`` field is the Cantor pairing of (layer, index). (*) An error
  id keeps the collision-free ``err_{l}_{pos}`` where ``0_{l}_{pos}`` is a feature of
  the same graph (circuit-tracer issue 78; see :mod:`ingest.graph`).
- link: ``source, target, weight``.

Works on any :class:`ingest.graph.AttributionGraph`, so the full and the pruned graph
export the same way.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ingest.errors import InvalidArgumentError
from ingest.graph import AttributionGraph, Node, NodeKind, cantor_pair, circuit_tracer_node_id

SCHEMA_VERSION = 1
FEATURE_TYPES = {
    NodeKind.FEATURE: "cross layer transcoder",
    NodeKind.ERROR: "mlp reconstruction error",
    NodeKind.TOKEN: "embedding",
    NodeKind.LOGIT: "logit",
}


def _layer_string(node: Node) -> str:
    if node.kind is NodeKind.TOKEN:
        return "E"
    if node.kind is NodeKind.LOGIT:
        return str(int(node.layer or 0) + 1)
    return str(node.layer)


def _clerp(node: Node) -> str:
    if node.label:
        return node.label
    if node.kind is NodeKind.TOKEN:
        return f'Emb: "{node.token}"'
    if node.kind is NodeKind.LOGIT:
        return f'Output "{node.token}" (p={node.token_prob or 0.0:.3f})'
    if node.kind is NodeKind.ERROR:
        return f"Err: mlp {node.layer}"
    return ""


def _js_node_id(node: Node) -> str:
    if node.kind is NodeKind.FEATURE:
        return f"{node.layer}_{node.feature}-{node.pos}"
    if node.kind is NodeKind.ERROR:
        return f"{node.layer}_err-{node.pos}"
    if node.kind is NodeKind.TOKEN:
        return f"E_{node.token_id}-{node.pos}"
    return f"L_{node.token_id}-{node.pos}"


def to_circuit_tracer_json(
    graph: AttributionGraph,
    *,
    slug: str | None = None,
    scan: str | None = None,
    transcoder_list: list[str] | None = None,
) -> dict[str, Any]:
    """The circuit-tracer graph JSON of ``graph`` as a dict (see the module docstring)."""
    meta = graph.metadata
    n_ctx = len(meta.tokens)
    taken = {n.node_id for n in graph.nodes if n.kind is not NodeKind.ERROR}
    ids = [circuit_tracer_node_id(n, taken) for n in graph.nodes]
    if len(set(ids)) != len(ids):
        raise InvalidArgumentError(
            f"graph {meta.graph_id!r} has duplicate node ids after export: validate it first"
        )
    nodes = []
    for node, node_id in zip(graph.nodes, ids, strict=True):
        feature = (
            cantor_pair(int(node.layer or 0), int(node.feature or 0))
            if node.kind is NodeKind.FEATURE
            else None
        )
        nodes.append(
            {
                "node_id": node_id,
                "feature": feature,
                "layer": _layer_string(node),
                "ctx_idx": node.pos,
                "feature_type": FEATURE_TYPES[node.kind],
                "token_prob": float(node.token_prob or 0.0),
                "is_target_logit": node.kind is NodeKind.LOGIT,
                "run_idx": 0,
                "reverse_ctx_idx": max(n_ctx - 1 - node.pos, 0) if n_ctx else 0,
                "jsNodeId": _js_node_id(node),
                "clerp": _clerp(node),
                "influence": node.influence,
                "activation": node.activation,
            }
        )
    links = [
        {"source": ids[s], "target": ids[t], "weight": float(w)}
        for s, t, w in zip(
            graph.sources.tolist(), graph.targets.tolist(), graph.weights.tolist(), strict=True
        )
    ]
    return {
        "metadata": {
            "slug": slug or meta.graph_id,
            "scan": scan or meta.model_id,
            "transcoder_list": transcoder_list if transcoder_list is not None else [meta.set_id],
            "prompt_tokens": list(meta.tokens),
            "prompt": meta.prompt,
            "node_threshold": meta.node_threshold,
            "schema_version": SCHEMA_VERSION,
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }


def write_json_atomic(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    final = Path(path)
    if final.is_dir():
        raise InvalidArgumentError(f"{final} is a directory: give a file path for the JSON")
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        payload = json.dumps(data, allow_nan=False).encode()
    except ValueError as exc:
        raise InvalidArgumentError(f"cannot write {final}: {exc}") from exc
    # Named here rather than by tempfile.mkstemp, whose 0600 would outlive the rename: the
    # file gets the permissions of any file this process creates.
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as fh:
            fh.write(payload)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def export_circuit_tracer_json(
    graph: AttributionGraph, path: str | os.PathLike[str], **kwargs: Any
) -> Path:
    """Write :func:`to_circuit_tracer_json` of ``graph`` to ``path`` atomically."""
    if not isinstance(graph, AttributionGraph):
        raise InvalidArgumentError(
            f"export_circuit_tracer_json takes an AttributionGraph, got {type(graph).__name__}"
            ": pass result.to_graph() (pruned) or result.to_graph(pruned=False)"
        )
    return write_json_atomic(to_circuit_tracer_json(graph, **kwargs), path)
