"""The graph store over Bolt: one implementation for Neo4j 5 and embedded ArcadeDB.

Writes follow Neo4j's batching guidance (DESIGN.md section 3): a graph's nodes and
edges go in ``UNWIND`` batches of ``batch_size`` rows, one transaction each, under a
``:Graph`` node claimed with status ``writing`` and a fresh ``write_id``; the status
becomes ``complete`` in a last transaction that also checks the ``write_id`` (so of
two writers of one graph only the last claimant completes). A crash leaves a graph in
``writing``, invisible to readers; the next write of that id deletes the leftovers
first. Edge endpoints are found through the (graph_id, node_id) uniqueness index.

Every statement comes from :mod:`ingest.store.cypher`; values are parameters; every
transaction carries the database name and a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from neo4j import Driver, GraphDatabase, ManagedTransaction, unit_of_work
from neo4j import exceptions as neo4j_errors
from tqdm.auto import tqdm

from ingest.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from ingest.graph import (
    AttributionGraph,
    FeatureRecord,
    ModelRecord,
    TranscoderSetRecord,
)
from ingest.store import cypher
from ingest.store.base import (
    BatchCallback,
    Direction,
    FeatureOccurrence,
    GraphStatus,
    GraphStore,
    GraphSummary,
    Page,
    Path,
    PathScore,
)
from ingest.store.config import StoreConfig
from ingest.store.records import (
    feature_from_props,
    feature_props,
    graph_props,
    node_from_props,
    node_props,
    summary_from_props,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_PAGE = 1000
_PROGRESS_MIN_ROWS = 50_000


def _check_range(name: str, value: int, low: int, high: int) -> int:
    if not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _rows(records: Any) -> list[dict[str, Any]]:
    return [r.data() for r in records]


class BoltGraphStore(GraphStore):
    """:class:`GraphStore` over the official ``neo4j`` driver."""

    def __init__(self, config: StoreConfig, driver: Driver | None = None) -> None:
        if config.uri is None and driver is None:
            raise InvalidArgumentError(
                "BoltGraphStore needs a server uri; use ingest.store.open_store(config), "
                "which starts the embedded server when no uri is set"
            )
        self.config = config
        self._driver = driver or GraphDatabase.driver(
            config.uri or "",
            auth=(config.user, config.password or ""),
            connection_timeout=config.connect_timeout_s,
            connection_acquisition_timeout=max(config.connect_timeout_s, 30.0),
            max_transaction_retry_time=15.0,
        )

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate driver errors into domain errors that say what to do."""
        try:
            yield
        except (neo4j_errors.ServiceUnavailable, neo4j_errors.SessionExpired) as exc:
            raise UnavailableError(
                f"graph store {self.config.redacted()} is unreachable while trying to {what} "
                f"({exc}); start it (`circuitscope db start`) or fix NEO4J_URI"
            ) from exc
        except neo4j_errors.AuthError as exc:
            raise UnavailableError(
                f"graph store {self.config.redacted()} rejected the credentials; "
                "check NEO4J_USER and NEO4J_PASSWORD"
            ) from exc
        except neo4j_errors.ConstraintError as exc:
            raise FailedPreconditionError(
                f"could not {what}: a uniqueness constraint was violated ({exc.message}); "
                "is another writer storing the same graph id?"
            ) from exc
        except neo4j_errors.CypherSyntaxError as exc:
            raise InvalidArgumentError(f"could not {what}: {exc.message}") from exc
        except neo4j_errors.ClientError as exc:
            if "Timeout" in (exc.code or "") or "TimedOut" in (exc.code or ""):
                raise ResourceExhaustedError(
                    f"{what} ran past its time limit; narrow the query or raise the timeout"
                ) from exc
            raise

    def _timeout(self, timeout: float | None) -> float | None:
        return self.config.query_timeout_s if timeout is None else timeout

    def _tx(
        self,
        work: Callable[[ManagedTransaction], T],
        *,
        write: bool,
        timeout: float | None,
        what: str,
    ) -> T:
        fn = unit_of_work(timeout=self._timeout(timeout))(work)
        with self._errors(what), self._driver.session(database=self.config.database) as session:
            return session.execute_write(fn) if write else session.execute_read(fn)

    def _read(
        self, query: str, params: Mapping[str, Any], timeout: float | None, what: str
    ) -> list[dict[str, Any]]:
        return self._tx(
            lambda tx: _rows(tx.run(query, dict(params))), write=False, timeout=timeout, what=what
        )

    def _write(
        self, query: str, params: Mapping[str, Any], timeout: float | None, what: str
    ) -> list[dict[str, Any]]:
        return self._tx(
            lambda tx: _rows(tx.run(query, dict(params))), write=True, timeout=timeout, what=what
        )

    def verify(self) -> None:
        """Check the server answers and the database exists; UnavailableError otherwise."""
        with self._errors("connect"):
            self._driver.verify_connectivity()
        self._read("RETURN 1 AS ok", {}, self.config.connect_timeout_s, "reach the database")

    def close(self) -> None:
        self._driver.close()

    def ensure_schema(self) -> None:
        for statement in cypher.SCHEMA:
            with (
                self._errors("create the schema"),
                self._driver.session(database=self.config.database) as session,
            ):
                session.run(statement).consume()

    # ------------------------------------------------------------------ catalog writes
    def upsert_model(self, model: ModelRecord, *, timeout: float | None = None) -> None:
        props = {k: v for k, v in vars(model).items() if v is not None}
        self._write(
            cypher.UPSERT_MODEL,
            {"model_id": model.model_id, "props": props},
            timeout,
            f"store model {model.model_id!r}",
        )

    def upsert_transcoder_set(
        self, tset: TranscoderSetRecord, *, timeout: float | None = None
    ) -> None:
        props = {k: v for k, v in vars(tset).items() if v is not None}
        self._write(
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
            self._write(
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
        rows = self._write(
            cypher.SET_FEATURE_LABEL,
            {"set_id": set_id, "layer": layer, "index": index, "label": label or None},
            timeout,
            "label a feature",
        )
        return feature_from_props(rows[0]["p"])

    # ------------------------------------------------------------------ graph writes
    def _status(self, graph_id: str, timeout: float | None) -> dict[str, Any] | None:
        rows = self._read(cypher.GRAPH_STATUS, {"graph_id": graph_id}, timeout, "read graph status")
        return rows[0] if rows else None

    def _delete_gnodes(self, graph_id: str, batch: int, timeout: float | None) -> int:
        total = 0
        while True:
            rows = self._write(
                cypher.DELETE_GNODES_BATCH,
                {"graph_id": graph_id, "limit": batch},
                timeout,
                f"delete the nodes of graph {graph_id!r}",
            )
            deleted = int(rows[0]["deleted"]) if rows else 0
            total += deleted
            if deleted == 0:
                return total

    def write_graph(
        self,
        graph: AttributionGraph,
        *,
        replace: bool = False,
        batch_size: int | None = None,
        on_batch: BatchCallback | None = None,
        timeout: float | None = None,
    ) -> GraphSummary:
        graph.validate()
        gid = graph.graph_id
        size = batch_size or self.config.batch_size
        _check_range("batch_size", size, 1, 1_000_000)
        existing = self._status(gid, timeout)
        if existing and existing["status"] == GraphStatus.COMPLETE and not replace:
            raise FailedPreconditionError(
                f"graph {gid!r} is already stored; delete it first or write with replace=True"
            )
        if existing and existing["status"] != GraphStatus.COMPLETE:
            logger.warning("graph %r was left %s; repairing it", gid, existing["status"])
        write_id = uuid.uuid4().hex
        props = graph_props(graph.metadata, GraphStatus.WRITING, write_id)
        self._write(
            cypher.CLAIM_GRAPH, {"graph_id": gid, "props": props}, timeout, f"claim graph {gid!r}"
        )
        leftovers = self._delete_gnodes(gid, size, timeout)
        if leftovers:
            logger.info("deleted %d leftover nodes of graph %r", leftovers, gid)

        set_id = graph.metadata.set_id
        node_rows = [node_props(n, i, gid, set_id) for i, n in enumerate(graph.nodes)]
        # Edges in source order, so that a batch groups each source's out-edges and
        # looks the source node up once (measured 1.5x faster on ArcadeDB).
        order = np.argsort(graph.sources, kind="stable").tolist()
        src, dst, w = graph.sources.tolist(), graph.targets.tolist(), graph.weights.tolist()
        edge_rows = [{"s": src[i], "t": dst[i], "w": w[i], "i": i} for i in order]
        total = len(node_rows) + len(edge_rows)
        with tqdm(
            total=total,
            desc=f"store {gid}",
            unit="row",
            disable=True if total < _PROGRESS_MIN_ROWS else None,
        ) as bar:
            for phase, query, rows, shape in (
                ("nodes", cypher.CREATE_GNODES, node_rows, list),
                ("edges", cypher.CREATE_ATTR_EDGES, edge_rows, _group_by_source),
            ):
                if on_batch is not None:
                    on_batch(phase, 0, len(rows))
                for start in range(0, len(rows), size):
                    chunk = rows[start : start + size]
                    self._write(
                        query,
                        {"graph_id": gid, "rows": shape(chunk)},
                        timeout,
                        f"write the {phase} of graph {gid!r}",
                    )
                    bar.update(len(chunk))
                    if on_batch is not None:
                        on_batch(phase, start + len(chunk), len(rows))
        done = self._write(
            cypher.COMPLETE_GRAPH,
            {
                "graph_id": gid,
                "write_id": write_id,
                "n_nodes": len(node_rows),
                "n_edges": len(edge_rows),
            },
            timeout,
            f"complete graph {gid!r}",
        )
        if not done or int(done[0]["updated"]) != 1:
            raise FailedPreconditionError(
                f"graph {gid!r} was claimed by another writer during this write; "
                "keep one writer per graph id and rerun"
            )
        return self.get_graph_summary(gid, timeout=timeout)

    def delete_graph(self, graph_id: str, *, timeout: float | None = None) -> bool:
        write_id = uuid.uuid4().hex
        rows = self._write(
            cypher.MARK_DELETING,
            {"graph_id": graph_id, "write_id": write_id},
            timeout,
            f"delete graph {graph_id!r}",
        )
        found = bool(rows and int(rows[0]["marked"]))
        deleted = self._delete_gnodes(graph_id, self.config.batch_size, timeout)
        self._write(
            cypher.DELETE_GRAPH_NODE,
            {"graph_id": graph_id, "write_id": write_id},
            timeout,
            f"delete graph {graph_id!r}",
        )
        return found or deleted > 0

    # ------------------------------------------------------------------ graph reads
    def get_graph_summary(self, graph_id: str, *, timeout: float | None = None) -> GraphSummary:
        rows = self._read(
            cypher.GRAPH_SUMMARY, {"graph_id": graph_id}, timeout, f"read graph {graph_id!r}"
        )
        if not rows:
            raise NotFoundError(
                f"no complete graph {graph_id!r} in the store; list graphs to find its id"
            )
        return summary_from_props(rows[0]["p"])

    def get_graph(self, graph_id: str, *, timeout: float | None = None) -> AttributionGraph:
        for _attempt in range(2):
            graph = self._tx(
                lambda tx: self._read_graph(tx, graph_id),
                write=False,
                timeout=timeout,
                what=f"read graph {graph_id!r}",
            )
            if graph is not None:
                return graph
        raise FailedPreconditionError(
            f"graph {graph_id!r} changed while it was read (rewritten or deleted); retry"
        )

    @staticmethod
    def _read_graph(tx: ManagedTransaction, graph_id: str) -> AttributionGraph | None:
        """The graph, or None when a concurrent rewrite or delete was detected."""
        params = {"graph_id": graph_id}
        head = _rows(tx.run(cypher.GRAPH_SUMMARY, params))
        if not head:
            raise NotFoundError(
                f"no complete graph {graph_id!r} in the store; list graphs to find its id"
            )
        nodes = [node_from_props(r["p"]) for r in _rows(tx.run(cypher.GRAPH_NODES, params))]
        cols = _rows(tx.run(cypher.GRAPH_EDGES, params))
        tail = _rows(tx.run(cypher.GRAPH_SUMMARY, params))
        summary = summary_from_props(head[0]["p"])
        col = cols[0] if cols else {"s": [], "t": [], "w": [], "i": []}
        order = np.argsort(np.asarray(col["i"], dtype=np.int64), kind="stable")
        if (
            not tail
            or tail[0]["p"].get("write_id") != head[0]["p"].get("write_id")
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
        _check_range("limit", limit, 1, MAX_PAGE)
        params: dict[str, Any] = {
            "model_id": model_id or None,
            "task": task or None,
            "prompt": prompt_contains.lower() if prompt_contains else None,
            "limit": limit + 1,
        }
        if newest_first:
            created, after_id = _split_cursor(cursor, (2**62, ""))
            params.update(after_created=int(created), after_id=str(after_id))
            if cursor is None:
                params["after_id"] = "\U0010ffff"
            query = cypher.LIST_GRAPHS_NEWEST
        else:
            params["after_id"] = cursor or ""
            query = cypher.LIST_GRAPHS_BY_ID
        rows = self._read(query, params, timeout, "list graphs")
        items = [summary_from_props(r["p"]) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]["p"]
            next_cursor = (
                f"{last['created_at']}:{last['graph_id']}" if newest_first else last["graph_id"]
            )
        return Page(items, next_cursor)

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
        _check_range("depth", depth, 1, 10)
        _check_range("top_k", top_k, 1, 10_000)
        if direction not in ("out", "in", "both"):
            raise InvalidArgumentError(f"direction must be out, in or both, got {direction!r}")

        def work(
            tx: ManagedTransaction,
        ) -> tuple[GraphSummary, list[dict[str, Any]], list[tuple[str, str, float]]]:
            head = _rows(tx.run(cypher.GRAPH_SUMMARY, {"graph_id": graph_id}))
            if not head:
                raise NotFoundError(
                    f"no complete graph {graph_id!r} in the store; list graphs to find its id"
                )
            centre = _rows(
                tx.run(cypher.NODES_BY_ID, {"graph_id": graph_id, "node_ids": [node_id]})
            )
            if not centre:
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
            nodes = _rows(
                tx.run(cypher.NODES_BY_ID, {"graph_id": graph_id, "node_ids": sorted(visited)})
            )
            summary = summary_from_props(head[0]["p"])
            return summary, nodes, [(s, t, w) for (s, t), w in edges.items()]

        summary, node_rows, edge_list = self._tx(
            work, write=False, timeout=timeout, what=f"read a subgraph of {graph_id!r}"
        )
        nodes = [node_from_props(r["p"]) for r in node_rows]
        index = {n.node_id: i for i, n in enumerate(nodes)}
        return AttributionGraph(
            metadata=summary.metadata,
            nodes=nodes,
            sources=np.array([index[s] for s, _, _ in edge_list], dtype=np.int64),
            targets=np.array([index[t] for _, t, _ in edge_list], dtype=np.int64),
            weights=np.array([w for _, _, w in edge_list], dtype=np.float32),
        )

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
        _check_range("top_k", top_k, 1, 1000)
        _check_range("max_length", max_length, 1, cypher.MAX_PATH_LENGTH)
        if score not in ("product", "sum"):
            raise InvalidArgumentError(f"score must be product or sum, got {score!r}")
        self.get_graph_summary(graph_id, timeout=timeout)
        rows = self._read(
            cypher.paths_query(max_length, score),
            {"graph_id": graph_id, "source_id": source_id, "target_id": target_id, "k": top_k},
            timeout,
            f"find paths in graph {graph_id!r}",
        )
        return [Path(list(r["ids"]), [float(w) for w in r["ws"]], float(r["score"])) for r in rows]

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
        _check_range("limit", limit, 1, MAX_PAGE)
        rows = self._read(
            cypher.FEATURE_OCCURRENCES,
            {
                "set_id": set_id,
                "layer": layer,
                "index": index,
                "after": cursor or "",
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
        return Page(items, rows[limit - 1]["graph_id"] if len(rows) > limit else None)

    def get_feature(
        self, set_id: str, layer: int, index: int, *, timeout: float | None = None
    ) -> FeatureRecord:
        rows = self._read(
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
        _check_range("limit", limit, 1, MAX_PAGE)
        after_layer, after_index = _split_cursor(cursor, (-1, -1))
        rows = self._read(
            cypher.SEARCH_FEATURES,
            {
                "set_id": set_id,
                "layer": layer,
                "label": label_contains.lower() if label_contains else None,
                "token": token or None,
                "after_layer": int(after_layer),
                "after_index": int(after_index),
                "limit": limit + 1,
            },
            timeout,
            "search features",
        )
        items = [feature_from_props(r["p"]) for r in rows[:limit]]
        next_cursor = f"{items[-1].layer}:{items[-1].index}" if len(rows) > limit else None
        return Page(items, next_cursor)

    def query(
        self,
        cypher_text: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        return self._read(cypher_text, dict(parameters or {}), timeout, "run a query")


def _split_cursor(cursor: str | None, default: tuple[Any, Any]) -> tuple[Any, Any]:
    """Decode an ``a:b`` keyset cursor; InvalidArgumentError on a malformed one."""
    if cursor is None:
        return default
    head, sep, tail = cursor.partition(":")
    try:
        if not sep:
            raise ValueError(cursor)
        return int(head), (tail if isinstance(default[1], str) else int(tail))
    except ValueError:
        raise InvalidArgumentError(
            f"malformed page cursor {cursor!r}; pass the next_cursor of the previous page"
        ) from None


def _group_by_source(edges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{s, t, w, i}`` (sorted by s) as ``{s, out: [{t, w, i}, ...]}`` per source."""
    grouped: list[dict[str, Any]] = []
    for e in edges:
        if not grouped or grouped[-1]["s"] != e["s"]:
            grouped.append({"s": e["s"], "out": []})
        grouped[-1]["out"].append({"t": e["t"], "w": e["w"], "i": e["i"]})
    return grouped


def _top_edges(
    tx: ManagedTransaction, graph_id: str, frontier: Sequence[str], k: int, direction: Direction
) -> list[tuple[str, str, float]]:
    """Per frontier node, its ``k`` strongest edges in ``direction``; ties by (source, target)."""
    params = {"graph_id": graph_id, "frontier": list(frontier), "k": k}
    found: list[tuple[str, str, float]] = []
    if direction in ("out", "both"):
        found += [
            (r["s"], r["t"], float(r["w"])) for r in _rows(tx.run(cypher.TOP_OUT_EDGES, params))
        ]
    if direction in ("in", "both"):
        found += [
            (r["s"], r["t"], float(r["w"])) for r in _rows(tx.run(cypher.TOP_IN_EDGES, params))
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
