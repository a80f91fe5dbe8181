"""A typed Python client of the circuits.v1 API.

Returns domain types (:class:`ingest.graph.AttributionGraph`, :class:`FeatureRecord`,
:class:`ingest.store.base.Page`, ...), so callers never touch generated code, and
raises domain errors (``ingest.errors``) for failed calls: the status code maps back to
the class the server mapped from, with the server's message; any other status
(DEADLINE_EXCEEDED, INTERNAL, ...) raises :class:`UnavailableError` naming the code.

Retries: calls answered UNAVAILABLE are retried with bounded exponential backoff
with full jitter (:class:`RetryPolicy`, in :mod:`service.transport`); a stream is
retried only if it failed before its first message, and an answer the server gave
after retrying the graph store itself (trailer ``circuitscope-retried-s``) is not
retried. Every read is idempotent, SetFeatureLabel sets a value and CancelJob is
idempotent, so retrying is safe; a retried SubmitIngest may queue a second job, which
then finds its graphs stored.

Example::

    with CircuitsClient("localhost:50051", token=os.environ["CIRCUITSCOPE_TOKEN"]) as c:
        page = c.list_graphs(model_id="gpt2-ioi", page_size=10)
        sub = c.get_subgraph(page.items[0].graph_id, "E_464_0", depth=2, top_k=5)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ingest.errors import InvalidArgumentError, NotFoundError, UnavailableError
from ingest.graph import AttributionGraph, FeatureRecord
from ingest.store.base import Direction, FeatureOccurrence, GraphSummary, Page, Path, PathScore
from service import convert
from service._generated.circuits.v1 import (
    analysis_service_pb2,
    analysis_service_pb2_grpc,
    feature_service_pb2,
    feature_service_pb2_grpc,
    graph_service_pb2,
    graph_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    types_pb2,
)
from service.config import DEFAULT_MAX_MESSAGE_BYTES
from service.results import (
    Attribution,
    CircuitFaithfulness,
    InterventionResult,
    JobStatus,
    ServedModel,
)
from service.transport import ClientTls, RetryPolicy, Transport, error_from_rpc

__all__ = ["CircuitsClient", "ClientTls", "RetryPolicy", "error_from_rpc"]
_DIRECTIONS = {
    "both": graph_service_pb2.DIRECTION_BOTH,
    "out": graph_service_pb2.DIRECTION_OUT,
    "in": graph_service_pb2.DIRECTION_IN,
}
_SCORES = {"product": graph_service_pb2.PATH_SCORE_PRODUCT, "sum": graph_service_pb2.PATH_SCORE_SUM}
# EvaluateCircuit's edge rankings and patchings by their names in
# ingest.attribution.faithfulness.
EDGE_SCORINGS = {
    "attribution": analysis_service_pb2.EDGE_SCORING_ATTRIBUTION,
    "weight": analysis_service_pb2.EDGE_SCORING_WEIGHT,
    "random": analysis_service_pb2.EDGE_SCORING_RANDOM,
    "eap": analysis_service_pb2.EDGE_SCORING_EAP,
    "eap_signed": analysis_service_pb2.EDGE_SCORING_EAP_SIGNED,
}
CIRCUIT_PATCHINGS = {
    "edge": analysis_service_pb2.CIRCUIT_PATCHING_EDGE,
    "node": analysis_service_pb2.CIRCUIT_PATCHING_NODE,
}

T = TypeVar("T")
E = TypeVar("E")  # a proto enum's value type


class CircuitsClient:
    """Synchronous client of GraphService, FeatureService and health (see module doc)."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: ClientTls | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._transport = Transport(
            target,
            token=token,
            tls=tls,
            timeout_s=timeout_s,
            retry=retry,
            max_message_bytes=max_message_bytes,
        )
        self._call = self._transport.call
        self._stream = self._transport.stream
        channel = self._transport.channel
        self._graphs = graph_service_pb2_grpc.GraphServiceStub(channel)
        self._features = feature_service_pb2_grpc.FeatureServiceStub(channel)
        self._analysis = analysis_service_pb2_grpc.AnalysisServiceStub(channel)
        self._jobs = job_service_pb2_grpc.JobServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> CircuitsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def channel(self) -> grpc.Channel:
        return self._transport.channel

    # ------------------------------------------------------------------ health
    def health(self, service: str = "") -> str:
        """The health status name of ``service`` ("" for the server): SERVING, NOT_SERVING, ..."""
        with _fields("Health.Check"):
            request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._call(self._health.Check, request)
        except NotFoundError:
            raise NotFoundError(
                f"no health status for service {service!r}: ask for '' (the server) or a "
                "circuits.v1 service such as 'circuits.v1.GraphService'"
            ) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ------------------------------------------------------------------ graphs
    def list_graphs(
        self,
        *,
        model_id: str = "",
        task: str = "",
        prompt_contains: str = "",
        page_size: int = 0,
        page_token: str = "",
        newest_first: bool = False,
    ) -> Page[GraphSummary]:
        """One page of stored graphs; ``next_cursor`` is the next page's token (None at the end)."""
        with _fields("ListGraphs"):
            request = graph_service_pb2.ListGraphsRequest(
                model_id=model_id,
                task=task,
                prompt_contains=prompt_contains,
                page_size=page_size,
                page_token=page_token,
                newest_first=newest_first,
            )
        response = self._call(self._graphs.ListGraphs, request)
        return Page(
            [convert.summary_from_proto(g) for g in response.graphs],
            response.next_page_token or None,
        )

    def iter_graphs(self, **filters: Any) -> Iterator[GraphSummary]:
        """Every stored graph matching ``filters`` (as for :meth:`list_graphs`), page by page."""
        return _every_page(self.list_graphs, filters)

    def get_graph(
        self,
        graph_id: str,
        *,
        node_threshold: float | None = None,
        edge_threshold: float | None = None,
    ) -> AttributionGraph:
        """The stored pruned graph (or the artifact re-pruned at the given thresholds)."""
        with _fields("GetGraph"):
            request = graph_service_pb2.GetGraphRequest(graph_id=graph_id)
            if node_threshold is not None:
                request.node_threshold = node_threshold
            if edge_threshold is not None:
                request.edge_threshold = edge_threshold
        response = self._call(self._graphs.GetGraph, request)
        return convert.graph_from_proto(response.graph)

    def stream_graph(self, graph_id: str, *, chunk_size: int = 0) -> AttributionGraph:
        """The stored graph, received as a stream of edge chunks and reassembled."""
        with _fields("StreamGraphEdges"):
            request = graph_service_pb2.StreamGraphEdgesRequest(
                graph_id=graph_id, chunk_size=chunk_size
            )
        summary: types_pb2.GraphSummary | None = None
        nodes: list[types_pb2.Node] = []
        edges: list[types_pb2.Edge] = []
        for chunk in self._stream(self._graphs.StreamGraphEdges, request):
            if chunk.HasField("summary"):
                summary = chunk.summary
                nodes.extend(chunk.nodes)
            edges.extend(chunk.edges)
        if summary is None:
            raise UnavailableError(f"the stream of graph {graph_id!r} ended before its first chunk")
        return convert.graph_from_parts(convert.metadata_from_proto(summary), nodes, edges)

    def get_subgraph(
        self,
        graph_id: str,
        node_id: str,
        *,
        depth: int = 0,
        top_k: int = 0,
        direction: Direction = "both",
    ) -> AttributionGraph:
        """The neighbourhood of ``node_id`` (0 for the server's defaults: depth 1, top_k 10).

        GetSubgraph answers nodes and edges only: the metadata carries the graph_id and
        nothing else (``list_graphs`` or ``get_graph`` give the rest).
        """
        with _fields("GetSubgraph"):
            request = graph_service_pb2.GetSubgraphRequest(
                graph_id=graph_id,
                node_id=node_id,
                depth=depth,
                top_k=top_k,
                direction=_choice("direction", direction, _DIRECTIONS),
            )
        response = self._call(self._graphs.GetSubgraph, request)
        summary = types_pb2.GraphSummary(graph_id=graph_id)
        return convert.graph_from_parts(
            convert.metadata_from_proto(summary), response.nodes, response.edges
        )

    def find_paths(
        self,
        graph_id: str,
        source_node_id: str,
        target_node_id: str,
        *,
        top_k: int = 0,
        max_length: int = 0,
        score: PathScore = "product",
    ) -> list[Path]:
        """The strongest paths from source to target, strongest first."""
        with _fields("FindPaths"):
            request = graph_service_pb2.FindPathsRequest(
                graph_id=graph_id,
                source_node_id=source_node_id,
                target_node_id=target_node_id,
                top_k=top_k,
                max_length=max_length,
                score=_choice("score", score, _SCORES),
            )
        response = self._call(self._graphs.FindPaths, request)
        return [convert.path_from_proto(p) for p in response.paths]

    # ------------------------------------------------------------------ features
    def get_feature(self, set_id: str, layer: int, index: int) -> FeatureRecord:
        with _fields("GetFeature"):
            request = feature_service_pb2.GetFeatureRequest(key=_feature_key(set_id, layer, index))
        response = self._call(self._features.GetFeature, request)
        return convert.feature_from_proto(response.feature)

    def search_features(
        self,
        set_id: str,
        *,
        layer: int | None = None,
        label_contains: str = "",
        token: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[FeatureRecord]:
        with _fields("SearchFeatures"):
            request = feature_service_pb2.SearchFeaturesRequest(
                set_id=set_id,
                label_contains=label_contains,
                token=token,
                page_size=page_size,
                page_token=page_token,
            )
            if layer is not None:
                request.layer = layer
        response = self._call(self._features.SearchFeatures, request)
        return Page(
            [convert.feature_from_proto(f) for f in response.features],
            response.next_page_token or None,
        )

    def set_feature_label(self, set_id: str, layer: int, index: int, label: str) -> FeatureRecord:
        with _fields("SetFeatureLabel"):
            key = _feature_key(set_id, layer, index)
            request = feature_service_pb2.SetFeatureLabelRequest(key=key, label=label)
        return convert.feature_from_proto(
            self._call(self._features.SetFeatureLabel, request).feature
        )

    def feature_occurrences(
        self, set_id: str, layer: int, index: int, *, page_size: int = 0, page_token: str = ""
    ) -> Page[FeatureOccurrence]:
        with _fields("ListFeatureOccurrences"):
            request = feature_service_pb2.ListFeatureOccurrencesRequest(
                key=_feature_key(set_id, layer, index), page_size=page_size, page_token=page_token
            )
        response = self._call(self._features.ListFeatureOccurrences, request)
        return Page(
            [convert.occurrence_from_proto(o) for o in response.occurrences],
            response.next_page_token or None,
        )

    # ------------------------------------------------------------------ analysis
    def list_models(self) -> list[str]:
        """The names of the models the server analyses on request."""
        return [m.name for m in self.served_models()]

    def served_models(self) -> list[ServedModel]:
        """The served models with the ids their stored graphs and features carry."""
        response = self._call(self._analysis.ListModels, analysis_service_pb2.ListModelsRequest())
        return [convert.served_model_from_proto(m) for m in response.models]

    def attribute(
        self,
        model: str,
        prompt: str,
        *,
        logit_diff: tuple[int, int] | None = None,
        feature: tuple[int, int, int | None] | None = None,
        max_n_logits: int = 0,
        max_feature_nodes: int | None = None,
        node_threshold: float | None = None,
        edge_threshold: float | None = None,
        timeout_s: float | None = None,
    ) -> Attribution:
        """The pruned attribution graph of ``prompt`` on a served model.

        Target: the top logits (default; ``max_n_logits``), a logit difference
        ``(correct, counterfactual)`` token ids, or a feature ``(layer, index, pos)``.
        """
        if logit_diff is not None and feature is not None:
            raise InvalidArgumentError("give at most one of logit_diff and feature")
        with _fields("Attribute"):
            request = analysis_service_pb2.AttributeRequest(model=model, prompt=prompt)
            if logit_diff is not None:
                request.logit_diff.correct_token_id = logit_diff[0]
                request.logit_diff.counterfactual_token_id = logit_diff[1]
            elif feature is not None:
                request.feature.layer, request.feature.index = feature[0], feature[1]
                if feature[2] is not None:
                    request.feature.position = feature[2]
            else:
                request.logits.max_n_logits = max_n_logits
            if max_feature_nodes is not None:
                request.max_feature_nodes = max_feature_nodes
            if node_threshold is not None:
                request.node_threshold = node_threshold
            if edge_threshold is not None:
                request.edge_threshold = edge_threshold
        response = self._call(self._analysis.Attribute, request, timeout_s)
        return convert.attribution_from_proto(response)

    def intervene(
        self,
        model: str,
        prompt: str,
        interventions: list[tuple[int, int, int, str, float]],
        *,
        freeze_attention: bool = False,
        top_k: int = 0,
        timeout_s: float | None = None,
    ) -> InterventionResult:
        """Next-token predictions with features changed: each intervention is
        ``(layer, position, index, "value" | "scale", number)``."""
        interventions = list(interventions)  # read twice: an iterator would be spent
        for *_, kind, _number in interventions:
            if kind not in ("value", "scale"):
                raise InvalidArgumentError(
                    f"intervention kind must be value or scale, got {kind!r}"
                )
        with _fields("Intervene"):
            request = analysis_service_pb2.InterveneRequest(
                model=model, prompt=prompt, freeze_attention=freeze_attention, top_k=top_k
            )
            for layer, position, index, kind, number in interventions:
                iv = request.interventions.add(layer=layer, position=position, index=index)
                setattr(iv, kind, number)
        response = self._call(self._analysis.Intervene, request, timeout_s)
        return convert.intervention_from_proto(response)

    def evaluate_circuit(
        self,
        model: str,
        prompt: str,
        counterfactual: str,
        correct_token_id: int,
        counterfactual_token_id: int,
        *,
        scoring: str = "attribution",
        patching: str = "edge",
        fractions: list[float] | None = None,
        max_feature_nodes: int | None = None,
        timeout_s: float | None = None,
    ) -> CircuitFaithfulness:
        """Faithfulness f(k) of the prompt's circuits (MIB protocol); ``scoring`` is one
        of :data:`EDGE_SCORINGS`, ``patching`` ``edge`` or ``node``."""
        with _fields("EvaluateCircuit"):
            request = analysis_service_pb2.EvaluateCircuitRequest(
                model=model,
                prompt=prompt,
                counterfactual=counterfactual,
                correct_token_id=correct_token_id,
                counterfactual_token_id=counterfactual_token_id,
                scoring=_choice("scoring", scoring, EDGE_SCORINGS),
                patching=_choice("patching", patching, CIRCUIT_PATCHINGS),
                fractions=fractions or [],
            )
            if max_feature_nodes is not None:
                request.max_feature_nodes = max_feature_nodes
        response = self._call(self._analysis.EvaluateCircuit, request, timeout_s)
        return convert.faithfulness_from_proto(response)

    # ------------------------------------------------------------------ jobs
    def submit_ingest(
        self,
        model: str,
        prompts: list[dict[str, str]],
        *,
        node_threshold: float | None = None,
        edge_threshold: float | None = None,
        max_feature_nodes: int | None = None,
    ) -> JobStatus:
        """Queue an ingest job; ``prompts`` are worker records (``prompt``, ``task``,
        ``id``, ``counterfactual``, ``correct``, ``incorrect``)."""
        with _fields("SubmitIngest"):
            request = job_service_pb2.SubmitIngestRequest(model=model)
            for record in prompts:
                unknown = set(record) - {
                    "prompt",
                    "task",
                    "id",
                    "counterfactual",
                    "correct",
                    "incorrect",
                }
                if unknown:
                    raise InvalidArgumentError(f"unknown prompt field(s) {sorted(unknown)}")
                request.prompts.add(
                    prompt=record.get("prompt", ""),
                    task=record.get("task", ""),
                    prompt_id=record.get("id", ""),
                    counterfactual=record.get("counterfactual", ""),
                    correct=record.get("correct", ""),
                    incorrect=record.get("incorrect", ""),
                )
            if node_threshold is not None:
                request.node_threshold = node_threshold
            if edge_threshold is not None:
                request.edge_threshold = edge_threshold
            if max_feature_nodes is not None:
                request.max_feature_nodes = max_feature_nodes
        return convert.job_status_from_proto(self._call(self._jobs.SubmitIngest, request).job)

    def get_job(self, job_id: str) -> JobStatus:
        with _fields("GetJob"):
            request = job_service_pb2.GetJobRequest(job_id=job_id)
        return convert.job_status_from_proto(self._call(self._jobs.GetJob, request).job)

    def watch_job(self, job_id: str) -> Iterator[JobStatus]:
        """The job's states as they change, until it finishes (the client's timeout
        bounds the whole watch)."""
        with _fields("WatchJob"):
            request = job_service_pb2.WatchJobRequest(job_id=job_id)
        for update in self._stream(self._jobs.WatchJob, request):
            yield convert.job_status_from_proto(update.job)

    def list_jobs(
        self, *, state: str = "", model: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[JobStatus]:
        """One page of the server's jobs, most recently submitted first, without their
        graph ids and errors (:meth:`get_job` has them); ``state`` is one of
        :class:`JobStatus`'s states or empty for all."""
        if state and state not in convert.JOB_STATES:
            raise InvalidArgumentError(
                f"unknown job state {state!r}; use one of {', '.join(convert.JOB_STATES)}"
            )
        with _fields("ListJobs"):
            request = job_service_pb2.ListJobsRequest(
                state=convert.JOB_STATES.get(state, job_service_pb2.JOB_STATE_UNSPECIFIED),
                model=model,
                page_size=page_size,
                page_token=page_token,
            )
        response = self._call(self._jobs.ListJobs, request)
        return Page(
            [convert.job_status_from_proto(j) for j in response.jobs],
            response.next_page_token or None,
        )

    def iter_jobs(self, **filters: Any) -> Iterator[JobStatus]:
        """Every job matching ``filters`` (as for :meth:`list_jobs`), page by page."""
        return _every_page(self.list_jobs, filters)

    def cancel_job(self, job_id: str) -> JobStatus:
        with _fields("CancelJob"):
            request = job_service_pb2.CancelJobRequest(job_id=job_id)
        return convert.job_status_from_proto(self._call(self._jobs.CancelJob, request).job)


@contextmanager
def _fields(method: str) -> Iterator[None]:
    """Protobuf refuses a value its field cannot hold (an integer beyond the field's
    range, a string that is not valid text): the caller's mistake, a domain error."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(
            f"bad value in the {method} request ({exc}): integers must fit the field "
            "(int32 for sizes, depths, layers and positions; int64 for indices and token ids)"
        ) from None


def _choice(name: str, value: str, choices: Mapping[str, E]) -> E:
    """``choices[value]`` (a proto enum value), or an error naming ``name`` and the choices."""
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return choices[value]


def _feature_key(set_id: str, layer: int, index: int) -> types_pb2.FeatureKey:
    return types_pb2.FeatureKey(set_id=set_id, layer=layer, index=index)


def _every_page(list_page: Callable[..., Page[T]], filters: dict[str, Any]) -> Iterator[T]:
    """The items of every page ``list_page(page_token=..., **filters)`` returns, in order."""
    token = ""
    while True:
        page = list_page(page_token=token, **filters)
        yield from page.items
        if page.next_cursor is None:
            return
        token = page.next_cursor
