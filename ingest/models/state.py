"""What a forward pass can hand back: the recorded activations and the frozen quantities.

A :class:`FrozenState` holds the nonlinear quantities that the local replacement model of
Ameisen et al. 2025 ("Circuit Tracing: Revealing Computational Graphs in Language Models")
keeps fixed at their values on one prompt: the attention patterns and the denominators of
every normalization (LayerNorm: ``sqrt(var(x) + eps)``; RMSNorm: ``sqrt(mean(x^2) + eps)``).
Fed back into :meth:`ingest.models.adapter.ModelAdapter.forward`, they make the map from
the residual stream to the logits affine (once the MLPs are replaced by linear or
constant maps).

A :class:`Recording` is the full trace of one forward pass. Its tensors are not detached,
so a caller can differentiate through them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class FrozenState:
    """The quantities a frozen forward uses instead of computing them.

    Every tensor may have batch size 1 and is then broadcast over a larger batch: one
    prompt's state can drive a batch of injected vectors. Norm scales are in the model's
    dtype, or float32 for half-precision models.
    """

    patterns: list[Tensor]  # n_layers x (B, H, T, T): attention probabilities, rows sum to 1
    attn_norm_scale: list[Tensor]  # n_layers x (B, T, 1): denominator of the norm before attention
    mlp_norm_scale: list[Tensor]  # n_layers x (B, T, 1): denominator of the norm the MLP reads
    final_norm_scale: Tensor  # (B, T, 1): denominator of the final norm

    def detach(self) -> FrozenState:
        """A copy cut from the autograd graph (the tensors share storage)."""
        return FrozenState(
            patterns=[p.detach() for p in self.patterns],
            attn_norm_scale=[s.detach() for s in self.attn_norm_scale],
            mlp_norm_scale=[s.detach() for s in self.mlp_norm_scale],
            final_norm_scale=self.final_norm_scale.detach(),
        )

    def prefix(self, length: int) -> FrozenState:
        """The state of the prompt's first ``length`` positions (views, not copies): what a
        causal model's frozen forward on that prefix uses."""
        return FrozenState(
            patterns=[p[..., :length, :length] for p in self.patterns],
            attn_norm_scale=[s[:, :length] for s in self.attn_norm_scale],
            mlp_norm_scale=[s[:, :length] for s in self.mlp_norm_scale],
            final_norm_scale=self.final_norm_scale[:, :length],
        )


@dataclass
class Recording:
    """Every intermediate of one forward pass, per layer, not detached.

    ``resid_pre[0]`` is the embedding (token plus learned positional embedding). For a
    parallel-residual block (GPT-NeoX default) the MLP reads ``resid_pre``, so
    ``resid_mid[l]`` is ``resid_pre[l]`` itself.
    """

    logits: Tensor  # (B, T, V)
    resid_pre: list[Tensor]  # n_layers x (B, T, d)
    resid_mid: list[Tensor]  # n_layers x (B, T, d)
    resid_post: list[Tensor]  # n_layers x (B, T, d)
    attn_in: list[Tensor]  # n_layers x (B, T, d): the normalized vector attention reads
    attn_out: list[Tensor]  # n_layers x (B, T, d)
    mlp_in: list[Tensor]  # n_layers x (B, T, d): the normalized vector the MLP reads
    mlp_out: list[Tensor]  # n_layers x (B, T, d): the MLP output (or its replacement)
    final_normed: Tensor  # (B, T, d): what the unembedding reads
    frozen: FrozenState
