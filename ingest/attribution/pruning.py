"""Influence, pruning and graph scores of a dense attribution matrix (DESIGN 5.3).

Following Ameisen et al. 2025 ("Circuit Tracing", section "Graph pruning") as
circuit-tracer implements it:

1. ``A_hat = |A|`` with each target row normalized to sum to 1 (all-zero rows stay 0).
2. Logit weights ``w``: the target logits' probabilities, zero elsewhere.
3. Influence ``= w (A_hat + A_hat^2 + ...) = w ((I - A_hat)^-1 - I)``. The graph is a
   DAG, so the nodes are put in a topological order (sources before targets), where
   ``I - A_hat`` is unit lower triangular, and the row vector is found by one triangular
   solve: O(n^2), exact, no truncated series.
4. Nodes are kept in descending influence until their cumulative share reaches
   ``node_threshold``; tokens and logits are always kept.
5. On the matrix restricted to kept nodes, re-normalized, edges are scored
   ``A_hat'[t, s] * (influence'_t + w_t)`` and kept until their cumulative share reaches
   ``edge_threshold``.
6. Repeat until stable: a feature or error node without a kept outgoing edge, or a
   feature without a kept incoming edge, is dropped with its edges.

Graph scores: replacement = influence(tokens) / (influence(tokens) + influence(errors));
completeness = sum_n (1 - error share of n's inputs)(influence_n + w_n) /
sum_n (influence_n + w_n).

All matrices here are ``(n, n)`` in the :class:`~ingest.attribution.layout.NodeLayout`
order, rows are targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ingest.attribution.layout import NodeLayout
from ingest.errors import InvalidArgumentError


def _check_square(adjacency: Tensor, layout: NodeLayout | None = None) -> None:
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise InvalidArgumentError(
            f"an adjacency matrix must be square (n, n), got {tuple(adjacency.shape)}"
        )
    if layout is not None and adjacency.shape[0] != layout.n:
        raise InvalidArgumentError(
            f"adjacency has {adjacency.shape[0]} nodes but the layout counts {layout.n}"
        )
    if not bool(torch.isfinite(adjacency).all()):
        raise InvalidArgumentError("the adjacency matrix holds NaN or infinite weights")


def normalize_matrix(adjacency: Tensor) -> Tensor:
    """``|A|`` with each row scaled to sum to 1; rows without inputs stay zero. (n, n)."""
    _check_square(adjacency)
    abs_adj = adjacency.abs()
    row_sums = abs_adj.sum(dim=1, keepdim=True)
    return abs_adj / row_sums.clamp_min(torch.finfo(abs_adj.dtype).tiny)


def topological_order(adjacency: Tensor) -> Tensor:
    """A permutation (n,) listing every source before each of its targets.

    Nodes are taken level by level (those with no remaining inputs first). Raises
    InvalidArgumentError when the non-zero pattern has a cycle.
    """
    _check_square(adjacency)
    mask = adjacency != 0
    if bool(mask.diagonal().any()):
        raise InvalidArgumentError("the attribution graph has a self-loop; it must be a DAG")
    n = mask.shape[0]
    remaining = torch.ones(n, dtype=torch.bool, device=mask.device)
    order: list[Tensor] = []
    while bool(remaining.any()):
        # A node is ready when none of its sources is still remaining.
        has_input = (mask & remaining[None, :]).any(dim=1)
        ready = remaining & ~has_input
        if not bool(ready.any()):
            raise InvalidArgumentError(
                "the attribution graph has a cycle; influence is defined only on a DAG"
            )
        order.append(torch.nonzero(ready).flatten())
        remaining &= ~ready
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)


def compute_influence(normalized: Tensor, weights: Tensor) -> Tensor:
    """``w ((I - A_hat)^-1 - I)`` for a normalized DAG matrix: (n,).

    normalized: (n, n) rows targets; weights: (n,). Solved exactly by one triangular
    solve in a topological order.
    """
    _check_square(normalized)
    if weights.shape != (normalized.shape[0],):
        raise InvalidArgumentError(
            f"weights must have shape ({normalized.shape[0]},), got {tuple(weights.shape)}"
        )
    n = normalized.shape[0]
    if n == 0:
        return weights.clone()
    perm = topological_order(normalized)
    a_p = normalized[perm][:, perm]  # strictly lower triangular: targets after sources
    eye = torch.eye(n, dtype=normalized.dtype, device=normalized.device)
    # x (I - A) = w  <=>  (I - A)^T x^T = w^T, and (I - A)^T is unit upper triangular.
    x_p = torch.linalg.solve_triangular(
        (eye - a_p).T, weights[perm].to(normalized.dtype)[:, None], upper=True
    ).flatten()
    x = torch.empty_like(x_p)
    x[perm] = x_p
    return x - weights.to(normalized.dtype)


def logit_weights(layout: NodeLayout, logit_probs: Tensor) -> Tensor:
    """(n,) vector with the target logits' probabilities in the logit slots.

    ``logit_probs`` may already be a full (n,) weight vector (a custom target, such as
    one feature, weighs its own node); it is then returned as it is.
    """
    if logit_probs.shape == (layout.n,):
        return logit_probs
    if logit_probs.shape != (layout.n_logits,):
        raise InvalidArgumentError(
            f"expected {layout.n_logits} logit probabilities, got {tuple(logit_probs.shape)}"
        )
    w = torch.zeros(layout.n, dtype=logit_probs.dtype, device=logit_probs.device)
    w[layout.logits] = logit_probs
    return w


def cumulative_threshold(scores: Tensor, share: float) -> float:
    """The smallest score kept when scores are taken in descending order until their
    cumulative share of the total reaches ``share``; ``inf`` when the total is 0."""
    if not 0.0 <= share <= 1.0:
        raise InvalidArgumentError(f"a threshold share must lie in [0, 1], got {share}")
    flat = scores.flatten()
    total = float(flat.sum())
    if flat.numel() == 0 or total <= 0.0:
        return float("inf")
    ordered = torch.sort(flat, descending=True).values
    cumulative = torch.cumsum(ordered, 0) / total
    # First index whose cumulative share reaches the threshold (tolerating rounding).
    reached = torch.nonzero(cumulative >= share - 1e-12).flatten()
    index = int(reached[0]) if reached.numel() else ordered.numel() - 1
    return float(ordered[index])


@dataclass
class PruneResult:
    """Which nodes and edges survive pruning, and the influences used.

    node_mask: (n,) bool; edge_mask: (n, n) bool (rows targets); node_influence: (n,)
    influence on the full graph; edge_scores: (n, n) scores on the node-pruned graph.
    """

    node_mask: Tensor
    edge_mask: Tensor
    node_influence: Tensor
    edge_scores: Tensor
    iterations: int


def prune(
    adjacency: Tensor,
    layout: NodeLayout,
    logit_probs: Tensor,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """Prune a dense attribution graph (see the module docstring for the algorithm).

    adjacency: (n, n) rows targets; logit_probs: (n_logits,), or a full (n,) weight
    vector. Tokens, logits and every node of positive weight are always kept.
    """
    _check_square(adjacency, layout)
    w = logit_weights(layout, logit_probs.to(adjacency.dtype))
    normalized = normalize_matrix(adjacency)
    influence = compute_influence(normalized, w)

    node_mask = influence >= cumulative_threshold(influence, node_threshold)
    node_mask[layout.tokens] = True
    node_mask[layout.logits] = True
    node_mask |= w > 0

    kept = adjacency * (node_mask[:, None] & node_mask[None, :])
    kept_norm = normalize_matrix(kept)
    kept_influence = compute_influence(kept_norm, w) + w
    edge_scores = kept_norm * kept_influence[:, None]
    edge_mask = edge_scores >= cumulative_threshold(edge_scores, edge_threshold)
    edge_mask &= kept != 0

    droppable = torch.zeros(layout.n, dtype=torch.bool, device=adjacency.device)
    droppable[layout.features] = True
    droppable[layout.errors] = True
    iterations = 0
    while True:
        iterations += 1
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        has_out = edge_mask.any(dim=0)
        has_in = edge_mask.any(dim=1)
        new_mask = node_mask.clone()
        new_mask[droppable] &= has_out[droppable]
        new_mask[layout.features] &= has_in[layout.features]
        new_mask |= w > 0
        if bool((new_mask == node_mask).all()):
            break
        node_mask = new_mask
    return PruneResult(
        node_mask=node_mask,
        edge_mask=edge_mask,
        node_influence=influence,
        edge_scores=edge_scores,
        iterations=iterations,
    )


@dataclass(frozen=True)
class GraphScores:
    """Replacement and completeness scores of a graph (both in [0, 1])."""

    replacement: float
    completeness: float


def graph_scores(adjacency: Tensor, layout: NodeLayout, logit_probs: Tensor) -> GraphScores:
    """Replacement and completeness of a dense graph (DESIGN 5.3). adjacency: (n, n)."""
    _check_square(adjacency, layout)
    w = logit_weights(layout, logit_probs.to(adjacency.dtype))
    normalized = normalize_matrix(adjacency)
    influence = compute_influence(normalized, w)
    token_inf = float(influence[layout.tokens].sum())
    error_inf = float(influence[layout.errors].sum())
    replacement = token_inf / (token_inf + error_inf) if token_inf + error_inf > 0 else 1.0
    non_error = 1.0 - normalized[:, layout.errors].sum(dim=1)
    output = influence + w
    total = float(output.sum())
    completeness = float((non_error * output).sum()) / total if total > 0 else 1.0
    return GraphScores(replacement=replacement, completeness=completeness)
