"""The output of attribution: the dense adjacency matrix with its node table.

:class:`AttributionResult` is what :func:`ingest.attribution.attribute` returns and
what the compact artifact stores. It holds the full, unpruned graph as a dense
``(n, n)`` matrix (rows targets, columns sources) in the
:class:`~ingest.attribution.layout.NodeLayout` order, one :class:`ingest.graph.Node`
per row, and the target logits' probabilities. :meth:`AttributionResult.to_graph`
turns it into an :class:`ingest.graph.AttributionGraph`, full or pruned (DESIGN 5.3),
with influences and graph scores filled in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ingest.attribution.layout import NodeLayout
from ingest.attribution.pruning import PruneResult, logit_weights, prune
from ingest.errors import InvalidArgumentError
from ingest.graph import AttributionGraph, GraphMetadata, Node, NodeKind

_KIND_ORDER = (NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TOKEN, NodeKind.LOGIT)


@dataclass
class AttributionResult:
    """A full attribution graph in dense form.

    adjacency: (n, n) float, rows targets; nodes: n nodes in layout order;
    logit_probs: (n_logits,) probabilities of the target logits (the logit weights).
    ``stats`` records how it was computed (backward passes, seconds, dtype, ...).
    ``node_weights``: (n,) optional weights of the output nodes for influence and
    pruning, set for custom targets such as one feature; by default the logit weights.
    """

    metadata: GraphMetadata
    layout: NodeLayout
    nodes: list[Node]
    adjacency: Tensor
    logit_probs: Tensor
    n_layers: int
    stats: dict[str, Any] = field(default_factory=dict)
    node_weights: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.layout.n
        if len(self.nodes) != n:
            raise InvalidArgumentError(
                f"the layout counts {n} nodes but {len(self.nodes)} were given"
            )
        if tuple(self.adjacency.shape) != (n, n):
            raise InvalidArgumentError(
                f"adjacency must have shape ({n}, {n}), got {tuple(self.adjacency.shape)}"
            )
        if tuple(self.logit_probs.shape) != (self.layout.n_logits,):
            raise InvalidArgumentError(
                f"logit_probs must have shape ({self.layout.n_logits},), "
                f"got {tuple(self.logit_probs.shape)}"
            )
        if self.node_weights is not None and tuple(self.node_weights.shape) != (n,):
            raise InvalidArgumentError(
                f"node_weights must have shape ({n},), got {tuple(self.node_weights.shape)}"
            )
        slices = (self.layout.features, self.layout.errors, self.layout.tokens, self.layout.logits)
        for kind, sl in zip(_KIND_ORDER, slices, strict=True):
            wrong = [nd.node_id for nd in self.nodes[sl] if nd.kind is not kind]
            if wrong:
                raise InvalidArgumentError(
                    f"nodes {wrong[:3]} sit in the {kind} range of the layout; order nodes as "
                    "features, errors, tokens, logits"
                )

    @property
    def n_nodes(self) -> int:
        return self.layout.n

    def check_prompt(self, input_ids: Tensor) -> None:
        """Raise InvalidArgumentError unless ``input_ids`` (1, T) is the graph's prompt:
        interventions and patching against a graph read its nodes at its positions. (A
        graph that records no token ids cannot be checked.)"""
        ids, own = input_ids.reshape(-1).tolist(), self.metadata.token_ids
        if own and ids != own:
            raise InvalidArgumentError(
                f"the prompt ({len(ids)} tokens, ids {ids[:6]}...) is not the one graph "
                f"{self.metadata.graph_id!r} was computed for ({len(own)} tokens, ids "
                f"{own[:6]}...): give the graph's own prompt"
            )

    def weights(self) -> Tensor:
        """(n,) float64 output weights: ``node_weights`` or the logit probabilities."""
        if self.node_weights is not None:
            return self.node_weights.double()
        return logit_weights(self.layout, self.logit_probs.double())

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """Node and edge masks at the given cumulative-influence thresholds."""
        return prune(
            self.adjacency,
            self.layout,
            self.weights(),
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
        )

    def to_graph(
        self,
        *,
        pruned: bool = True,
        node_threshold: float = 0.8,
        edge_threshold: float = 0.98,
    ) -> AttributionGraph:
        """The graph as an :class:`AttributionGraph`.

        Pruned (default): the nodes and edges kept by :meth:`prune`. Full: every node
        and every non-zero edge. Nodes carry their influence on the logits (computed on
        the full graph); the metadata carries the thresholds and the replacement and
        completeness scores of the full graph.
        """
        adjacency = self.adjacency
        result = self.prune(node_threshold, edge_threshold)
        if pruned:
            node_mask = result.node_mask
            edge_mask = result.edge_mask
        else:
            node_mask = torch.ones(self.layout.n, dtype=torch.bool)
            edge_mask = adjacency != 0
        kept = torch.nonzero(node_mask).flatten()
        new_index = torch.full((self.layout.n,), -1, dtype=torch.long)
        new_index[kept] = torch.arange(kept.numel())
        targets, sources = torch.nonzero(edge_mask, as_tuple=True)
        weights = adjacency[targets, sources]

        influence = result.node_influence
        nodes = [
            dataclasses.replace(self.nodes[i], influence=float(influence[i])) for i in kept.tolist()
        ]
        # Scores of the full graph, as circuit-tracer reports them: pruning drops the
        # low-influence error nodes, so a pruned graph's own scores would read near 1.
        scores = result.scores
        metadata = dataclasses.replace(
            self.metadata,
            node_threshold=node_threshold if pruned else None,
            edge_threshold=edge_threshold if pruned else None,
            replacement_score=scores.replacement,
            completeness_score=scores.completeness,
            extra={**self.metadata.extra, "pruned": pruned, "n_layers": self.n_layers},
        )
        return AttributionGraph(
            metadata=metadata,
            nodes=nodes,
            sources=new_index[sources].numpy().astype(np.int64),
            targets=new_index[targets].numpy().astype(np.int64),
            weights=weights.float().numpy(),
        )
