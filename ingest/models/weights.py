"""The canonical weight layout every model family is converted into.

A family converter (``ingest/models/families/``) reads a Hugging Face model and returns a
:class:`CanonicalWeights`; the generic forward in :mod:`ingest.models.adapter` never looks
at the HF module tree again. The layout follows TransformerLens' convention: matrices
act on row vectors (``y = x @ W + b``) and attention weights are split per head.

Shapes (``d`` model width, ``H`` query heads, ``K`` key/value heads, ``e`` head width,
``m`` MLP width, ``V`` vocabulary):

==========  ==============  ======================================================
name        shape           meaning
==========  ==============  ======================================================
W_Q, b_Q    (H, d, e), (H, e)  queries
W_K, b_K    (K, d, e), (K, e)  keys; query head h reads key head ``h // (H // K)``
W_V, b_V    (K, d, e), (K, e)  values, grouped like keys
W_O, b_O    (H, e, d), (d,)    output projection
W_in, b_in  (d, m), (m,)       MLP input (the "up" projection of a gated MLP)
W_gate      (d, m), (m,)       gate of a gated MLP (SwiGLU): ``act(x W_gate) * (x W_in)``
W_out       (m, d), (d,)       MLP output ("down")
W_E         (V, d)             token embedding
W_pos       (n_ctx, d)         learned positional embedding (None with rotary)
W_U, b_U    (d, V), (V,)       unembedding
==========  ==============  ======================================================

Tensors may be views of the HF parameters (no copy); they are detached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

NormKind = Literal["layernorm", "rmsnorm"]


@dataclass
class NormWeights:
    """A LayerNorm (``(x - mean) / sqrt(var + eps) * w + b``) or RMSNorm
    (``x / sqrt(mean(x^2) + eps) * w``)."""

    kind: NormKind
    weight: Tensor  # (d,)
    bias: Tensor | None  # (d,)
    eps: float

    def __post_init__(self) -> None:
        if self.kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm kind {self.kind!r}: use 'layernorm' or 'rmsnorm'")


@dataclass
class AttentionWeights:
    """One attention sublayer, per head; ``scale`` multiplies ``q . k`` before softmax;
    ``window`` (sliding-window attention, Mistral) lets query i see keys j > i - window."""

    W_Q: Tensor  # (H, d, e)
    W_K: Tensor  # (K, d, e)
    W_V: Tensor  # (K, d, e)
    W_O: Tensor  # (H, e, d)
    b_Q: Tensor | None  # (H, e)
    b_K: Tensor | None  # (K, e)
    b_V: Tensor | None  # (K, e)
    b_O: Tensor | None  # (d,)
    scale: float
    window: int | None = None


# Activations whose transformers module is written out in Python and a fused torch
# kernel computes the same function: GPT-2's "gelu_new" is the tanh approximation of
# GELU, which F.gelu(approximate="tanh") (transformers' "gelu_pytorch_tanh") computes
# in one kernel; results differ by float rounding only. Activation collection for
# transcoder training spends much of its time in the MLP activation.
_FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def activation(name: str) -> nn.Module:
    """The MLP activation module for a config's activation name (transformers' ACT2FN,
    with fused equivalents of the Python-written ones)."""
    from transformers.activations import ACT2FN

    return ACT2FN[_FUSED_ACTIVATIONS.get(name, name)]


@dataclass
class MLPWeights:
    """One MLP sublayer: ``act(x W_in + b_in) W_out + b_out``, or gated
    ``(act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out``."""

    W_in: Tensor  # (d, m)
    b_in: Tensor | None  # (m,)
    W_out: Tensor  # (m, d)
    b_out: Tensor | None  # (d,)
    act: nn.Module  # from transformers.activations.ACT2FN
    act_name: str
    W_gate: Tensor | None = None  # (d, m)
    b_gate: Tensor | None = None  # (m,)


@dataclass
class LayerWeights:
    """One transformer block. ``parallel_residual``: the MLP reads the block's input
    (GPT-J / GPT-NeoX) instead of the residual after attention."""

    attn_norm: NormWeights
    attn: AttentionWeights
    mlp_norm: NormWeights
    mlp: MLPWeights
    parallel_residual: bool


@dataclass
class CanonicalWeights:
    """Everything the generic forward needs, produced by a family converter."""

    family: str
    model_type: str
    W_E: Tensor  # (V, d)
    W_pos: Tensor | None  # (n_ctx, d)
    layers: list[LayerWeights]
    final_norm: NormWeights
    W_U: Tensor  # (d, V)
    b_U: Tensor | None  # (V,)
    n_ctx: int
    # HF's rotary module: called as rotary(x, position_ids) -> (cos, sin), each (1, T, r)
    # with r <= e; the first r dimensions of each query/key head are rotated.
    rotary: nn.Module | None = None
    extra_config: dict[str, object] = field(default_factory=dict)  # hashed into the fingerprint
