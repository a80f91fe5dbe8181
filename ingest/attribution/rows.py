"""Edges into a batch of targets: one forward, one vectorized backward per batch.

:class:`RowComputer` holds the frozen replacement model of one prompt, run once on
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
``b``'s gradient is row ``b``'s. The frozen model is linear with detached weights, so the
kept graph holds weights, patterns and norm scales, not activations; what grows with the
batch is the read points (``n_layers + 1`` tensors of ``(batch_size, T, d)``). Batching by
copies instead of ``is_grads_batched`` (vmap over a batch-1 graph) keeps every product a
plain matmul: vmap broadcast each frozen attention pattern ``batch_size`` times per pass,
which took most of a pass on CPU.

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
        acts.append(a[nz[:, 0], nz[:, 1]])
    if not layers:
        empty = torch.zeros(0, dtype=torch.long)
        return ActiveFeatures(empty, empty, empty, torch.zeros(0))
    return ActiveFeatures(torch.cat(layers), torch.cat(poss), torch.cat(idxs), torch.cat(acts))


class RowComputer:
    """One batched forward of the frozen replacement model; rows by batched backward.

    ``gather_entries`` bounds the gradients gathered at once at the features' positions
    (a (batch, features, d_model) block), so a layer of many active features on a wide
    model is read in parts instead of one transient of that whole size.
    """

    gather_entries = 1 << 24

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
        n_layers, (_, T, d) = adapter.n_layers, state.resid0.shape
        B = batch_size
        # One copy of the prompt per row of a batch; the patterns and scales stay batch 1.
        self.resid0 = state.resid0.detach().expand(B, T, d).clone().requires_grad_(True)
        self.injections = [
            torch.zeros(B, T, d, dtype=adapter.dtype, device=adapter.device).requires_grad_(True)
            for _ in range(n_layers)
        ]
        captured: list[Tensor] = []
        mlps = replacement_mlps(
            transcoders, replacement_constants(state, transcoders), self.injections, captured
        )
        with torch.enable_grad():
            final = adapter.frozen_final_normed(self.resid0, state.frozen, mlps)
        self.read_points: list[Tensor] = [*captured, final]  # n_layers + 1, each (B, T, d)
        # The vector each source writes, by write point: features per (source, target layer).
        self.token_vectors = state.resid0[0].detach()  # (T, d)
        self.error_vectors = [e[0].detach() for e in state.errors]  # n_layers x (T, d)
        self.feature_groups: list[tuple[Tensor, Tensor, dict[int, Tensor]]] = []
        for layer in transcoders.layers:
            sel = torch.nonzero(features.layer == layer).flatten()
            if sel.numel() == 0:
                continue
            idx = features.index[sel]
            decs = transcoders.decoder_vectors(layer, idx)  # {target: (k, d)}
            scale = features.activation[sel].to(adapter.device)[:, None]
            weighted = {t: (v.to(adapter.dtype) * scale).detach() for t, v in decs.items()}
            self.feature_groups.append((sel, features.pos[sel].to(adapter.device), weighted))
        self.n_features = len(features)

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
        copies, T, d = self.resid0.shape  # the copies after the rows get no gradient
        B = len(rows)
        n_layers = self.adapter.n_layers
        dev, dtype = self.adapter.device, self.adapter.dtype
        slots = torch.tensor([n_layers if r.layer is None else r.layer for r in rows])
        positions = torch.tensor([r.pos for r in rows])
        vectors = torch.stack([r.vector for r in rows]).to(dev, dtype)  # (B, d)
        grads_in: list[Tensor | None] = [None] * (n_layers + 1)
        for slot in torch.unique(slots).tolist():
            sel = torch.nonzero(slots == slot).flatten()
            g = torch.zeros(copies, T, d, dtype=dtype, device=dev)
            g[sel.to(dev), positions[sel].to(dev)] = vectors[sel.to(dev)]
            grads_in[slot] = g
        used = [i for i, g in enumerate(grads_in) if g is not None]
        leaves = [self.resid0, *self.injections]
        grads = torch.autograd.grad(
            [self.read_points[i] for i in used],
            leaves,
            [grads_in[i] for i in used],  # type: ignore[misc]
            retain_graph=True,
            allow_unused=True,
        )
        self.n_backward += 1
        zero = torch.zeros(B, T, d, dtype=dtype, device=dev)
        g_embed = grads[0][:B] if grads[0] is not None else zero  # (B, T, d)
        g_mlp = [g[:B] if g is not None else zero for g in grads[1:]]

        feature_edges = torch.zeros(B, self.n_features, dtype=self.adapter.dtype,
                                    device=self.adapter.device)  # fmt: skip
        part = max(1, self.gather_entries // (B * d))  # features read at once
        for sel, pos, weighted in self.feature_groups:
            acc = torch.zeros(B, sel.numel(), dtype=self.adapter.dtype, device=self.adapter.device)
            for target, vectors in weighted.items():
                for start in range(0, sel.numel(), part):
                    end = start + part
                    gathered = g_mlp[target].index_select(1, pos[start:end])  # (B, part, d)
                    acc[:, start:end] += torch.einsum("bkd,kd->bk", gathered, vectors[start:end])
            feature_edges[:, sel.to(self.adapter.device)] = acc
        error_edges = [
            (g * e[None]).sum(-1) for g, e in zip(g_mlp, self.error_vectors, strict=True)
        ]
        token_edges = (g_embed * self.token_vectors[None]).sum(-1)  # (B, T)
        edges = torch.cat([feature_edges, *error_edges, token_edges], dim=1)
        return edges.detach().cpu()
