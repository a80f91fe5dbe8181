"""An in-memory index of one complete graph: neighbourhoods and strongest paths.

A graph whose status is ``complete`` never changes in the store (a rewrite or a
delete gives it a new ``write_id`` first), so the service can answer GetSubgraph and
FindPaths for it from memory (:mod:`service.graph_cache`). :class:`GraphIndex` holds
what makes those answers fast and returns exactly what the store returns
(``ingest/store/bolt.py``, :meth:`GraphStore.subgraph` and
:meth:`GraphStore.strongest_paths`):

- **neighbourhood** (:meth:`GraphIndex.subgraph`): breadth-first, ``depth`` hops; per
  expanded node its ``top_k`` edges by |weight|, ties by the other end's id (``out``
  and ``in``); for ``both``, per frontier node the top ``top_k`` by (|weight|, source
  id, target id) of the union of every frontier node's top-k out and top-k in edges
  that touch it (the store's rule, kept to the letter). Out- and in-edges are stored
  per node already in rank order (CSR arrays), so a hop is one vectorized gather. The
  answer's nodes are in stored order, as the store returns them; edges come hop by
  hop (the store's edge order follows its query engine's grouping and is
  unspecified).
- **paths** (:meth:`GraphIndex.strongest_paths`): the ``top_k`` directed paths of at
  most ``max_length`` edges by the product (or sum) of |weight|, accumulated from the
  source as the store's Cypher ``reduce`` does, so scores are bit-identical. A
  forward dynamic programme keeps the best ``top_k`` partial paths per (node, length)
  among nodes that can still reach the target; that is exact because extending a
  path by an edge is monotone in its score. Valid for acyclic graphs (attribution
  graphs are); :attr:`GraphIndex.acyclic` tells the caller when to ask the store.

Node ids are compared as the store's server compares strings (UTF-16 code units);
graphs with two edges between one pair of nodes are not :attr:`GraphIndex.simple` and
should be left to the store, whose answer for them depends on its query order.

**Responses from pre-serialized bytes**: at load time every node and every edge is
serialized once as the field it is in a GetSubgraphResponse (``nodes`` / ``edges``
entry: tag, length, message bytes), so an answer is one ``bytes.join`` of those
slices in the answer's order (:meth:`GraphIndex.subgraph_bytes`): no message is built
or parsed per call, and the server hands the bytes to gRPC as they are
(``service/servicers/graphs.py``). The bytes are exactly what
``GetSubgraphResponse(nodes=..., edges=...).SerializeToString()`` gives for the same
nodes and edges. For a 1k-edge answer this is about 0.06 ms, against about 0.6 ms to
build, parse and re-serialize a message. Memory: each edge's field is a ``bytes``
object of about 80 + 2 x (node id length) bytes (object header, list slot, tags,
two ids, an 8-byte weight), each node's about 100 bytes plus its id, token and label;
the budget of :mod:`service.graph_cache` counts edges plus nodes, so docs/service.md
gives the bytes per budget unit.
"""

from __future__ import annotations

import heapq
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ingest.errors import NotFoundError, ResourceExhaustedError
from ingest.graph import AttributionGraph
from ingest.store.base import Direction, Path, PathScore
from service import convert
from service._generated.circuits.v1 import graph_service_pb2, types_pb2

_WIRE_LEN = 2
#: Bytes a budget unit (an edge or a node of a cached graph) takes, about: 105-130 measured
#: with tracemalloc (docs/service.md, "Memory"); memory kept besides counts at this rate.
BYTES_PER_UNIT = 120
_WIRE_I64 = 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tag(message: type, field: str, wire_type: int) -> bytes:
    number = message.DESCRIPTOR.fields_by_name[field].number  # type: ignore[attr-defined]
    return _varint(number << 3 | wire_type)


