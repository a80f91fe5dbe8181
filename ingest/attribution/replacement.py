"""The local replacement model of one prompt (Ameisen et al. 2025, section 2.2; DESIGN 5.2).

One recorded forward pass of the real model fixes, at their values on the prompt:

- the attention patterns and every norm denominator (a :class:`FrozenState`);
- the transcoder activations ``z_l = encode(l, mlp_in_l)`` of every covered layer,
  except at a leading beginning-of-sequence token (the model's ``bos_token_id`` at
  position 0), where they are held at zero: position 0 is an attention sink whose
  residual has an outsized norm and whose many active features are artifacts of it, so
  its whole MLP output is error there (as circuit-tracer zeroes position 0);
- the error ``err_l = mlp_out_l - transcoder_out_l`` per layer and position, where
  ``transcoder_out_t = sum_{s <= t} z_s W_dec(s, t) + b_dec(t) + skip(t, mlp_in_t)``
  (an uncovered layer has transcoder output 0, so its whole MLP output is error).

The replacement model replaces each MLP by ``x -> const_l + skip(l, x) + inject_l``
with ``const_l = decoded_l + b_dec(l) + err_l`` and ``inject_l`` an extra vector (zero
unless a caller adds one). With patterns and denominators frozen, it is affine in the
embedding ``resid0``, in every ``const_l`` and in every ``inject_l``, and it reproduces
the model's logits exactly on the prompt (up to float rounding).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ingest.errors import InvalidArgumentError
from ingest.models import FrozenState, ModelAdapter
from ingest.transcoders.transcoder_set import TranscoderSet

logger = logging.getLogger(__name__)


@dataclass
class ReplacementState:
    """Everything fixed by the prompt; batch dimension 1 throughout.

    input_ids: (1, T); resid0: (1, T, d) embeddings (token plus learned position);
    mlp_in, mlp_out, transcoder_out, errors: n_layers x (1, T, d);
    activations / pre_activations: {covered layer: (T, d_transcoder)};
    logits: (1, T, V) of the real model.
    """

    input_ids: Tensor
    frozen: FrozenState
    resid0: Tensor
    mlp_in: list[Tensor]
    mlp_out: list[Tensor]
    transcoder_out: list[Tensor]
    errors: list[Tensor]
    activations: dict[int, Tensor]
    pre_activations: dict[int, Tensor]
    logits: Tensor
    # leading positions whose features are held at zero (1 for a BOS token at position 0)
    zeroed_positions: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def zeroed_positions(adapter: ModelAdapter, input_ids: Tensor) -> int:
    """1 when the prompt (1, T) starts with the model's BOS token, else 0."""
    return int(adapter.leading_bos(input_ids)[0])


def encode_held(
    transcoders: TranscoderSet, state: ReplacementState, layer: int, x: Tensor
) -> Tensor:
    """Layer ``layer``'s activations (T, d_transcoder) at MLP input ``x`` (T, d), with the
    state's zeroed positions held at zero, in ``x``'s dtype."""
    z = transcoders.encode(layer, x).to(x.dtype)
    if state.zeroed_positions:
        z = torch.cat([torch.zeros_like(z[: state.zeroed_positions]), z[state.zeroed_positions :]])
    return z


# Pairs already checked: hashing a large model's weights for every prompt is wasted work.
_CHECKED: weakref.WeakKeyDictionary[TranscoderSet, weakref.ReferenceType[ModelAdapter]] = (
    weakref.WeakKeyDictionary()
)


def check_compatible(adapter: ModelAdapter, transcoders: TranscoderSet) -> None:
    """Raise InvalidArgumentError when ``transcoders`` cannot replace ``adapter``'s MLPs.

    The weight fingerprint is compared once per (set, adapter) pair of live objects;
    weights changed in place afterwards are not re-hashed.
    """
    if transcoders.kind == "sae":
        raise InvalidArgumentError(
            f"transcoder set {transcoders.metadata.set_id!r} is an SAE on MLP outputs; "
            "attribution needs transcoders (MLP input -> MLP output) or a cross-layer "
            "transcoder"
        )
    seen = _CHECKED.get(transcoders)
    if seen is not None and seen() is adapter:
        return
    transcoders.check_fits(adapter)
    _CHECKED[transcoders] = weakref.ref(adapter)


