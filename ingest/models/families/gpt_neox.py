"""GPT-NeoX and Pythia (Black et al. 2022; Biderman et al. 2023): LayerNorm, partial
rotary embeddings, GELU MLP, and by default a parallel residual.

HF's ``query_key_value`` is an ``nn.Linear`` with output ``3d`` laid out per head: its
output reshapes to (H, 3, e), so head h's query, key and value are consecutive blocks of
``e`` rows. Only the first ``rotary_pct * e`` dims of each head are rotated; the angles
come from the model's own ``gpt_neox.rotary_emb`` so rope scaling variants stay exact.
``use_parallel_residual`` (Pythia: true) makes the MLP read ``LN2(x)`` of the block's
input instead of the residual after attention.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from ingest.models.registry import register_family
from ingest.models.weights import (
    AttentionWeights,
    CanonicalWeights,
    LayerWeights,
    MLPWeights,
    NormWeights,
    activation,
)


def _layernorm(module) -> NormWeights:
    return NormWeights("layernorm", module.weight, module.bias, module.eps)


@register_family("gpt_neox", "gpt_neox")
def convert_gpt_neox(model: PreTrainedModel) -> CanonicalWeights:
    m: Any = model  # the HF module tree is untyped
    cfg = m.config
    base = m.gpt_neox
    d, H = cfg.hidden_size, cfg.num_attention_heads
    e = d // H
    layers = []
    for layer in base.layers:
        qkv = layer.attention.query_key_value
        w = qkv.weight.view(H, 3, e, d)  # (out, in) with out = (H, 3, e)
        b = qkv.bias.view(H, 3, e) if qkv.bias is not None else None
        dense = layer.attention.dense
        attn = AttentionWeights(
            W_Q=w[:, 0].transpose(1, 2),
            W_K=w[:, 1].transpose(1, 2),
            W_V=w[:, 2].transpose(1, 2),
            W_O=dense.weight.view(d, H, e).permute(1, 2, 0),
            b_Q=b[:, 0] if b is not None else None,
            b_K=b[:, 1] if b is not None else None,
            b_V=b[:, 2] if b is not None else None,
            b_O=dense.bias,
            scale=e**-0.5,
        )
        mlp = MLPWeights(
            W_in=layer.mlp.dense_h_to_4h.weight.T,
            b_in=layer.mlp.dense_h_to_4h.bias,
            W_out=layer.mlp.dense_4h_to_h.weight.T,
            b_out=layer.mlp.dense_4h_to_h.bias,
            act=activation(cfg.hidden_act),
            act_name=cfg.hidden_act,
        )
        layers.append(
            LayerWeights(
                attn_norm=_layernorm(layer.input_layernorm),
                attn=attn,
                mlp_norm=_layernorm(layer.post_attention_layernorm),
                mlp=mlp,
                parallel_residual=bool(cfg.use_parallel_residual),
            )
        )
    lm_head = m.get_output_embeddings()
    return CanonicalWeights(
        family="gpt_neox",
        model_type=cfg.model_type,
        W_E=base.embed_in.weight,
        W_pos=None,
        layers=layers,
        final_norm=_layernorm(base.final_layer_norm),
        W_U=lm_head.weight.T,
        b_U=lm_head.bias,
        n_ctx=cfg.max_position_embeddings,
        rotary=base.rotary_emb,
    )
