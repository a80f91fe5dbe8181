"""Converters between the circuits.v1 messages and the domain types, both directions.

The one module that knows both worlds: servicers turn requests into domain arguments
and domain results into responses here, and the client turns responses back into
domain types, so neither side touches the other's representation. The domain
(``ingest/``) never imports generated code.

Round trips are exact for every field the contract carries (``GraphMetadata.extra``
travels as a ``Struct``, so its numbers come back as floats); edge weights travel as
doubles, so float32 weights survive unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from ingest.errors import InvalidArgumentError
from ingest.graph import AttributionGraph, FeatureRecord, GraphMetadata, Node, NodeKind
from ingest.store.base import (
    Direction,
    FeatureOccurrence,
    GraphStatus,
    GraphSummary,
    Path,
    PathScore,
)
from service._generated.circuits.v1 import (
    analysis_service_pb2,
    feature_service_pb2,
    graph_service_pb2,
    job_service_pb2,
    types_pb2,
)
from service.results import (
    Attribution,
    CircuitFaithfulness,
    InterventionResult,
    JobStatus,
    Prediction,
    ServedModel,
)

_KIND_TO_PROTO = {
    NodeKind.FEATURE: types_pb2.NODE_KIND_FEATURE,
    NodeKind.ERROR: types_pb2.NODE_KIND_ERROR,
    NodeKind.TOKEN: types_pb2.NODE_KIND_TOKEN,
    NodeKind.LOGIT: types_pb2.NODE_KIND_LOGIT,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}
_DIRECTIONS: dict[int, Direction] = {
    graph_service_pb2.DIRECTION_UNSPECIFIED: "both",
    graph_service_pb2.DIRECTION_BOTH: "both",
    graph_service_pb2.DIRECTION_OUT: "out",
    graph_service_pb2.DIRECTION_IN: "in",
}
_PATH_SCORES: dict[int, PathScore] = {
    graph_service_pb2.PATH_SCORE_UNSPECIFIED: "product",
    graph_service_pb2.PATH_SCORE_PRODUCT: "product",
    graph_service_pb2.PATH_SCORE_SUM: "sum",
}


def _opt(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


# ---------------------------------------------------------------------------- enums


def direction_from_proto(value: int) -> Direction:
    try:
        return _DIRECTIONS[value]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown direction {value}; use DIRECTION_OUT, DIRECTION_IN or DIRECTION_BOTH"
        ) from None


def path_score_from_proto(value: int) -> PathScore:
    try:
        return _PATH_SCORES[value]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown path score {value}; use PATH_SCORE_PRODUCT or PATH_SCORE_SUM"
        ) from None


# ---------------------------------------------------------------------------- nodes, edges


def node_to_proto(node: Node) -> types_pb2.Node:
    msg = types_pb2.Node(
        node_id=node.node_id,
        kind=_KIND_TO_PROTO[node.kind],
        position=node.pos,
        token=node.token or "",
        label=node.label or "",
    )
    for name, value in (
        ("layer", node.layer),
        ("feature", node.feature),
        ("token_id", node.token_id),
        ("activation", node.activation),
        ("influence", node.influence),
        ("token_prob", node.token_prob),
    ):
        if value is not None:
            setattr(msg, name, value)
    return msg


def node_from_proto(msg: types_pb2.Node) -> Node:
    if msg.kind not in _KIND_FROM_PROTO:
        raise InvalidArgumentError(f"node {msg.node_id!r} has no valid kind ({msg.kind})")
    return Node(
        node_id=msg.node_id,
        kind=_KIND_FROM_PROTO[msg.kind],
        layer=_opt(msg, "layer"),
        pos=msg.position,
        feature=_opt(msg, "feature"),
        token_id=_opt(msg, "token_id"),
        token=msg.token or None,
        activation=_opt(msg, "activation"),
        influence=_opt(msg, "influence"),
        token_prob=_opt(msg, "token_prob"),
        label=msg.label or None,
    )


def edges_to_proto(
    graph: AttributionGraph, start: int = 0, stop: int | None = None
) -> list[types_pb2.Edge]:
    """Edges ``start:stop`` of ``graph`` as messages, in stored order."""
    ids = [n.node_id for n in graph.nodes]
    sources = graph.sources[start:stop].tolist()
    targets = graph.targets[start:stop].tolist()
    weights = graph.weights[start:stop].tolist()
    return [
        types_pb2.Edge(source_id=ids[s], target_id=ids[t], weight=w)
        for s, t, w in zip(sources, targets, weights, strict=True)
    ]


def _edge_arrays(
    nodes: Sequence[Node], edges: Sequence[types_pb2.Edge]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {n.node_id: i for i, n in enumerate(nodes)}
    try:
        sources = np.array([index[e.source_id] for e in edges], dtype=np.int64)
        targets = np.array([index[e.target_id] for e in edges], dtype=np.int64)
    except KeyError as exc:
        raise InvalidArgumentError(
            f"an edge refers to node {exc.args[0]!r}, which is not in the graph"
        ) from None
    weights = np.array([e.weight for e in edges], dtype=np.float32)
    return sources, targets, weights


# ---------------------------------------------------------------------------- graphs


def _timestamp(value: datetime | None) -> Any:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    if value is not None:
        ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def summary_to_proto(
    metadata: GraphMetadata,
    node_count: int,
    edge_count: int,
    created_at: datetime | None = None,
    updated_at: datetime | None = None,
) -> types_pb2.GraphSummary:
    msg = types_pb2.GraphSummary(
        graph_id=metadata.graph_id,
        model_id=metadata.model_id,
        set_id=metadata.set_id,
        task=metadata.task or "",
        prompt=metadata.prompt,
        tokens=metadata.tokens,
        token_ids=metadata.token_ids,
        artifact_uri=metadata.artifact_uri or "",
        node_count=node_count,
        edge_count=edge_count,
    )
    for name in ("node_threshold", "edge_threshold", "replacement_score", "completeness_score"):
        value = getattr(metadata, name)
        if value is not None:
            setattr(msg, name, value)
    if created_at is not None:
        msg.create_time.CopyFrom(_timestamp(created_at))
    if updated_at is not None:
        msg.update_time.CopyFrom(_timestamp(updated_at))
    if metadata.extra:
        msg.extra.update(metadata.extra)
    return msg


def stored_summary_to_proto(summary: GraphSummary) -> types_pb2.GraphSummary:
    return summary_to_proto(
        summary.metadata, summary.n_nodes, summary.n_edges, summary.created_at, summary.updated_at
    )


def metadata_from_proto(msg: types_pb2.GraphSummary) -> GraphMetadata:
    return GraphMetadata(
        graph_id=msg.graph_id,
        model_id=msg.model_id,
        set_id=msg.set_id,
        prompt=msg.prompt,
        tokens=list(msg.tokens),
        token_ids=list(msg.token_ids),
        node_threshold=_opt(msg, "node_threshold"),
        edge_threshold=_opt(msg, "edge_threshold"),
        replacement_score=_opt(msg, "replacement_score"),
        completeness_score=_opt(msg, "completeness_score"),
        artifact_uri=msg.artifact_uri or None,
        task=msg.task or None,
        extra=json_format.MessageToDict(msg.extra) if msg.HasField("extra") else {},
    )


def summary_from_proto(msg: types_pb2.GraphSummary) -> GraphSummary:
    return GraphSummary(
        metadata=metadata_from_proto(msg),
        status=GraphStatus.COMPLETE,
        n_nodes=msg.node_count,
        n_edges=msg.edge_count,
        created_at=_time(msg, "create_time"),
        updated_at=_time(msg, "update_time"),
    )


def _time(msg: Message, name: str) -> datetime | None:
    return getattr(msg, name).ToDatetime(tzinfo=UTC) if msg.HasField(name) else None


def graph_to_proto(graph: AttributionGraph, stored: GraphSummary | None = None) -> types_pb2.Graph:
    """``graph`` as a message; ``stored``, its summary in the store, gives its times."""
    times = (stored.created_at, stored.updated_at) if stored is not None else (None, None)
    return types_pb2.Graph(
        summary=summary_to_proto(graph.metadata, graph.n_nodes, graph.n_edges, *times),
        nodes=[node_to_proto(n) for n in graph.nodes],
        edges=edges_to_proto(graph),
    )


def graph_from_parts(
    metadata: GraphMetadata, nodes: Sequence[types_pb2.Node], edges: Sequence[types_pb2.Edge]
) -> AttributionGraph:
    """Reassemble a domain graph from node and edge messages."""
    domain_nodes = [node_from_proto(n) for n in nodes]
    sources, targets, weights = _edge_arrays(domain_nodes, edges)
    return AttributionGraph(metadata, domain_nodes, sources, targets, weights)


def graph_from_proto(msg: types_pb2.Graph) -> AttributionGraph:
    return graph_from_parts(metadata_from_proto(msg.summary), msg.nodes, msg.edges)


def path_to_proto(path: Path) -> types_pb2.Path:
    edges = [
        types_pb2.Edge(source_id=s, target_id=t, weight=w)
        for s, t, w in zip(path.node_ids[:-1], path.node_ids[1:], path.weights, strict=True)
    ]
    return types_pb2.Path(node_ids=path.node_ids, edges=edges, score=path.score)


def path_from_proto(msg: types_pb2.Path) -> Path:
    return Path(node_ids=list(msg.node_ids), weights=[e.weight for e in msg.edges], score=msg.score)


# ---------------------------------------------------------------------------- features


def feature_key_from_proto(key: types_pb2.FeatureKey) -> tuple[str, int, int]:
    """(set_id, layer, index) of a key; InvalidArgumentError when incomplete."""
    if not key.set_id:
        raise InvalidArgumentError("feature key needs a set_id (the transcoder set id)")
    if key.layer < 0 or key.index < 0:
        raise InvalidArgumentError(
            f"feature key layer and index must be >= 0, got layer {key.layer}, index {key.index}"
        )
    return key.set_id, key.layer, key.index


def feature_to_proto(feature: FeatureRecord) -> types_pb2.Feature:
    msg = types_pb2.Feature(
        key=types_pb2.FeatureKey(set_id=feature.set_id, layer=feature.layer, index=feature.index),
        label=feature.label or "",
        top_tokens=feature.top_tokens,
        de_embedding_tokens=feature.de_embedding_tokens,
        output_tokens=feature.output_tokens,
    )
    if feature.density is not None:
        msg.density = feature.density
    if feature.max_activation is not None:
        msg.max_activation = feature.max_activation
    for example in feature.top_examples:
        struct = struct_pb2.Struct()
        struct.update(example)
        msg.top_examples.append(struct)
    return msg


#: Example fields that are integers; a Struct carries every number as a double.
_INTEGER_EXAMPLE_FIELDS = frozenset({"window", "position"})


def _example_from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    example = json_format.MessageToDict(struct)
    for key in _INTEGER_EXAMPLE_FIELDS & example.keys():
        value = example[key]
        if isinstance(value, float) and value.is_integer():
            example[key] = int(value)
    return example


def feature_from_proto(msg: types_pb2.Feature) -> FeatureRecord:
    return FeatureRecord(
        set_id=msg.key.set_id,
        layer=msg.key.layer,
        index=msg.key.index,
        density=_opt(msg, "density"),
        max_activation=_opt(msg, "max_activation"),
        label=msg.label or None,
        top_tokens=list(msg.top_tokens),
        top_examples=[_example_from_struct(s) for s in msg.top_examples],
        de_embedding_tokens=list(msg.de_embedding_tokens),
        output_tokens=list(msg.output_tokens),
    )


def occurrence_to_proto(occ: FeatureOccurrence) -> feature_service_pb2.FeatureOccurrence:
    msg = feature_service_pb2.FeatureOccurrence(
        graph_id=occ.graph_id, node_id=occ.node_id, position=occ.pos
    )
    if occ.activation is not None:
        msg.activation = occ.activation
    if occ.influence is not None:
        msg.influence = occ.influence
    return msg


def occurrence_from_proto(msg: feature_service_pb2.FeatureOccurrence) -> FeatureOccurrence:
    return FeatureOccurrence(
        graph_id=msg.graph_id,
        node_id=msg.node_id,
        pos=msg.position,
        activation=_opt(msg, "activation"),
        influence=_opt(msg, "influence"),
    )


# ---------------------------------------------------------------------------- analysis


def target_from_proto(request: Any) -> Any:
    """The attribution target of an AttributeRequest (``ingest.attribution.targets``)."""
    from ingest.attribution.targets import FeatureTarget, LogitDiffTarget, LogitTargets

    which = request.WhichOneof("target")
    if which is None:
        return LogitTargets()
    if which == "logits":
        spec = request.logits
        if not 0 <= spec.max_n_logits <= 100:
            raise InvalidArgumentError(f"max_n_logits must be in 0..100, got {spec.max_n_logits}")
        return LogitTargets(
            max_n_logits=spec.max_n_logits or 10,
            desired_logit_prob=spec.desired_logit_prob or 0.95,
        )
    if which == "logit_diff":
        spec = request.logit_diff
        return LogitDiffTarget(spec.correct_token_id, spec.counterfactual_token_id)
    spec = request.feature
    if spec.layer < 0 or spec.index < 0:
        raise InvalidArgumentError("feature target layer and index must be >= 0")
    if spec.HasField("position") and spec.position < 0:
        raise InvalidArgumentError(f"feature target position must be >= 0, got {spec.position}")
    return FeatureTarget(
        spec.layer, spec.index, spec.position if spec.HasField("position") else None
    )


def predictions_to_proto(
    rows: Sequence[tuple[int, str, float, float]],
) -> list[analysis_service_pb2.TokenPrediction]:
    """(token id, token, logit, probability) rows as TokenPrediction messages."""
    return [
        analysis_service_pb2.TokenPrediction(token_id=t, token=s, logit=lg, probability=pr)
        for t, s, lg, pr in rows
    ]


# ---------------------------------------------------------------------------- jobs

JOB_STATES = {
    "queued": job_service_pb2.JOB_STATE_QUEUED,
    "running": job_service_pb2.JOB_STATE_RUNNING,
    "succeeded": job_service_pb2.JOB_STATE_SUCCEEDED,
    "failed": job_service_pb2.JOB_STATE_FAILED,
    "cancelled": job_service_pb2.JOB_STATE_CANCELLED,
}
JOB_STATE_NAMES = {v: k for k, v in JOB_STATES.items()}
_PROMPT_FIELDS = (
    ("prompt", "prompt"),
    ("task", "task"),
    ("prompt_id", "id"),
    ("counterfactual", "counterfactual"),
    ("correct", "correct"),
    ("incorrect", "incorrect"),
)


def ingest_prompt_from_proto(msg: job_service_pb2.IngestPrompt) -> dict[str, str]:
    """The ingest worker's JSON Lines record of a prompt (empty fields left out)."""
    return {key: getattr(msg, name) for name, key in _PROMPT_FIELDS if getattr(msg, name)}


