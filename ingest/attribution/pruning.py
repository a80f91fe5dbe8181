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
    if not _all_finite(adjacency):
        raise InvalidArgumentError("the adjacency matrix holds NaN or infinite weights")


def _all_finite(matrix: Tensor) -> bool:
    """Whether every entry is finite, without a temporary the size of the matrix: a NaN
    or an infinity makes the sum non-finite; only then (or if finite entries overflow
    the sum) are the rows checked, a block at a time."""
    if bool(torch.isfinite(matrix.sum())):
        return True
    rows = max(1, _COLUMN_BLOCK_ENTRIES // max(matrix.shape[-1], 1))
    return all(bool(torch.isfinite(part).all()) for part in matrix.split(rows))


def normalize_matrix(adjacency: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``|A|`` with each row scaled to sum to 1; rows without inputs stay zero. (n, n),
    in ``dtype`` (default: the input's), made in one copy."""
    _check_square(adjacency)
    out = adjacency.to(dtype or adjacency.dtype, copy=True).abs_()
    out /= out.sum(dim=1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out


def topological_levels(adjacency: Tensor) -> list[Tensor]:
    """The nodes level by level: those with no inputs first, then those whose inputs all
    lie in earlier levels, and so on (so no edge joins two nodes of one level). Raises
    InvalidArgumentError when the non-zero pattern has a cycle."""
    _check_square(adjacency)
    mask = adjacency != 0
    if bool(mask.diagonal().any()):
        raise InvalidArgumentError("the attribution graph has a self-loop; it must be a DAG")
    remaining = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    levels: list[Tensor] = []
    while bool(remaining.any()):
        # A node is ready when none of its sources is still remaining.
        has_input = (mask & remaining[None, :]).any(dim=1)
        ready = remaining & ~has_input
        if not bool(ready.any()):
            raise InvalidArgumentError(
                "the attribution graph has a cycle; influence is defined only on a DAG"
            )
        levels.append(torch.nonzero(ready).flatten())
        remaining &= ~ready
    return levels


def topological_order(adjacency: Tensor) -> Tensor:
    """A permutation (n,) listing every source before each of its targets."""
    levels = topological_levels(adjacency)
    return torch.cat(levels) if levels else torch.zeros(0, dtype=torch.long)


# Columns of the matrix read at once by compute_influence: about 4M entries.
_COLUMN_BLOCK_ENTRIES = 1 << 22


def compute_influence(normalized: Tensor, weights: Tensor) -> Tensor:
    """``w ((I - A_hat)^-1 - I)`` for a normalized DAG matrix: (n,).

    normalized: (n, n) rows targets; weights: (n,). ``x = w (I - A_hat)^-1`` solves
    ``x_s = w_s + sum_t x_t A_hat[t, s]``: every target of a node lies in a later
    topological level, so the levels are solved last to first, each exactly, reading a
    block of columns at a time (no copy of the matrix).
    """
    _check_square(normalized)
    n = normalized.shape[0]
    if weights.shape != (n,):
        raise InvalidArgumentError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    w = weights.to(normalized.dtype)
    x = w.clone()
    block = max(1, _COLUMN_BLOCK_ENTRIES // max(n, 1))
    for level in reversed(topological_levels(normalized)):
        # Within a level no node feeds another, so its columns are solved together.
        for columns in level.split(block):
            x[columns] = w[columns] + x @ normalized[:, columns]
    return x - w


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
    # Only positive scores can carry a share: sort those (graphs are mostly zeros).
    positive = flat[flat > 0]
    ordered = torch.sort(positive, descending=True).values
    cumulative = torch.cumsum(ordered, 0) / total
    # First index whose cumulative share reaches the threshold (tolerating rounding).
    reached = torch.nonzero(cumulative >= share - 1e-12).flatten()
    if reached.numel():
        return float(ordered[int(reached[0])])
    # rounding left the positives short of the share: every score is kept
    return 0.0 if positive.numel() < flat.numel() else float(ordered[-1])


@dataclass(frozen=True)
class GraphScores:
    """Replacement and completeness scores of a graph (both in [0, 1])."""

    replacement: float
    completeness: float


@dataclass
class PruneResult:
    """Which nodes and edges survive pruning, the influences used, and the full graph's
    scores.

    node_mask: (n,) bool; edge_mask: (n, n) bool (rows targets); node_influence: (n,)
    influence on the full graph; scores: the full graph's :class:`GraphScores`.
    """

    node_mask: Tensor
    edge_mask: Tensor
    node_influence: Tensor
    scores: GraphScores
    iterations: int


def _scores(normalized: Tensor, influence: Tensor, w: Tensor, layout: NodeLayout) -> GraphScores:
    """Replacement and completeness (module doc) from the normalized full graph."""
    token_inf = float(influence[layout.tokens].sum())
    error_inf = float(influence[layout.errors].sum())
    replacement = token_inf / (token_inf + error_inf) if token_inf + error_inf > 0 else 1.0
    non_error = 1.0 - normalized[:, layout.errors].sum(dim=1)
    output = influence + w
    total = float(output.sum())
    completeness = float((non_error * output).sum()) / total if total > 0 else 1.0
    return GraphScores(replacement=replacement, completeness=completeness)


def prune(
    adjacency: Tensor,
    layout: NodeLayout,
    logit_probs: Tensor,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """Prune a dense attribution graph (see the module docstring for the algorithm).

    adjacency: (n, n) rows targets, any float dtype (computed in float64);
    logit_probs: (n_logits,), or a full (n,) weight vector. Tokens, logits and every
    node of positive weight are always kept.

    Memory: one float64 copy of the matrix for the node influence, then only the
    (k, k) block of the k nodes kept, on which steps 5 and 6 run (a dropped node's
    rows and columns are zero there): about 3x the float32 adjacency at the peak.
    """
    _check_square(adjacency, layout)
    w = logit_weights(layout, logit_probs.to(torch.float64))
    normalized = normalize_matrix(adjacency, torch.float64)
    influence = compute_influence(normalized, w)
    scores = _scores(normalized, influence, w, layout)
    del normalized

    node_mask = influence >= cumulative_threshold(influence, node_threshold)
    node_mask[layout.tokens] = True
    node_mask[layout.logits] = True
    node_mask |= w > 0

    kept = torch.nonzero(node_mask).flatten()
    block = adjacency[kept[:, None], kept[None, :]]
    kept_norm = normalize_matrix(block, torch.float64)
    kept_w = w[kept]
    kept_influence = compute_influence(kept_norm, kept_w) + kept_w
    edge_scores = kept_norm.mul_(kept_influence[:, None])
    sub_edges = edge_scores >= cumulative_threshold(edge_scores, edge_threshold)
    sub_edges &= block != 0
    del block, kept_norm, edge_scores

    # the layout orders features, errors, tokens, logits
    is_feature = kept < layout.n_features
    droppable = kept < layout.n_features + layout.n_errors  # features and errors
    weighted = kept_w > 0
    sub_nodes = torch.ones(kept.numel(), dtype=torch.bool, device=adjacency.device)
    iterations = 0
    while True:
        iterations += 1
        sub_edges &= sub_nodes[:, None] & sub_nodes[None, :]
        has_out = sub_edges.any(dim=0)
        has_in = sub_edges.any(dim=1)
        new_nodes = sub_nodes.clone()
        new_nodes[droppable] &= has_out[droppable]
        new_nodes[is_feature] &= has_in[is_feature]
        new_nodes |= weighted
        if bool((new_nodes == sub_nodes).all()):
            break
        sub_nodes = new_nodes

    node_mask = torch.zeros_like(node_mask)
    node_mask[kept] = sub_nodes
    edge_mask = torch.zeros(adjacency.shape, dtype=torch.bool, device=adjacency.device)
    edge_mask[kept[:, None], kept[None, :]] = sub_edges
    return PruneResult(
        node_mask=node_mask,
        edge_mask=edge_mask,
        node_influence=influence,
        scores=scores,
        iterations=iterations,
    )


def graph_scores(adjacency: Tensor, layout: NodeLayout, logit_probs: Tensor) -> GraphScores:
    """Replacement and completeness of a dense graph (DESIGN 5.3). adjacency: (n, n),
    computed in float64."""
    _check_square(adjacency, layout)
    w = logit_weights(layout, logit_probs.to(torch.float64))
    normalized = normalize_matrix(adjacency, torch.float64)
    return _scores(normalized, compute_influence(normalized, w), w, layout)
