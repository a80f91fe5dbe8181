"""Interventions on transcoder features, errors and embeddings in the replacement model.

The model runs with each covered MLP replaced by its transcoder plus the error recorded on
the clean prompt (Ameisen et al. 2025, "Circuit Tracing", section on intervention
experiments; Dunefsky et al. 2024). Features are recomputed from their (possibly
changed) inputs unless overridden, so an intervention's effect propagates to later
features and to the logits.

- ``freeze_attention=True``: attention patterns and norm denominators stay at their
  clean values, and a layer the set does not cover keeps its clean MLP output: the
  frozen local replacement model, the graph's own, where that output is an error node
  and effects are the graph's direct-plus-indirect linear paths. ``False``: patterns and
  denominators are recomputed, and an uncovered layer runs its real MLP.
- :func:`intervene`: set features to values, or scale them, at given (layer, pos).
- :func:`ablate`: zero-, mean- or counterfactual-patch a set of graph nodes (features,
  errors, token embeddings). Mean is over the prompt's positions; patch takes the node's
  value on a counterfactual prompt of the same length.

With no override the run reproduces the clean logits exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ingest.attribution.replacement import (
    ReplacementState,
    build_replacement,
    encode_held,
    skip_fn,
)
from ingest.errors import InvalidArgumentError
from ingest.graph import Node, NodeKind
from ingest.models import ModelAdapter
from ingest.transcoders.transcoder_set import TranscoderSet

AblationMode = Literal["zero", "mean", "patch"]
ABLATION_MODES: tuple[str, ...] = ("zero", "mean", "patch")


@dataclass(frozen=True)
class FeatureIntervention:
    """Set (``value``) or multiply (``scale``) feature ``index`` of ``layer`` at ``pos``."""

    layer: int
    pos: int
    index: int
    value: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise InvalidArgumentError(
                f"intervention on feature {self.layer}/{self.index} at {self.pos}: give "
                "exactly one of value and scale"
            )
        number = self.value if self.value is not None else self.scale
        if not math.isfinite(float(number or 0.0)):
            raise InvalidArgumentError(
                f"intervention on feature {self.layer}/{self.index} at {self.pos}: its "
                f"{'value' if self.value is not None else 'scale'} {number} is not a finite "
                "number"
            )


@dataclass
class FeatureOverrides:
    """Per covered layer: ``set_mask`` (T, d_tc) bool, ``set_values`` and ``scale`` (T, d_tc).

    The activation used is ``where(set_mask, set_values, scale * computed)``.
    """

    set_mask: dict[int, Tensor] = field(default_factory=dict)
    set_values: dict[int, Tensor] = field(default_factory=dict)
    scale: dict[int, Tensor] = field(default_factory=dict)

    def apply(self, layer: int, z: Tensor) -> Tensor:
        if layer in self.scale:
            z = z * self.scale[layer]
        if layer in self.set_mask:
            z = torch.where(self.set_mask[layer], self.set_values[layer], z)
        return z


@dataclass
class RunOutput:
    """logits: (1, T, V); activations: {covered layer: (T, d_transcoder)}."""

    logits: Tensor
    activations: dict[int, Tensor]


class ReplacementRunner:
    """Runs one prompt's replacement model under overrides (see the module docstring)."""

    def __init__(
        self, adapter: ModelAdapter, transcoders: TranscoderSet, state: ReplacementState
    ) -> None:
        self.adapter, self.transcoders, self.state = adapter, transcoders, state

    @torch.no_grad()
    def run(
        self,
        *,
        overrides: FeatureOverrides | None = None,
        errors: list[Tensor] | None = None,
        resid0: Tensor | None = None,
        freeze_attention: bool = True,
    ) -> RunOutput:
        """errors: n_layers x (1, T, d) (default: the clean errors); resid0: (1, T, d)."""
        tcs, state = self.transcoders, self.state
        errs = errors if errors is not None else state.errors
        over = overrides or FeatureOverrides()
        acts: dict[int, Tensor] = {}

        def make(layer: int) -> Callable[[Tensor], Tensor]:
            skip = skip_fn(tcs, layer)

            def replace(x: Tensor) -> Tensor:
                z = over.apply(layer, encode_held(tcs, state, layer, x[0]))  # (T, d_tc)
                acts[layer] = z
                out = tcs.b_dec(layer).to(x.dtype).expand_as(x[0])
                for source in tcs.layers:
                    if source <= layer and layer in tcs.targets(source):
                        out = out + acts[source] @ tcs.W_dec(source, layer).to(x.dtype)
                if skip is not None:
                    out = out + skip(x[0])
                return out[None] + errs[layer]

            return replace

        def uncovered(layer: int) -> Callable[[Tensor], Tensor]:
            """The layer's error node is its whole MLP output: held at ``errs[layer]``
            when frozen; else the real MLP, with the positions whose error node was
            changed (ablated or patched) taking their given value."""
            if freeze_attention:
                return lambda x: errs[layer]
            changed = (errs[layer] != state.errors[layer]).any(-1, keepdim=True)
            return lambda x: torch.where(changed, errs[layer], self.adapter.mlp(layer, x))

        covered = set(tcs.layers)
        mlps = {
            layer: make(layer) if layer in covered else uncovered(layer)
            for layer in range(self.adapter.n_layers)
        }
        logits = self.adapter(
            resid0=state.resid0 if resid0 is None else resid0,
            frozen=state.frozen if freeze_attention else None,
            mlp_replacements=mlps,
        )
        return RunOutput(logits=logits, activations=acts)


