"""Typed configuration of one transcoder module and the architecture registry.

Importing this module does not import torch: the CLI reads its choices from
:data:`ARCHITECTURES` and :data:`KINDS` while building its parser. Each architecture spec
names the class that implements it (imported on first use).

Architectures (what ``sparsity`` means for each):

- ``relu``: ReLU with a decoder-norm-weighted L1 penalty, ``sparsity`` = lambda
  (Dunefsky et al. 2024; Anthropic's April 2024 update for the decoder-norm weighting).
- ``topk``: keep the k largest pre-activations, ``sparsity`` = k, AuxK loss on dead
  latents (Gao et al. 2024; EleutherAI sparsify).
- ``jumprelu``: ``z = pre * H(pre - theta)`` with a learned per-latent threshold trained
  by a straight-through estimator and an L0 penalty, ``sparsity`` = L0 coefficient
  (Rajamanoharan et al. 2024; Gemma Scope).

Kinds (what is read and what is predicted):

- ``transcoder``: one module per layer, MLP input -> MLP output;
- ``clt``: a cross-layer transcoder, encoder at layer l reads the MLP input of l,
  decoders write to the MLP outputs of every layer >= l (Anthropic 2025);
- ``sae``: the baseline, one module per layer, MLP output -> MLP output.
"""

import importlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ingest.errors import InvalidArgumentError
from ingest.transcoders.registry import Registry


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one architecture is trained and stored; ``impl`` is ``module:Class``."""

    name: str
    impl: str
    sparsity_name: str
    default_sparsity: float
    integer_sparsity: bool
    unit_norm_decoder: bool
    has_threshold: bool
    description: str
    #: Norm of the initial encoder rows; None: the config's ``dec_init_norm``.
    enc_init_norm: float | None = None

    def implementation(self) -> Any:
        module_name, _, attr = self.impl.partition(":")
        return getattr(importlib.import_module(module_name), attr)


ARCHITECTURES: Registry[ArchitectureSpec] = Registry("architecture")


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    ARCHITECTURES.add(spec.name, spec)
    return spec


register_architecture(
    ArchitectureSpec(
        name="relu",
        impl="ingest.transcoders.architectures:ReLUActivation",
        sparsity_name="l1_coefficient",
        default_sparsity=0.3,
        integer_sparsity=False,
        unit_norm_decoder=False,
        has_threshold=False,
        description="ReLU + decoder-norm-weighted L1 (Dunefsky et al. 2024)",
    )
)
register_architecture(
    ArchitectureSpec(
        name="topk",
        impl="ingest.transcoders.architectures:TopKActivation",
        sparsity_name="k",
        default_sparsity=16,
        integer_sparsity=True,
        unit_norm_decoder=True,
        has_threshold=False,
        description="TopK + AuxK dead-latent loss (Gao et al. 2024, EleutherAI sparsify)",
        enc_init_norm=1.0,
    )
)
register_architecture(
    ArchitectureSpec(
        name="jumprelu",
        impl="ingest.transcoders.architectures:JumpReLUActivation",
        sparsity_name="l0_coefficient",
        default_sparsity=0.01,
        integer_sparsity=False,
        unit_norm_decoder=True,
        has_threshold=True,
        description="JumpReLU + L0 with straight-through threshold (Gemma Scope)",
    )
)

KINDS: tuple[str, ...] = ("transcoder", "clt", "sae")


@dataclass(frozen=True)
class TranscoderConfig:
    """One module's shape and sparsity. Validated on construction.

    ``d_in``/``d_out`` are the widths read and written (both ``d_model`` for MLPs);
    ``d_transcoder`` is the number of latents per layer.
    """

    arch: str
    d_in: int
    d_out: int
    d_transcoder: int
    sparsity: float
    skip: bool = False
    dec_init_norm: float = 0.1
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05
    aux_k_coefficient: float = 1.0 / 32.0
    aux_k: int = 0  # 0 means d_in // 2, as in sparsify
    aux_k_rows: int = 256  # AuxK on the first rows of each shuffled batch; 0: all rows

    def __post_init__(self) -> None:
        spec = ARCHITECTURES.get(self.arch)
        for name in ("d_in", "d_out", "d_transcoder"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
        if not math.isfinite(self.sparsity) or self.sparsity < 0:
            raise InvalidArgumentError(
                f"{spec.sparsity_name} (sparsity) must be a finite number >= 0, "
                f"got {self.sparsity!r}"
            )
        if spec.integer_sparsity and (
            self.sparsity != int(self.sparsity) or not 1 <= self.sparsity <= self.d_transcoder
        ):
            raise InvalidArgumentError(
                f"{spec.sparsity_name} (sparsity) for {self.arch} must be an integer in "
                f"[1, d_transcoder={self.d_transcoder}], got {self.sparsity!r}"
            )
        if self.dec_init_norm <= 0 or self.jumprelu_bandwidth <= 0:
            raise InvalidArgumentError("dec_init_norm and jumprelu_bandwidth must be > 0")
        if self.jumprelu_init_threshold <= 0:
            raise InvalidArgumentError("jumprelu_init_threshold must be > 0")
        if self.aux_k_coefficient < 0 or self.aux_k < 0 or self.aux_k_rows < 0:
            raise InvalidArgumentError("aux_k_coefficient, aux_k and aux_k_rows must be >= 0")

    @property
    def spec(self) -> ArchitectureSpec:
        return ARCHITECTURES.get(self.arch)

    @property
    def k(self) -> int:
        return int(self.sparsity)

    @property
    def k_aux(self) -> int:
        """AuxK's k: ``aux_k``, or half of ``d_in`` when 0 (sparsify's default)."""
        return self.aux_k or max(1, self.d_in // 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TranscoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgumentError(
                f"unknown transcoder config keys {sorted(unknown)}: expected a subset of "
                f"{sorted(known)}"
            )
        return cls(**data)
