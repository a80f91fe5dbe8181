"""Attribution graph types shared by every subsystem.

An attribution graph (Ameisen et al. 2025, "Circuit Tracing: Revealing Computational
Graphs in Language Models"; DESIGN.md section 5.2) has four kinds of nodes: active
transcoder features, MLP reconstruction errors, token embeddings and target logits,
and weighted directed edges from source to target: the direct linear effect of the
source on the target in the local replacement model. The attribution code builds an
:class:`AttributionGraph`, the store persists it, the gRPC service serves it.

Node ids follow the circuit-tracer / Neuronpedia graph JSON (DESIGN.md section 8):

==========  =============================  ====================================
kind        internal id (stored, served)   circuit-tracer JSON id
==========  =============================  ====================================
feature     ``{layer}_{index}_{pos}``      same
token       ``E_{token_id}_{pos}``         same
logit       ``{n_layers+1}_{token_id}_{pos}``  same
error       ``err_{layer}_{pos}``          ``0_{layer}_{pos}``
==========  =============================  ====================================

circuit-tracer's error id ``0_{layer}_{pos}`` collides with the feature id of feature
``layer`` at layer 0 and the same position (circuit-tracer issue 78), so the store and
the API use the collision-free ``err_{layer}_{pos}``. The JSON exporter maps it to
``0_{layer}_{pos}`` (see :func:`circuit_tracer_node_id`) only where that id is not
already taken by a feature node of the same graph, and keeps ``err_...`` otherwise; an
importer recognises error nodes by their ``feature_type`` ("mlp reconstruction
error"), never by the shape of the id.

Edges are parallel numpy arrays (``sources`` int64[E], ``targets`` int64[E],
``weights`` float32[E]) indexing into ``nodes``: compact for graphs of 10^5 edges and
cheap to write in batches. This module imports numpy only (no torch).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.errors import InvalidArgumentError, NotFoundError


class NodeKind(StrEnum):
    """What a node of an attribution graph stands for."""

    FEATURE = "feature"
    ERROR = "error"
    TOKEN = "token"
    LOGIT = "logit"


# ---------------------------------------------------------------------------- node ids


def feature_node_id(layer: int, index: int, pos: int) -> str:
    """The id of feature ``index`` of layer ``layer`` at position ``pos``."""
    return f"{layer}_{index}_{pos}"


def error_node_id(layer: int, pos: int) -> str:
    """The collision-free internal id of the MLP reconstruction error at (layer, pos)."""
    return f"err_{layer}_{pos}"


def token_node_id(token_id: int, pos: int) -> str:
    """The id of the embedding of token ``token_id`` at position ``pos``."""
    return f"E_{token_id}_{pos}"


def logit_node_id(n_layers: int, token_id: int, pos: int) -> str:
    """The id of the logit of ``token_id`` at position ``pos`` of an ``n_layers`` model."""
    return f"{n_layers + 1}_{token_id}_{pos}"


def circuit_tracer_node_id(node: Node, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """The id the circuit-tracer JSON exporter writes for ``node``.

    Identical to ``node.node_id`` except for error nodes, written ``0_{layer}_{pos}``
    as circuit-tracer does, unless that id is in ``taken`` (the ids of the graph's
    other nodes), in which case the collision-free internal id is kept.
    """
    if node.kind is NodeKind.ERROR and node.layer is not None:
        legacy = f"0_{node.layer}_{node.pos}"
        if legacy not in taken:
            return legacy
    return node.node_id


def cantor_pair(layer: int, index: int) -> int:
    """The Cantor pairing of (layer, index): circuit-tracer's JSON ``feature`` field."""
    s = layer + index
    return s * (s + 1) // 2 + index


# ---------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class Node:
    """One node of an attribution graph.

    ``layer`` is None for token embeddings and ``n_layers`` for logits; ``feature`` is
    the transcoder feature index (feature nodes only); ``token_id`` is set on token and
    logit nodes; ``token_prob`` on logit nodes.
    """

    node_id: str
    kind: NodeKind
    layer: int | None
    pos: int
    feature: int | None = None
    token_id: int | None = None
    token: str | None = None
    activation: float | None = None
    influence: float | None = None
    token_prob: float | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if not self.node_id:
            raise InvalidArgumentError("a node needs a non-empty node_id")
        if not isinstance(self.kind, NodeKind):
            try:
                object.__setattr__(self, "kind", NodeKind(self.kind))
            except ValueError as exc:
                raise InvalidArgumentError(
                    f"node {self.node_id!r}: unknown kind {self.kind!r}; "
                    f"use one of {[k.value for k in NodeKind]}"
                ) from exc
        if self.pos < 0:
            raise InvalidArgumentError(f"node {self.node_id!r}: position {self.pos} < 0")
        if self.kind is NodeKind.FEATURE and (self.layer is None or self.feature is None):
            raise InvalidArgumentError(
                f"feature node {self.node_id!r} needs both layer and feature index"
            )
        if self.kind is NodeKind.ERROR and self.layer is None:
            raise InvalidArgumentError(f"error node {self.node_id!r} needs a layer")
        if self.kind in (NodeKind.TOKEN, NodeKind.LOGIT) and self.token_id is None:
            raise InvalidArgumentError(f"{self.kind} node {self.node_id!r} needs a token_id")


