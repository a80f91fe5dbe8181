"""One interface over every supported causal LM: the generic forward pass.

:class:`ModelAdapter` runs a pre-norm decoder-only transformer from the canonical weights
a family converter produced (:mod:`ingest.models.weights`), with three controls the
circuit pipeline needs:

- ``resid0`` replaces the embedding, so a caller can make it a leaf for gradients.
- ``frozen`` supplies attention patterns and norm denominators (a :class:`FrozenState`,
  usually recorded on the same prompt) instead of computing them. This is the local
  replacement model's freezing (Ameisen et al. 2025, "Circuit Tracing", section 2.2):
  each norm becomes affine (mean-centering, division by a constant, elementwise weight,
  bias) and each attention layer becomes ``pattern @ (x W_V + b_V) W_O + b_O``. With the
  MLPs replaced by affine or constant maps, the map from ``resid0`` (or any vector a
  replacement injects) to the logits is then exactly affine, and gradients reach the
  input only through values/outputs, the replacements and the norms' linear parts. The
  frozen tensors are detached on use, so no gradient flows into them.
- ``mlp_replacements[l](mlp_in)`` replaces layer ``l``'s MLP output: transcoder splicing
  (Dunefsky et al. 2024, "Transcoders Find Interpretable LLM Feature Circuits"),
  zero-ablation, or constants that act as attribution leaves.

Block wiring, per layer ``l`` with residual ``x``::

    a = Attn(LN1(x))
    sequential:  mid = x + a;  out = mid + MLP(LN2(mid))
    parallel:    mid = x;      out = x + a + MLP(LN2(x))
    logits = LNf(x_final) @ W_U + b_U

No padding or attention-mask support: every sequence is read from position 0 under a
causal mask, so right-padded batches give correct outputs at the real positions; left
padding does not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, cast, overload

import torch
from torch import Tensor, nn

from ingest.errors import InvalidArgumentError
from ingest.models.components import MLP, Attention, Block, Norm
from ingest.models.state import FrozenState, Recording
from ingest.models.weights import CanonicalWeights

logger = logging.getLogger(__name__)

MLPReplacement = Callable[[Tensor], Tensor]


def _buffer(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _check_frozen_shape(name: str, value: Tensor, batch: int, shape: tuple[int, ...]) -> None:
    """``value`` is ``(1 or batch, *shape)``; else :class:`InvalidArgumentError` naming it."""
    if value.dim() == len(shape) + 1 and value.shape[0] in (1, batch) and value.shape[1:] == shape:
        return
    lead = "1" if batch == 1 else f"1 or {batch}"
    raise InvalidArgumentError(
        f"frozen {name} has shape {tuple(value.shape)} but this input needs "
        f"({', '.join([lead, *map(str, shape)])}): freeze on the same prompt, with this model"
    )


class ModelAdapter(nn.Module):
    """A family-independent view of a causal LM; see the module docstring."""

    W_E: Tensor  # (V, d)
    W_pos: Tensor | None  # (n_ctx, d)
    W_U: Tensor  # (d, V)
    b_U: Tensor | None  # (V,)
    final_norm: Norm
    rotary: nn.Module | None

    def __init__(self, weights: CanonicalWeights) -> None:
        super().__init__()
        self.family = weights.family
        self.model_type = weights.model_type
        self.register_buffer("W_E", _buffer(weights.W_E))
        self.register_buffer("W_pos", _buffer(weights.W_pos))
        self.register_buffer("W_U", _buffer(weights.W_U))
        self.register_buffer("b_U", _buffer(weights.b_U))
        self.blocks = nn.ModuleList(
            Block(
                attn_norm=Norm(lw.attn_norm),
                attn=Attention(lw.attn),
                mlp_norm=Norm(lw.mlp_norm),
                mlp=MLP(lw.mlp),
                parallel_residual=lw.parallel_residual,
            )
            for lw in weights.layers
        )
        self.final_norm = Norm(weights.final_norm)
        # A private copy, so moving the adapter never moves the HF model's module.
        self.rotary = copy.deepcopy(weights.rotary) if weights.rotary is not None else None
        self.extra_config = dict(weights.extra_config)

        self.n_layers = len(self.blocks)
        if self.n_layers == 0:
            raise InvalidArgumentError("the model has no transformer layers")
        first = self.block(0).attn
        self.vocab_size, self.d_model = self.W_E.shape
        self.d_mlp = int(self.block(0).mlp.W_in.shape[1])
        self.n_heads = first.n_heads
        self.n_kv_heads = first.n_kv_heads
        self.d_head = first.d_head
        self.n_ctx = int(weights.n_ctx)
        # The checkpoint's beginning-of-sequence token (its config's bos_token_id), set by
        # the loader; not part of the fingerprint. Attribution holds the features of a
        # prompt's leading BOS at zero (ingest.attribution.replacement).
        self.bos_token_id: int | None = None
        if self.W_U.shape != (self.d_model, self.vocab_size):
            raise InvalidArgumentError(
                f"unembedding has shape {tuple(self.W_U.shape)}, expected "
                f"({self.d_model}, {self.vocab_size}): the checkpoint's lm_head does not match "
                "its embedding"
            )
        self.eval()

    # -- basic properties -------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    @property
    def parallel_residual(self) -> list[bool]:
        return [bool(b.parallel_residual) for b in self.iter_blocks()]

    def block(self, layer: int) -> Block:
        """Layer ``layer``'s components."""
        return cast(Block, self.blocks[self._layer(layer)])

    def iter_blocks(self) -> list[Block]:
        return [cast(Block, b) for b in self.blocks]

    # -- pieces -----------------------------------------------------------------------

    def _check_ids(self, input_ids: Tensor) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (
            torch.int64,
            torch.int32,
        ):
            raise InvalidArgumentError("input_ids must be an integer tensor of token ids (B, T)")
        if input_ids.dim() != 2:
            raise InvalidArgumentError(
                f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}: "
                "add a batch dimension with input_ids[None]"
            )
        self._check_length(input_ids.shape[0], input_ids.shape[1])
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.vocab_size:
            raise InvalidArgumentError(
                f"token ids must lie in [0, {self.vocab_size}), got values in [{low}, {high}]: "
                "tokenize with this model's tokenizer"
            )
        return input_ids.to(self.device, torch.long)

    def _check_length(self, batch: int, tokens: int) -> None:
        if batch == 0 or tokens == 0:
            raise InvalidArgumentError("empty input: give at least one sequence of one token")
        if tokens > self.n_ctx:
            raise InvalidArgumentError(
                f"input has {tokens} tokens but the model's context is {self.n_ctx}: "
                "truncate the prompt"
            )

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token (plus learned positional) embedding of ``input_ids`` (B, T): (B, T, d)."""
        ids = self._check_ids(input_ids)
        x = self.W_E[ids]
        if self.W_pos is not None:
            x = x + self.W_pos[: ids.shape[1]]
        return x

    def unembed(self, final_normed: Tensor) -> Tensor:
        """``final_normed`` (B, T, d) @ W_U + b_U: (B, T, V)."""
        logits = final_normed @ self.W_U
        return logits + self.b_U if self.b_U is not None else logits

    def mlp(self, layer: int, mlp_in: Tensor) -> Tensor:
        """Layer ``layer``'s true MLP on its normalized input (..., d): (..., d)."""
        return self.block(layer).mlp(mlp_in)

    def ov_matrices(self, layer: int) -> Tensor:
        """Per head, the map from the normalized attention input to the residual output,
        ``W_V[kv(h)] @ W_O[h]``, acting on row vectors: (H, d, d).

        A frozen layer's output is ``sum_h pattern[h] @ (attn_in @ OV[h]) + attn_bias``."""
        return self.block(layer).attn.ov()

    def attn_bias(self, layer: int) -> Tensor:
        """The constant part of layer ``layer``'s attention output, ``sum_h b_V[kv(h)] W_O[h]
        + b_O`` (pattern rows sum to 1): (d,)."""
        return self.block(layer).attn.bias_out()

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise InvalidArgumentError(
                f"layer {layer} does not exist: the model has layers 0 to {self.n_layers - 1}"
            )
        return layer

    def _rotary(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.rotary is None:
            return None
        positions = torch.arange(x.shape[1], device=x.device)[None]  # (1, T)
        cos, sin = self.rotary(x, positions)  # (1, T, r) each
        return cos.to(x.dtype), sin.to(x.dtype)

    def _check_frozen(self, frozen: FrozenState, batch: int, tokens: int) -> None:
        """Every frozen tensor has the shape a recording of this model on a ``(batch,
        tokens)`` input has, or batch size 1: patterns ``(B, H, T, T)``, norm scales
        ``(B, T, 1)``. Anything else would broadcast silently or fail deep in the forward."""
        lists = (frozen.patterns, frozen.attn_norm_scale, frozen.mlp_norm_scale)
        if any(len(v) != self.n_layers for v in lists):
            raise InvalidArgumentError(
                f"frozen state must hold {self.n_layers} layers of patterns and norm scales: "
                "record it with this model"
            )
        pattern, per_token = (self.n_heads, tokens, tokens), (tokens, 1)
        for layer in range(self.n_layers):
            _check_frozen_shape(f"patterns[{layer}]", frozen.patterns[layer], batch, pattern)
            _check_frozen_shape(
                f"attn_norm_scale[{layer}]", frozen.attn_norm_scale[layer], batch, per_token
            )
            _check_frozen_shape(
                f"mlp_norm_scale[{layer}]", frozen.mlp_norm_scale[layer], batch, per_token
            )
        _check_frozen_shape("final_norm_scale", frozen.final_norm_scale, batch, per_token)

    # -- the forward pass ---------------------------------------------------------------

    @overload
    def forward(
        self,
        input_ids: Tensor | None = ...,
        *,
        resid0: Tensor | None = ...,
        frozen: FrozenState | None = ...,
        mlp_replacements: Mapping[int, MLPReplacement] | None = ...,
        record: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        input_ids: Tensor | None = ...,
        *,
        resid0: Tensor | None = ...,
        frozen: FrozenState | None = ...,
        mlp_replacements: Mapping[int, MLPReplacement] | None = ...,
        record: Literal[True],
    ) -> Recording: ...

    @overload
    def forward(
        self,
        input_ids: Tensor | None = ...,
        *,
        resid0: Tensor | None = ...,
        frozen: FrozenState | None = ...,
        mlp_replacements: Mapping[int, MLPReplacement] | None = ...,
        record: bool,
    ) -> Tensor | Recording: ...

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        resid0: Tensor | None = None,
        frozen: FrozenState | None = None,
        mlp_replacements: Mapping[int, MLPReplacement] | None = None,
        record: bool = False,
    ) -> Tensor | Recording:
        """Logits (B, T, V) for ``input_ids`` (B, T) or ``resid0`` (B, T, d); with
        ``record=True`` a :class:`Recording` whose tensors are not detached.

        ``frozen`` tensors and ``mlp_replacements`` outputs may have batch size 1 and are
        broadcast over the batch.
        """
        x = self._input(input_ids, resid0)
        rec: defaultdict[str, list[Tensor]] = defaultdict(list)
        x = self._blocks(x, frozen, mlp_replacements, rec if record else None)
        if frozen is None:
            final_scale = self.final_norm.scale(x)
        else:
            final_scale = frozen.final_norm_scale.detach()
        final_normed = self.final_norm(x, final_scale)
        logits = self.unembed(final_normed)
        if not record:
            return logits
        return Recording(
            logits=logits,
            resid_pre=rec["resid_pre"],
            resid_mid=rec["resid_mid"],
            resid_post=rec["resid_post"],
            attn_in=rec["attn_in"],
            attn_out=rec["attn_out"],
            mlp_in=rec["mlp_in"],
            mlp_out=rec["mlp_out"],
            final_normed=final_normed,
            frozen=FrozenState(
                patterns=rec["patterns"],
                attn_norm_scale=rec["attn_norm_scale"],
                mlp_norm_scale=rec["mlp_norm_scale"],
                final_norm_scale=final_scale,
            ),
        )

    def frozen_final_normed(
        self,
        resid0: Tensor,
        frozen: FrozenState,
        mlp_replacements: Mapping[int, MLPReplacement] | None = None,
    ) -> Tensor:
        """The final normalized residual (B, T, d) of the frozen forward from ``resid0``:
        ``forward`` without the unembedding and without a recording, for a caller that
        differentiates through it at a batch of copies of one prompt (attribution's rows),
        where logits (B, T, V) and every block's values would cost more than the rest."""
        x = self._blocks(self._input(None, resid0), frozen, mlp_replacements, None)
        return self.final_norm(x, frozen.final_norm_scale.detach())

    def _input(self, input_ids: Tensor | None, resid0: Tensor | None) -> Tensor:
        """The residual stream's start: ``resid0`` checked, or the embedding of ``input_ids``."""
        if input_ids is not None and resid0 is not None:
            raise InvalidArgumentError("give exactly one of input_ids and resid0, not both")
        if resid0 is not None:
            if resid0.dim() != 3 or resid0.shape[-1] != self.d_model:
                raise InvalidArgumentError(
                    f"resid0 must have shape (batch, tokens, {self.d_model}), "
                    f"got {tuple(resid0.shape)}"
                )
            self._check_length(resid0.shape[0], resid0.shape[1])
            return resid0
        if input_ids is not None:
            return self.embed(input_ids)
        raise InvalidArgumentError("give input_ids (batch, tokens) or resid0")

    def _blocks(
        self,
        x: Tensor,
        frozen: FrozenState | None,
        mlp_replacements: Mapping[int, MLPReplacement] | None,
        rec: defaultdict[str, list[Tensor]] | None,
    ) -> Tensor:
        """Every block on the residual ``x``: the last block's output; each block's values
        are appended to ``rec`` under their ``Recording`` names when it is given."""
        replacements = dict(mlp_replacements or {})
        for layer in replacements:
            self._layer(layer)
        if frozen is not None:
            self._check_frozen(frozen, x.shape[0], x.shape[1])
        rotary = self._rotary(x) if frozen is None else None
        for layer, block in enumerate(self.iter_blocks()):
            step = self._run_block(layer, block, x, rotary, frozen, replacements.get(layer))
            x = step["resid_post"]
            if rec is not None:
                for key, value in step.items():
                    rec[key].append(value)
        return x

    def _run_block(
        self,
        layer: int,
        block: Block,
        x: Tensor,
        rotary: tuple[Tensor, Tensor] | None,
        frozen: FrozenState | None,
        replacement: MLPReplacement | None,
    ) -> dict[str, Tensor]:
        """One block on the residual ``x``: every value :class:`Recording` keeps of it,
        under its ``Recording`` field name (``patterns``, ``attn_norm_scale``, ...)."""
        resid_pre = x
        if frozen is None:
            attn_scale = block.attn_norm.scale(x)
        else:
            attn_scale = frozen.attn_norm_scale[layer].detach()
        attn_in = block.attn_norm(x, attn_scale)
        if frozen is None:
            pattern = block.attn.pattern(attn_in, rotary)
        else:
            pattern = frozen.patterns[layer].detach()
        attn_out = block.attn(attn_in, pattern)
        resid_mid = x if block.parallel_residual else x + attn_out
        if frozen is None:
            mlp_scale = block.mlp_norm.scale(resid_mid)
        else:
            mlp_scale = frozen.mlp_norm_scale[layer].detach()
        mlp_in = block.mlp_norm(resid_mid, mlp_scale)
        if replacement is not None:
            mlp_out = self._replaced(layer, replacement, mlp_in)
        else:
            mlp_out = block.mlp(mlp_in)
        x = x + attn_out + mlp_out if block.parallel_residual else resid_mid + mlp_out
        return {
            "resid_pre": resid_pre,
            "resid_mid": resid_mid,
            "resid_post": x,
            "attn_in": attn_in,
            "attn_out": attn_out,
            "mlp_in": mlp_in,
            "mlp_out": mlp_out,
            "patterns": pattern,
            "attn_norm_scale": attn_scale,
            "mlp_norm_scale": mlp_scale,
        }

    def leading_bos(self, input_ids: Tensor) -> Tensor:
        """Per row of ``input_ids`` (B, T): 1 where it starts with this model's BOS token,
        else 0 (long, on the CPU). Attribution holds that position's features at zero, and
        the feature catalog does not count it."""
        ids = input_ids.detach().cpu()
        if self.bos_token_id is None or ids.shape[-1] == 0:
            return torch.zeros(ids.shape[0], dtype=torch.long)
        return (ids[:, 0] == self.bos_token_id).long()

    def mlp_sites(
        self, input_ids: Tensor, layers: Sequence[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The MLP inputs and outputs (B, T, d) of ``layers``, in that order, for
        activation collection: the same values as ``forward(input_ids, record=True)``,
        but the blocks after the last of them, the final norm and the unembedding do not
        run, and nothing else is kept (the unembedding alone costs several layers' worth
        on models with large vocabularies)."""
        if not layers:
            raise InvalidArgumentError("give at least one layer to record")
        wanted = {self._layer(layer) for layer in layers}
        x = self.embed(input_ids)
        rotary = self._rotary(x)
        mlp_in: dict[int, Tensor] = {}
        mlp_out: dict[int, Tensor] = {}
        for layer, block in enumerate(self.iter_blocks()[: max(wanted) + 1]):
            step = self._run_block(layer, block, x, rotary, None, None)
            x = step["resid_post"]
            if layer in wanted:
                mlp_in[layer], mlp_out[layer] = step["mlp_in"], step["mlp_out"]
        return [mlp_in[layer] for layer in layers], [mlp_out[layer] for layer in layers]

    def _replaced(self, layer: int, replacement: MLPReplacement, mlp_in: Tensor) -> Tensor:
        out = replacement(mlp_in)
        if not isinstance(out, Tensor):
            raise InvalidArgumentError(
                f"mlp_replacements[{layer}] returned {type(out).__name__}, not a tensor "
                "(batch, tokens, d_model)"
            )
        try:
            shape = torch.broadcast_shapes(out.shape, mlp_in.shape)
        except RuntimeError:
            shape = None
        if shape != mlp_in.shape:
            raise InvalidArgumentError(
                f"mlp_replacements[{layer}] returned shape {tuple(out.shape)}; it must broadcast "
                f"to the MLP output shape {tuple(mlp_in.shape)}"
            )
        return out

    # -- identity ------------------------------------------------------------------------

    def architecture(self) -> dict[str, object]:
        """The architecture as JSON-ready values (hashed by :meth:`fingerprint`)."""
        layers = [
            {
                "attn_norm": [b.attn_norm.kind, b.attn_norm.eps],
                "mlp_norm": [b.mlp_norm.kind, b.mlp_norm.eps],
                "attn_scale": b.attn.scale,
                "window": b.attn.window,
                "act": b.mlp.act_name,
                "gated": b.mlp.gated,
                "parallel_residual": bool(b.parallel_residual),
            }
            for b in self.iter_blocks()
        ]
        rotary: dict[str, object] | None = None
        if self.rotary is not None:
            # original_inv_freq: dynamic rope variants rewrite inv_freq for long inputs
            inv_freq = getattr(self.rotary, "original_inv_freq", None)
            if not isinstance(inv_freq, Tensor):
                inv_freq = cast(Tensor, self.rotary.inv_freq)
            rotary = {
                "rope_type": str(getattr(self.rotary, "rope_type", "default")),
                "attention_scaling": float(getattr(self.rotary, "attention_scaling", 1.0)),
                "inv_freq": [float(v) for v in inv_freq.float().tolist()],
            }
        return {
            "family": self.family,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "vocab_size": self.vocab_size,
            "n_ctx": self.n_ctx,
            "final_norm": [self.final_norm.kind, self.final_norm.eps],
            "rotary": rotary,
            "layers": layers,
            "extra": self.extra_config,
        }

    def fingerprint(self) -> str:
        """SHA-256 (hex) of :meth:`architecture` and every weight, hashed as float32 in a
        fixed order, so the same checkpoint gives the same value on any device and at any
        load precision of float32 or above."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.architecture(), sort_keys=True, default=str).encode())
        for name, tensor in self.named_buffers():
            if tensor is None or name.startswith("rotary."):
                continue  # rotary buffers enter through architecture()
            t = tensor.detach()
            if t.is_floating_point():
                t = t.to(torch.float32)
            digest.update(f"{name}:{tuple(t.shape)}".encode())
            digest.update(t.cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
