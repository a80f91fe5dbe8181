"""The generic transformer components, written once for every family.

Each component holds its canonical weights (:mod:`ingest.models.weights`) as buffers and
splits its computation at the points where the local replacement model freezes values
(Ameisen et al. 2025, "Circuit Tracing"):

- :class:`Norm` computes a denominator (:meth:`Norm.scale`) and, separately, applies the
  norm with a given denominator (:meth:`Norm.forward`). With the denominator held fixed
  the norm is affine in its input: mean-centering (LayerNorm only), division by a
  constant, the elementwise weight and the bias.
- :class:`Attention` computes a pattern (:meth:`Attention.pattern`: queries, keys, rotary
  embedding, scaled dot product, causal mask, softmax) and, separately, mixes values with
  a given pattern (:meth:`Attention.forward`), which is affine in its input.
- :class:`MLP` is the nonlinear part that transcoders replace.

Half-precision inputs get their norm denominators (kept in float32), normalization and
softmax computed in float32, as the HF implementations do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ingest.models.weights import AttentionWeights, MLPWeights, NormWeights

_HALF = (torch.float16, torch.bfloat16)


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _normalized(
    x: Tensor, scale: Tensor, weight: Tensor, bias: Tensor | None, center: bool
) -> Tensor:
    """``(x - mean(x)) / scale * weight + bias`` (centered for LayerNorm only), in float32
    for half-precision inputs, as HF does."""
    dtype = x.dtype
    if dtype in _HALF:
        x, scale = x.float(), scale.float()
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
    y = (x / scale).to(dtype) * weight
    return y if bias is None else y + bias


class Norm(nn.Module):
    """LayerNorm or RMSNorm with the denominator exposed."""

    weight: Tensor
    bias: Tensor | None

    def __init__(self, w: NormWeights) -> None:
        super().__init__()
        self.kind = w.kind
        self.eps = float(w.eps)
        self.register_buffer("weight", w.weight.detach())
        self.register_buffer("bias", _detached(w.bias))

    def scale(self, x: Tensor) -> Tensor:
        """The denominator for ``x`` (..., d): (..., 1)."""
        xf = x.float() if x.dtype in _HALF else x
        if self.kind == "layernorm":
            second_moment = xf.var(dim=-1, keepdim=True, unbiased=False)
        else:
            second_moment = xf.pow(2).mean(dim=-1, keepdim=True)
        # kept in float32 for half-precision inputs: the denominator is not rounded
        return torch.sqrt(second_moment + self.eps)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        """Normalize ``x`` (B, T, d) with denominator ``scale`` (B or 1, T, 1): (B, T, d)."""
        if not scale.requires_grad and x.requires_grad and torch.is_grad_enabled():
            # a held denominator: the norm is affine in x, and one function's backward
            # costs three passes over x's gradient instead of autograd's six
            return _HeldNorm.apply(x, scale, self.weight, self.bias, self.kind == "layernorm")
        return self._normalize(x, scale)

    def _normalize(self, x: Tensor, scale: Tensor) -> Tensor:
        return _normalized(x, scale, self.weight, self.bias, self.kind == "layernorm")

    def linear(self, v: Tensor) -> Tensor:
        """The norm's linear part, its denominator taken out: (..., d) -> (..., d).

        LayerNorm: ``(v - mean(v)) * weight``; RMSNorm: ``v * weight``. The norm itself is
        ``linear(x) / scale(x) + bias``: a direction's effect through the norm with the
        denominator held (weights-based readings: de-embeddings, direct logit effects).
        """
        if self.kind == "layernorm":
            v = v - v.mean(dim=-1, keepdim=True)
        return v * self.weight.to(v.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, d={self.weight.shape[0]}, eps={self.eps}"


class _HeldNorm(torch.autograd.Function):
    """:meth:`Norm.forward` with a held denominator, as one autograd node: the gradient
    ``g`` becomes ``center(g * weight / scale)`` (``center`` for LayerNorm only)."""

    @staticmethod
    def forward(
        x: Tensor, scale: Tensor, weight: Tensor, bias: Tensor | None, center: bool
    ) -> Tensor:
        return _normalized(x, scale, weight, bias, center)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, scale, weight, _, center = inputs
        ctx.save_for_backward(scale, weight)
        ctx.center = center
        ctx.dtype = x.dtype

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        scale, weight = ctx.saved_tensors
        g = grads[0] * weight
        g = g.float() / scale.float() if ctx.dtype in _HALF else g / scale
        if ctx.center:
            g = g - g.mean(dim=-1, keepdim=True)
        return g.to(ctx.dtype), None, None, None, None


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``r`` dims of each head of ``x`` (B, H, T, e) by rotary angles
    given as ``cos``/``sin`` (1 or B, T, r), in the "rotate half" layout of GPT-NeoX and
    Llama (Su et al. 2021, "RoFormer"); the remaining ``e - r`` dims pass through."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, r)
    x_rot, x_pass = x[..., :r], x[..., r:]
    first, second = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = torch.cat((-second, first), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention with grouped key/value heads (Ainslie et al. 2023) and
    an optional sliding window (Beltagy et al. 2020; Jiang et al. 2023, Mistral)."""

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    b_Q: Tensor | None
    b_K: Tensor | None
    b_V: Tensor | None
    b_O: Tensor | None
    kv_index: Tensor

    def __init__(self, w: AttentionWeights) -> None:
        super().__init__()
        n_heads, n_kv = w.W_Q.shape[0], w.W_K.shape[0]
        if n_heads % n_kv:
            raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads")
        self.scale = float(w.scale)
        self.window = None if w.window is None else int(w.window)
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            self.register_buffer(name, _detached(getattr(w, name)))
        # query head h reads key/value head h // (H // K)
        self.register_buffer(
            "kv_index", torch.arange(n_heads, device=w.W_Q.device) // (n_heads // n_kv)
        )

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.W_K.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[2]

    def _project(self, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        """``x`` (B, T, d) through per-head weights ``W`` (n, d, e), repeated to one per
        query head: (B, T, H, e), heads in the last two dimensions."""
        n, d, e = W.shape
        out = torch.matmul(x, W.permute(1, 0, 2).reshape(d, n * e)).unflatten(-1, (n, e))
        if b is not None:
            out = out + b
        if n == self.n_heads:
            return out
        # query head h reads key/value head h // (H // K): a view, summed in the backward
        B, T = x.shape[:2]
        group = self.n_heads // n
        return out.unsqueeze(3).expand(B, T, n, group, e).reshape(B, T, self.n_heads, e)

    def pattern(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None) -> Tensor:
        """Attention probabilities for the normalized input ``x`` (B, T, d): (B, H, T, T)."""
        q = self._project(x, self.W_Q, self.b_Q).transpose(1, 2)  # (B, H, T, e)
        k = self._project(x, self.W_K, self.b_K).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, H, T, T)
        T = x.shape[1]
        visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if self.window is not None:
            visible = visible.triu(1 - self.window)  # key j visible from i iff j > i - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if scores.dtype in _HALF:
            return torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        return torch.softmax(scores, dim=-1)

    def forward(self, x: Tensor, pattern: Tensor) -> Tensor:
        """Mix values of ``x`` (B, T, d) with ``pattern`` (B or 1, H, T, T): (B, T, d)."""
        v = self._project(x, self.W_V, self.b_V)  # (B, T, H, e)
        B, T, H, e = v.shape
        if pattern.shape[0] == 1 and B > 1:
            # One pattern for the whole batch (a frozen prompt's copies): the batch goes into
            # the columns of one (T, T) @ (T, B e) product per head. A broadcast matmul would
            # copy the pattern B times, forward and backward.
            folded = v.permute(2, 1, 0, 3).reshape(H, T, B * e)
            mixed = torch.matmul(pattern[0], folded)  # (H, T, B e)
            z = mixed.unflatten(-1, (B, e)).permute(2, 1, 0, 3)  # (B, T, H, e)
        else:
            z = torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2)  # (B, T, H, e)
        out = torch.matmul(z.reshape(B, T, H * e), self.W_O.reshape(H * e, -1))
        if self.b_O is not None:
            out = out + self.b_O
        return out

    def ov(self) -> Tensor:
        """Per-head map from normalized input to output, ``W_V[kv(h)] @ W_O[h]``: (H, d, d)."""
        return torch.matmul(self.W_V[self.kv_index], self.W_O)

    def bias_out(self) -> Tensor:
        """The output's constant part when pattern rows sum to 1:
        ``sum_h b_V[kv(h)] @ W_O[h] + b_O`` (d,)."""
        out = torch.zeros(self.W_O.shape[-1], dtype=self.W_O.dtype, device=self.W_O.device)
        if self.b_V is not None:
            out = out + torch.einsum("he,hed->d", self.b_V[self.kv_index], self.W_O)
        if self.b_O is not None:
            out = out + self.b_O
        return out


