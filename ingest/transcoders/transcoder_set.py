"""The set of transcoders over a model's layers: the object attribution consumes.

A :class:`TranscoderSet` wraps either one :class:`~ingest.transcoders.transcoder.Transcoder`
per covered layer (kinds ``transcoder`` and ``sae``) or one
:class:`~ingest.transcoders.clt.CrossLayerTranscoder` (kind ``clt``), and addresses
everything by *model* layer index. It carries the metadata that ties it to one model
(model id, weight fingerprint, layer count, width, hook names) and checks it against an
adapter with :meth:`check_fits`.

Contract used by the replacement model and attribution (DESIGN 5.2), for a covered
layer ``l`` and its MLP input ``x (..., d_model)``:

- ``pre_activations(l, x) = x @ W_enc(l).T + b_enc(l)`` and ``encode(l, x) = act(pre)``;
- the estimate of layer t's MLP output is ``sum_{s <= t} encode(s, x_s) @ W_dec(s, t) +
  b_dec(t) + skip(t, x_t)`` where per-layer sets only have ``W_dec(t, t)``;
- ``decoder_vectors(s, idx)`` is ``{t: W_dec(s, t)[idx]}`` over the targets of s.
"""

import hashlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ingest.errors import InvalidArgumentError
from ingest.transcoders.clt import CrossLayerTranscoder
from ingest.transcoders.config import KINDS, TranscoderConfig
from ingest.transcoders.transcoder import Transcoder

logger = logging.getLogger(__name__)

# Hook names as circuit-tracer configs spell them. A transcoder reads the MLP's input
# after the norm's weight and bias (circuit-tracer's ``mlp.hook_in``); TransformerLens'
# ``ln2.hook_normalized`` is before them, which sets written before 2026-11-26 named.
MLP_IN_HOOK = "mlp.hook_in"
MLP_OUT_HOOK = "hook_mlp_out"
PRE_WEIGHT_HOOK = "ln2.hook_normalized"
KIND_HOOKS: dict[str, tuple[str, str]] = {
    "transcoder": (MLP_IN_HOOK, MLP_OUT_HOOK),
    "clt": (MLP_IN_HOOK, MLP_OUT_HOOK),
    "sae": (MLP_OUT_HOOK, MLP_OUT_HOOK),
}


class AdapterLike(Protocol):
    n_layers: int
    d_model: int

    def fingerprint(self) -> str: ...


@dataclass
class SetMetadata:
    """What ties a set to one model; written to ``circuitscope.json``."""

    kind: str
    model_id: str
    model_fingerprint: str
    n_layers: int
    d_model: int
    layers: list[int]
    config: TranscoderConfig
    set_id: str = ""
    feature_input_hook: str = ""
    feature_output_hook: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"unknown kind {self.kind!r}: choose one of {KINDS}")
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise InvalidArgumentError(
                f"layers must be a non-empty increasing list, got {self.layers}"
            )
        if self.layers[0] < 0 or self.layers[-1] >= self.n_layers:
            raise InvalidArgumentError(
                f"layers {self.layers} out of range for a {self.n_layers}-layer model: "
                f"use 0..{self.n_layers - 1}"
            )
        hooks = KIND_HOOKS[self.kind]
        self.feature_input_hook = self.feature_input_hook or hooks[0]
        self.feature_output_hook = self.feature_output_hook or hooks[1]
        if not self.set_id:
            # A local path names the model by its directory; hub ids stay as they are.
            model = self.model_id
            if model.startswith(("/", ".", "~")):
                model = model.rstrip("/").rsplit("/", 1)[-1]
            self.set_id = f"{model}/{self.kind}-{self.config.arch}-{self.config.d_transcoder}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SetMetadata":
        data = dict(data)
        data["config"] = TranscoderConfig.from_dict(data["config"])
        data["layers"] = [int(x) for x in data["layers"]]
        if data.get("feature_input_hook") == PRE_WEIGHT_HOOK:  # the old name of the same input
            data["feature_input_hook"] = MLP_IN_HOOK
        return cls(**data)


