"""``circuits.v1.AnalysisService``: attribution on request, on served models.

Each call runs :func:`ingest.attribution.attribute.attribute` and prunes the result
(:meth:`AttributionResult.to_graph`) in the model pool; nothing runs on the event loop.
The call's deadline cannot interrupt a running computation: a call whose deadline
passes gets DEADLINE_EXCEEDED while the computation finishes in the background.
"""

from __future__ import annotations

from grpc import aio

from ingest.errors import InvalidArgumentError
from ingest.graph import AttributionGraph
from service import convert
from service._generated.circuits.v1 import analysis_service_pb2 as pb
from service._generated.circuits.v1 import analysis_service_pb2_grpc
from service.artifacts import check_threshold
from service.models import ModelRegistry
from service.runner import BlockingRunner

MAX_PROMPT_CHARS = 4096
MAX_FEATURE_NODES = 100_000


def _attribute(
    registry: ModelRegistry,
    name: str,
    prompt: str,
    target: object,
    max_feature_nodes: int | None,
    node_threshold: float,
    edge_threshold: float,
) -> tuple[AttributionGraph, int, float]:
    from ingest.attribution.attribute import attribute

    model, transcoders = registry.get(name)
    result = attribute(
        model,
        transcoders,
        prompt,
        target=target,  # type: ignore[arg-type]
        max_feature_nodes=max_feature_nodes,
    )
    graph = result.to_graph(
        pruned=True, node_threshold=node_threshold, edge_threshold=edge_threshold
    )
    return graph, result.n_nodes, float(result.stats.get("seconds", 0.0))


class AnalysisServicer(analysis_service_pb2_grpc.AnalysisServiceServicer):
    """Attribution graphs computed on request."""

    def __init__(self, registry: ModelRegistry, model_runner: BlockingRunner) -> None:
        self._registry = registry
        self._model = model_runner

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ServedModel(name=n, loaded=self._registry.is_loaded(n))
                for n in self._registry.names()
            ]
        )

    async def Attribute(
        self, request: pb.AttributeRequest, context: aio.ServicerContext
    ) -> pb.AttributeResponse:
        if not request.model:
            raise InvalidArgumentError("model is required; ListModels names the served models")
        if not request.prompt:
            raise InvalidArgumentError("prompt is required")
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgumentError(
                f"prompt has {len(request.prompt)} characters; keep it under {MAX_PROMPT_CHARS}"
            )
        max_nodes = None
        if request.HasField("max_feature_nodes"):
            max_nodes = request.max_feature_nodes
            if not 1 <= max_nodes <= MAX_FEATURE_NODES:
                raise InvalidArgumentError(
                    f"max_feature_nodes must be in 1..{MAX_FEATURE_NODES}, got {max_nodes}"
                )
        node_threshold = check_threshold(
            "node_threshold",
            request.node_threshold if request.HasField("node_threshold") else 0.8,
        )
        edge_threshold = check_threshold(
            "edge_threshold",
            request.edge_threshold if request.HasField("edge_threshold") else 0.98,
        )
        target = convert.target_from_proto(request)
        graph, full_nodes, seconds = await self._model.call(
            context,
            _attribute,
            self._registry,
            request.model,
            request.prompt,
            target,
            max_nodes,
            node_threshold,
            edge_threshold,
            pass_timeout=False,
        )
        return pb.AttributeResponse(
            graph=convert.graph_to_proto(graph), full_node_count=full_nodes, seconds=seconds
        )
