"""Influence, pruning and graph scores on hand-made and random DAGs."""

import math

import networkx as nx
import pytest
import torch

from ingest.attribution.layout import NodeLayout
from ingest.attribution.pruning import (
    compute_influence,
    cumulative_threshold,
    graph_scores,
    logit_weights,
    normalize_matrix,
    prune,
    topological_order,
)
from ingest.errors import InvalidArgumentError

pytestmark = pytest.mark.unit

# Nodes: f0 f1 | e0 | t0 t1 | L0
F0, F1, E0, T0, T1, L0 = range(6)
LAYOUT = NodeLayout(n_features=2, n_errors=1, n_tokens=2, n_logits=1)


def hand_graph() -> torch.Tensor:
    a = torch.zeros(6, 6, dtype=torch.float64)
    a[F0, T0], a[F0, T1] = 2.0, -2.0
    a[F1, F0], a[F1, E0] = 3.0, 1.0
    a[L0, F1], a[L0, F0], a[L0, T1] = 1.0, -1.0, 2.0
    return a


def test_normalize_rows_sum_to_one_and_empty_rows_stay_zero() -> None:
    norm = normalize_matrix(hand_graph())
    sums = norm.sum(dim=1)
    assert torch.allclose(sums[[F0, F1, L0]], torch.ones(3, dtype=torch.float64))
    assert torch.equal(sums[[E0, T0, T1]], torch.zeros(3, dtype=torch.float64))
    assert norm[L0, F0] == 0.25  # |A| is used, signs dropped


def test_influence_matches_hand_computation() -> None:
    w = logit_weights(LAYOUT, torch.tensor([0.6], dtype=torch.float64))
    inf = compute_influence(normalize_matrix(hand_graph()), w)
    # From L0: f1 .25, f0 .25, t1 .5; through f1: f0 += .25*.75, e0 += .25*.25;
    # through f0 (.4375): t0 += .21875, t1 += .21875.
    expected = torch.tensor([0.4375, 0.25, 0.0625, 0.21875, 0.71875, 0.0], dtype=torch.float64)
    assert torch.allclose(inf, 0.6 * expected, atol=1e-15)


def test_influence_equals_series_and_networkx_paths_on_random_dag() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 40
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = torch.tril(a, diagonal=-1) * (torch.rand(n, n, generator=gen) < 0.3)
    perm = torch.randperm(n, generator=gen)
    a = a[perm][:, perm]  # hide the triangular order
    w = torch.rand(n, generator=gen, dtype=torch.float64)
    norm = normalize_matrix(a)
    inf = compute_influence(norm, w)

    series = torch.zeros(n, dtype=torch.float64)
    term = w.clone()
    for _ in range(n):
        term = term @ norm
        series += term
    assert torch.allclose(inf, series, atol=1e-12)

    # Path-sum definition via networkx: influence_s = sum_t w_t * sum over paths t<-s.
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    for t, s in torch.nonzero(norm).tolist():
        g.add_edge(s, t, weight=float(norm[t, s]))
    paths = {v: 0.0 for v in range(n)}  # sum of path products from v to weighted targets
    for v in reversed(list(nx.topological_sort(g))):
        paths[v] = sum(
            d["weight"] * (paths[u] + float(w[u])) for _, u, d in g.out_edges(v, data=True)
        )
    assert torch.allclose(
        inf, torch.tensor([paths[v] for v in range(n)], dtype=torch.float64), atol=1e-12
    )


def test_topological_order_and_cycle_detection() -> None:
    a = hand_graph()
    order = topological_order(a).tolist()
    rank = {v: i for i, v in enumerate(order)}
    for t, s in torch.nonzero(a).tolist():
        assert rank[s] < rank[t]
    cyclic = torch.zeros(3, 3)
    cyclic[0, 1] = cyclic[1, 2] = cyclic[2, 0] = 1.0
    with pytest.raises(InvalidArgumentError, match="cycle"):
        topological_order(cyclic)
    with pytest.raises(InvalidArgumentError, match="square"):
        normalize_matrix(torch.zeros(2, 3))