_NODES_TAG = _tag(graph_service_pb2.GetSubgraphResponse, "nodes", _WIRE_LEN)
_EDGES_TAG = _tag(graph_service_pb2.GetSubgraphResponse, "edges", _WIRE_LEN)
# A Graph and a StreamGraphEdgesResponse share one layout: summary, nodes, edges (the
# byte-equality test of the whole-graph answers holds them to it).
_GRAPH_SUMMARY_TAG = _tag(types_pb2.Graph, "summary", _WIRE_LEN)
_GRAPH_NODES_TAG = _tag(types_pb2.Graph, "nodes", _WIRE_LEN)
_GRAPH_EDGES_TAG = _tag(types_pb2.Graph, "edges", _WIRE_LEN)
_GET_GRAPH_TAG = _tag(graph_service_pb2.GetGraphResponse, "graph", _WIRE_LEN)
_SOURCE_TAG = _tag(types_pb2.Edge, "source_id", _WIRE_LEN)
_TARGET_TAG = _tag(types_pb2.Edge, "target_id", _WIRE_LEN)
_WEIGHT_TAG = _tag(types_pb2.Edge, "weight", _WIRE_I64)
_SMALL_VARINTS = [_varint(i) for i in range(128)]
_PACK_DOUBLE = struct.Struct("<d").pack
_ZERO_DOUBLE = bytes(8)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _edge_fields(
    node_ids: Sequence[str],
    sources: npt.NDArray[np.int32],
    targets: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float64],
) -> list[bytes]:
    """Each edge as its serialized ``edges`` field of a GetSubgraphResponse (tag, length,
    ``Edge`` message with source id, target id, weight: the fields in number order, as
    ``SerializeToString`` writes them; a weight of +0.0 is the default and left out, as
    there). Runs once per graph load, in the load threads."""
    encoded = [node_id.encode() for node_id in node_ids]
    source_fields = [_field(_SOURCE_TAG, b) for b in encoded]
    target_fields = [_field(_TARGET_TAG, b) for b in encoded]
    small = _SMALL_VARINTS
    fields: list[bytes] = []
    append = fields.append
    for s, t, w in zip(sources.tolist(), targets.tolist(), weights.tolist(), strict=True):
        weight = _PACK_DOUBLE(w)
        edge = source_fields[s] + target_fields[t]
        if weight != _ZERO_DOUBLE:
            edge += _WEIGHT_TAG + weight
        size = len(edge)
        append(_EDGES_TAG + (small[size] if size < 128 else _varint(size)) + edge)
    return fields