def job_to_proto(job: Any) -> job_service_pb2.Job:
    """A :class:`service.jobs.Job` as a message."""
    msg = job_service_pb2.Job(
        job_id=job.job_id,
        state=JOB_STATES[str(job.state)],
        model=job.model,
        prompt_count=len(job.prompts),
        processed_count=job.processed,
        graph_ids=job.graph_ids,
        already_stored_count=job.already_stored,
        errors=job.errors,
        message=job.message,
    )
    msg.create_time.CopyFrom(_timestamp(job.created_at))
    msg.update_time.CopyFrom(_timestamp(job.updated_at))
    return msg


def job_status_from_proto(msg: job_service_pb2.Job) -> JobStatus:
    return JobStatus(
        job_id=msg.job_id,
        state=JOB_STATE_NAMES.get(msg.state, "unspecified"),
        model=msg.model,
        prompt_count=msg.prompt_count,
        processed_count=msg.processed_count,
        graph_ids=list(msg.graph_ids),
        already_stored_count=msg.already_stored_count,
        errors=list(msg.errors),
        message=msg.message,
    )


# ---------------------------------------------------------------------------- analysis results


def attribution_from_proto(msg: analysis_service_pb2.AttributeResponse) -> Attribution:
    return Attribution(graph_from_proto(msg.graph), msg.full_node_count, msg.seconds)


