"""``circuits.v1.GraphService`` over a :class:`ingest.store.GraphStore`.

Translates each request into one store call (run off the event loop with the call's
deadline as the store timeout) and the result into a response. Limits and defaults of
the contract (``proto/circuits/v1/graph_service.proto``) are applied here; everything
else is the store's job. GetSubgraph, FindPaths, GetGraph (at the stored thresholds)
and StreamGraphEdges are answered from the :class:`~service.graph_cache.GraphCache`
when the server has one and it holds the graph (same answers as the store; small
neighbourhoods computed on the event loop, larger ones and paths in the cache's
threads); otherwise by the store. GetGraph and StreamGraphEdges still read the graph's
summary (its creation time) from the store, one indexed lookup. ListGraphs
pages are kept for a bounded time by a :class:`~service.listing_cache.ListingCache`
when the server has one.

GetSubgraph, GetGraph and StreamGraphEdges answers from the cache are serialized
already (:meth:`GraphIndex.subgraph_bytes`, :meth:`GraphIndex.graph_response_bytes`,
:meth:`GraphIndex.stream_chunks`); :func:`add_graph_service` registers these methods
with a serializer that passes such bytes through unchanged (and serializes a message,
the store path, as usual), so the bytes are never parsed into a message and
serialized again.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc import aio

from ingest.errors import InvalidArgumentError
from ingest.store.base import GraphStore, GraphSummary
from service import convert
from service._generated.circuits.v1 import graph_service_pb2 as pb
from service._generated.circuits.v1 import graph_service_pb2_grpc
from service.artifacts import check_threshold, reprune
from service.graph_cache import GraphCache
from service.graph_index import GraphIndex
from service.listing_cache import ListingCache
from service.pagination import decode_store_cursor, encode_page_token, page_size
from service.runner import BlockingRunner

DEFAULT_CHUNK = 5000
# DESIGN.md section 5.3 defaults, used when a graph does not record its own.
DEFAULT_NODE_THRESHOLD = 0.8
DEFAULT_EDGE_THRESHOLD = 0.98
MAX_CHUNK = 50_000


def bounded(name: str, value: int, default: int, low: int, high: int) -> int:
    """``value`` (``default`` when 0) checked against [low, high]."""
    if value == 0:
        return default
    if not low <= value <= high:
        raise InvalidArgumentError(
            f"{name} must be in {low}..{high} (0 for {default}), got {value}"
        )
    return value


def _required(name: str, value: str) -> str:
    if not value:
        raise InvalidArgumentError(f"{name} is required")
    return value


class GraphServicer(graph_service_pb2_grpc.GraphServiceServicer):
    """Reads of stored attribution graphs."""

    def __init__(
        self,
        store: GraphStore,
        runner: BlockingRunner,
        model_runner: BlockingRunner,
        cache: GraphCache | None = None,
        listings: ListingCache[pb.ListGraphsResponse] | None = None,
    ) -> None:
        self._store = store
        self._run = runner
        self._model = model_runner
        self._cache = cache
        self._listings = listings

    async def ListGraphs(
        self, request: pb.ListGraphsRequest, context: aio.ServicerContext
    ) -> pb.ListGraphsResponse:
        filters = {
            "model_id": request.model_id or None,
            "task": request.task or None,
            "prompt_contains": request.prompt_contains or None,
            "newest_first": request.newest_first,
        }
        cursor = decode_store_cursor(request.page_token, filters)
        limit = page_size(request.page_size)

        async def load() -> pb.ListGraphsResponse:
            page = await self._run.call(
                context,
                self._store.list_graphs,
                model_id=request.model_id or None,
                task=request.task or None,
                prompt_contains=request.prompt_contains or None,
                newest_first=request.newest_first,
                limit=limit,
                cursor=cursor,
            )
            return pb.ListGraphsResponse(
                graphs=[convert.stored_summary_to_proto(s) for s in page.items],
                next_page_token=encode_page_token(page.next_cursor, filters),
            )

        if self._listings is None:
            return await load()
        key = (*filters.values(), limit, cursor)
        return await self._listings.get(key, load)

    async def GetGraph(  # type: ignore[override]
        self, request: pb.GetGraphRequest, context: aio.ServicerContext
    ) -> pb.GetGraphResponse | bytes:
        """The stored graph (serialized already when the cache holds it), or the
        artifact re-pruned at the requested thresholds."""
        graph_id = _required("graph_id", request.graph_id)
        summary = await self._run.call(context, self._store.get_graph_summary, graph_id)
        if request.HasField("node_threshold") or request.HasField("edge_threshold"):
            stored = summary.metadata
            node_threshold = check_threshold(
                "node_threshold",
                request.node_threshold
                if request.HasField("node_threshold")
                else stored.node_threshold or DEFAULT_NODE_THRESHOLD,
            )
            edge_threshold = check_threshold(
                "edge_threshold",
                request.edge_threshold
                if request.HasField("edge_threshold")
                else stored.edge_threshold or DEFAULT_EDGE_THRESHOLD,
            )
            graph = await self._model.call(
                context,
                reprune,
                graph_id,
                stored.artifact_uri,
                node_threshold,
                edge_threshold,
                pass_timeout=False,
            )
            # The artifact's metadata predates storing; keep the stored identity fields
            # and what the ingest recorded with the prompt.
            graph.metadata.artifact_uri = stored.artifact_uri
            graph.metadata.task = stored.task
            graph.metadata.extra = {**graph.metadata.extra, **stored.extra}
            return pb.GetGraphResponse(graph=convert.graph_to_proto(graph, summary))
        index = await self._cached(context, graph_id)
        if index is not None:
            # off the event loop: the first call for a graph makes its serialized
            # fields, and every call copies the whole graph's bytes
            raw = await self._run.call(
                context,
                index.graph_response_bytes,
                _summary_bytes(index, summary),
                pass_timeout=False,
            )
            self._recount(index)
            return raw
        graph = await self._run.call(context, self._store.get_graph, graph_id)
        return pb.GetGraphResponse(graph=convert.graph_to_proto(graph, summary))

    async def StreamGraphEdges(  # type: ignore[override]
        self, request: pb.StreamGraphEdgesRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGraphEdgesResponse | bytes]:
        """The stored graph in chunks (serialized already when the cache holds it)."""
        graph_id = _required("graph_id", request.graph_id)
        chunk = bounded("chunk_size", request.chunk_size, DEFAULT_CHUNK, 1, MAX_CHUNK)
        summary = await self._run.call(context, self._store.get_graph_summary, graph_id)
        index = await self._cached(context, graph_id)
        if index is not None:
            # off the event loop: the first call for a graph makes its serialized fields
            await self._run.call(context, index.whole_fields, pass_timeout=False)
            self._recount(index)
            for message in index.stream_chunks(_summary_bytes(index, summary), chunk):
                yield message
            return
        graph = await self._run.call(context, self._store.get_graph, graph_id)
        yield pb.StreamGraphEdgesResponse(
            summary=convert.summary_to_proto(
                graph.metadata, graph.n_nodes, graph.n_edges, summary.created_at, summary.updated_at
            ),
            nodes=[convert.node_to_proto(n) for n in graph.nodes],
            edges=convert.edges_to_proto(graph, 0, chunk),
        )
        for start in range(chunk, graph.n_edges, chunk):
            yield pb.StreamGraphEdgesResponse(
                edges=convert.edges_to_proto(graph, start, start + chunk)
            )

    async def _cached(self, context: aio.ServicerContext, graph_id: str) -> GraphIndex | None:
        """The graph cache's copy of the graph (at most its ``revalidate_s`` stale, as
        every cached answer), or None when the server has no cache or it cannot hold
        the graph: the store answers then."""
        if self._cache is None:
            return None
        return await self._cache.get(graph_id, self._run.timeout_for(context))

    def _recount(self, index: GraphIndex) -> None:
        """Its serialized Graph fields made, ``index`` counts them in the cache's budget."""
        if self._cache is not None:
            self._cache.recount(index)

    async def GetSubgraph(  # type: ignore[override]
        self, request: pb.GetSubgraphRequest, context: aio.ServicerContext
    ) -> pb.GetSubgraphResponse | bytes:
        """The neighbourhood; serialized already when answered from the cache."""
        graph_id = _required("graph_id", request.graph_id)
        node_id = _required("node_id", request.node_id)
        depth = bounded("depth", request.depth, 1, 1, 5)
        top_k = bounded("top_k", request.top_k, 10, 1, 1000)
        direction = convert.direction_from_proto(request.direction)
        cache = self._cache
        index = await cache.get(graph_id, self._run.timeout_for(context)) if cache else None
        if cache is not None and index is not None and index.simple:
            return await cache.neighbourhood(
                index, node_id, depth=depth, top_k=top_k, direction=direction
            )
        sub = await self._run.call(
            context,
            self._store.subgraph,
            graph_id,
            node_id,
            depth=depth,
            top_k=top_k,
            direction=direction,
        )
        return pb.GetSubgraphResponse(
            nodes=[convert.node_to_proto(n) for n in sub.nodes], edges=convert.edges_to_proto(sub)
        )

    async def FindPaths(
        self, request: pb.FindPathsRequest, context: aio.ServicerContext
    ) -> pb.FindPathsResponse:
        graph_id = _required("graph_id", request.graph_id)
        source_id = _required("source_node_id", request.source_node_id)
        target_id = _required("target_node_id", request.target_node_id)
        top_k = bounded("top_k", request.top_k, 5, 1, 100)
        max_length = bounded("max_length", request.max_length, 6, 1, 10)
        score = convert.path_score_from_proto(request.score)
        cache = self._cache
        index = await cache.get(graph_id, self._run.timeout_for(context)) if cache else None
        if cache is not None and index is not None and index.acyclic:
            deadline = time.monotonic() + self._run.timeout_for(context)
            paths = await cache.run(
                lambda: index.strongest_paths(
                    source_id,
                    target_id,
                    top_k=top_k,
                    max_length=max_length,
                    score=score,
                    deadline=deadline,
                )
            )
        else:
            paths = await self._run.call(
                context,
                self._store.strongest_paths,
                graph_id,
                source_id,
                target_id,
                top_k=top_k,
                max_length=max_length,
                score=score,
            )
        return pb.FindPathsResponse(paths=[convert.path_to_proto(p) for p in paths])


