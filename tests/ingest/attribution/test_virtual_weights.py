"""Weights-based connections and de-embeddings reproduce attribution edges exactly."""

import pytest
import torch

from ingest.attribution.attribute import attribute
from ingest.attribution.replacement import build_replacement
from ingest.attribution.virtual_weights import (
    de_embeddings,
    feature_connections,
    feature_token_summaries,
    head_connections,
    output_logits,
    read_vectors,
    top_tokens,
)
from ingest.errors import InvalidArgumentError
from ingest.graph import NodeKind
from ingest.models import adapter_from_hf

from . import models as m

pytestmark = pytest.mark.unit

PROMPT = torch.tensor([[3, 17, 8, 25, 11, 3, 30]])


def _setup(zero_attention: bool):
    hf = m.hf_model("gpt2")
    if zero_attention:
        with torch.no_grad():
            for block in hf.transformer.h:
                block.attn.c_proj.weight.zero_()
                block.attn.c_proj.bias.zero_()
    adp = adapter_from_hf(hf.double())
    tcs = m.transcoder_set(adp)
    result = attribute(adp, tcs, PROMPT)
    state = build_replacement(adp, tcs, PROMPT)
    return adp, tcs, result, state


def _layer_nodes(result, layer):
    return [(i, n) for i, n in enumerate(result.nodes[result.layout.features]) if n.layer == layer]


def test_direct_and_head_connections_sum_to_the_edges() -> None:
    adp, tcs, result, state = _setup(zero_attention=False)
    sources, targets = _layer_nodes(result, 0), _layer_nodes(result, 1)
    s_idx = torch.tensor([n.feature for _, n in sources])
    t_idx = torch.tensor([n.feature for _, n in targets])
    direct = feature_connections(adp, tcs, 0, s_idx, 1, t_idx)  # (k_s, k_t)
    heads = head_connections(adp, tcs, 0, s_idx, 1, 1, t_idx)  # (H, k_s, k_t)
    pattern = state.frozen.patterns[1][0]  # (H, T, T)
    sig_attn = state.frozen.attn_norm_scale[1][0, :, 0]  # (T,)
    sig_mlp = state.frozen.mlp_norm_scale[1][0, :, 0]
    for a, (col, src) in enumerate(sources):
        for b, (row, tgt) in enumerate(targets):
            expected = 0.0
            if src.pos == tgt.pos:
                expected += float(direct[a, b])
            through = pattern[:, tgt.pos, src.pos] * heads[:, a, b] / sig_attn[src.pos]
            expected += float(through.sum())
            expected *= src.activation / float(sig_mlp[tgt.pos])
            assert float(result.adjacency[row, col]) == pytest.approx(expected, abs=1e-10)


def test_de_embeddings_match_token_edges_without_attention() -> None:
    adp, tcs, result, state = _setup(zero_attention=True)
    lay = result.layout
    feats = _layer_nodes(result, 0)
    idx = torch.tensor([n.feature for _, n in feats])
    scores = de_embeddings(adp, tcs, 0, idx)  # (k, V)
    reads = read_vectors(adp, tcs, 0, idx)
    sig = state.frozen.mlp_norm_scale[0][0, :, 0]
    for k, (row, node) in enumerate(feats):
        tok_col = lay.tokens.start + node.pos
        token = result.nodes[tok_col]
        assert token.kind is NodeKind.TOKEN
        positional = float(adp.W_pos[node.pos] @ reads[k])
        expected = (float(scores[k, token.token_id]) + positional) / float(sig[node.pos])
        assert float(result.adjacency[row, tok_col]) == pytest.approx(expected, abs=1e-10)
    through = de_embeddings(adp, tcs, 1, idx[:2], attn_layer=1)
    assert through.shape == (adp.n_heads, 2, adp.vocab_size)


def test_output_logits_and_top_tokens() -> None:
    adp, tcs, result, state = _setup(zero_attention=True)
    last = adp.n_layers - 1
    lay = result.layout
    feats = [(i, n) for i, n in _layer_nodes(result, last) if n.pos == PROMPT.shape[1] - 1]
    assert feats
    idx = torch.tensor([n.feature for _, n in feats])
    effects = output_logits(adp, tcs, last, idx)  # (k, V)
    sig = float(state.frozen.final_norm_scale[0, -1, 0])
    for k, (col, node) in enumerate(feats):
        for r, logit in enumerate(result.nodes[lay.logits]):
            row = effects[k]
            expected = node.activation * float(row[logit.token_id] - row.mean()) / sig
            edge = float(result.adjacency[lay.logits.start + r, col])
            assert edge == pytest.approx(expected, abs=1e-10)
    names = top_tokens(effects, m.word_tokenizer(), k=3)
    assert len(names) == len(feats) and all(len(row) == 3 for row in names)
    summaries = feature_token_summaries(adp, tcs, m.word_tokenizer(), last, idx, k=4)
    assert len(summaries) == len(feats)
    assert summaries[0][1] == top_tokens(effects[:1], m.word_tokenizer(), k=4)[0]
    with pytest.raises(InvalidArgumentError, match="between"):
        head_connections(adp, tcs, 1, idx, 1, 1, idx)


def test_a_parallel_blocks_own_attention_is_on_no_path_to_its_features() -> None:
    adp = m.adapter("neox", torch.float64)
    assert adp.parallel_residual[1]
    tcs = m.transcoder_set(adp)
    idx = torch.tensor([0, 1])
    assert de_embeddings(adp, tcs, 1, idx, attn_layer=0).shape == (adp.n_heads, 2, adp.vocab_size)
    with pytest.raises(InvalidArgumentError, match="parallel"):
        de_embeddings(adp, tcs, 1, idx, attn_layer=1)
    with pytest.raises(InvalidArgumentError, match="between"):
        head_connections(adp, tcs, 0, idx, 1, 1, idx)