def _predictions(rows: Sequence[analysis_service_pb2.TokenPrediction]) -> list[Prediction]:
    return [Prediction(r.token_id, r.token, r.logit, r.probability) for r in rows]


def intervention_from_proto(msg: analysis_service_pb2.InterveneResponse) -> InterventionResult:
    return InterventionResult(
        _predictions(msg.clean), _predictions(msg.intervened), _predictions(msg.clean_after)
    )


def faithfulness_to_proto(curve: Any) -> analysis_service_pb2.EvaluateCircuitResponse:
    """An :class:`ingest.attribution.faithfulness.FaithfulnessCurve` as a response."""
    return analysis_service_pb2.EvaluateCircuitResponse(
        points=[
            analysis_service_pb2.FaithfulnessPoint(fraction=f, edge_count=n, faithfulness=v)
            for f, n, v in zip(curve.fractions, curve.n_edges, curve.faithfulness, strict=True)
        ],
        cpr=curve.cpr,
        cmd=curve.cmd,
        metric_full=curve.m_full,
        metric_empty=curve.m_empty,
        metric_counterfactual=curve.m_counterfactual,
        warning=curve.warning() or "",
    )


def served_model_from_proto(msg: analysis_service_pb2.ServedModel) -> ServedModel:
    return ServedModel(msg.name, msg.loaded, msg.model_id, msg.set_id)


def faithfulness_from_proto(
    msg: analysis_service_pb2.EvaluateCircuitResponse,
) -> CircuitFaithfulness:
    return CircuitFaithfulness(
        fractions=[p.fraction for p in msg.points],
        edge_counts=[p.edge_count for p in msg.points],
        faithfulness=[p.faithfulness for p in msg.points],
        cpr=msg.cpr,
        cmd=msg.cmd,
        metric_full=msg.metric_full,
        metric_empty=msg.metric_empty,
        metric_counterfactual=(
            msg.metric_counterfactual if msg.HasField("metric_counterfactual") else None
        ),
        warning=msg.warning or None,
    )
