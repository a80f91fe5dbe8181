"""Every query of docs/cypher.md, run against the store and checked against Python.

The cookbook's code blocks are parsed from the markdown, so a query edited there is
re-checked here. The known data: three complete graphs of one task (and one graph
of that task left incomplete, which no query may report), with a catalog where
even feature indices carry labels.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pytest

from ingest.graph import AttributionGraph
from ingest.store.base import GraphStore
from tests.ingest.store.helpers import catalog, crash_in_edges, make_graph, to_networkx

pytestmark = pytest.mark.integration

COOKBOOK = Path(__file__).resolve().parents[3] / "docs" / "cypher.md"


def cookbook() -> dict[int, str]:
    text = COOKBOOK.read_text()
    sections = re.split(r"^### (\d+)\. .*$", text, flags=re.M)
    queries = {}
    for number, body in zip(sections[1::2], sections[2::2], strict=True):
        blocks = re.findall(r"```cypher\n(.*?)```", body, flags=re.S)
        assert len(blocks) == 1, f"section {number} should hold one cypher block"
        queries[int(number)] = blocks[0]
    return queries


@dataclass
class Known:
    uid: str
    task: str
    set_id: str
    graphs: list[AttributionGraph]

    @property
    def first(self) -> AttributionGraph:
        return self.graphs[0]


@pytest.fixture(scope="module")
def known(store: GraphStore) -> Known:
    uid = uuid.uuid4().hex[:8]
    task, set_id = f"cook-{uid}", f"{uid}-cookset"
    graphs = [
        make_graph(
            f"{uid}-cook-{i}",
            seed=40 + i,
            task=task,
            set_id=set_id,
            model_id=f"{uid}-m{i % 2}",
            density=0.45,
        )
        for i in range(4)
    ]
    for graph in graphs[:3]:
        store.write_graph(graph)
    with pytest.raises(RuntimeError):  # left incomplete on purpose
        store.write_graph(graphs[3], on_batch=crash_in_edges)
    store.upsert_features(catalog(set_id=set_id))
    return Known(uid, task, set_id, graphs[:3])


def _features(graph: AttributionGraph) -> list[Any]:
    return [n for n in graph.nodes if n.kind == "feature"]


def q1(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    g = to_networkx(k.first)
    source, target = k.first.nodes[0].node_id, k.first.nodes[-1].node_id

    def strength(p: list[str]) -> float:
        return float(np.prod([abs(g.edges[a, b]["weight"]) for a, b in itertools.pairwise(p)]))

    want = sorted(nx.all_simple_paths(g, source, target, cutoff=4), key=strength, reverse=True)

    def check(rows: list[dict[str, Any]]) -> None:
        assert [r["path"] for r in rows] == want[:3]
        assert [r["strength"] for r in rows] == pytest.approx([strength(p) for p in want[:3]])

    params = {"graph_id": k.first.graph_id, "source_id": source, "target_id": target, "k": 3}
    return params, check


def q2(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    by_layer: dict[int, list[Any]] = defaultdict(list)
    for n in _features(k.first):
        by_layer[n.layer].append(n)
    want = [
        {
            "layer": layer,
            "top_features": [
                n.node_id for n in sorted(ns, key=lambda n: (-n.influence, n.node_id))[:2]
            ],
        }
        for layer, ns in sorted(by_layer.items())
    ]
    return {"graph_id": k.first.graph_id, "k": 2}, lambda rows: _eq(rows, want)


def q3(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    strength: Counter[str] = Counter()
    for s, t, w in k.first.edge_list():
        strength[s] += abs(w)
        strength[t] += abs(w)
    top = sorted(strength.items(), key=lambda kv: (-kv[1], kv[0]))[:5]

    def check(rows: list[dict[str, Any]]) -> None:
        assert [r["node_id"] for r in rows] == [n for n, _ in top]
        assert [r["strength"] for r in rows] == pytest.approx([s for _, s in top])
        assert rows[0]["kind"] == k.first.node(top[0][0]).kind

    return {"graph_id": k.first.graph_id, "k": 5}, check


def q4(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    layer, index = 1, 3
    want = []
    for graph in k.graphs:
        hits = sorted(
            (n for n in _features(graph) if n.layer == layer and n.feature == index),
            key=lambda n: -n.activation,
        )
        if hits:
            want.append(
                {
                    "graph_id": graph.graph_id,
                    "prompt": graph.metadata.prompt,
                    "positions": [n.pos for n in hits],
                    "max_activation": hits[0].activation,
                }
            )
    assert want
    return {"set_id": k.set_id, "layer": layer, "index": index}, lambda rows: _eq(rows, want)


def q5(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    sets = [{(n.layer, n.feature) for n in _features(g)} for g in k.graphs]
    shared = sorted(set.intersection(*sets))
    assert shared and shared != sorted(set.union(*sets))
    want = [{"layer": a, "feature": b} for a, b in shared]
    return {"task": k.task}, lambda rows: _eq(rows, want)


def q6(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    want = []
    for graph in k.graphs:
        kinds = [n.kind for n in graph.nodes]
        w = np.abs(graph.weights.astype(np.float64))
        err = w[[kinds[s] == "error" for s in graph.sources.tolist()]].sum()
        want.append({"graph_id": graph.graph_id, "error_share": pytest.approx(err / w.sum())})
    return {"task": k.task}, lambda rows: _eq(rows, want)


def q7(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    logit = k.first.nodes[-1].node_id
    ins = sorted(
        ((s, w) for s, t, w in k.first.edge_list() if t == logit), key=lambda e: (-abs(e[1]), e[0])
    )[:4]
    want = [{"source": s, "kind": k.first.node(s).kind, "weight": w} for s, w in ins]
    return {"graph_id": k.first.graph_id, "logit_id": logit, "k": 4}, lambda rows: _eq(rows, want)


def q8(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    flow: Counter[tuple[int, int]] = Counter()
    for s, t, w in k.first.edge_list():
        a, b = k.first.node(s).layer, k.first.node(t).layer
        if a is not None and b is not None:
            flow[(a, b)] += abs(w)
    want = [
        {"from_layer": a, "to_layer": b, "flow": pytest.approx(v)}
        for (a, b), v in sorted(flow.items())
    ]
    return {"graph_id": k.first.graph_id}, lambda rows: _eq(rows, want)


def _mean_acts(k: Known) -> dict[tuple[int, int], float]:
    acts: dict[tuple[int, int], list[float]] = defaultdict(list)
    for graph in k.graphs:
        for n in _features(graph):
            acts[(n.layer, n.feature)].append(n.activation)
    return {key: float(np.mean(v)) for key, v in acts.items()}


def q9(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    labels = {(f.layer, f.index): f.label for f in catalog(set_id=k.set_id)}
    top = sorted(_mean_acts(k).items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    want = [
        {"layer": a, "feature": b, "mean_act": pytest.approx(v), "label": labels[(a, b)]}
        for (a, b), v in top
    ]
    assert {w["label"] is None for w in want} == {True, False}, "want labelled and unlabelled"
    return {"task": k.task, "k": 5}, lambda rows: _eq(rows, want)


def q10(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    per: dict[str, list[AttributionGraph]] = defaultdict(list)
    for g in k.graphs:
        per[g.metadata.model_id].append(g)
    want = [
        {
            "model_id": m,
            "graphs": len(gs),
            "mean_nodes": pytest.approx(np.mean([g.n_nodes for g in gs])),
            "mean_edges": pytest.approx(np.mean([g.n_edges for g in gs])),
        }
        for m, gs in sorted(per.items())
    ]
    return {"model_prefix": f"{k.uid}-m"}, lambda rows: _eq(rows, want)


def q11(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    labelled = {(f.layer, f.index) for f in catalog(set_id=k.set_id) if f.label}
    seen: Counter[tuple[int, int]] = Counter()
    for g in k.graphs:
        for key in {(n.layer, n.feature) for n in _features(g)}:
            seen[key] += 1
    top = sorted(
        ((key, c) for key, c in seen.items() if key not in labelled), key=lambda kv: (-kv[1], kv[0])
    )[:4]
    want = [{"layer": a, "feature": b, "graphs": c} for (a, b), c in top]
    return {"task": k.task, "k": 4}, lambda rows: _eq(rows, want)


def q12(k: Known) -> tuple[dict[str, Any], Callable[[list[dict[str, Any]]], None]]:
    graphs_of: dict[tuple[int, int, int, int], set[str]] = defaultdict(set)
    weights: dict[tuple[int, int, int, int], list[float]] = defaultdict(list)
    for g in k.graphs:
        for s, t, w in g.edge_list():
            a, b = g.node(s), g.node(t)
            if a.kind == "feature" and b.kind == "feature":
                key = (a.layer, a.feature, b.layer, b.feature)
                graphs_of[key].add(g.graph_id)
                weights[key].append(w)
    rows_want = sorted(
        ((key, len(gs)) for key, gs in graphs_of.items() if len(gs) >= 3),
        key=lambda kv: (-kv[1], kv[0]),
    )
    assert rows_want
    want = [
        {
            "src_layer": a,
            "src_feature": b,
            "dst_layer": c,
            "dst_feature": d,
            "graphs": n,
            "mean_weight": pytest.approx(np.mean(weights[(a, b, c, d)])),
        }
        for (a, b, c, d), n in rows_want
    ]
    return {"task": k.task, "min_graphs": 3}, lambda rows: _eq(rows, want)


def _eq(rows: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert rows == want


CHECKS = {1: q1, 2: q2, 3: q3, 4: q4, 5: q5, 6: q6, 7: q7, 8: q8, 9: q9, 10: q10, 11: q11, 12: q12}


def test_every_cookbook_query_is_checked() -> None:
    assert sorted(cookbook()) == sorted(CHECKS)
    assert len(CHECKS) >= 10


@pytest.mark.parametrize("number", sorted(CHECKS))
def test_cookbook_query(store: GraphStore, known: Known, number: int) -> None:
    params, check = CHECKS[number](known)
    rows = store.query(cookbook()[number], params)
    assert rows, f"query {number} returned nothing on the known graphs"
    check(rows)