# ---------------------------------------------------------------------------- graphs


@dataclass
class GraphMetadata:
    """What describes a graph besides its nodes and edges (one ``:Graph`` node)."""

    graph_id: str
    model_id: str
    set_id: str
    prompt: str
    tokens: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    node_threshold: float | None = None
    edge_threshold: float | None = None
    replacement_score: float | None = None
    completeness_score: float | None = None
    artifact_uri: str | None = None
    task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.graph_id:
            raise InvalidArgumentError("a graph needs a non-empty graph_id")
        if len(self.tokens) != len(self.token_ids):
            raise InvalidArgumentError(
                f"graph {self.graph_id!r}: {len(self.tokens)} tokens but "
                f"{len(self.token_ids)} token ids; give one id per token"
            )


def _empty_index() -> npt.NDArray[np.int64]:
    return np.zeros(0, dtype=np.int64)


def _empty_weights() -> npt.NDArray[np.float32]:
    return np.zeros(0, dtype=np.float32)


@dataclass
class AttributionGraph:
    """A (pruned) attribution graph.

    ``sources``: int64[E], ``targets``: int64[E] index into ``nodes``;
    ``weights``: float32[E], the signed direct effect of source on target.
    """

    metadata: GraphMetadata
    nodes: list[Node]
    sources: npt.NDArray[np.int64] = field(default_factory=_empty_index)
    targets: npt.NDArray[np.int64] = field(default_factory=_empty_index)
    weights: npt.NDArray[np.float32] = field(default_factory=_empty_weights)
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sources = np.asarray(self.sources, dtype=np.int64).reshape(-1)
        self.targets = np.asarray(self.targets, dtype=np.int64).reshape(-1)
        self.weights = np.asarray(self.weights, dtype=np.float32).reshape(-1)

    @property
    def graph_id(self) -> str:
        return self.metadata.graph_id

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return int(self.weights.shape[0])

    def node_index(self, node_id: str) -> int:
        """The position of ``node_id`` in ``nodes``; NotFoundError when absent."""
        if self._index is None:
            self._index = {n.node_id: i for i, n in enumerate(self.nodes)}
        try:
            return self._index[node_id]
        except KeyError:
            raise NotFoundError(
                f"graph {self.graph_id!r} has no node {node_id!r}; list its nodes to find the id"
            ) from None

    def node(self, node_id: str) -> Node:
        return self.nodes[self.node_index(node_id)]

    def out_edges(self, node_id: str) -> list[tuple[int, float]]:
        """(target index, weight) of every edge leaving ``node_id``."""
        i = self.node_index(node_id)
        sel = np.nonzero(self.sources == i)[0]
        return [(int(self.targets[e]), float(self.weights[e])) for e in sel]

    def in_edges(self, node_id: str) -> list[tuple[int, float]]:
        """(source index, weight) of every edge entering ``node_id``."""
        i = self.node_index(node_id)
        sel = np.nonzero(self.targets == i)[0]
        return [(int(self.sources[e]), float(self.weights[e])) for e in sel]

    def validate(self) -> None:
        """Raise InvalidArgumentError unless ids are unique, indices in range, weights finite."""
        gid = self.graph_id
        ids = [n.node_id for n in self.nodes]
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise InvalidArgumentError(f"graph {gid!r}: node id {dup!r} appears twice")
        e = self.n_edges
        if self.sources.shape != (e,) or self.targets.shape != (e,):
            raise InvalidArgumentError(
                f"graph {gid!r}: sources {self.sources.shape}, targets {self.targets.shape} "
                f"and weights {self.weights.shape} must be 1-D of one length"
            )
        n = len(self.nodes)
        for name, arr in (("sources", self.sources), ("targets", self.targets)):
            if e and (int(arr.min()) < 0 or int(arr.max()) >= n):
                raise InvalidArgumentError(
                    f"graph {gid!r}: {name} index out of range [0, {n}); "
                    "edges must index into nodes"
                )
        if e and not bool(np.isfinite(self.weights).all()):
            bad = int(np.nonzero(~np.isfinite(self.weights))[0][0])
            raise InvalidArgumentError(
                f"graph {gid!r}: edge {bad} has a non-finite weight {self.weights[bad]}; "
                "drop or clip it before storing"
            )
        for node in self.nodes:
            for attr in ("activation", "influence", "token_prob"):
                value = getattr(node, attr)
                if value is not None and not math.isfinite(value):
                    raise InvalidArgumentError(
                        f"graph {gid!r}: node {node.node_id!r} has non-finite {attr} {value}"
                    )

    def edge_list(self) -> list[tuple[str, str, float]]:
        """(source id, target id, weight) triples in edge order."""
        ids = [n.node_id for n in self.nodes]
        return [
            (ids[s], ids[t], float(w))
            for s, t, w in zip(
                self.sources.tolist(), self.targets.tolist(), self.weights.tolist(), strict=True
            )
        ]


