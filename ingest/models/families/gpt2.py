"""GPT-2 (Radford et al. 2019): pre-LayerNorm blocks, learned positional embeddings,
GELU MLP, tied unembedding.

HF stores GPT-2's projections as ``Conv1D`` modules whose weight is (in, out), the
transpose of ``nn.Linear``; ``c_attn`` holds Q, K and V side by side along its output
dimension, each split into heads of width ``d / H``. Attention scores are scaled by
``1/sqrt(e)`` when ``scale_attn_weights`` and further by ``1/(layer + 1)`` when
``scale_attn_by_inverse_layer_idx``.
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


def _layernorm(module, eps: float) -> NormWeights:
    return NormWeights("layernorm", module.weight, module.bias, eps)


@register_family("gpt2", "gpt2")
def convert_gpt2(model: PreTrainedModel) -> CanonicalWeights:
    m: Any = model  # the HF module tree is untyped
    cfg = m.config
    tf = m.transformer
    d, H = cfg.n_embd, cfg.n_head
    e = d // H
    eps = cfg.layer_norm_epsilon
    layers = []
    for idx, block in enumerate(tf.h):
        w_qkv, b_qkv = block.attn.c_attn.weight, block.attn.c_attn.bias  # (d, 3d), (3d,)
        # columns [i*d, (i+1)*d) hold Q, K, V (i = 0, 1, 2); head h owns e of them
        W_Q, W_K, W_V = (
            w_qkv[:, i * d : (i + 1) * d].view(d, H, e).transpose(0, 1) for i in range(3)
        )
        b_Q, b_K, b_V = (b_qkv[i * d : (i + 1) * d].view(H, e) for i in range(3))
        scale = e**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(idx + 1)
        attn = AttentionWeights(
            W_Q=W_Q,
            W_K=W_K,
            W_V=W_V,
            W_O=block.attn.c_proj.weight.view(H, e, d),
            b_Q=b_Q,
            b_K=b_K,
            b_V=b_V,
            b_O=block.attn.c_proj.bias,
            scale=scale,
        )
        mlp = MLPWeights(
            W_in=block.mlp.c_fc.weight,  # (d, m): Conv1D is already (in, out)
            b_in=block.mlp.c_fc.bias,
            W_out=block.mlp.c_proj.weight,
            b_out=block.mlp.c_proj.bias,
            act=activation(cfg.activation_function),
            act_name=cfg.activation_function,
        )
        layers.append(
            LayerWeights(
                attn_norm=_layernorm(block.ln_1, eps),
                attn=attn,
                mlp_norm=_layernorm(block.ln_2, eps),
                mlp=mlp,
                parallel_residual=False,
            )
        )
    lm_head = m.lm_head
    return CanonicalWeights(
        family="gpt2",
        model_type=cfg.model_type,
        W_E=tf.wte.weight,
        W_pos=tf.wpe.weight,
        layers=layers,
        final_norm=_layernorm(tf.ln_f, eps),
        W_U=lm_head.weight.T,
        b_U=lm_head.bias,
        n_ctx=cfg.n_positions,
    )
