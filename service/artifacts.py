"""Re-pruning a stored graph's full artifact at thresholds chosen on read.

The store keeps the graph pruned at ingest time; the worker keeps the full graph as a
compact artifact (:mod:`ingest.attribution.artifact`) whose ``file://`` URI is in the
graph's metadata. GetGraph with thresholds loads that artifact and prunes it again
(DESIGN.md section 5.3, :meth:`AttributionResult.to_graph`). Loading means torch and
a dense ``(n, n)`` matrix, so callers run this in the model pool, never on the event loop.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from urllib.parse import unquote, urlparse

from ingest.errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from ingest.graph import AttributionGraph

logger = logging.getLogger(__name__)

# Ingest skips a graph the store holds complete, so the artifact comes back only after
# the graph is deleted.
_AFTER_LOSS = (
    "omit the thresholds to get the stored pruned graph, or delete the graph from the "
    "store (GraphStore.delete_graph) and ingest its prompt again"
)


def check_threshold(name: str, value: float) -> float:
    """A cumulative-share threshold must be in (0, 1]."""
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise InvalidArgumentError(f"{name} must be in (0, 1], got {value}")
    return value


def artifact_path(graph_id: str, uri: str | None) -> Path:
    """The local directory of a graph's artifact URI (``file://`` only)."""
    if not uri:
        raise FailedPreconditionError(
            f"graph {graph_id!r} has no full-graph artifact, so it cannot be re-pruned; "
            "omit the thresholds to get the stored pruned graph"
        )
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise FailedPreconditionError(
            f"graph {graph_id!r} keeps its artifact at a {parsed.scheme!r} URI, which this "
            "server cannot read; omit the thresholds to get the stored pruned graph"
        )
    path = Path(unquote(parsed.path))
    if not path.is_dir():
        logger.warning("the artifact of graph %s is not at %s", graph_id, path)
        raise FailedPreconditionError(
            f"the artifact of graph {graph_id!r} is missing from this server's disk, so it "
            f"cannot be re-pruned; {_AFTER_LOSS}"
        )
    return path


def reprune(
    graph_id: str, uri: str | None, node_threshold: float, edge_threshold: float
) -> AttributionGraph:
    """The artifact of ``graph_id`` pruned at the given thresholds."""
    from ingest.attribution.artifact import load_artifact

    path = artifact_path(graph_id, uri)
    try:
        result = load_artifact(path)
    except Exception as exc:
        # The server's own files, damaged however (bad JSON, a truncated tensor file, a
        # missing key): the details and the path go to the log, not to the caller.
        logger.error("the artifact of graph %s at %s cannot be read", graph_id, path, exc_info=exc)
        raise DataLossError(
            f"the artifact of graph {graph_id!r} on this server is damaged (the server "
            f"logged the details); {_AFTER_LOSS}"
        ) from exc
    return result.to_graph(
        pruned=True, node_threshold=node_threshold, edge_threshold=edge_threshold
    )