class TranscoderSet(nn.Module):
    """Per-layer transcoders, SAEs, or one cross-layer transcoder, by model layer."""

    def __init__(
        self,
        metadata: SetMetadata,
        modules: dict[int, Transcoder] | CrossLayerTranscoder,
    ) -> None:
        super().__init__()
        self.metadata = metadata
        self._fingerprint_cache: tuple[tuple[object, ...], str] | None = None
        cfg = metadata.config
        self.clt: CrossLayerTranscoder | None = None
        self.per_layer = nn.ModuleDict()
        if isinstance(modules, CrossLayerTranscoder):
            if metadata.kind != "clt":
                raise InvalidArgumentError(
                    f"a cross-layer module needs kind 'clt', got {metadata.kind!r}"
                )
            if modules.n_layers != len(metadata.layers):
                raise InvalidArgumentError(
                    f"the CLT spans {modules.n_layers} layers but metadata lists {metadata.layers}"
                )
            self.clt = modules
        else:
            if metadata.kind == "clt":
                raise InvalidArgumentError("kind 'clt' needs a CrossLayerTranscoder module")
            if sorted(modules) != metadata.layers:
                raise InvalidArgumentError(
                    f"modules cover layers {sorted(modules)} but metadata lists {metadata.layers}"
                )
            for layer, module in modules.items():
                self.per_layer[str(layer)] = module
        if cfg.d_in != metadata.d_model or cfg.d_out != metadata.d_model:
            raise InvalidArgumentError(
                f"transcoder widths d_in={cfg.d_in}, d_out={cfg.d_out} differ from the "
                f"model's d_model={metadata.d_model}"
            )

    # -- shape and identity ------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.metadata.kind

    @property
    def layers(self) -> list[int]:
        return list(self.metadata.layers)

    @property
    def n_layers(self) -> int:
        return self.metadata.n_layers

    @property
    def d_model(self) -> int:
        return self.metadata.d_model

    @property
    def d_transcoder(self) -> int:
        return self.metadata.config.d_transcoder

    @property
    def config(self) -> TranscoderConfig:
        return self.metadata.config

    @property
    def is_cross_layer(self) -> bool:
        return self.clt is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """A sha256 (32 hex digits) over the set's tensor names, shapes and values as
        float32: the same set gives the same value on any device and at float32 or
        above.

        Cached while no parameter or buffer changes: in-place updates (an optimizer's
        step, ``copy_`` under ``no_grad``, ``load_state_dict``) and moves (``.to()``,
        ``.half()``) are seen; writes through a tensor's ``.data`` are not. Inference
        tensors (made under ``torch.inference_mode``) have no version: not cached.
        """
        tensors = list(itertools.chain(self.parameters(), self.buffers()))
        key: tuple[object, ...] | None = None
        if not any(t.is_inference() for t in tensors):
            key = tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors)
            if self._fingerprint_cache is not None and self._fingerprint_cache[0] == key:
                return self._fingerprint_cache[1]
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            data = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{name}:{tuple(data.shape)}".encode())
            digest.update(data.numpy().tobytes())
        value = digest.hexdigest()[:32]
        self._fingerprint_cache = None if key is None else (key, value)
        return value

    def _apply(self, fn: Any, recurse: bool = True) -> "TranscoderSet":
        # .to() and friends swap tensors' storage without bumping their versions, and
        # a freed block may come back at the same address: forget the hash
        self._fingerprint_cache = None
        return super()._apply(fn, recurse)  # type: ignore[no-any-return]

    @property
    def catalog_id(self) -> str:
        """The id the set's graphs and catalog entries are stored under: its name
        (``metadata.set_id``) plus a hash of its weights, so that two training runs
        that share a name never share graph or feature ids."""
        return f"{self.metadata.set_id}@{self.fingerprint()[:12]}"

    def _pos(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise InvalidArgumentError(
                f"layer {layer} is out of range for a {self.n_layers}-layer model: "
                f"use 0..{self.n_layers - 1}"
            )
        if layer not in self.metadata.layers:
            raise InvalidArgumentError(
                f"layer {layer} has no transcoder in this set: it covers layers "
                f"{self.metadata.layers}"
            )
        return self.metadata.layers.index(layer)

    def module(self, layer: int) -> Transcoder:
        """The per-layer module of ``layer`` (not for cross-layer sets)."""
        self._pos(layer)
        if self.clt is not None:
            raise InvalidArgumentError("a cross-layer set has no per-layer modules")
        return self.per_layer[str(layer)]  # type: ignore[return-value]

    def targets(self, source_layer: int) -> list[int]:
        """Model layers that latents of ``source_layer`` write to."""
        pos = self._pos(source_layer)
        return self.layers[pos:] if self.clt is not None else [source_layer]

    # -- weights -----------------------------------------------------------------------
    def W_enc(self, layer: int) -> torch.Tensor:
        """(d_transcoder, d_model) encoder rows."""
        pos = self._pos(layer)
        return self.clt.W_enc[pos] if self.clt is not None else self.module(layer).W_enc

    def b_enc(self, layer: int) -> torch.Tensor:
        """(d_transcoder,)."""
        pos = self._pos(layer)
        return self.clt.b_enc[pos] if self.clt is not None else self.module(layer).b_enc

    def W_dec(self, source_layer: int, target_layer: int | None = None) -> torch.Tensor:
        """(d_transcoder, d_model) decoder rows of ``source_layer``'s latents into target."""
        target = source_layer if target_layer is None else target_layer
        if target not in self.targets(source_layer):
            raise InvalidArgumentError(
                f"latents of layer {source_layer} write to layers {self.targets(source_layer)}, "
                f"not {target}"
            )
        if self.clt is not None:
            s, t = self._pos(source_layer), self._pos(target)
            return self.clt.W_dec[s][:, t - s, :]
        return self.module(source_layer).W_dec

    def b_dec(self, layer: int) -> torch.Tensor:
        """(d_model,) output bias of ``layer``'s estimate."""
        pos = self._pos(layer)
        return self.clt.b_dec[pos] if self.clt is not None else self.module(layer).b_dec

    def W_skip(self, layer: int) -> torch.Tensor | None:
        """(d_model, d_model) skip weights used as ``x @ W_skip.T``, or None."""
        pos = self._pos(layer)
        if self.clt is not None:
            return None if self.clt.W_skip is None else self.clt.W_skip[pos]
        return self.module(layer).W_skip

    def threshold(self, layer: int) -> torch.Tensor | None:
        """(d_transcoder,) JumpReLU thresholds, or None."""
        pos = self._pos(layer)
        return self.clt.threshold(pos) if self.clt is not None else self.module(layer).threshold

    # -- computation -------------------------------------------------------------------
    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) -> (..., d_transcoder)."""
        pos = self._pos(layer)
        self._check_input(x)
        if self.clt is not None:
            return self.clt.pre_activations(pos, x)
        return self.module(layer).pre_activations(x)

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) -> activations (..., d_transcoder)."""
        pos = self._pos(layer)
        self._check_input(x)
        if self.clt is not None:
            return self.clt.encode(pos, x)
        return self.module(layer).encode(x)

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) -> (..., d_model), zero without a skip connection."""
        pos = self._pos(layer)
        self._check_input(x)
        if self.clt is not None:
            return self.clt.skip(pos, x)
        return self.module(layer).skip(x)

    def _check_input(self, x: object, what: str = "x") -> None:
        """InvalidArgumentError unless ``x`` is a tensor (..., d_model) of the set's dtype."""
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(
                f"{what} must be a torch.Tensor (..., {self.d_model}), got {type(x).__name__}"
            )
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise InvalidArgumentError(
                f"{what} has shape {tuple(x.shape)}, but the set reads vectors of the model's "
                f"d_model {self.d_model}: give (..., {self.d_model})"
            )
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            raise InvalidArgumentError(
                f"{what} is {x.dtype} but the set's weights are {dtype}: convert one "
                f"(x.to({dtype}) or tset.to(dtype={x.dtype}))"
            )

    def decode(
        self,
        target_layer: int,
        acts: torch.Tensor | Mapping[int, torch.Tensor],
        mlp_in: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Estimate (..., d_model) of ``target_layer``'s output from latent activations.

        Per-layer sets take the target layer's acts (..., d_transcoder); cross-layer sets
        take ``{source_layer: acts}`` for sources <= target (missing sources count as
        zero). ``mlp_in`` (..., d_model) is needed when the set has a skip connection.
        """
        pos = self._pos(target_layer)
        if self.clt is None:
            if not isinstance(acts, torch.Tensor):
                raise InvalidArgumentError("a per-layer set decodes one activation tensor")
            return self.module(target_layer).decode(acts, mlp_in)
        if isinstance(acts, torch.Tensor):
            raise InvalidArgumentError("a cross-layer set decodes {source_layer: acts}")
        out = self.b_dec(target_layer)
        for source, value in acts.items():
            if target_layer in self.targets(source):
                out = out + value @ self.W_dec(source, target_layer)
        if self.clt.W_skip is not None:
            if mlp_in is None:
                raise InvalidArgumentError("this set has a skip connection: pass mlp_in")
            out = out + self.clt.skip(pos, mlp_in)
        return out

    def reconstruct(self, inputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """inputs[l]: (..., d_model) what layer l's latents read (its MLP input; for SAEs its
        MLP output), None where not covered.

        Returns a list of length ``n_layers`` with the estimate (..., d_model) of every
        covered layer's output and None elsewhere.
        """
        if len(inputs) != self.n_layers:
            raise InvalidArgumentError(
                f"reconstruct needs one entry per model layer ({self.n_layers}), got {len(inputs)}"
            )
        out: list[torch.Tensor | None] = [None] * self.n_layers
        missing = [layer for layer in self.layers if inputs[layer] is None]
        if missing:
            raise InvalidArgumentError(f"reconstruct is missing inputs for layers {missing}")
        xs: list[torch.Tensor] = [inputs[layer] for layer in self.layers]  # type: ignore[misc]
        if self.clt is not None:
            for layer, y in zip(self.layers, self.clt(xs), strict=True):
                out[layer] = y
        else:
            for layer, x in zip(self.layers, xs, strict=True):
                out[layer] = self.module(layer)(x)
        return out

    def decoder_vectors(
        self, source_layer: int, feature_indices: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """feature_indices: (k,) -> {target model layer: (k, d_model)}."""
        idx = self._check_indices(feature_indices)
        return {t: self.W_dec(source_layer, t)[idx] for t in self.targets(source_layer)}

    def encoder_vectors(self, layer: int, feature_indices: torch.Tensor) -> torch.Tensor:
        """feature_indices: (k,) -> (k, d_model)."""
        idx = self._check_indices(feature_indices)
        return self.W_enc(layer)[idx]

    def _check_indices(self, feature_indices: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(feature_indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d_transcoder):
            raise InvalidArgumentError(
                f"feature indices must lie in [0, {self.d_transcoder}), got "
                f"min {int(idx.min())}, max {int(idx.max())}"
            )
        return idx.to(self.device)

    def check_fits(self, adapter: AdapterLike) -> None:
        """Raise InvalidArgumentError when this set was not trained for ``adapter``'s model."""
        meta = self.metadata
        if adapter.n_layers != meta.n_layers or adapter.d_model != meta.d_model:
            raise InvalidArgumentError(
                f"transcoder set {meta.set_id!r} was trained for a model with "
                f"{meta.n_layers} layers and d_model {meta.d_model}, but this model has "
                f"{adapter.n_layers} layers and d_model {adapter.d_model}: load the set "
                f"trained for this model or train one with 'circuitscope transcoders train'"
            )
        if meta.model_fingerprint:
            fingerprint = adapter.fingerprint()
            if fingerprint != meta.model_fingerprint:
                raise InvalidArgumentError(
                    f"transcoder set {meta.set_id!r} was trained on model {meta.model_id!r} "
                    f"(fingerprint {meta.model_fingerprint[:12]}), but the loaded model's "
                    f"weights differ (fingerprint {fingerprint[:12]}): use the set trained "
                    f"for this model or retrain"
                )
        else:
            logger.warning(
                "transcoder set %s carries no model fingerprint; only its shape was checked",
                meta.set_id,
            )
