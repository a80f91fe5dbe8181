"""Edges into a batch of targets: forwards on copies of the prompt, one backward per batch.

:class:`RowComputer` holds the frozen replacement model of one prompt, run on
``batch_size`` copies of it with leaf tensors at the embedding (``resid0``) and at every
MLP output (``inject_l``). A *row* is a target read at one point by one vector ``e_t``: a
layer's MLP input (a feature's encoder row) or the final normalized residual (a logit's
unembedding direction). :meth:`RowComputer.rows` injects up to ``batch_size`` read
vectors, one per copy, as the gradient of one backward pass through the kept graph
(circuit-tracer's batching), and turns the gradients at the write points into edges
``A[t, s] = (a_s d_s)^T J e_t`` for every source: each active feature (activation times
its decoder rows, summed over the layers it writes to), each error vector and each token
embedding (Ameisen et al. 2025, "Circuit Tracing", section 2.3).

The copies do not interact (attention mixes positions within one sequence), so copy
``b``'s gradient is row ``b``'s. The frozen model is linear and its weights are detached
(a skip connection's weights are not, but what they save is the MLP input, a read point),
so the kept graph holds weights, patterns and norm scales, not activations; what grows
with the batch is the read points (``n_layers + 1`` tensors of ``(batch_size, T, d)``).
Batching by copies instead of ``is_grads_batched`` (vmap over a batch-1 graph) keeps
every product a plain matmul: vmap broadcast each frozen attention pattern
``batch_size`` times per pass, which took most of a pass on CPU.

A batch's edges are read only where they can be non-zero: from sources before its last
read position (attention is causal) and at the write points its reads depend on (a
layer's MLP output lies after that layer's input, so a batch of layer-l feature rows
reaches no MLP output of layer l or later: autograd returns None there). Without a
feature budget, feature rows come in the sources' order (layer, then position), so most
batches read a prefix of the prompt and the layers below their own.

Causality also means the positions before P do not depend on the positions after it, so
a batch whose reads all lie before P backpropagates through the frozen forward of the
prompt's first P positions only: every pass then costs P (and its attention P^2) instead
of T (T^2). The forward runs on ``prefix_parts`` prefixes (the first quarter, half,
three quarters and the whole prompt by default), each when a batch first needs it, and
each batch uses the shortest that holds its reads; a graph of 64 rows at 512 tokens takes
about half the time it took on the whole prompt. The prefixes' graphs are kept, so the
read points take up to 2.5 times the memory of one forward's.

Sources are ordered as in :class:`~ingest.attribution.layout.NodeLayout`: features (the
order of :class:`ActiveFeatures`), errors by (layer, pos), tokens by pos.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ingest.attribution.replacement import (
    ReplacementState,
    replacement_constants,
    replacement_mlps,
)
from ingest.attribution.targets import FeatureTarget
from ingest.models import ModelAdapter
from ingest.transcoders.transcoder_set import TranscoderSet


@dataclass(frozen=True)
class ActiveFeatures:
    """Active features sorted by (layer, pos, index); every tensor has shape (k,)."""

    layer: Tensor
    pos: Tensor
    index: Tensor
    activation: Tensor

    def __len__(self) -> int:
        return int(self.layer.numel())

    def subset(self, keep: Tensor) -> ActiveFeatures:
        return ActiveFeatures(
            self.layer[keep], self.pos[keep], self.index[keep], self.activation[keep]
        )


@dataclass(frozen=True)
class Row:
    """A target row: read ``vector`` (d,) at MLP input of ``layer`` (None: final norm)."""

    layer: int | None
    pos: int
    vector: Tensor


def active_features(state: ReplacementState, extra: FeatureTarget | None = None) -> ActiveFeatures:
    """Every non-zero transcoder activation of the prompt (plus ``extra``, even if 0)."""
    layers, poss, idxs, acts = [], [], [], []
    for layer in sorted(state.activations):
        a = state.activations[layer]  # (T, d_transcoder)
        nz = torch.nonzero(a)
        if extra is not None and extra.layer == layer:
            pos = extra.pos if extra.pos is not None else state.n_tokens - 1
            key = torch.tensor([[pos, extra.index]], device=nz.device)
            if not bool((nz == key).all(dim=1).any()):
                nz = torch.cat([nz, key])
                nz = nz[torch.argsort(nz[:, 0] * a.shape[1] + nz[:, 1])]
        layers.append(torch.full((nz.shape[0],), layer, dtype=torch.long))
        poss.append(nz[:, 0].cpu())
        idxs.append(nz[:, 1].cpu())
        acts.append(a[nz[:, 0], nz[:, 1]] + 0.0)  # + 0.0: an inactive target's -0.0 reads 0.0
    if not layers:
        empty = torch.zeros(0, dtype=torch.long)
        return ActiveFeatures(empty, empty, empty, torch.zeros(0))
    return ActiveFeatures(torch.cat(layers), torch.cat(poss), torch.cat(idxs), torch.cat(acts))


@dataclass(frozen=True)
class _FeatureGroup:
    """The active features of one layer, by position: where they sit in the source order
    (``sel``), their positions (``pos_cpu`` and on the model's device ``pos``), and the
    vector each writes to each target layer's MLP output ({target: (k, d)})."""

    sel: Tensor
    pos_cpu: Tensor
    pos: Tensor
    weighted: dict[int, Tensor]


@dataclass(frozen=True)
class _PrefixGraph:
    """The frozen forward on copies of the prompt's first ``length`` positions: its leaves
    (``resid0`` then each layer's injection, (B, length, d)) and read points (each layer's
    MLP input, then the final normalized residual)."""

    length: int
    leaves: list[Tensor]
    read_points: list[Tensor]


class RowComputer:
    """Batched forwards of the frozen replacement model; rows by batched backward.

    ``gather_entries`` bounds the gradients gathered at once at the features' positions
    (a (batch, features, d_model) block), so a layer of many active features on a wide
    model is read in parts instead of one transient of that whole size.
    ``prefix_parts`` is the number of prompt prefixes a batch may backpropagate through
    (module docstring); 1 runs every batch through the whole prompt.
    """

    gather_entries = 1 << 24
    prefix_parts = 4

    def __init__(
        self,
        adapter: ModelAdapter,
        transcoders: TranscoderSet,
        state: ReplacementState,
        features: ActiveFeatures,
        batch_size: int,
    ) -> None:
        self.adapter, self.transcoders, self.state = adapter, transcoders, state
        self.features = features
        self.batch_size = batch_size
        self.n_backward = 0
        self.n_forward = 0
        T = state.n_tokens
        parts = max(1, min(self.prefix_parts, T))
        self.prefix_lengths = sorted({-(-T * i // parts) for i in range(1, parts + 1)})
        self._constants = replacement_constants(state, transcoders)  # n_layers x (1, T, d)
        self._graphs: dict[int, _PrefixGraph] = {}
        # The vector each source writes, by write point: features per (source, target layer).
        self.token_vectors = state.resid0[0].detach()  # (T, d)
        self.error_vectors = [e[0].detach() for e in state.errors]  # n_layers x (T, d)
        self.feature_groups: list[_FeatureGroup] = []
        for layer in transcoders.layers:
            sel = torch.nonzero(features.layer == layer).flatten()
            if sel.numel() == 0:
                continue
            sel = sel[torch.argsort(features.pos[sel], stable=True)]  # by position
            decs = transcoders.decoder_vectors(layer, features.index[sel])  # {target: (k, d)}
            scale = features.activation[sel].to(adapter.device)[:, None]
            weighted = {t: (v.to(adapter.dtype) * scale).detach() for t, v in decs.items()}
            pos = features.pos[sel].cpu()
            self.feature_groups.append(
                _FeatureGroup(sel.to(adapter.device), pos, pos.to(adapter.device), weighted)
            )
        self.n_features = len(features)

    def _graph(self, length: int) -> _PrefixGraph:
        """The frozen forward on ``batch_size`` copies of the first ``length`` positions."""
        if length in self._graphs:
            return self._graphs[length]
        adapter, n_layers, B = self.adapter, self.adapter.n_layers, self.batch_size
        d = self.state.resid0.shape[-1]
        # One copy of the prompt per row of a batch; the patterns and scales stay batch 1.
        resid0 = self.state.resid0[:, :length].detach().expand(B, length, d).clone()
        leaves = [resid0.requires_grad_(True)] + [
            torch.zeros(B, length, d, dtype=adapter.dtype, device=adapter.device).requires_grad_(
                True
            )
            for _ in range(n_layers)
        ]
        captured: list[Tensor] = []
        constants = [c[:, :length] for c in self._constants]
        mlps = replacement_mlps(self.transcoders, constants, leaves[1:], captured)
        with torch.enable_grad():
            final = adapter.frozen_final_normed(leaves[0], self.state.frozen.prefix(length), mlps)
        graph = _PrefixGraph(length, leaves, [*captured, final])
        self._graphs[length] = graph
        self.n_forward += 1
        return graph

    def final_normed(self) -> Tensor:
        """The frozen forward's final normalized residual of the first copy: (T, d)."""
        return self._graph(self.state.n_tokens).read_points[-1][0].detach()

    @property
    def n_sources(self) -> int:
        T = self.state.n_tokens
        return self.n_features + self.adapter.n_layers * T + T

    def rows(self, rows: list[Row]) -> Tensor:
        """Edges into each of ``rows`` from every source: (len(rows), n_sources)."""
        out = []
        for start in range(0, len(rows), self.batch_size):
            out.append(self._batch(rows[start : start + self.batch_size]))
        if not out:
            return torch.zeros(0, self.n_sources, dtype=self.adapter.dtype)
        return torch.cat(out)

    def _batch(self, rows: list[Row]) -> Tensor:
        B = len(rows)
        n_layers = self.adapter.n_layers
        dev, dtype = self.adapter.device, self.adapter.dtype
        T, d = self.state.resid0.shape[1:]
        slots = torch.tensor([n_layers if r.layer is None else r.layer for r in rows])
        positions = torch.tensor([r.pos for r in rows])
        vectors = torch.stack([r.vector for r in rows]).to(dev, dtype)  # (B, d)
        # Only sources before the batch's last read position, and only write points the
        # reads depend on, can have non-zero edges (causal attention; a layer's MLP output
        # lies after its input): the rest stay zero without being read. None: not reached.
        P = int(positions.max()) + 1
        graph = self._graph(next(n for n in self.prefix_lengths if n >= P))
        grads_in: list[Tensor | None] = [None] * (n_layers + 1)
        for slot in torch.unique(slots).tolist():
            sel = torch.nonzero(slots == slot).flatten()
            # the copies after the rows get no gradient
            g = torch.zeros(self.batch_size, graph.length, d, dtype=dtype, device=dev)
            g[sel.to(dev), positions[sel].to(dev)] = vectors[sel.to(dev)]
            grads_in[slot] = g
        used = [i for i, g in enumerate(grads_in) if g is not None]
        grads = torch.autograd.grad(
            [graph.read_points[i] for i in used],
            graph.leaves,
            [grads_in[i] for i in used],  # type: ignore[misc]
            retain_graph=True,
            allow_unused=True,
        )
        self.n_backward += 1
        g_embed = grads[0][:B, :P]  # (B, P, d)
        g_mlp = [None if g is None else g[:B, :P] for g in grads[1:]]

        feature_edges = torch.zeros(B, self.n_features, dtype=dtype, device=dev)
        part = max(1, self.gather_entries // (B * d))  # features read at once
        for group in self.feature_groups:
            reached = [(g, v) for t, v in group.weighted.items() if (g := g_mlp[t]) is not None]
            k = int(torch.searchsorted(group.pos_cpu, P))  # features at positions < P
            if not reached or k == 0:
                continue
            acc = torch.zeros(B, k, dtype=dtype, device=dev)
            for g, vectors in reached:
                for start in range(0, k, part):
                    end = min(start + part, k)
                    gathered = g.index_select(1, group.pos[start:end])  # (B, part, d)
                    acc[:, start:end] += torch.einsum("bkd,kd->bk", gathered, vectors[start:end])
            feature_edges[:, group.sel[:k]] = acc
        error_edges = torch.zeros(B, len(g_mlp), T, dtype=dtype, device=dev)
        for layer, (g, e) in enumerate(zip(g_mlp, self.error_vectors, strict=True)):
            if g is not None:
                error_edges[:, layer, :P] = (g * e[None, :P]).sum(-1)
        token_edges = torch.zeros(B, T, dtype=dtype, device=dev)
        token_edges[:, :P] = (g_embed * self.token_vectors[None, :P]).sum(-1)
        edges = torch.cat([feature_edges, error_edges.flatten(1), token_edges], dim=1)
        return edges.detach().cpu()
