"""The graph store over Bolt: one implementation for Neo4j 5 and embedded ArcadeDB.

Connections and transactions are in :mod:`ingest.store.session`, graph writes (atomic
to readers, repaired on rerun) in :mod:`ingest.store.writes`; this module holds the
catalog and the reads. ``get_graph``, ``subgraph`` and ``strongest_paths`` read the
graph's ``write_id`` at the start and the end of one read transaction (``get_graph``
also checks the counts), so an answer never mixes two versions of a graph rewritten
under the reader: it is retried once, then FailedPreconditionError. ``subgraph``
expands breadth-first, one query per hop for the whole frontier; ``strongest_paths`` is
one variable-length match ranked in Cypher.

Every statement comes from :mod:`ingest.store.cypher`; values are parameters; every
transaction carries the database name and a timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from neo4j import ManagedTransaction

from ingest.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from ingest.graph import (
    AttributionGraph,
    FeatureRecord,
    ModelRecord,
    TranscoderSetRecord,
)
from ingest.store import cursors, cypher, writes
from ingest.store.base import (
    BatchCallback,
    Direction,
    FeatureOccurrence,
    GraphRevision,
    GraphStore,
    GraphSummary,
    Page,
    Path,
    PathScore,
)
from ingest.store.records import (
    feature_from_props,
    feature_props,
    node_from_props,
    summary_from_props,
)
from ingest.store.session import BoltConnection, check_range
from ingest.store.session import rows as record_rows

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PAGE = 1000


class BoltGraphStore(BoltConnection, GraphStore):
    """:class:`GraphStore` over the official ``neo4j`` driver (construct it with a
    StoreConfig, as :class:`BoltConnection`)."""

    # ------------------------------------------------------------------ catalog writes
    def upsert_model(self, model: ModelRecord, *, timeout: float | None = None) -> None:
        props = {k: v for k, v in vars(model).items() if v is not None}
        self.write_rows(
            cypher.UPSERT_MODEL,
            {"model_id": model.model_id, "props": props},
            timeout,
            f"store model {model.model_id!r}",
        )

    def upsert_transcoder_set(
        self, tset: TranscoderSetRecord, *, timeout: float | None = None
    ) -> None:
        props = {k: v for k, v in vars(tset).items() if v is not None}
        self.write_rows(
            cypher.UPSERT_TRANSCODER_SET,
            {"set_id": tset.set_id, "props": props},
            timeout,
            f"store transcoder set {tset.set_id!r}",
        )

    def upsert_features(
        self,
        features: Iterable[FeatureRecord],
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> int:
        size = batch_size or self.config.batch_size
        rows = [
            {"set_id": f.set_id, "layer": f.layer, "index": f.index, "props": feature_props(f)}
            for f in features
        ]
        for start in range(0, len(rows), size):
            self.write_rows(
                cypher.UPSERT_FEATURES,
                {"rows": rows[start : start + size]},
                timeout,
                "store features",
            )
        return len(rows)

    def set_feature_label(
        self,
        set_id: str,
        layer: int,
        index: int,
        label: str | None,
        *,
        timeout: float | None = None,
    ) -> FeatureRecord:
        if label is not None and len(label) > 1000:
            raise InvalidArgumentError("a feature label holds at most 1000 characters")
        self._check_labelable(set_id, layer, index, timeout)
        rows = self.write_rows(
            cypher.SET_FEATURE_LABEL,
            {"set_id": set_id, "layer": layer, "index": index, "label": label or None},
            timeout,
            "label a feature",
        )
        return feature_from_props(rows[0]["p"])

    def _check_labelable(self, set_id: str, layer: int, index: int, timeout: float | None) -> None:
        """A label goes on a catalog entry, or on a latent of a registered set that
        exists (index below its width, layer below its model's depth, where recorded)."""
        key = {"set_id": set_id, "layer": layer, "index": index}
        if self.read_rows(cypher.GET_FEATURE, key, timeout, "read a feature"):
            return
        scope = self.read_rows(cypher.FEATURE_SET_SCOPE, key, timeout, "read a transcoder set")
        name = f"feature ({set_id!r}, layer {layer}, index {index})"
        if not scope:
            raise NotFoundError(
                f"{name} is not in the catalog, and no transcoder set {set_id!r} is "
                "registered: check the set id, or register the set first with "
                "store.upsert_transcoder_set(...) (ingest jobs register theirs; writing a "
                "graph does not)"
            )
        width, n_layers = scope[0]["width"], scope[0]["n_layers"]
        if width is not None and index >= width:
            raise InvalidArgumentError(
                f"{name}: set {set_id!r} has {width} latents per layer; use index 0..{width - 1}"
            )
        if n_layers is not None and layer >= n_layers:
            raise InvalidArgumentError(
                f"{name}: set {set_id!r} is for a {n_layers}-layer model; use layer "
                f"0..{n_layers - 1}"
            )

    # ------------------------------------------------------------------ graph writes
    def write_graph(
        self,
        graph: AttributionGraph,
        *,
        replace: bool = False,
        batch_size: int | None = None,
        on_batch: BatchCallback | None = None,
        timeout: float | None = None,
    ) -> GraphSummary:
        writes.write_graph(
            self,
            graph,
            replace=replace,
            batch_size=batch_size,
            on_batch=on_batch,
            timeout=timeout,
        )
        return self.get_graph_summary(graph.graph_id, timeout=timeout)

    def delete_graph(self, graph_id: str, *, timeout: float | None = None) -> bool:
        return writes.delete_graph(self, graph_id, timeout=timeout)

    # ------------------------------------------------------------------ graph reads
    def get_graph_summary(self, graph_id: str, *, timeout: float | None = None) -> GraphSummary:
        rows = self.read_rows(
            cypher.GRAPH_SUMMARY, {"graph_id": graph_id}, timeout, f"read graph {graph_id!r}"
        )
        if not rows:
            raise NotFoundError(
                f"no complete graph {graph_id!r} in the store; list graphs to find its id"
            )
        return summary_from_props(rows[0]["p"])

    def get_graph(self, graph_id: str, *, timeout: float | None = None) -> AttributionGraph:
        return self._consistent_read(
            graph_id, lambda tx: self._read_graph(tx, graph_id), timeout, f"read graph {graph_id!r}"
        )

    def _consistent_read(
        self,
        graph_id: str,
        work: Callable[[ManagedTransaction], T | None],
        timeout: float | None,
        what: str,
    ) -> T:
        """Run ``work`` (None when it saw the graph change) in a read transaction; once
        more on a change, then FailedPreconditionError."""
        for _attempt in range(2):
            got = self.transaction(work, write=False, timeout=timeout, what=what)
            if got is not None:
                return got
        raise FailedPreconditionError(
            f"graph {graph_id!r} changed while it was read (rewritten or deleted); retry"
        )

    @staticmethod
    def _read_graph(tx: ManagedTransaction, graph_id: str) -> AttributionGraph | None:
        """The graph, or None when a concurrent rewrite or delete was detected."""
        params = {"graph_id": graph_id}
        head = _head(tx, graph_id)
        packed = record_rows(tx.run(cypher.GRAPH_NODES, params))
        node_rows = sorted(packed[0]["nodes"] if packed else [], key=lambda row: row[0])
        nodes = [node_from_props(dict(zip(cypher.NODE_COLUMNS, r, strict=True))) for r in node_rows]
        cols = record_rows(tx.run(cypher.GRAPH_EDGES, params))
        summary = summary_from_props(head)
        col = cols[0] if cols else {"s": [], "t": [], "w": [], "i": []}
        order = np.argsort(np.asarray(col["i"], dtype=np.int64), kind="stable")
        if (
            not _unchanged(tx, graph_id, head)
            or len(nodes) != summary.n_nodes
            or not len(col["s"]) == len(col["t"]) == len(col["w"]) == summary.n_edges
            or not np.array_equal(np.asarray(col["i"])[order], np.arange(summary.n_edges))
        ):
            return None
        return AttributionGraph(
            metadata=summary.metadata,
            nodes=nodes,
            sources=np.asarray(col["s"], dtype=np.int64)[order],
            targets=np.asarray(col["t"], dtype=np.int64)[order],
            weights=np.asarray(col["w"], dtype=np.float32)[order],
        )

    def graph_revisions(
        self, graph_ids: Sequence[str], *, timeout: float | None = None
    ) -> dict[str, GraphRevision]:
        rows = self.read_rows(
            cypher.GRAPH_REVISIONS,
            {"graph_ids": list(graph_ids)},
            timeout,
            "read graph revisions",
        )
        return {
            r["graph_id"]: GraphRevision(
                str(r["write_id"]), int(r["n_nodes"] or 0), int(r["n_edges"] or 0)
            )
            for r in rows
        }

    def list_graphs(
        self,
        *,
        model_id: str | None = None,
        task: str | None = None,
        prompt_contains: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        newest_first: bool = False,
        timeout: float | None = None,
    ) -> Page[GraphSummary]:
        check_range("limit", limit, 1, MAX_PAGE)
        params: dict[str, Any] = {
            "model_id": model_id or None,
            "task": task or None,
            "prompt": prompt_contains.lower() if prompt_contains else None,
            "limit": limit + 1,
        }
        listing = cursors.GRAPHS_NEWEST if newest_first else cursors.GRAPHS_BY_ID
        after = self._graph_cursor(listing, cursor, timeout)
        if newest_first:
            created, after_id = cursors.time_and_id(after) if after else (2**62, "\U0010ffff")
            params.update(after_created=created, after_id=after_id)
            query = cypher.LIST_GRAPHS_NEWEST
        else:
            params["after_id"] = after or ""
            query = cypher.LIST_GRAPHS_BY_ID
        rows = self.read_rows(query, params, timeout, "list graphs")
        items = [summary_from_props(r["p"]) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]["p"]
            key = f"{last['created_at']}:{last['graph_id']}" if newest_first else last["graph_id"]
            next_cursor = cursors.make(listing, key)
        return Page(items, next_cursor)

    def _graph_cursor(self, listing: str, cursor: object, timeout: float | None) -> str | None:
        """The key in a graph-id ``cursor`` of ``listing`` (None: the first page). A bare
        key, as handed out before cursors were tagged, is taken while its graph is
        stored; InvalidArgumentError for anything else (:mod:`ingest.store.cursors`)."""
        found = cursors.read(listing, cursor)
        if found is None:
            return None
        key, vouched = found
        if not vouched:
            graph_id = cursors.graph_key(listing, key)
            if not self.read_rows(
                cypher.GRAPH_KNOWN, {"graph_id": graph_id}, timeout, "check a cursor"
            ):
                raise cursors.malformed(cursor)
        return key

    def subgraph(
        self,
        graph_id: str,
        node_id: str,
        *,
        depth: int = 1,
        top_k: int = 10,
        direction: Direction = "both",
        timeout: float | None = None,
    ) -> AttributionGraph:
        check_range("depth", depth, 1, 10)
        check_range("top_k", top_k, 1, 10_000)
        if direction not in ("out", "in", "both"):
            raise InvalidArgumentError(f"direction must be out, in or both, got {direction!r}")

        def work(tx: ManagedTransaction) -> AttributionGraph | None:
            head = _head(tx, graph_id)
            centre = record_rows(
                tx.run(cypher.NODES_BY_ID, {"graph_id": graph_id, "node_ids": [node_id]})
            )
            if not centre:
                if not _unchanged(tx, graph_id, head):
                    return None
                raise NotFoundError(f"graph {graph_id!r} has no node {node_id!r}")
            visited, frontier = {node_id}, [node_id]
            edges: dict[tuple[str, str], float] = {}
            for _hop in range(depth):
                if not frontier:
                    break
                chosen = _top_edges(tx, graph_id, frontier, top_k, direction)
                next_frontier: list[str] = []
                for s, t, w in chosen:
                    edges[(s, t)] = w
                    for end in (s, t):
                        if end not in visited:
                            visited.add(end)
                            next_frontier.append(end)
                frontier = next_frontier
            node_rows = record_rows(
                tx.run(cypher.NODES_BY_ID, {"graph_id": graph_id, "node_ids": sorted(visited)})
            )
            nodes = [node_from_props(r["p"]) for r in node_rows]
            index = {n.node_id: i for i, n in enumerate(nodes)}
            # On ArcadeDB a rewrite under this transaction shows: nodes of an edge gone,
            # or a new write_id at the end. Either way the answer would mix versions.
            if not visited <= index.keys() or not _unchanged(tx, graph_id, head):
                return None
            return AttributionGraph(
                metadata=summary_from_props(head).metadata,
                nodes=nodes,
                sources=np.array([index[s] for s, _ in edges], dtype=np.int64),
                targets=np.array([index[t] for _, t in edges], dtype=np.int64),
                weights=np.array(list(edges.values()), dtype=np.float32),
            )

        return self._consistent_read(graph_id, work, timeout, f"read a subgraph of {graph_id!r}")

    def strongest_paths(
        self,
        graph_id: str,
        source_id: str,
        target_id: str,
        *,
        top_k: int = 5,
        max_length: int = 6,
        score: PathScore = "product",
        timeout: float | None = None,
    ) -> list[Path]:
        check_range("top_k", top_k, 1, 1000)
        check_range("max_length", max_length, 1, cypher.MAX_PATH_LENGTH)
        if score not in ("product", "sum"):
            raise InvalidArgumentError(f"score must be product or sum, got {score!r}")
        query = cypher.paths_query(max_length, score)
        params = {"graph_id": graph_id, "source_id": source_id, "target_id": target_id, "k": top_k}

        def work(tx: ManagedTransaction) -> list[Path] | None:
            head = _head(tx, graph_id)
            ends = [source_id, target_id]
            known = record_rows(
                tx.run(cypher.NODES_BY_ID, {"graph_id": graph_id, "node_ids": ends})
            )
            found = record_rows(tx.run(query, params))
            if not _unchanged(tx, graph_id, head):
                return None
            missing = sorted(set(ends) - {r["p"]["node_id"] for r in known})
            if missing:
                named = " or ".join(repr(m) for m in missing)
                raise NotFoundError(f"graph {graph_id!r} has no node {named}")
            return [
                Path(list(r["ids"]), [float(w) for w in r["ws"]], float(r["score"])) for r in found
            ]

        return self._consistent_read(graph_id, work, timeout, f"find paths in graph {graph_id!r}")

    def graphs_with_feature(
        self,
        set_id: str,
        layer: int,
        index: int,
        *,
        limit: int = 100,
        cursor: str | None = None,
        timeout: float | None = None,
    ) -> Page[FeatureOccurrence]:
        check_range("limit", limit, 1, MAX_PAGE)
        rows = self.read_rows(
            cypher.FEATURE_OCCURRENCES,
            {
                "set_id": set_id,
                "layer": layer,
                "index": index,
                "after": self._graph_cursor(cursors.FEATURE_OCCURRENCES, cursor, timeout) or "",
                "limit": limit + 1,
            },
            timeout,
            "find graphs with a feature",
        )
        items = [
            FeatureOccurrence(
                r["graph_id"], o["node_id"], int(o["pos"]), o.get("activation"), o.get("influence")
            )
            for r in rows[:limit]
            for o in sorted(r["occ"], key=lambda o: (o["pos"], o["node_id"]))
        ]
        last = rows[limit - 1]["graph_id"] if len(rows) > limit else None
        return Page(
            items, None if last is None else cursors.make(cursors.FEATURE_OCCURRENCES, last)
        )

    def get_feature(
        self, set_id: str, layer: int, index: int, *, timeout: float | None = None
    ) -> FeatureRecord:
        rows = self.read_rows(
            cypher.GET_FEATURE,
            {"set_id": set_id, "layer": layer, "index": index},
            timeout,
            "read a feature",
        )
        if not rows:
            raise NotFoundError(
                f"feature ({set_id!r}, layer {layer}, index {index}) is not in the catalog; "
                "search features to find it"
            )
        return feature_from_props(rows[0]["p"])

    def search_features(
        self,
        set_id: str,
        *,
        layer: int | None = None,
        label_contains: str | None = None,
        token: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        timeout: float | None = None,
    ) -> Page[FeatureRecord]:
        check_range("limit", limit, 1, MAX_PAGE)
        after_layer, after_index = cursors.layer_and_index(cursor) or (-1, -1)
        rows = self.read_rows(
            cypher.SEARCH_FEATURES,
            {
                "set_id": set_id,
                "layer": layer,
                "label": label_contains.lower() if label_contains else None,
                "token": token or None,
                "after_layer": after_layer,
                "after_index": after_index,
                "limit": limit + 1,
            },
            timeout,
            "search features",
        )
        items = [feature_from_props(r["p"]) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = cursors.make_catalog(items[-1].layer, items[-1].index)
        return Page(items, next_cursor)

    def query(
        self,
        cypher_text: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        return self.read_rows(
            cypher_text, dict(parameters or {}), timeout, "run a query", caller_cypher=True
        )


def _head(tx: ManagedTransaction, graph_id: str) -> dict[str, Any]:
    """The properties of the complete graph ``graph_id``; NotFoundError when there is none."""
    found = record_rows(tx.run(cypher.GRAPH_SUMMARY, {"graph_id": graph_id}))
    if not found:
        raise NotFoundError(
            f"no complete graph {graph_id!r} in the store; list graphs to find its id"
        )
    return dict(found[0]["p"])


def _unchanged(tx: ManagedTransaction, graph_id: str, head: Mapping[str, Any]) -> bool:
    """Whether the graph read as ``head`` is still complete with the same ``write_id``."""
    tail = record_rows(tx.run(cypher.GRAPH_SUMMARY, {"graph_id": graph_id}))
    return bool(tail) and tail[0]["p"].get("write_id") == head.get("write_id")


def _top_edges(
    tx: ManagedTransaction, graph_id: str, frontier: Sequence[str], k: int, direction: Direction
) -> list[tuple[str, str, float]]:
    """Per frontier node, its ``k`` strongest edges in ``direction``; ties by (source, target)."""
    params = {"graph_id": graph_id, "frontier": list(frontier), "k": k}
    found: list[tuple[str, str, float]] = []
    if direction in ("out", "both"):
        found += [
            (r["s"], r["t"], float(r["w"]))
            for r in record_rows(tx.run(cypher.TOP_OUT_EDGES, params))
        ]
    if direction in ("in", "both"):
        found += [
            (r["s"], r["t"], float(r["w"]))
            for r in record_rows(tx.run(cypher.TOP_IN_EDGES, params))
        ]
    if direction != "both":
        return found
    # Per node, the top k of the union of its top-k out and top-k in edges.
    chosen: dict[tuple[str, str], float] = {}
    for node in frontier:
        incident = sorted(
            {(s, t, w) for s, t, w in found if node in (s, t)},
            key=lambda e: (-abs(e[2]), e[0], e[1]),
        )
        for s, t, w in incident[:k]:
            chosen[(s, t)] = w
    return [(s, t, w) for (s, t), w in chosen.items()]
