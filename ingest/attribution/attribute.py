"""Attribution graphs by batched backward passes through the local replacement model.

Algorithm (Ameisen et al. 2025, "Circuit Tracing", section 2.3; DESIGN 5.2), for one
prompt of T tokens:

1. Build the local replacement model (:mod:`ingest.attribution.replacement`): attention
   patterns and norm denominators frozen, each MLP replaced by transcoder output plus
   error. It is affine in the embeddings and in every vector added to an MLP output.
2. Nodes: active features (layer, pos, index) with activation ``a_s``, errors
   (layer, pos), token embeddings (pos), targets (:mod:`ingest.attribution.targets`).
3. The edge from source ``s`` to target ``t`` is ``A[t, s] = (a_s d_s)^T J e_t``:
   ``a_s d_s`` the vector ``s`` writes (activation times decoder row, summed over the
   layers a cross-layer feature writes to; the error vector; the embedding), ``e_t``
   the target's read vector, ``J`` the Jacobian of the frozen model between the write
   and read points. Edges go to pre-activations: targets' nonlinearities are not
   differentiated.
4. One forward pass runs the frozen model on ``batch_size`` copies of the prompt with
   leaf tensors at the embedding and at every MLP output, up to the final norm (no
   logits). Each backward pass through the kept graph then injects up to ``batch_size``
   targets' read vectors, one per copy (at its layer and position), and reads ``J e_t``
   for all sources of all those targets at once: the number of backward passes is
   ``ceil(rows / batch_size)`` (:mod:`ingest.attribution.rows`).
5. With more active features than ``max_feature_nodes``, the target rows come first
   (a :class:`FeatureTarget`'s own row, which is always expanded); then features are
   expanded in batches in order of their current influence on the targets (recomputed
   as rows arrive), and only expanded features stay nodes. Only the expanded rows are
   held, so the budget bounds memory as well as time.

The result is an :class:`~ingest.attribution.result.AttributionResult`: the dense
adjacency in the layout order (features, errors, tokens, targets), ready to prune.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ingest.attribution.layout import NodeLayout
from ingest.attribution.prompts import tokenize
from ingest.attribution.replacement import build_replacement, check_compatible
from ingest.attribution.result import AttributionResult
from ingest.attribution.rows import ActiveFeatures, Row, RowComputer, active_features
from ingest.attribution.targets import (
    FeatureTarget,
    LogitDiffTarget,
    LogitTargets,
    Target,
    check_target,
    demeaned_unembedding,
    select_logits,
)
from ingest.errors import InvalidArgumentError
from ingest.graph import (
    GraphMetadata,
    Node,
    NodeKind,
    error_node_id,
    feature_node_id,
    logit_node_id,
    token_node_id,
)
from ingest.models import LoadedModel, ModelAdapter
from ingest.transcoders.transcoder_set import TranscoderSet

logger = logging.getLogger(__name__)


@dataclass
class AttributionConfig:
    """Options of :func:`attribute`; validated on construction."""

    target: Target = field(default_factory=LogitTargets)
    max_feature_nodes: int | None = None
    batch_size: int = 64
    progress: bool = False

    def __post_init__(self) -> None:
        check_target(self.target)
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise InvalidArgumentError(
                f"max_feature_nodes must be >= 0 or None, got {self.max_feature_nodes}"
            )


def attribute(
    model: LoadedModel | ModelAdapter,
    transcoders: TranscoderSet,
    prompt: str | list[int] | Tensor,
    *,
    target: Target | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    tokenizer: Any = None,
    graph_id: str | None = None,
    model_id: str | None = None,
    set_id: str | None = None,
    progress: bool = False,
) -> AttributionResult:
    """The full attribution graph of ``prompt`` (see the module docstring).

    ``model``: a :class:`LoadedModel` (its tokenizer encodes text prompts) or a bare
    adapter with ``tokenizer`` given for text. The computation runs on the adapter's
    device and dtype; ``transcoders`` are moved to them (in place). ``target``: default
    :class:`LogitTargets()`. Raises InvalidArgumentError for bad prompts, targets, or a
    transcoder set made for another model.

    The graph's metadata: ``model_id`` defaults to the LoadedModel's (a bare adapter's
    default is its ``model_type``, which every checkpoint of a family shares: give one),
    ``set_id`` to ``transcoders.catalog_id`` (the id ingest and the server store graphs
    and features under), and ``graph_id`` to a hash of the model and set ids, the
    prompt's token ids, the target, ``max_feature_nodes`` and the dtype, so computing
    the same graph again gives the same id.
    """
    cfg = AttributionConfig(
        target=LogitTargets() if target is None else target,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        progress=progress,
    )
    adapter = model.adapter if isinstance(model, LoadedModel) else model
    tok = tokenizer or (model.tokenizer if isinstance(model, LoadedModel) else None)
    if model_id is None:
        model_id = model.model_id if isinstance(model, LoadedModel) else adapter.model_type
    check_compatible(adapter, transcoders)
    # hashed as loaded: a move to a narrower dtype would round the weights it hashes
    set_id = set_id or transcoders.catalog_id
    transcoders.to(device=adapter.device, dtype=adapter.dtype)
    input_ids = tokenize(tok, prompt, adapter.vocab_size, adapter.n_ctx)
    T = int(input_ids.shape[1])
    started = time.perf_counter()

    state = build_replacement(adapter, transcoders, input_ids.to(adapter.device), check=False)
    tgt = cfg.target
    feature_target = tgt if isinstance(tgt, FeatureTarget) else None
    if feature_target is not None:
        transcoders.encoder_vectors(feature_target.layer, torch.tensor([feature_target.index]))
        if feature_target.pos is not None and not 0 <= feature_target.pos < T:
            raise InvalidArgumentError(
                f"feature target position {feature_target.pos} outside the prompt [0, {T})"
            )
        target_pos = feature_target.pos if feature_target.pos is not None else T - 1
        if target_pos < state.zeroed_positions:
            raise InvalidArgumentError(
                "feature target position 0 holds the beginning-of-sequence token, where "
                "transcoder features are held at zero: target a later position"
            )
    features = active_features(state, feature_target)
    computer = RowComputer(adapter, transcoders, state, features, cfg.batch_size)

    # Target rows and their weights.
    last = state.logits[0, -1]
    W_U = adapter.W_U
    logit_tokens: list[int] = []
    logit_probs = torch.zeros(0, dtype=torch.float64)
    logit_rows: list[Row] = []
    labels: list[str | None] = []
    if isinstance(tgt, LogitTargets):
        ids, probs = select_logits(last, tgt)
        logit_tokens = ids.tolist()
        logit_probs = probs.double().cpu()
        vectors = demeaned_unembedding(W_U, ids)
        logit_rows = [Row(None, T - 1, v) for v in vectors]
        labels = [None] * len(logit_rows)
    elif isinstance(tgt, LogitDiffTarget):
        a, b = tgt.checked(adapter.vocab_size)
        logit_tokens = [a]
        logit_probs = torch.ones(1, dtype=torch.float64)
        logit_rows = [Row(None, T - 1, W_U[:, a] - W_U[:, b])]
        labels = [f"logit diff {a} - {b}"]

    encoders = torch.zeros(len(features), adapter.d_model, dtype=adapter.dtype)
    for layer in transcoders.layers:
        sel = features.layer == layer
        if bool(sel.any()):
            encoders[sel] = transcoders.encoder_vectors(layer, features.index[sel]).detach().cpu()
    feature_rows = [
        Row(layer, pos, encoders[i].to(adapter.device))
        for i, (layer, pos) in enumerate(
            zip(features.layer.tolist(), features.pos.tolist(), strict=True)
        )
    ]
    n_feat, n_err, n_tok = len(features), adapter.n_layers * T, T
    forced = [] if feature_target is None else [_feature_position(features, feature_target, T)]
    limit = n_feat if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n_feat)
    limit = max(limit, len(forced))  # a feature target is always expanded
    bar = tqdm(
        total=len(logit_rows) + limit, desc="attribution rows", unit="row",
        disable=not cfg.progress,
    )  # fmt: skip
    try:
        target_edges = computer.rows(logit_rows)  # (n_logits, n_sources)
        bar.update(len(logit_rows))
        # Expanded features' rows in the order they were expanded: at most ``limit`` rows,
        # so the budget bounds memory as well as time. Every feature expanded comes in
        # source order, so its rows land in the adjacency in place (no gathered copy).
        expanded: list[int] = []
        every = limit == n_feat
        if every:
            layout = NodeLayout(n_feat, n_err, n_tok, len(logit_rows))
            adjacency = torch.zeros(layout.n, layout.n, dtype=adapter.dtype)
            expanded_edges = adjacency[layout.features, : layout.n_sources]
        else:
            expanded_edges = torch.zeros(limit, computer.n_sources, dtype=adapter.dtype)
        while len(expanded) < limit:
            if every:  # no ranking needed
                chunk = list(range(len(expanded), min(len(expanded) + cfg.batch_size, n_feat)))
            elif forced and forced[0] not in expanded:  # its row first: it is the target
                chunk = forced
            else:
                ranking = _feature_ranking(
                    expanded_edges[: len(expanded)], expanded, target_edges, logit_probs,
                    n_feat, forced,
                )  # fmt: skip
                chunk = ranking[: min(cfg.batch_size, limit - len(expanded))]
            rows = computer.rows([feature_rows[i] for i in chunk])
            expanded_edges[len(expanded) : len(expanded) + len(chunk)] = rows
            expanded += chunk
            bar.update(len(chunk))
    finally:
        bar.close()

    keep = torch.tensor(sorted(expanded), dtype=torch.long)
    kept_features = features.subset(keep)
    if every:
        adjacency[layout.logits, : layout.n_sources] = target_edges
    else:
        slot = torch.tensor(expanded, dtype=torch.long).argsort()  # row of each kept feature
        cols = torch.cat([keep, torch.arange(n_feat, computer.n_sources)])
        layout = NodeLayout(len(keep), n_err, n_tok, len(logit_rows))
        adjacency = torch.zeros(layout.n, layout.n, dtype=adapter.dtype)
        adjacency[layout.features, : layout.n_sources] = expanded_edges[slot][:, cols]
        adjacency[layout.logits, : layout.n_sources] = target_edges[:, cols]

    node_weights = None
    if feature_target is not None:
        node_weights = torch.zeros(layout.n, dtype=torch.float64)
        target_index = int(torch.nonzero(keep == forced[0]))
        node_weights[target_index] = 1.0
    token_ids = input_ids[0].tolist()
    token_strs = _token_strings(tok, token_ids)
    nodes = _nodes(adapter, kept_features, T, token_ids, token_strs, logit_tokens, logit_probs,
                   labels, tok)  # fmt: skip
    elapsed = time.perf_counter() - started
    dtype_name = str(adapter.dtype).removeprefix("torch.")
    stats = {
        "n_forward_passes": 1 + computer.n_forward,  # the recording, then the frozen ones
        "n_backward_passes": computer.n_backward,
        "batch_size": cfg.batch_size,
        "n_active_features": n_feat,
        "n_feature_nodes": len(keep),
        "seconds": elapsed,
        "dtype": dtype_name,
        "device": str(adapter.device),
        "target": type(tgt).__name__,
    }
    logger.info(
        "attribution of %d tokens: %d active features, %d rows, %d backward passes, %.2fs",
        T, n_feat, len(keep) + len(logit_rows), computer.n_backward, elapsed,
    )  # fmt: skip
    if not graph_id:
        graph_id = _graph_id(model_id, set_id, token_ids, tgt, cfg.max_feature_nodes, dtype_name)
    meta = GraphMetadata(
        graph_id=graph_id,
        model_id=model_id,
        set_id=set_id,
        prompt=prompt if isinstance(prompt, str) else " ".join(token_strs),
        tokens=token_strs,
        token_ids=token_ids,
    )
    return AttributionResult(
        metadata=meta, layout=layout, nodes=nodes, adjacency=adjacency,
        logit_probs=logit_probs.to(adapter.dtype), n_layers=adapter.n_layers, stats=stats,
        node_weights=node_weights,
    )  # fmt: skip


def _graph_id(
    model_id: str,
    set_id: str,
    token_ids: list[int],
    target: Target,
    max_feature_nodes: int | None,
    dtype: str,
) -> str:
    """32 hex digits, the same whenever the same graph is computed again."""
    payload = {
        "model": model_id,
        "transcoders": set_id,
        "token_ids": token_ids,
        "target": [type(target).__name__, dataclasses.asdict(target)],
        "max_feature_nodes": max_feature_nodes,
        "dtype": dtype,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _feature_position(features: ActiveFeatures, target: FeatureTarget, T: int) -> int:
    pos = target.pos if target.pos is not None else T - 1
    hit = (
        (features.layer == target.layer) & (features.pos == pos) & (features.index == target.index)
    )
    return int(torch.nonzero(hit).flatten()[0])


def _feature_ranking(
    expanded_edges: Tensor,
    expanded: list[int],
    target_edges: Tensor,
    logit_probs: Tensor,
    n_feat: int,
    forced: list[int],
) -> list[int]:
    """Features not yet expanded, by descending influence on the targets so far.

    ``expanded_edges`` holds the rows of the ``expanded`` features, in that order.
    Influence ``w (A_hat + A_hat^2 + ...)`` over the rows computed so far (targets and
    expanded features; a forced feature target weighs 1), propagated row by row: rows
    only reach earlier layers, so this ends after at most ``n_layers + 1`` steps,
    exactly, and needs only the ``(rows, n_sources)`` block instead of a dense square
    matrix.
    """
    n_sources = expanded_edges.shape[1]
    done_idx = torch.tensor(expanded, dtype=torch.long)
    rows = torch.cat([target_edges.double(), expanded_edges.double()]).abs()
    rows = rows / rows.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    n_targets, n_rows = target_edges.shape[0], rows.shape[0]
    row_of = torch.full((n_sources,), -1, dtype=torch.long)
    row_of[done_idx] = torch.arange(n_targets, n_rows)
    y = torch.cat([logit_probs.double(), torch.zeros(len(expanded), dtype=torch.float64)])
    for f in forced:
        if int(row_of[f]) >= 0:
            y[int(row_of[f])] = 1.0
    influence = torch.zeros(n_sources, dtype=torch.float64)
    has_row = row_of >= 0
    for _ in range(n_rows + 1):
        contribution = y @ rows  # (n_sources,)
        influence += contribution
        y = torch.zeros(n_rows, dtype=torch.float64)
        y[row_of[has_row]] = contribution[has_row]
        if not bool(y.any()):
            break
    ranked = influence[:n_feat].clone()
    done = torch.zeros(n_feat, dtype=torch.bool)
    done[done_idx] = True
    ranked[done] = -1.0
    return [i for i in torch.argsort(ranked, descending=True).tolist() if not bool(done[i])]


def _token_strings(tokenizer: Any, token_ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(t) for t in token_ids]
    return [str(tokenizer.decode([t])) for t in token_ids]


def _nodes(
    adapter: ModelAdapter,
    features: ActiveFeatures,
    T: int,
    token_ids: list[int],
    token_strs: list[str],
    logit_tokens: list[int],
    logit_probs: Tensor,
    labels: list[str | None],
    tokenizer: Any,
) -> list[Node]:
    nodes = [
        Node(feature_node_id(layer, idx, pos), NodeKind.FEATURE, layer, pos, feature=idx,
             activation=float(act))
        for layer, pos, idx, act in zip(
            features.layer.tolist(), features.pos.tolist(), features.index.tolist(),
            features.activation.tolist(), strict=True,
        )
    ]  # fmt: skip
    nodes += [
        Node(error_node_id(layer, pos), NodeKind.ERROR, layer, pos)
        for layer in range(adapter.n_layers)
        for pos in range(T)
    ]
    nodes += [
        Node(token_node_id(tid, pos), NodeKind.TOKEN, None, pos, token_id=tid, token=s)
        for pos, (tid, s) in enumerate(zip(token_ids, token_strs, strict=True))
    ]
    out_strs = _token_strings(tokenizer, logit_tokens)
    nodes += [
        Node(logit_node_id(adapter.n_layers, tid, T - 1), NodeKind.LOGIT, adapter.n_layers,
             T - 1, token_id=tid, token=s, token_prob=float(p), label=label)
        for tid, s, p, label in zip(logit_tokens, out_strs, logit_probs.tolist(), labels,
                                    strict=True)
    ]  # fmt: skip
    return nodes
