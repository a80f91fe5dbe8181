"""The graph store interface and the values it returns.

Every other subsystem talks to the database through :class:`GraphStore` (STYLE
habit 2); :func:`ingest.store.open_store` returns one. There is one implementation,
over Bolt (:mod:`ingest.store.bolt`), and two servers behind it: Neo4j 5 and the
embedded ArcadeDB server.

Guarantees every implementation keeps:

- Readers only ever see complete graphs. A graph is written under a ``:Graph`` node
  whose ``status`` is ``writing`` and flipped to ``complete`` after the last batch;
  every read filters on ``complete`` and ``get_graph`` re-checks the counts and the
  write id, so a graph being rewritten or deleted under a reader raises instead of
  returning half of it.
- Listings use keyset cursors (opaque strings): pages neither skip nor repeat items
  when others are written meanwhile.
- Every call accepts ``timeout`` (seconds, per transaction; None for the config
  default) so a caller can pass its own deadline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ingest.graph import (
    AttributionGraph,
    FeatureRecord,
    GraphMetadata,
    ModelRecord,
    TranscoderSetRecord,
)

if TYPE_CHECKING:
    from ingest.store.config import StoreConfig

T = TypeVar("T")

Direction = Literal["out", "in", "both"]
PathScore = Literal["product", "sum"]
# Called after each committed batch: (phase, rows done in phase, rows in phase).
BatchCallback = Callable[[str, int, int], None]


class GraphStatus(StrEnum):
    """The life cycle of a stored graph; readers see ``complete`` only."""

    WRITING = "writing"
    COMPLETE = "complete"
    DELETING = "deleting"


@dataclass(frozen=True)
class GraphSummary:
    """A stored graph's metadata and size, without its nodes and edges. ``created_at``
    is when its id was first written (kept when the graph is replaced), ``updated_at``
    when it was last written."""

    metadata: GraphMetadata
    status: GraphStatus
    n_nodes: int
    n_edges: int
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def graph_id(self) -> str:
        return self.metadata.graph_id


@dataclass(frozen=True)
class GraphRevision:
    """The revision of a complete graph: ``write_id`` changes whenever the graph is
    rewritten or deleted, so a copy tagged with it is current while it matches."""

    write_id: str
    n_nodes: int
    n_edges: int


@dataclass(frozen=True)
class Path:
    """A directed path: ``node_ids`` source first, ``weights`` of its edges in order."""

    node_ids: list[str]
    weights: list[float]
    score: float


@dataclass(frozen=True)
class FeatureOccurrence:
    """One active feature node of a complete graph."""

    graph_id: str
    node_id: str
    pos: int
    activation: float | None
    influence: float | None


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a keyset-paginated listing; ``next_cursor`` None on the last page."""

    items: list[T] = field(default_factory=list)
    next_cursor: str | None = None


class GraphStore(ABC):
    """Storage and queries of attribution graphs and the shared feature catalog."""

    #: how the store was reached: the server's uri, database and user (for an embedded
    #: server, those it was started with) and the batch size and timeouts in use
    config: StoreConfig

    # ------------------------------------------------------------------ lifecycle
    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> GraphStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def ensure_schema(self) -> None:
        """Create constraints and indexes if missing; safe to call any number of times."""

    # ------------------------------------------------------------------ writes
    @abstractmethod
    def upsert_model(self, model: ModelRecord, *, timeout: float | None = None) -> None:
        """Create or update a ``:Model``."""

    @abstractmethod
    def upsert_transcoder_set(
        self, tset: TranscoderSetRecord, *, timeout: float | None = None
    ) -> None:
        """Create or update a ``:TranscoderSet``."""

    @abstractmethod
    def upsert_features(
        self,
        features: Iterable[FeatureRecord],
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """MERGE features on (set_id, layer, index), replacing their statistics; returns count."""

    @abstractmethod
    def write_graph(
        self,
        graph: AttributionGraph,
        *,
        replace: bool = False,
        batch_size: int | None = None,
        on_batch: BatchCallback | None = None,
        timeout: float | None = None,
    ) -> GraphSummary:
        """Store ``graph``; it becomes visible to readers only once every batch is in.

        A graph id left incomplete by an earlier crash is repaired (leftovers deleted,
        graph rewritten). A complete graph with the same id raises AlreadyExistsError
        (a FailedPreconditionError) unless ``replace``; a write whose claim another
        writer or a delete took over meanwhile raises FailedPreconditionError.
        """

    @abstractmethod
    def delete_graph(self, graph_id: str, *, timeout: float | None = None) -> bool:
        """Delete a graph (complete or not); False when there was none."""

    @abstractmethod
    def set_feature_label(
        self,
        set_id: str,
        layer: int,
        index: int,
        label: str | None,
        *,
        timeout: float | None = None,
    ) -> FeatureRecord:
        """Set (or clear with None/"") a feature's label, creating its catalog entry if
        absent: NotFoundError when neither the entry nor its transcoder set is in the
        store, InvalidArgumentError for a layer or index outside the set."""

    # ------------------------------------------------------------------ reads
    @abstractmethod
    def get_graph(self, graph_id: str, *, timeout: float | None = None) -> AttributionGraph:
        """The complete graph, nodes and edges in their stored order; NotFoundError otherwise."""

    @abstractmethod
    def get_graph_summary(self, graph_id: str, *, timeout: float | None = None) -> GraphSummary:
        """The complete graph's metadata and size; NotFoundError otherwise."""

    @abstractmethod
    def graph_revisions(
        self, graph_ids: Sequence[str], *, timeout: float | None = None
    ) -> dict[str, GraphRevision]:
        """The revision of each complete graph among ``graph_ids`` (absent ones left out)."""

    @abstractmethod
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
        """Complete graphs matching every given filter, by graph_id (or newest first)."""

    @abstractmethod
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
        """The neighbourhood of ``node_id``: breadth-first ``depth`` hops keeping, per
        expanded node, its ``top_k`` edges by |weight| (ties by source id, target id)."""

    @abstractmethod
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
        """The ``top_k`` directed paths of at most ``max_length`` edges from source to
        target, by the product (or sum) of their edges' |weight|, strongest first; empty
        when there is none. NotFoundError when the graph, or either node, is not there."""

    @abstractmethod
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
        """Occurrences of a feature in complete graphs, by (graph_id, position); a page
        holds every occurrence of up to ``limit`` graphs."""

    @abstractmethod
    def get_feature(
        self, set_id: str, layer: int, index: int, *, timeout: float | None = None
    ) -> FeatureRecord:
        """One catalog feature; NotFoundError when absent."""

    @abstractmethod
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
        """Catalog features matching every given filter, by (layer, index)."""

    @abstractmethod
    def query(
        self,
        cypher: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """Run read-only Cypher (e.g. from docs/cypher.md) with parameters; rows as dicts.

        The query sees every ``:Graph``; filter on ``status = 'complete'``. Neo4j rejects
        writes in the read transaction this runs in; ArcadeDB does not, so never pass
        Cypher from untrusted callers.
        """