def _summary_bytes(index: GraphIndex, stored: GraphSummary) -> bytes:
    """The serialized GraphSummary of a cached graph, with the store's times."""
    summary = convert.summary_to_proto(
        index.metadata, index.n_nodes, index.n_edges, stored.created_at, stored.updated_at
    )
    return summary.SerializeToString()


def _serialize(response: Message | bytes) -> bytes:
    """The response serializer of the methods the cache answers with bytes (GetSubgraph,
    GetGraph, StreamGraphEdges): those pass through, messages are serialized."""
    if isinstance(response, bytes):
        return response
    return response.SerializeToString()


#: Methods whose responses may be serialized already (:func:`_serialize`).
_PRESERIALIZED = frozenset({"GetSubgraph", "GetGraph", "StreamGraphEdges"})


def add_graph_service(servicer: GraphServicer, server: aio.Server) -> None:
    """Register ``servicer`` as ``circuits.v1.GraphService`` on ``server``, as the
    generated ``add_GraphServiceServicer_to_server`` does (handlers made from the
    service's descriptor), but with :func:`_serialize` for the methods the cache answers
    with bytes."""
    service = pb.DESCRIPTOR.services_by_name["GraphService"]
    handlers = {}
    for method in service.methods:
        request = GetMessageClass(method.input_type)
        response = GetMessageClass(method.output_type)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=(
                _serialize if method.name in _PRESERIALIZED else response.SerializeToString
            ),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
