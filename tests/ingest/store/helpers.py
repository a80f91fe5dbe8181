"""Builders of small synthetic attribution graphs for the store tests.

A graph has token nodes at every position, ``feats`` feature nodes and one error
node per (layer, position), and logit nodes at the last position. Edges run from a
lower layer (tokens below layer 0, logits above the last layer) to a higher one, at
the same or a later position, each present with probability ``density``: a DAG like
a real attribution graph. Feature indices come from a small vocabulary so that
graphs share features.
"""

from __future__ import annotations

import networkx as nx
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

SET_ID = "synthetic-set"
MODEL_ID = "synthetic-model"
VOCAB = 6


def make_graph(
    graph_id: str,
    *,
    seed: int = 0,
    n_layers: int = 3,
    n_pos: int = 4,
    feats: int = 2,
    density: float = 0.5,
    task: str | None = "synthetic",
    prompt: str | None = None,
    model_id: str = MODEL_ID,
    set_id: str = SET_ID,
) -> AttributionGraph:
    rng = np.random.default_rng(seed)
    token_ids = [int(t) for t in rng.integers(100, 200, size=n_pos)]
    tokens = [f"tok{t}" for t in token_ids]
    nodes: list[Node] = []
    rank: list[int] = []
    for pos, tid in enumerate(token_ids):
        nodes.append(
            Node(
                token_node_id(tid, pos), NodeKind.TOKEN, None, pos, token_id=tid, token=tokens[pos]
            )
        )
        rank.append(-1)
    for layer in range(n_layers):
        for pos in range(n_pos):
            for index in sorted(rng.choice(VOCAB, size=feats, replace=False).tolist()):
                nodes.append(
                    Node(
                        feature_node_id(layer, index, pos),
                        NodeKind.FEATURE,
                        layer,
                        pos,
                        feature=index,
                        activation=float(rng.uniform(0.1, 5.0)),
                        influence=float(rng.uniform(0.0, 1.0)),
                    )
                )
                rank.append(layer)
            nodes.append(
                Node(
                    error_node_id(layer, pos),
                    NodeKind.ERROR,
                    layer,
                    pos,
                    influence=float(rng.uniform(0.0, 0.2)),
                )
            )
            rank.append(layer)
    for tid in (int(t) for t in rng.choice(np.arange(300, 400), size=2, replace=False)):
        nodes.append(
            Node(
                logit_node_id(n_layers, tid, n_pos - 1),
                NodeKind.LOGIT,
                n_layers,
                n_pos - 1,
                token_id=tid,
                token=f"out{tid}",
                token_prob=float(rng.uniform(0.1, 0.5)),
            )
        )
        rank.append(n_layers)
    src, dst = [], []
    for i, a in enumerate(nodes):
        for j, b in enumerate(nodes):
            if rank[i] < rank[j] and a.pos <= b.pos and rng.random() < density:
                src.append(i)
                dst.append(j)
    weights = rng.normal(size=len(src)).astype(np.float32)
    meta = GraphMetadata(
        graph_id=graph_id,
        model_id=model_id,
        set_id=set_id,
        prompt=prompt if prompt is not None else f"prompt of {graph_id}",
        tokens=tokens,
        token_ids=token_ids,
        node_threshold=0.8,
        edge_threshold=0.98,
        replacement_score=0.7,
        completeness_score=0.9,
        artifact_uri=f"file:///tmp/{graph_id}",
        task=task,
        extra={"seed": seed},
    )
    return AttributionGraph(meta, nodes, np.array(src), np.array(dst), weights)


def to_networkx(graph: AttributionGraph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n.node_id, node=n)
    for s, t, w in graph.edge_list():
        g.add_edge(s, t, weight=w)
    return g


def catalog(n_layers: int = 3, set_id: str = SET_ID) -> list[FeatureRecord]:
    """One catalog entry per (layer, index) of the synthetic vocabulary."""
    return [
        FeatureRecord(
            set_id,
            layer,
            index,
            density=0.01 * (index + 1),
            max_activation=float(index + 1),
            label=f"feature {index} of layer {layer}" if index % 2 == 0 else None,
            top_tokens=[f"t{index}", f"t{index + 1}"],
            top_examples=[{"text": f"example {index}", "activation": 1.5}],
            de_embedding_tokens=[f"d{index}"],
            output_tokens=[f"o{layer}"],
        )
        for layer in range(n_layers)
        for index in range(VOCAB)
    ]


def crash_in_edges(phase: str, done: int, total: int) -> None:
    """A write_graph ``on_batch`` callback that fails after the first batch of edges."""
    if phase == "edges" and done > 0:
        raise RuntimeError("simulated crash")
