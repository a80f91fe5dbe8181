"""Small synthetic attribution graphs and features for the service tests and benchmark.

:func:`layered_graph` builds a graph with ``n_tokens`` token nodes, ``width`` feature
nodes per layer for ``n_layers`` layers, one error node per layer and ``n_logits``
logit nodes, with every node of one layer connected to every node of the next layer
(tokens -> layer 0 -> ... -> last layer -> logits). Weights are deterministic
functions of the endpoints, distinct in absolute value, so top-k and path rankings
have one right answer.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import numpy as np

from ingest.graph import (
    AttributionGraph,
    FeatureRecord,
    GraphMetadata,
    Node,
    NodeKind,
    error_node_id,
    feature_node_id,
    logit_node_id,
    token_node_id,
)

if TYPE_CHECKING:
    from ingest.attribution.result import AttributionResult

SET_ID = "test-set"
MODEL_ID = "test-model"


def layered_graph(
    graph_id: str,
    *,
    n_layers: int = 2,
    width: int = 3,
    n_tokens: int = 2,
    n_logits: int = 1,
    model_id: str = MODEL_ID,
    task: str | None = "toy",
    prompt: str = "a b",
) -> AttributionGraph:
    pos = n_tokens - 1
    token_ids = list(range(100, 100 + n_tokens))
    layers: list[list[Node]] = [
        [
            Node(token_node_id(t, p), NodeKind.TOKEN, None, p, token_id=t, token=f"t{p}")
            for p, t in enumerate(token_ids)
        ]
    ]
    for layer in range(n_layers):
        row = [
            Node(
                feature_node_id(layer, i, pos),
                NodeKind.FEATURE,
                layer,
                pos,
                feature=i,
                activation=1.0 + i,
                influence=0.5 / (1 + i),
            )
            for i in range(width)
        ]
        row.append(Node(error_node_id(layer, pos), NodeKind.ERROR, layer, pos, influence=0.01))
        layers.append(row)
    layers.append(
        [
            Node(
                logit_node_id(n_layers, 500 + j, pos),
                NodeKind.LOGIT,
                n_layers,
                pos,
                token_id=500 + j,
                token=f"out{j}",
                token_prob=0.9 / (1 + j),
            )
            for j in range(n_logits)
        ]
    )
    nodes = [n for row in layers for n in row]
    index = {n.node_id: i for i, n in enumerate(nodes)}
    sources, targets, weights = [], [], []
    for lower, upper in itertools.pairwise(layers):
        for a, src in enumerate(lower):
            for b, dst in enumerate(upper):
                sources.append(index[src.node_id])
                targets.append(index[dst.node_id])
                sign = 1.0 if (a + b) % 2 == 0 else -1.0
                weights.append(sign * (1.0 + a + 0.01 * b) / (1 + len(sources) * 1e-4))
    metadata = GraphMetadata(
        graph_id=graph_id,
        model_id=model_id,
        set_id=SET_ID,
        prompt=prompt,
        tokens=[f"t{p}" for p in range(n_tokens)],
        token_ids=token_ids,
        node_threshold=0.8,
        edge_threshold=0.98,
        replacement_score=0.6,
        completeness_score=0.75,
        task=task,
    )
    return AttributionGraph(
        metadata,
        nodes,
        np.array(sources, dtype=np.int64),
        np.array(targets, dtype=np.int64),
        np.array(weights, dtype=np.float32),
    )


def features(n_layers: int = 2, width: int = 3) -> list[FeatureRecord]:
    return [
        FeatureRecord(
            set_id=SET_ID,
            layer=layer,
            index=i,
            density=0.01 * (i + 1),
            max_activation=2.0 + i,
            label=f"layer {layer} feature {i}" if i % 2 == 0 else None,
            top_tokens=[f"tok{i}", "common"],
            # the shape feature_stats writes: window and position are integers
            top_examples=[
                {"window": i, "position": 3, "activation": 1.5, "token": "w3", "context": "w1 w3"}
            ],
        )
        for layer in range(n_layers)
        for i in range(width)
    ]


def layered_result(graph_id: str, **kwargs: object) -> AttributionResult:
    """The full (dense) form of :func:`layered_graph`, as attribution would return it."""
    import torch

    from ingest.attribution.layout import NodeLayout
    from ingest.attribution.result import AttributionResult

    graph = layered_graph(graph_id, **kwargs)  # type: ignore[arg-type]
    order = (NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TOKEN, NodeKind.LOGIT)
    nodes = sorted(graph.nodes, key=lambda n: order.index(n.kind))
    nodes = [dataclasses.replace(n, influence=None) for n in nodes]
    index = {n.node_id: i for i, n in enumerate(nodes)}
    adjacency = torch.zeros(len(nodes), len(nodes), dtype=torch.float32)  # (n, n) rows targets
    for source, target, weight in graph.edge_list():
        adjacency[index[target], index[source]] = weight
    counts = {k: sum(n.kind is k for n in nodes) for k in order}
    layout = NodeLayout(*(counts[k] for k in order))
    logit_probs = torch.tensor([n.token_prob for n in nodes if n.kind is NodeKind.LOGIT])
    n_layers = max(n.layer for n in nodes if n.kind is NodeKind.ERROR) + 1
    return AttributionResult(graph.metadata, layout, nodes, adjacency, logit_probs, n_layers)


def random_graph(
    graph_id: str,
    *,
    n_nodes: int,
    n_edges: int,
    seed: int,
    acyclic: bool = True,
    weight_levels: int | None = None,
    self_loops: int = 0,
    duplicate_edges: int = 0,
    task: str = "cache",
    model_id: str = "cache-model",
    set_id: str = "cache-set",
) -> AttributionGraph:
    """A random graph of feature nodes with distinct ids of varied length (so string
    order differs from node order) and ``n_edges`` distinct (source, target) pairs.

    ``acyclic``: edges run forward in a random topological order (not the node
    order). ``weight_levels``: weights take that many magnitudes (with both signs), so
    top-k rankings hinge on the id tie-break; else normal weights, all distinct.
    ``self_loops`` / ``duplicate_edges`` add that many of each (stores accept both).
    """
    rng = np.random.default_rng(seed)
    nodes = [
        Node(
            feature_node_id(int(layer), int(index), 0),
            NodeKind.FEATURE,
            int(layer),
            0,
            feature=int(index),
            activation=float(rng.uniform(0.1, 3.0)),
        )
        for layer, index in zip(
            rng.integers(0, 12, n_nodes),
            rng.choice(5000, size=n_nodes, replace=False),
            strict=True,
        )
    ]
    topo = rng.permutation(n_nodes)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_edges:
        a, b = (int(x) for x in rng.choice(n_nodes, size=2, replace=False))
        if acyclic:
            a, b = sorted((a, b), key=lambda i: topo[i])
        pairs.add((a, b))
    edges = sorted(pairs)
    edges += [(int(i), int(i)) for i in rng.choice(n_nodes, size=self_loops, replace=False)]
    edges += [edges[int(i)] for i in rng.choice(n_edges, size=duplicate_edges, replace=False)]
    order = rng.permutation(len(edges))
    sources = np.array([edges[i][0] for i in order], dtype=np.int64)
    targets = np.array([edges[i][1] for i in order], dtype=np.int64)
    if weight_levels is None:
        weights = rng.normal(0.0, 1.0, len(edges))
    else:
        weights = rng.integers(1, weight_levels + 1, len(edges)) * rng.choice(
            [-0.5, 0.5], len(edges)
        )
    metadata = GraphMetadata(
        graph_id=graph_id,
        model_id=model_id,
        set_id=set_id,
        prompt=f"random graph {seed}",
        tokens=["r"],
        token_ids=[1],
        task=task,
    )
    return AttributionGraph(metadata, nodes, sources, targets, weights.astype(np.float32))
