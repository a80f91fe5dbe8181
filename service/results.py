"""Result types of the analysis and job RPCs, as the Python client returns them.

Plain dataclasses with no gRPC or torch imports; :mod:`service.convert` builds them
from response messages. Graphs, features and pages use the domain types of
``ingest.graph`` and ``ingest.store.base`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.graph import AttributionGraph


@dataclass(frozen=True)
class ServedModel:
    """A model the server analyses: the name requests use, whether it is loaded, the
    ``model_id`` its stored graphs carry and its transcoder set's catalog ``set_id``
    (empty until loaded)."""

    name: str
    loaded: bool
    model_id: str
    set_id: str


@dataclass(frozen=True)
class Attribution:
    """What Attribute returns: the pruned graph, the full graph's size, server seconds."""

    graph: AttributionGraph
    full_node_count: int
    seconds: float


@dataclass(frozen=True)
class Prediction:
    """A next-token prediction at the prompt's last position."""

    token_id: int
    token: str
    logit: float
    probability: float


@dataclass(frozen=True)
class InterventionResult:
    """Top next tokens without (``clean``) and with (``intervened``) the interventions,
    and the clean top tokens after them (``clean_after``)."""

    clean: list[Prediction]
    intervened: list[Prediction]
    clean_after: list[Prediction]


@dataclass(frozen=True)
class CircuitFaithfulness:
    """f(k) per fraction k of edges kept, with CPR, CMD, the metric's end points, the
    real counterfactual run's metric, and a warning when f divides by a gap that the
    linearization makes small (see EvaluateCircuitResponse)."""

    fractions: list[float]
    edge_counts: list[int]
    faithfulness: list[float]
    cpr: float
    cmd: float
    metric_full: float
    metric_empty: float
    metric_counterfactual: float | None
    warning: str | None = None


@dataclass(frozen=True)
class JobStatus:
    """An ingest job as the server reports it; ``state`` is queued, running, succeeded,
    failed or cancelled."""

    job_id: str
    state: str
    model: str
    prompt_count: int
    processed_count: int
    graph_ids: list[str]
    already_stored_count: int
    errors: list[str]
    message: str

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


__all__ = [
    "Attribution",
    "CircuitFaithfulness",
    "InterventionResult",
    "JobStatus",
    "Prediction",
    "ServedModel",
]
