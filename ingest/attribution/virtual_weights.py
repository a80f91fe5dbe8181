"""Weights-based feature connections and de-embeddings (Dunefsky et al. 2024; DESIGN 5.6).

In the frozen replacement model the effect of an earlier feature ``i`` (activation
``z_i``, decoder rows ``d_i`` into the MLP outputs it writes) on a later feature ``j``
factorizes into an input-dependent and an input-invariant part:

- direct, through the residual stream (same position):
  ``z_i * (sum_t d_i^(t) . r_j) / sigma_j``, where ``r_j`` is ``j``'s *read vector* in
  residual space (its encoder row through the linear part of the MLP norm: the weight
  times the encoder row, then mean-centred for a LayerNorm) and ``sigma_j`` the norm's
  denominator at the target position. :func:`feature_connections` gives
  ``sum_t d_i^(t) . r_j``, summed over the layers ``t`` of ``i``'s decoders that the
  target reads (``t < layer_j``);
- through attention head ``h`` of layer ``m``:
  ``z_i * pattern_h[p_t, p_s] * (N_m(d_i) OV_h) . r_j / (sigma^attn_m[p_s] sigma_j)``,
  with ``N_m`` the linear part of the attention norm; :func:`head_connections` gives
  ``(N_m(d_i) OV_h) . r_j`` per head.

De-embeddings (:func:`de_embeddings`): ``W_E r_j``, which input tokens a feature reads
directly from the embedding (and through a head, ``N_m(W_E) OV_h r_j``);
:func:`output_logits`: ``N_f(d_i) W_U``, which tokens a feature's output promotes.
Each is one term of an attribution edge, exactly. The edge itself is their sum only
when no other path joins the two ends: features of adjacent layers (and de-embeddings
of layer 0) with no skip connection between them. Farther apart, the edge also carries
compositions (attention after attention, a skip connection in between) that no single
term here covers; the tests check the sum where it is the whole edge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ingest.errors import InvalidArgumentError
from ingest.models import ModelAdapter
from ingest.transcoders.transcoder_set import TranscoderSet


@torch.no_grad()
def read_vectors(
    adapter: ModelAdapter, transcoders: TranscoderSet, layer: int, indices: Tensor
) -> Tensor:
    """Residual-space read vectors of features ``indices`` (k,) of ``layer``: (k, d).

    ``pre_j = r_j . x / sigma + const`` for the residual ``x`` the MLP norm reads: the
    transpose of the norm's linear part (:meth:`ingest.models.components.Norm.linear`)
    applied to the encoder row, the weight first and the (symmetric) mean-centring after
    it.
    """
    enc = transcoders.encoder_vectors(layer, indices).to(adapter.dtype)  # (k, d)
    norm = adapter.block(layer).mlp_norm
    read = enc * norm.weight.to(enc.dtype)
    if norm.kind == "layernorm":
        read = read - read.mean(dim=-1, keepdim=True)
    return read


def _writes(transcoders: TranscoderSet, layer: int, indices: Tensor, before: int) -> Tensor:
    """Sum of decoder rows of ``indices`` into MLP outputs of layers < ``before``: (k, d)."""
    decs = transcoders.decoder_vectors(layer, indices)
    rows = [v for t, v in decs.items() if t < before]
    if not rows:
        raise InvalidArgumentError(
            f"features of layer {layer} write to no layer before {before}: pick a target "
            "layer after the source"
        )
    return torch.stack(rows).sum(0)


@torch.no_grad()
def feature_connections(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    source_layer: int,
    source_indices: Tensor,
    target_layer: int,
    target_indices: Tensor,
) -> Tensor:
    """Input-invariant direct (residual) connections: (k_source, k_target)."""
    writes = _writes(transcoders, source_layer, source_indices, target_layer).to(adapter.dtype)
    return writes @ read_vectors(adapter, transcoders, target_layer, target_indices).T


@torch.no_grad()
def head_connections(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    source_layer: int,
    source_indices: Tensor,
    attn_layer: int,
    target_layer: int,
    target_indices: Tensor,
) -> Tensor:
    """Input-invariant connections through each head of ``attn_layer``: (H, k_s, k_t).

    Needs ``source_layer < attn_layer <= target_layer`` (``<`` for a parallel block).
    """
    parallel = adapter.parallel_residual[target_layer]
    if not source_layer < attn_layer <= target_layer or (parallel and attn_layer == target_layer):
        raise InvalidArgumentError(
            f"attention of layer {attn_layer} does not lie between a source at layer "
            f"{source_layer} and a target at layer {target_layer}"
        )
    writes = _writes(transcoders, source_layer, source_indices, attn_layer).to(adapter.dtype)
    normed = adapter.block(attn_layer).attn_norm.linear(writes)  # (k_s, d)
    moved = torch.einsum("kd,hde->hke", normed, adapter.ov_matrices(attn_layer))
    reads = read_vectors(adapter, transcoders, target_layer, target_indices)  # (k_t, d)
    return moved @ reads.T


@torch.no_grad()
def de_embeddings(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    layer: int,
    indices: Tensor,
    attn_layer: int | None = None,
) -> Tensor:
    """Token scores ``W_E r_j`` (k, V), or through each head of ``attn_layer``: (H, k, V)."""
    reads = read_vectors(adapter, transcoders, layer, indices)
    if attn_layer is None:
        return reads @ adapter.W_E.T
    parallel = adapter.parallel_residual[layer]
    if not 0 <= attn_layer <= layer or (parallel and attn_layer == layer):
        raise InvalidArgumentError(
            f"attention of layer {attn_layer} does not lie between the embedding and a "
            f"feature at layer {layer}"
            + (" (its block is parallel: the MLP reads the block's input)" if parallel else "")
        )
    normed = adapter.block(attn_layer).attn_norm.linear(adapter.W_E)  # (V, d)
    moved = torch.einsum("vd,hde->hve", normed, adapter.ov_matrices(attn_layer))
    return torch.einsum("hve,ke->hkv", moved, reads)


@torch.no_grad()
def output_logits(
    adapter: ModelAdapter, transcoders: TranscoderSet, layer: int, indices: Tensor
) -> Tensor:
    """Direct logit effect of features' decoders through the final norm's linear part
    and the unembedding: (k, V), up to the final norm's denominator."""
    writes = _writes(transcoders, layer, indices, adapter.n_layers).to(adapter.dtype)
    return adapter.final_norm.linear(writes) @ adapter.W_U


def top_tokens(scores: Tensor, tokenizer: object, k: int = 10) -> list[list[str]]:
    """The ``k`` highest-scoring tokens of each row of ``scores`` (n, V), as strings."""
    top = torch.topk(scores, min(k, scores.shape[-1]), dim=-1).indices
    decode = getattr(tokenizer, "decode", None)
    return [[decode([t]) if decode else str(t) for t in row] for row in top.tolist()]


def feature_token_summaries(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    tokenizer: object,
    layer: int,
    indices: Tensor,
    k: int = 10,
) -> list[tuple[list[str], list[str]]]:
    """Per feature of ``layer``: (tokens its encoder reads most strongly from the
    embedding, tokens its decoder promotes most through the unembedding), the
    ``de_embedding_tokens`` and ``output_tokens`` of :class:`ingest.graph.FeatureRecord`."""
    reads = top_tokens(de_embeddings(adapter, transcoders, layer, indices), tokenizer, k)
    writes = top_tokens(output_logits(adapter, transcoders, layer, indices), tokenizer, k)
    return list(zip(reads, writes, strict=True))