def _empty_overrides(state: ReplacementState) -> FeatureOverrides:
    over = FeatureOverrides()
    for layer, a in state.activations.items():
        over.set_mask[layer] = torch.zeros_like(a, dtype=torch.bool)
        over.set_values[layer] = torch.zeros_like(a)
        over.scale[layer] = torch.ones_like(a)
    return over


def _check_feature(state: ReplacementState, layer: int, pos: int, index: int) -> None:
    if layer not in state.activations:
        raise InvalidArgumentError(
            f"layer {layer} has no transcoder: intervene on layers {sorted(state.activations)}"
        )
    T, d_tc = state.activations[layer].shape
    if not 0 <= pos < T or not 0 <= index < d_tc:
        raise InvalidArgumentError(
            f"feature {index} at position {pos} is out of range: positions 0..{T - 1}, "
            f"features 0..{d_tc - 1}"
        )


def intervene(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    input_ids: Tensor,
    interventions: Iterable[FeatureIntervention],
    *,
    freeze_attention: bool = True,
) -> RunOutput:
    """Logits and activations with ``interventions`` applied; input_ids: (1, T)."""
    state = build_replacement(adapter, transcoders, input_ids)
    over = _empty_overrides(state)
    for iv in interventions:
        _check_feature(state, iv.layer, iv.pos, iv.index)
        largest = torch.finfo(over.scale[iv.layer].dtype).max
        if abs(float(iv.value if iv.value is not None else iv.scale or 0.0)) > largest:
            raise InvalidArgumentError(
                f"intervention on feature {iv.layer}/{iv.index} at {iv.pos}: "
                f"{iv.value if iv.value is not None else iv.scale} exceeds the largest "
                f"{str(over.scale[iv.layer].dtype).removeprefix('torch.')} the model computes "
                f"in ({largest:.4g})"
            )
        if iv.value is not None:
            over.set_mask[iv.layer][iv.pos, iv.index] = True
            over.set_values[iv.layer][iv.pos, iv.index] = iv.value
        else:
            over.scale[iv.layer][iv.pos, iv.index] = float(iv.scale or 0.0)
    return ReplacementRunner(adapter, transcoders, state).run(
        overrides=over, freeze_attention=freeze_attention
    )


def ablation_inputs(
    state: ReplacementState,
    nodes: Sequence[Node],
    mode: AblationMode,
    counterfactual: ReplacementState | None = None,
) -> tuple[FeatureOverrides, list[Tensor], Tensor]:
    """(feature overrides, errors, resid0) that ablate ``nodes`` in ``state``'s prompt."""
    if mode not in ABLATION_MODES:
        raise InvalidArgumentError(f"unknown ablation mode {mode!r}: use one of {ABLATION_MODES}")
    if mode == "patch":
        if counterfactual is None:
            raise InvalidArgumentError("patching needs a counterfactual prompt")
        if counterfactual.n_tokens != state.n_tokens:
            raise InvalidArgumentError(
                f"the counterfactual prompt has {counterfactual.n_tokens} tokens, the prompt "
                f"{state.n_tokens}: patching needs prompts of the same length"
            )
    over = _empty_overrides(state)
    errors = [e.clone() for e in state.errors]
    resid0 = state.resid0.clone()

    def replacement(clean: Tensor, cf: Tensor | None, pos: int) -> Tensor:
        """clean/cf: (T, ...) -> the ablated value at ``pos``."""
        if mode == "zero":
            return torch.zeros_like(clean[pos])
        if mode == "mean":
            return clean.mean(dim=0)
        assert cf is not None
        return cf[pos]

    for node in nodes:
        if node.kind is NodeKind.FEATURE:
            layer, index = int(node.layer or 0), int(node.feature or 0)
            _check_feature(state, layer, node.pos, index)
            clean = state.activations[layer][:, index]
            cf = counterfactual.activations[layer][:, index] if counterfactual else None
            over.set_mask[layer][node.pos, index] = True
            over.set_values[layer][node.pos, index] = replacement(clean, cf, node.pos)
        elif node.kind is NodeKind.ERROR:
            layer = int(node.layer or 0)
            cf_err = counterfactual.errors[layer][0] if counterfactual else None
            errors[layer][0, node.pos] = replacement(state.errors[layer][0], cf_err, node.pos)
        elif node.kind is NodeKind.TOKEN:
            cf_emb = counterfactual.resid0[0] if counterfactual else None
            resid0[0, node.pos] = replacement(state.resid0[0], cf_emb, node.pos)
        else:
            raise InvalidArgumentError(
                f"node {node.node_id!r} is a {node.kind}; only features, errors and token "
                "embeddings can be ablated"
            )
    return over, errors, resid0


def ablate(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    input_ids: Tensor,
    nodes: Sequence[Node],
    *,
    mode: AblationMode = "zero",
    counterfactual_ids: Tensor | None = None,
    freeze_attention: bool = False,
) -> RunOutput:
    """Logits and activations with ``nodes`` ablated (see the module docstring)."""
    state = build_replacement(adapter, transcoders, input_ids)
    cf = None
    if counterfactual_ids is not None:
        cf = build_replacement(adapter, transcoders, counterfactual_ids)
    over, errors, resid0 = ablation_inputs(state, nodes, mode, cf)
    return ReplacementRunner(adapter, transcoders, state).run(
        overrides=over, errors=errors, resid0=resid0, freeze_attention=freeze_attention
    )