class MLP(nn.Module):
    """``act(x W_in + b_in) W_out + b_out``, or the gated form (Shazeer 2020, "GLU Variants
    Improve Transformer") ``(act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out``."""

    W_in: Tensor
    b_in: Tensor | None
    W_out: Tensor
    b_out: Tensor | None
    W_gate: Tensor | None
    b_gate: Tensor | None

    def __init__(self, w: MLPWeights) -> None:
        super().__init__()
        for name in ("W_in", "b_in", "W_out", "b_out", "W_gate", "b_gate"):
            self.register_buffer(name, _detached(getattr(w, name)))
        self.act = w.act
        self.act_name = w.act_name

    @property
    def gated(self) -> bool:
        return self.W_gate is not None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., d) -> (..., d)."""
        hidden = x @ self.W_in  # (..., m)
        if self.b_in is not None:
            hidden = hidden + self.b_in
        if self.W_gate is not None:
            gate = x @ self.W_gate
            if self.b_gate is not None:
                gate = gate + self.b_gate
            hidden = self.act(gate) * hidden
        else:
            hidden = self.act(hidden)
        out = hidden @ self.W_out
        if self.b_out is not None:
            out = out + self.b_out
        return out


class Block(nn.Module):
    """One transformer block's components; the residual wiring lives in the adapter."""

    attn_norm: Norm
    attn: Attention
    mlp_norm: Norm
    mlp: MLP

    def __init__(
        self,
        attn_norm: Norm,
        attn: Attention,
        mlp_norm: Norm,
        mlp: MLP,
        parallel_residual: bool,
    ) -> None:
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.parallel_residual = parallel_residual