# ---------------------------------------------------------------------------- catalog


@dataclass
class FeatureRecord:
    """One transcoder feature in the shared catalog, unique on (set_id, layer, index).

    ``top_examples`` are small JSON-able dicts (e.g. ``{"text": ..., "activation": ...}``);
    ``de_embedding_tokens`` are the tokens the feature's encoder reads most strongly
    from the embedding, ``output_tokens`` those its decoder promotes through the unembedding.
    """

    set_id: str
    layer: int
    index: int
    density: float | None = None
    max_activation: float | None = None
    label: str | None = None
    top_tokens: list[str] = field(default_factory=list)
    top_examples: list[dict[str, Any]] = field(default_factory=list)
    de_embedding_tokens: list[str] = field(default_factory=list)
    output_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.set_id:
            raise InvalidArgumentError("a feature needs a non-empty set_id")
        if self.layer < 0 or self.index < 0:
            raise InvalidArgumentError(
                f"feature ({self.set_id!r}, {self.layer}, {self.index}): "
                "layer and index must be >= 0"
            )
        for name in ("top_tokens", "de_embedding_tokens", "output_tokens"):
            tokens = getattr(self, name)
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise InvalidArgumentError(
                    f"feature ({self.set_id!r}, {self.layer}, {self.index}): {name} must be "
                    f"a list of token strings, got {tokens!r:.120}; build records from "
                    "compute_feature_stats rows with FeatureRecord.from_stats"
                )
        if not isinstance(self.top_examples, list) or not all(
            isinstance(e, dict) for e in self.top_examples
        ):
            raise InvalidArgumentError(
                f"feature ({self.set_id!r}, {self.layer}, {self.index}): top_examples must "
                f"be a list of dicts, got {self.top_examples!r:.120}"
            )

    @classmethod
    def from_stats(cls, row: dict[str, Any], set_id: str) -> FeatureRecord:
        """The catalog entry of one row of ``compute_feature_stats`` (or of the
        ``feature_stats.json`` that ``circuitscope transcoders stats`` writes).

        ``top_tokens`` are the distinct tokens of the row's top examples, strongest
        first; ``de_embedding_tokens`` are the row's ``top_tokens`` (the stats file's
        name for the de-embedding); ``output_tokens`` its ``output_tokens``. ``set_id``
        is the id the catalog stores the set under (``TranscoderSet.catalog_id``).
        """
        examples = list(row.get("top_examples", []))
        firing = list(dict.fromkeys(str(e["token"]) for e in examples if "token" in e))
        return cls(
            set_id=set_id,
            layer=int(row["layer"]),
            index=int(row["index"]),
            density=row.get("density"),
            max_activation=row.get("max_activation"),
            top_tokens=firing,
            top_examples=examples,
            de_embedding_tokens=_token_texts(row.get("top_tokens", [])),
            output_tokens=_token_texts(row.get("output_tokens", [])),
        )


def _token_texts(entries: list[Any]) -> list[str]:
    """Token strings from a stats row's token list (dicts with a "token", or strings)."""
    return [str(e.get("token", "")) if isinstance(e, dict) else str(e) for e in entries]


@dataclass
class ModelRecord:
    """A model graphs are computed on (one ``:Model`` node)."""

    model_id: str
    architecture: str | None = None
    n_layers: int | None = None
    d_model: int | None = None
    source: str | None = None


@dataclass
class TranscoderSetRecord:
    """A set of transcoders for one model (one ``:TranscoderSet`` node).

    ``kind`` is ``per_layer`` or ``cross_layer``.
    """

    set_id: str
    model_id: str
    kind: str = "per_layer"
    d_transcoder: int | None = None
    source: str | None = None