def test_cumulative_threshold() -> None:
    scores = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert cumulative_threshold(scores, 0.5) == pytest.approx(0.5)
    assert cumulative_threshold(scores, 0.8) == pytest.approx(0.3)
    assert cumulative_threshold(scores, 0.85) == pytest.approx(0.1)
    assert cumulative_threshold(torch.zeros(3), 0.8) == math.inf
    with pytest.raises(InvalidArgumentError):
        cumulative_threshold(scores, 1.5)


def test_graph_scores_hand_computation() -> None:
    scores = graph_scores(hand_graph(), LAYOUT, torch.tensor([1.0], dtype=torch.float64))
    # tokens .9375, errors .0625
    assert scores.replacement == pytest.approx(0.9375)
    # every node's output share weighted by 1 - error share; only f1 reads the error (1/4)
    out = [0.4375, 0.25, 0.0625, 0.21875, 0.71875, 1.0]
    assert scores.completeness == pytest.approx((sum(out) - 0.25 * 0.25) / sum(out))


def test_prune_drops_feature_without_inputs_and_keeps_tokens_and_logits() -> None:
    # f2 writes to the logit but has no inputs: influential, yet pruned with its edge.
    layout = NodeLayout(n_features=3, n_errors=1, n_tokens=2, n_logits=1)
    a = torch.zeros(7, 7, dtype=torch.float64)
    f0, f1, f2, e0, t0, t1, lg = range(7)
    a[f0, t0] = 1.0
    a[f1, f0], a[f1, e0] = 2.0, 1.0
    a[lg, f1], a[lg, f2], a[lg, t1] = 2.0, 1.0, 0.5
    result = prune(
        a, layout, torch.tensor([1.0], dtype=torch.float64), node_threshold=1.0, edge_threshold=1.0
    )
    kept = set(torch.nonzero(result.node_mask).flatten().tolist())
    assert kept == {f0, f1, e0, t0, t1, lg}
    assert not bool(result.edge_mask[lg, f2])
    assert bool(result.edge_mask[lg, f1]) and bool(result.edge_mask[f0, t0])


def test_prune_invariants_on_random_graph() -> None:
    gen = torch.Generator().manual_seed(1)
    layout = NodeLayout(n_features=30, n_errors=6, n_tokens=4, n_logits=3)
    n = layout.n
    # Topological order: tokens, then features/errors interleaved by index, then logits.
    a = torch.zeros(n, n, dtype=torch.float64)
    sources = list(range(layout.tokens.start, layout.tokens.stop))
    for f in list(range(30)) + list(range(30, 36)):
        if f < 30:  # features read everything already placed
            k = min(len(sources), 5)
            pick = torch.randperm(len(sources), generator=gen)[:k]
            for p in pick.tolist():
                a[f, sources[p]] = float(torch.randn(1, generator=gen))
        sources.append(f)
    for lg in range(layout.logits.start, layout.logits.stop):
        a[lg, : layout.n_sources] = torch.randn(
            layout.n_sources, generator=gen, dtype=torch.float64
        )
    probs = torch.tensor([0.5, 0.3, 0.1], dtype=torch.float64)
    res = prune(a, layout, probs, node_threshold=0.6, edge_threshold=0.9)
    nm, em = res.node_mask, res.edge_mask
    assert bool(nm[layout.tokens].all()) and bool(nm[layout.logits].all())
    assert nm.sum() < n
    assert not bool((em & ~(nm[:, None] & nm[None, :])).any())
    assert not bool((em & (a == 0)).any())
    for i in torch.nonzero(nm).flatten().tolist():
        if i < layout.n_features + layout.n_errors:
            assert bool(em[:, i].any()), f"kept node {i} has no kept outgoing edge"
        if i < layout.n_features:
            assert bool(em[i].any()), f"kept feature {i} has no kept incoming edge"
    loose = prune(a, layout, probs, node_threshold=0.99, edge_threshold=0.99)
    assert int(loose.node_mask.sum()) >= int(nm.sum())
    assert int(loose.edge_mask.sum()) >= int(em.sum())