def _csr(
    keys: npt.NDArray[np.int64], order: npt.NDArray[np.int64], n_nodes: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """Row pointers and edge ids of edges grouped by ``keys`` in ``order``."""
    counts = np.bincount(keys, minlength=n_nodes)
    pointers = np.zeros(n_nodes + 1, dtype=np.int64)
    np.cumsum(counts, out=pointers[1:])
    return pointers, order.astype(np.int32)


def _ranges(starts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The concatenated index ranges ``[start, start + size)``, in order."""
    ends = np.cumsum(sizes)
    return np.repeat(starts - (ends - sizes), sizes) + np.arange(int(ends[-1]) if len(ends) else 0)


@dataclass(frozen=True)
class Neighbourhood:
    """A subgraph answer: node positions in stored order, edge ids hop by hop."""

    nodes: npt.NDArray[np.int64]
    edges: npt.NDArray[np.int64]


class GraphIndex:
    """Adjacency of one complete graph, ranked for the store's queries (module doc).

    ``write_id`` is the store revision the copy was read at. Memory is about 40 bytes
    per edge of adjacency plus the edge's serialized field (about 80 bytes plus its
    two node ids), and a few hundred bytes per node.
    """

    def __init__(self, graph: AttributionGraph, write_id: str) -> None:
        self.graph_id = graph.graph_id
        self.metadata = graph.metadata
        self.write_id = write_id
        self.nodes = graph.nodes
        self.node_ids = [n.node_id for n in graph.nodes]
        self.position = {node_id: i for i, node_id in enumerate(self.node_ids)}
        n, e = len(self.nodes), graph.n_edges
        self.n_nodes, self.n_edges = n, e
        self.sources = graph.sources.astype(np.int32)
        self.targets = graph.targets.astype(np.int32)
        self.weights = graph.weights.astype(np.float64)  # float32 values, exactly
        magnitude = np.abs(self.weights)
        # Rank of each node id in the server's string order (UTF-16 code units).
        id_rank = np.empty(n, dtype=np.int64)
        id_rank[sorted(range(n), key=lambda i: self.node_ids[i].encode("utf-16-be"))] = np.arange(n)
        src, dst = graph.sources, graph.targets
        out_order = np.lexsort((id_rank[dst], -magnitude, src))
        in_order = np.lexsort((id_rank[src], -magnitude, dst))
        self.out_ptr, self.out_edges = _csr(src, out_order, n)
        self.in_ptr, self.in_edges = _csr(dst, in_order, n)
        rank = np.empty(e, dtype=np.int64)
        rank[np.lexsort((id_rank[dst], id_rank[src], -magnitude))] = np.arange(e)
        self.both_rank = rank
        pairs = src * max(n, 1) + dst
        self.simple = bool(np.unique(pairs).shape[0] == e)
        self.acyclic = _is_acyclic(src, dst, n)
        self._node_fields = [
            _field(_NODES_TAG, convert.node_to_proto(nd).SerializeToString()) for nd in self.nodes
        ]
        self._edge_fields = _edge_fields(self.node_ids, self.sources, self.targets, self.weights)
        self._whole: tuple[bytes, bytes, npt.NDArray[np.int64]] | None = None

    @property
    def cost(self) -> int:
        """What the copy counts against the cache's budget: edges plus nodes, plus the
        serialized Graph fields once made (:meth:`whole_fields`), in units of
        :data:`BYTES_PER_UNIT` bytes."""
        extra = 0
        if self._whole is not None:
            nodes, edges, ends = self._whole
            extra = -(-(len(nodes) + len(edges) + ends.nbytes) // BYTES_PER_UNIT)
        return self.n_edges + self.n_nodes + extra

    def _position(self, node_id: str) -> int:
        found = self.position.get(node_id)
        if found is None:
            raise NotFoundError(f"graph {self.graph_id!r} has no node {node_id!r}")
        return found

    # ------------------------------------------------------------------ neighbourhood
    def _top(
        self,
        pointers: npt.NDArray[np.int64],
        edges: npt.NDArray[np.int32],
        frontier: npt.NDArray[np.int64],
        k: int,
    ) -> npt.NDArray[np.int64]:
        """The first ``k`` ranked edges of every frontier node, node after node."""
        starts = pointers[frontier]
        return edges[_ranges(starts, np.minimum(pointers[frontier + 1] - starts, k))].astype(
            np.int64
        )

    def _hop_both(self, frontier: npt.NDArray[np.int64], k: int) -> list[int]:
        """Direction ``both``: per frontier node, its top ``k`` by (|weight|, source id,
        target id) of the frontier's top-k out and in edges that touch it."""
        found = np.union1d(
            self._top(self.out_ptr, self.out_edges, frontier, k),
            self._top(self.in_ptr, self.in_edges, frontier, k),
        ).tolist()
        ends = zip(self.sources[found].tolist(), self.targets[found].tolist(), strict=True)
        incident: dict[int, list[int]] = {node: [] for node in frontier.tolist()}
        for edge, (s, t) in zip(found, ends, strict=True):
            if s in incident:
                incident[s].append(edge)
            if t in incident and t != s:
                incident[t].append(edge)
        rank = self.both_rank
        chosen: list[int] = []
        for touching in incident.values():
            chosen += sorted(touching, key=rank.__getitem__)[:k]
        return chosen

    def subgraph(
        self, node_id: str, *, depth: int, top_k: int, direction: Direction
    ) -> Neighbourhood:
        """The store's neighbourhood of ``node_id`` (see :meth:`GraphStore.subgraph`)."""
        centre = self._position(node_id)
        visited = np.zeros(self.n_nodes, dtype=bool)
        visited[centre] = True
        frontier = np.array([centre], dtype=np.int64)
        hops: list[npt.NDArray[np.int64]] = []
        for hop in range(depth):
            if not frontier.size:
                break
            if direction == "out":
                chosen = self._top(self.out_ptr, self.out_edges, frontier, top_k)
            elif direction == "in":
                chosen = self._top(self.in_ptr, self.in_edges, frontier, top_k)
            else:
                chosen = np.array(self._hop_both(frontier, top_k), dtype=np.int64)
            hops.append(chosen)
            if hop == depth - 1:  # the last hop: its ends join the answer, none expand
                visited[self.sources[chosen]] = True
                visited[self.targets[chosen]] = True
                break
            # Endpoints in the store's order (each edge's source, then its target);
            # the unvisited ones, first occurrences first, are the next frontier.
            ends = np.stack((self.sources[chosen], self.targets[chosen]), axis=1).ravel()
            ends = ends[~visited[ends]]
            fresh, first = np.unique(ends, return_index=True)
            frontier = fresh[np.argsort(first)].astype(np.int64)
            visited[frontier] = True
        edges = np.concatenate(hops) if hops else np.zeros(0, dtype=np.int64)
        if direction == "both":  # an edge between two expanded nodes is kept once
            _, first = np.unique(edges, return_index=True)
            edges = edges[np.sort(first)]
        return Neighbourhood(np.flatnonzero(visited), edges)

    def subgraph_bytes(self, found: Neighbourhood) -> bytes:
        """``found`` as a serialized GetSubgraphResponse: its nodes' then its edges'
        fields, serialized at load time, joined (module doc)."""
        return b"".join(
            [
                *map(self._node_fields.__getitem__, found.nodes.tolist()),
                *map(self._edge_fields.__getitem__, found.edges.tolist()),
            ]
        )

    def subgraph_message(self, found: Neighbourhood) -> graph_service_pb2.GetSubgraphResponse:
        """``found`` as a GetSubgraphResponse message (parsed from :meth:`subgraph_bytes`)."""
        return graph_service_pb2.GetSubgraphResponse.FromString(self.subgraph_bytes(found))

    def subgraph_graph(self, found: Neighbourhood) -> AttributionGraph:
        """``found`` as an :class:`AttributionGraph`, the store's return type."""
        local = np.full(self.n_nodes, -1, dtype=np.int64)
        local[found.nodes] = np.arange(len(found.nodes))
        ids = found.edges
        return AttributionGraph(
            metadata=self.metadata,
            nodes=[self.nodes[i] for i in found.nodes.tolist()],
            sources=local[self.sources[ids]],
            targets=local[self.targets[ids]],
            weights=self.weights[ids].astype(np.float32),
        )

    def whole_fields(self) -> tuple[bytes, bytes, npt.NDArray[np.int64]]:
        """The nodes and the edges as fields of a Graph (and of a StreamGraphEdgesResponse):
        the GetSubgraph fields retagged and joined, with each edge's end offset in the
        edges' bytes. Made on the first call (GetGraph, StreamGraphEdges; the server
        makes that call off its event loop) and kept: about the edges' serialized size
        again in memory."""
        if self._whole is None:
            nodes = b"".join(_GRAPH_NODES_TAG + f[len(_NODES_TAG) :] for f in self._node_fields)
            retagged = [_GRAPH_EDGES_TAG + f[len(_EDGES_TAG) :] for f in self._edge_fields]
            ends = np.cumsum([len(f) for f in retagged], dtype=np.int64)
            self._whole = (nodes, b"".join(retagged), ends)
        return self._whole

    def _edge_bytes(self, start: int, stop: int) -> bytes:
        _, edges, ends = self.whole_fields()
        stop = min(stop, self.n_edges)
        if start >= stop:
            return b""
        return edges[(int(ends[start - 1]) if start else 0) : int(ends[stop - 1])]

    def graph_response_bytes(self, summary: bytes) -> bytes:
        """The serialized GetGraphResponse of the whole graph, ``summary`` being its
        serialized GraphSummary: byte for byte what serializing the message gives."""
        nodes, edges, _ = self.whole_fields()
        graph = _field(_GRAPH_SUMMARY_TAG, summary) + nodes + edges
        return _field(_GET_GRAPH_TAG, graph)

    def stream_chunks(self, summary: bytes, chunk: int) -> Iterator[bytes]:
        """The serialized StreamGraphEdgesResponse messages of the whole graph in chunks
        of ``chunk`` edges, made one at a time: the summary and the nodes with the first."""
        nodes, _, _ = self.whole_fields()
        yield _field(_GRAPH_SUMMARY_TAG, summary) + nodes + self._edge_bytes(0, chunk)
        for start in range(chunk, self.n_edges, chunk):
            yield self._edge_bytes(start, start + chunk)

    # ------------------------------------------------------------------ paths
    def strongest_paths(
        self,
        source_id: str,
        target_id: str,
        *,
        top_k: int,
        max_length: int,
        score: PathScore,
        deadline: float | None = None,
    ) -> list[Path]:
        """The store's strongest paths (see :meth:`GraphStore.strongest_paths`);
        NotFoundError for an unknown node. Only for :attr:`acyclic` graphs.
        ``deadline`` (``time.monotonic()``) bounds the work as the store's timeout does."""
        source, target = self._position(source_id), self._position(target_id)
        reach = self._distance_to(target, max_length)
        if source not in reach:
            return []
        combine: Callable[[float, float], float] = (
            (lambda acc, w: acc * w) if score == "product" else (lambda acc, w: acc + w)
        )
        start = 1.0 if score == "product" else 0.0
        magnitude = np.abs(self.weights)
        # Partial paths from the source: (score, edge ids), the best top_k per end node.
        layer: dict[int, list[tuple[float, tuple[int, ...]]]] = {source: [(start, ())]}
        complete: list[tuple[float, tuple[int, ...]]] = []
        for length in range(1, max_length + 1):
            extended: dict[int, list[tuple[float, tuple[int, ...]]]] = {}
            for node, partials in layer.items():
                if deadline is not None and time.monotonic() > deadline:
                    raise ResourceExhaustedError(
                        f"finding paths in graph {self.graph_id!r} ran past its time limit; "
                        "lower max_length or top_k, or raise the deadline"
                    )
                lo, hi = int(self.out_ptr[node]), int(self.out_ptr[node + 1])
                for edge in self.out_edges[lo:hi].tolist():
                    nxt = int(self.targets[edge])
                    if reach.get(nxt, max_length + 1) > max_length - length:
                        continue
                    w = float(magnitude[edge])
                    bucket = extended.setdefault(nxt, [])
                    bucket.extend((combine(acc, w), (*path, edge)) for acc, path in partials)
            layer = {}
            for node, bucket in extended.items():
                best = heapq.nlargest(top_k, bucket, key=lambda item: item[0])
                if node == target:
                    complete += best
                layer[node] = best
            if not layer:
                break
        best = sorted(complete, key=lambda item: (-item[0], item[1]))[:top_k]
        return [self._path(edges, value) for value, edges in best]

    def _path(self, edges: Sequence[int], value: float) -> Path:
        ids = list(edges)
        node_ids = [self.node_ids[int(self.sources[ids[0]])]]
        node_ids += [self.node_ids[t] for t in self.targets[ids].tolist()]
        return Path(node_ids, self.weights[ids].tolist(), value)

    def _distance_to(self, target: int, limit: int) -> dict[int, int]:
        """Edges from each node to ``target``, for nodes within ``limit`` of it."""
        distance = {target: 0}
        frontier = [target]
        for hops in range(1, limit + 1):
            nxt: list[int] = []
            for node in frontier:
                lo, hi = int(self.in_ptr[node]), int(self.in_ptr[node + 1])
                for s in self.sources[self.in_edges[lo:hi]].tolist():
                    if s not in distance:
                        distance[s] = hops
                        nxt.append(s)
            frontier = nxt
        return distance


def _is_acyclic(
    sources: npt.NDArray[np.int64], targets: npt.NDArray[np.int64], n_nodes: int
) -> bool:
    """Kahn's algorithm, vectorized by layers of nodes without incoming edges."""
    indegree = np.bincount(targets, minlength=n_nodes)
    order = np.argsort(sources, kind="stable")
    pointers = np.zeros(n_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(sources, minlength=n_nodes), out=pointers[1:])
    sorted_targets = targets[order]
    ready = np.flatnonzero(indegree == 0)
    seen = 0
    while ready.size:
        seen += ready.size
        starts, stops = pointers[ready], pointers[ready + 1]
        lengths = stops - starts
        if not lengths.sum():
            break
        index = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        reached = sorted_targets[index]
        np.subtract.at(indegree, reached, 1)
        candidates = np.unique(reached)
        ready = candidates[indegree[candidates] == 0]
    return seen == n_nodes
