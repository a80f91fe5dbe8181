"""Llama (Touvron et al. 2023): RMSNorm, rotary embeddings on the full head, SwiGLU MLP,
grouped-query attention, optionally tied embeddings. Mistral (Jiang et al. 2023) and
Qwen2 share the module layout and add a sliding attention window (Qwen2 also has
query/key/value biases), so they are read by the same converter. Which layers slide is
read per ``model_type``, as HF's own modules read it: Llama never, Mistral every layer
(``sliding_window``), Qwen2 the layers ``layer_types`` names ``sliding_attention``. A key
another type would use (a ``sliding_window`` in a Llama config, ``layer_types`` in a
Mistral one) is ignored by HF, and so here.

HF's projections are ``nn.Linear`` (out, in). ``q_proj`` has ``H * e`` outputs and
``k_proj``/``v_proj`` ``K * e``; query head h reads key/value head ``h // (H / K)``
(``repeat_kv``). The head width ``e`` is ``config.head_dim``, which may differ from
``d / H``. Rotary angles come from the model's own ``model.rotary_emb`` (with its rope
scaling and attention scaling). The MLP is ``down(act(gate(x)) * up(x))``.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _rmsnorm(module) -> NormWeights:
    return NormWeights("rmsnorm", module.weight, None, module.variance_epsilon)


def _heads_in(linear, n: int, e: int) -> tuple:
    """An (n * e, d) projection as (n, d, e) weights and (n, e) bias."""
    d = linear.weight.shape[1]
    W = linear.weight.view(n, e, d).transpose(1, 2)
    b = linear.bias.view(n, e) if linear.bias is not None else None
    return W, b


def _no_window(cfg: Any) -> list[int | None]:
    """Llama: full causal attention in every layer (``LlamaAttention`` has no window)."""
    return [None] * cfg.num_hidden_layers


def _window_every_layer(cfg: Any) -> list[int | None]:
    """Mistral: ``sliding_window`` (None: no window) in every layer; ``MistralModel``
    builds one mask for all layers and ignores ``layer_types``."""
    return [getattr(cfg, "sliding_window", None)] * cfg.num_hidden_layers


def _window_by_layer_type(cfg: Any) -> list[int | None]:
    """Qwen2: ``sliding_window`` in the layers ``layer_types`` marks ``sliding_attention``.
    ``Qwen2Config`` has already set ``sliding_window`` to None unless
    ``use_sliding_window``, and derived ``layer_types`` from ``max_window_layers`` (the
    layers from that index on slide) when the config named none."""
    window = getattr(cfg, "sliding_window", None)
    kinds = getattr(cfg, "layer_types", None)
    if kinds is None:
        kinds = [
            "sliding_attention" if window is not None and i >= cfg.max_window_layers else "full"
            for i in range(cfg.num_hidden_layers)
        ]
    return [window if kind == "sliding_attention" else None for kind in kinds]


# model_type -> per-layer sliding windows, as that type's HF modules read them
_WINDOWS: dict[str, Callable[[Any], list[int | None]]] = {
    "llama": _no_window,
    "mistral": _window_every_layer,
    "qwen2": _window_by_layer_type,
}


@register_family("llama", *_WINDOWS)
def convert_llama(model: PreTrainedModel) -> CanonicalWeights:
    m: Any = model  # the HF module tree is untyped
    cfg = m.config
    base = m.model
    d, H = cfg.hidden_size, cfg.num_attention_heads
    K = cfg.num_key_value_heads or H
    e = getattr(cfg, "head_dim", None) or d // H
    windows = _WINDOWS[cfg.model_type](cfg)
    layers = []
    for idx, layer in enumerate(base.layers):
        sa = layer.self_attn
        W_Q, b_Q = _heads_in(sa.q_proj, H, e)
        W_K, b_K = _heads_in(sa.k_proj, K, e)
        W_V, b_V = _heads_in(sa.v_proj, K, e)
        attn = AttentionWeights(
            W_Q=W_Q,
            W_K=W_K,
            W_V=W_V,
            W_O=sa.o_proj.weight.view(d, H, e).permute(1, 2, 0),
            b_Q=b_Q,
            b_K=b_K,
            b_V=b_V,
            b_O=sa.o_proj.bias,
            scale=float(sa.scaling),
            window=windows[idx],
        )
        mlp = MLPWeights(
            W_in=layer.mlp.up_proj.weight.T,
            b_in=layer.mlp.up_proj.bias,
            W_out=layer.mlp.down_proj.weight.T,
            b_out=layer.mlp.down_proj.bias,
            act=activation(cfg.hidden_act),
            act_name=cfg.hidden_act,
            W_gate=layer.mlp.gate_proj.weight.T,
            b_gate=layer.mlp.gate_proj.bias,
        )
        layers.append(
            LayerWeights(
                attn_norm=_rmsnorm(layer.input_layernorm),
                attn=attn,
                mlp_norm=_rmsnorm(layer.post_attention_layernorm),
                mlp=mlp,
                parallel_residual=False,
            )
        )
    lm_head = m.get_output_embeddings()
    return CanonicalWeights(
        family="llama",
        model_type=cfg.model_type,
        W_E=base.embed_tokens.weight,
        W_pos=None,
        layers=layers,
        final_norm=_rmsnorm(base.norm),
        W_U=lm_head.weight.T,
        b_U=lm_head.bias,
        n_ctx=cfg.max_position_embeddings,
        rotary=base.rotary_emb,
    )