def _layered_graph(seed: int) -> tuple[torch.Tensor, NodeLayout]:
    """A random float32 graph shaped like an attribution graph: tokens, then 3 layers of
    features and errors reading tokens and earlier layers, then logits reading all."""
    gen = torch.Generator().manual_seed(seed)
    per_layer, layers, n_tokens, n_logits = 12, 3, 4, 3
    layout = NodeLayout(per_layer * layers, 2 * layers, n_tokens, n_logits)
    a = torch.zeros(layout.n, layout.n)
    sources = list(range(layout.tokens.start, layout.tokens.stop))
    for layer in range(layers):
        nodes = list(range(layer * per_layer, (layer + 1) * per_layer))
        nodes += [layout.errors.start + 2 * layer, layout.errors.start + 2 * layer + 1]
        for node in nodes:
            if node < layout.n_features:  # error nodes have no inputs
                weights = torch.randn(len(sources), generator=gen)
                weights[torch.rand(len(sources), generator=gen) < 0.5] = 0.0
                a[node, sources] = weights
        sources += nodes
    a[layout.logits, : layout.n_sources] = torch.randn(n_logits, layout.n_sources, generator=gen)
    return a, layout


def _reference_prune(
    a: torch.Tensor,
    layout: NodeLayout,
    w: torch.Tensor,
    node_threshold: float,
    edge_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The algorithm of the module doc written plainly on the whole (n, n) matrix:
    influence by a matrix inverse, steps 5 and 6 on the masked full matrix."""
    eye = torch.eye(layout.n, dtype=torch.float64)

    def influence(m: torch.Tensor) -> torch.Tensor:
        norm = m.abs() / m.abs().sum(1, keepdim=True).clamp_min(1e-300)
        return w @ (torch.linalg.inv(eye - norm) - eye), norm

    inf, _ = influence(a)
    node_mask = (inf >= cumulative_threshold(inf, node_threshold)) | (w > 0)
    node_mask[layout.tokens] = True
    kept = a * (node_mask[:, None] & node_mask[None, :])
    kept_inf, kept_norm = influence(kept)
    scores = kept_norm * (kept_inf + w)[:, None]
    edge_mask = (scores >= cumulative_threshold(scores, edge_threshold)) & (kept != 0)
    droppable = torch.zeros(layout.n, dtype=torch.bool)
    droppable[: layout.n_features + layout.n_errors] = True
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        new = node_mask & ~(droppable & ~edge_mask.any(0))
        new[layout.features] &= edge_mask[layout.features].any(1)
        new |= w > 0
        if torch.equal(new, node_mask):
            return node_mask, edge_mask, inf
        node_mask = new


@pytest.mark.parametrize("seed", range(6))
def test_pruning_equals_the_plain_algorithm_on_the_whole_matrix(seed: int) -> None:
    a, layout = _layered_graph(seed)
    probs = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    w = logit_weights(layout, probs)
    for node_threshold, edge_threshold in ((0.8, 0.98), (0.5, 0.7), (1.0, 1.0)):
        res = prune(a, layout, probs, node_threshold=node_threshold, edge_threshold=edge_threshold)
        node_mask, edge_mask, inf = _reference_prune(
            a.double(), layout, w, node_threshold, edge_threshold
        )
        torch.testing.assert_close(res.node_influence, inf, rtol=1e-10, atol=1e-12)
        assert torch.equal(res.node_mask, node_mask)
        assert torch.equal(res.edge_mask, edge_mask)
        # the float32 matrix is pruned in float64: as its float64 copy is
        again = prune(
            a.double(), layout, probs, node_threshold=node_threshold, edge_threshold=edge_threshold
        )
        assert torch.equal(again.node_mask, res.node_mask)
        assert torch.equal(again.edge_mask, res.edge_mask)
        assert again.scores == res.scores == graph_scores(a, layout, probs)


def test_nan_and_inf_are_refused_but_huge_finite_weights_are_not() -> None:
    a = hand_graph()
    huge = a * 5e307  # finite entries whose sum overflows to inf
    assert bool(torch.isfinite(huge).all()) and not math.isfinite(float(huge.sum()))
    assert prune(huge, LAYOUT, torch.tensor([1.0], dtype=torch.float64)).node_mask[L0]
    for bad in (math.nan, math.inf, -math.inf):
        broken = a.clone()
        broken[F1, F0] = bad
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            prune(broken, LAYOUT, torch.tensor([1.0], dtype=torch.float64))