@torch.no_grad()
def build_replacement(
    adapter: ModelAdapter, transcoders: TranscoderSet, input_ids: Tensor, *, check: bool = True
) -> ReplacementState:
    """Record the prompt ``input_ids`` (1, T) and fix the replacement model's constants.

    ``check=False`` skips :func:`check_compatible` (hashing the model's weights) for a
    caller that has already checked this pair.
    """
    if not isinstance(input_ids, Tensor):
        raise InvalidArgumentError(
            f"input_ids must be a (1, T) tensor of token ids, got {type(input_ids).__name__}: "
            "tokenize text with ingest.attribution.prompts.tokenize(tokenizer, text, "
            "adapter.vocab_size, adapter.n_ctx)"
        )
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InvalidArgumentError(
            f"the replacement model is built for one prompt: input_ids must be (1, T), got "
            f"{tuple(input_ids.shape)}"
        )
    if check:
        check_compatible(adapter, transcoders)
    rec = adapter(input_ids, record=True)
    inputs: list[Tensor | None] = [
        rec.mlp_in[layer] if layer in transcoders.layers else None
        for layer in range(adapter.n_layers)
    ]
    estimates = transcoders.reconstruct(inputs)
    transcoder_out = [
        est.to(adapter.dtype) if est is not None else torch.zeros_like(rec.mlp_out[layer])
        for layer, est in enumerate(estimates)
    ]
    errors = [rec.mlp_out[layer] - transcoder_out[layer] for layer in range(adapter.n_layers)]
    pre = {
        layer: transcoders.pre_activations(layer, rec.mlp_in[layer][0]).to(adapter.dtype)
        for layer in transcoders.layers
    }
    acts = {
        layer: transcoders.encode(layer, rec.mlp_in[layer][0]).to(adapter.dtype)
        for layer in transcoders.layers
    }
    zeroed = zeroed_positions(adapter, input_ids)
    if zeroed:
        for layer in transcoders.layers:
            acts[layer][:zeroed] = 0.0
            # the estimate there without features: b_dec (+ skip); the error takes the rest
            x = rec.mlp_in[layer][0, :zeroed]
            none: Tensor | dict[int, Tensor] = (
                {} if transcoders.is_cross_layer else torch.zeros_like(acts[layer][:zeroed])
            )
            bare = transcoders.decode(layer, none, x).to(adapter.dtype)
            transcoder_out[layer][0, :zeroed] = bare  # tensors of this call: safe to write
            errors[layer][0, :zeroed] = rec.mlp_out[layer][0, :zeroed] - bare
    return ReplacementState(
        input_ids=input_ids,
        frozen=rec.frozen.detach(),
        resid0=rec.resid_pre[0].detach(),
        mlp_in=[t.detach() for t in rec.mlp_in],
        mlp_out=[t.detach() for t in rec.mlp_out],
        transcoder_out=transcoder_out,
        errors=errors,
        activations=acts,
        pre_activations=pre,
        logits=rec.logits.detach(),
        zeroed_positions=zeroed,
    )


def skip_fn(transcoders: TranscoderSet, layer: int) -> Callable[[Tensor], Tensor] | None:
    """``x -> skip(layer, x)`` when the layer's transcoder has a skip connection."""
    if layer not in transcoders.layers or transcoders.W_skip(layer) is None:
        return None
    return lambda x: transcoders.skip(layer, x).to(x.dtype)


def replacement_mlps(
    transcoders: TranscoderSet,
    constants: list[Tensor],
    injections: list[Tensor] | None = None,
    captured: list[Tensor] | None = None,
) -> dict[int, Callable[[Tensor], Tensor]]:
    """MLP replacements ``x -> constants[l] + skip(l, x) (+ injections[l])``.

    constants / injections: n_layers x (B or 1, T, d). When ``captured`` is a list, each
    replacement appends the MLP input it receives (B, T, d), so a caller can read or
    differentiate the values a target reads.
    """

    def make(layer: int) -> Callable[[Tensor], Tensor]:
        skip = skip_fn(transcoders, layer)

        def replace(x: Tensor) -> Tensor:
            if captured is not None:
                captured.append(x)
            out = constants[layer]
            if skip is not None:
                out = out + skip(x)
            if injections is not None:
                out = out + injections[layer]
            return out

        return replace

    return {layer: make(layer) for layer in range(len(constants))}


def replacement_constants(state: ReplacementState, transcoders: TranscoderSet) -> list[Tensor]:
    """The constant MLP-output parts ``transcoder_out - skip + error``: n_layers x (1, T, d).

    Equal to the true MLP output minus the skip path, which the frozen model recomputes.
    """
    out = []
    for layer, mlp_out in enumerate(state.mlp_out):
        skip = skip_fn(transcoders, layer)
        const = mlp_out if skip is None else mlp_out - skip(state.mlp_in[layer])
        out.append(const)
    return out


def replacement_logits(
    adapter: ModelAdapter, transcoders: TranscoderSet, state: ReplacementState
) -> Tensor:
    """Logits (1, T, V) of the local replacement model on its own prompt."""
    with torch.no_grad():
        mlps = replacement_mlps(transcoders, replacement_constants(state, transcoders))
        return adapter(resid0=state.resid0, frozen=state.frozen, mlp_replacements=mlps)
