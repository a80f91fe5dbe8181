"""Typed configuration of one transcoder module and the architecture registry.

Importing this module does not import torch: the CLI reads its choices from
:data:`ARCHITECTURES` and :data:`KINDS`, and its defaults from :class:`TrainConfig`, while
building its parser. Each architecture spec names the class that implements it (imported
on first use).

Architectures (what ``sparsity`` means for each):

- ``relu``: ReLU with a decoder-norm-weighted L1 penalty, ``sparsity`` = lambda
  (Dunefsky et al. 2024; Anthropic's April 2024 update for the decoder-norm weighting).
- ``topk``: keep the k largest pre-activations, ``sparsity`` = k, AuxK loss on dead
  latents (Gao et al. 2024; EleutherAI sparsify).
- ``jumprelu``: ``z = pre * H(pre - theta)`` with a learned per-latent threshold trained
  by a straight-through estimator and an L0 penalty, ``sparsity`` = L0 coefficient
  (Rajamanoharan et al. 2024; Gemma Scope).
- ``batchtopk``: the ``N k`` largest pre-activations of each batch of N tokens in
  training, ``sparsity`` = k (the mean L0); inference and files are JumpReLU's, at the
  running average of the smallest kept value (Bussmann et al. 2024).

Kinds (what is read and what is predicted):

- ``transcoder``: one module per layer, MLP input -> MLP output;
- ``clt``: a cross-layer transcoder, encoder at layer l reads the MLP input of l,
  decoders write to the MLP outputs of every layer >= l (Anthropic 2025);
- ``sae``: the baseline, one module per layer, MLP output -> MLP output.
"""

import importlib
import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral
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
register_architecture(
    ArchitectureSpec(
        name="batchtopk",
        impl="ingest.transcoders.architectures:BatchTopKActivation",
        sparsity_name="k",
        default_sparsity=16,
        integer_sparsity=True,
        unit_norm_decoder=True,
        has_threshold=True,
        description="BatchTopK in training, JumpReLU after at the running average of the "
        "smallest kept value (Bussmann et al. 2024)",
        enc_init_norm=1.0,
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
    aux_k_rows: int = 256  # AuxK rows when every latent is dead (losses.aux_k_row_count); 0: all
    #: BatchTopK's firing floor: per step, the encoder bias of a latent under the floor is
    #: raised by this fraction of the threshold (architectures.BatchTopKActivation; 0: off)
    balance_rate: float = 0.0

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
        if not math.isfinite(self.balance_rate) or not 0 <= self.balance_rate <= 1:
            raise InvalidArgumentError(
                f"balance_rate must be in [0, 1] (0: no firing floor), got {self.balance_rate!r}"
            )

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


#: BatchTopK's default firing-floor rate (session 14: at most 0.4% dead latents on any
#: layer of the 8 zoo models at k 16, none diverging at k 4; docs/transcoders.md).
DEFAULT_BALANCE_RATE = 0.05


#: The TrainConfig fields that ``circuitscope transcoders train`` and ``pareto`` set by a
#: flag of the same name (``batch_size`` <- ``--batch-size``); ``skip`` is ``--[no-]skip``.
CLI_FIELDS = frozenset({
    "kind", "arch", "width", "expansion", "sparsity", "skip", "layers", "steps", "batch_size",
    "lr", "buffer_mb", "buffer_rows", "seed", "eval_every", "checkpoint_every",
    "dead_after_tokens", "aux_k_coefficient", "aux_k_rows", "resample_every", "answer_weight",
    "balance_rate", "kl_steps", "kl_lr", "kl_coefficient", "kl_batch", "compile",
})  # fmt: skip


#: The end-to-end phase's settings (:attr:`TrainConfig.kl_steps`).
KL_FIELDS = ("kl_steps", "kl_lr", "kl_coefficient", "kl_batch")


def flagged(field: str) -> str:
    """``field`` with the command-line flag that sets it, for error messages."""
    if field not in CLI_FIELDS:
        return field
    flag = "--[no-]skip" if field == "skip" else "--" + field.replace("_", "-")
    return f"{field} ({flag})"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's result. Validated on construction."""

    kind: str = "transcoder"
    #: BatchTopK since session 13: far fewer dead latents than TopK at equal quality and
    #: speed on the zoo (docs/transcoders.md, "Benchmark")
    arch: str = "batchtopk"
    #: latents per layer; None: ``expansion`` x d_model (as sparsify's ``num_latents=0``)
    width: int | None = None
    expansion: int = 8
    sparsity: float | None = None  # None: the architecture's default
    #: W_skip (skip transcoders, Paulo et al. 2025); None: on for transcoders and CLTs,
    #: off for SAEs (an SAE with a skip connection could copy its input).
    skip: bool | None = None
    layers: tuple[int, ...] | None = None  # None: every layer
    steps: int = 2000
    batch_size: int = 4096  # tokens per step (SAELens configurations use 4096)
    lr: float = 2e-3
    warmup_steps: int = 50
    buffer_mb: float = 2048.0  # activation buffer memory bound (MiB)
    buffer_rows: int = 0  # rows per layer; 0: as many as buffer_mb holds
    model_batch_size: int = 0  # windows per model forward; 0: buffer.FLOATS_PER_FORWARD
    seed: int = 0
    eval_every: int = 500
    checkpoint_every: int = 500
    eval_windows: int = 64
    dead_after_tokens: int = 20_000
    aux_k_coefficient: float = 1.0 / 32.0
    aux_k_rows: int = 256  # AuxK rows when every latent is dead, more as fewer are; 0: all
    resample_every: int = 250  # 0: never
    #: BatchTopK's firing floor (TranscoderConfig.balance_rate; 0: none); None:
    #: DEFAULT_BALANCE_RATE for batchtopk, none for the other architectures
    balance_rate: float | None = None
    #: Loss weight of the answer-predicting rows of an answer-only prompt source (the
    #: other rows weigh 1); sources scored at every token ignore it.
    answer_weight: float = 8.0
    #: End-to-end steps after the ``steps`` reconstruction steps: each adds
    #: ``kl_coefficient`` x KL(model || model with every covered MLP replaced) on
    #: ``kl_batch`` training windows to the reconstruction loss, at ``kl_lr``
    #: (:mod:`ingest.transcoders.end_to_end`). 0: none.
    kl_steps: int = 0
    kl_lr: float = 1e-4
    kl_coefficient: float = 1.0
    kl_batch: int = 64
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05
    #: Compile the training loss, forward and backward, with ``torch.compile`` (on CUDA
    #: as CUDA graphs, mode ``reduce-overhead``), for GPUs, where a step of small kernels
    #: is bound by launches and host syncs. The step then has fixed shapes: AuxK runs on
    #: the first ``aux_k_rows`` rows over every column, the live ones masked
    #: (:func:`~ingest.transcoders.losses.static_aux_k_loss`), and selections take
    #: ``torch.topk``. Per-layer kinds (transcoders, SAEs) only.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(
                f"unknown kind {self.kind!r} (--kind): choose one of {KINDS}"
            )
        ARCHITECTURES.get(self.arch)
        if self.layers is not None:
            layers = self.layers
            if (
                isinstance(layers, str | bytes)
                or not all(isinstance(x, Integral) and not isinstance(x, bool) for x in layers)
                or not layers
                or min(layers) < 0
            ):
                raise InvalidArgumentError(
                    f"{flagged('layers')} must be a non-empty sequence of layer numbers >= 0, "
                    f"e.g. (0, 1) (--layers 0,1), or None for every layer; got {layers!r}"
                )
            object.__setattr__(self, "layers", tuple(int(x) for x in layers))
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidArgumentError(f"{flagged(item.name)} must be finite, got {value}")
        for name in ("steps", "batch_size", "buffer_mb", "eval_windows", "expansion"):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(
                    f"{flagged(name)} must be positive, got {getattr(self, name)}"
                )
        if self.width is not None and self.width <= 0:
            raise InvalidArgumentError(
                f"{flagged('width')} must be positive, got {self.width}; leave it out for "
                f"--expansion x d_model"
            )
        if self.kind == "sae" and self.skip:
            raise InvalidArgumentError(
                "an SAE with a skip connection can copy its input through W_skip: drop "
                "--skip for --kind sae (skip connections are for transcoders)"
            )
        if self.buffer_rows < 0:
            raise InvalidArgumentError(
                f"{flagged('buffer_rows')} must be >= 0 (0 sizes it by --buffer-mb)"
            )
        if self.dead_after_tokens <= 0:
            raise InvalidArgumentError(
                f"{flagged('dead_after_tokens')} must be positive, got {self.dead_after_tokens}"
            )
        if self.aux_k_rows < 0 or self.aux_k_coefficient < 0:
            raise InvalidArgumentError(
                f"{flagged('aux_k_rows')} (0: every row) and {flagged('aux_k_coefficient')} "
                "(0: no AuxK) must be >= 0"
            )
        if self.lr <= 0 or self.warmup_steps < 0:
            raise InvalidArgumentError(
                f"{flagged('lr')} must be > 0 and warmup_steps >= 0, got {self.lr} and "
                f"{self.warmup_steps}"
            )
        if self.model_batch_size < 0:
            raise InvalidArgumentError("model_batch_size must be >= 0 (0 picks it)")
        if self.resample_every < 0:
            raise InvalidArgumentError(
                f"{flagged('resample_every')} must be >= 0 (0 disables resampling)"
            )
        if self.eval_every <= 0 or self.checkpoint_every <= 0:
            raise InvalidArgumentError(
                f"{flagged('eval_every')} and {flagged('checkpoint_every')} must be positive"
            )
        if self.balance_rate is not None and not 0 <= self.balance_rate <= 1:
            raise InvalidArgumentError(
                f"{flagged('balance_rate')} must be in [0, 1] (0: no firing floor), got "
                f"{self.balance_rate}"
            )
        if self.balance_rate and self.arch != "batchtopk":
            raise InvalidArgumentError(
                f"{flagged('balance_rate')} is batchtopk's firing floor: drop it for "
                f"--arch {self.arch}, or train --arch batchtopk"
            )
        if self.kl_steps < 0:
            raise InvalidArgumentError(
                f"{flagged('kl_steps')} must be >= 0 (0: no end-to-end steps), got {self.kl_steps}"
            )
        for name in ("kl_lr", "kl_coefficient"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise InvalidArgumentError(
                    f"{flagged(name)} must be a finite number > 0, got {value}"
                )
        if self.kl_batch <= 0:
            raise InvalidArgumentError(
                f"{flagged('kl_batch')} (windows per end-to-end step) must be positive, got "
                f"{self.kl_batch}"
            )
        if self.compile and self.kind == "clt":
            raise InvalidArgumentError(
                f"{flagged('compile')} compiles the per-layer step: drop it for --kind clt"
            )
        if not math.isfinite(self.answer_weight) or self.answer_weight <= 0:
            raise InvalidArgumentError(
                f"{flagged('answer_weight')} must be a finite number > 0 (1: every token "
                f"weighs the same), got {self.answer_weight}"
            )

    @property
    def total_steps(self) -> int:
        """Reconstruction steps and end-to-end steps."""
        return self.steps + self.kl_steps

    @property
    def uses_skip(self) -> bool:
        """Whether the modules get W_skip: ``skip``, or by default every kind but SAEs."""
        return self.kind != "sae" if self.skip is None else self.skip

    @property
    def resolved_balance_rate(self) -> float:
        """``balance_rate``, or by default :data:`DEFAULT_BALANCE_RATE` for BatchTopK and
        0 (no firing floor) for the other architectures."""
        if self.balance_rate is not None:
            return self.balance_rate
        return DEFAULT_BALANCE_RATE if self.arch == "batchtopk" else 0.0

    def width_for(self, d_model: int) -> int:
        """Latents per layer on a model of width ``d_model``."""
        return self.expansion * d_model if self.width is None else self.width

    def module_config(self, d_model: int) -> TranscoderConfig:
        spec = ARCHITECTURES.get(self.arch)
        sparsity = spec.default_sparsity if self.sparsity is None else self.sparsity
        return TranscoderConfig(
            arch=self.arch,
            d_in=d_model,
            d_out=d_model,
            d_transcoder=self.width_for(d_model),
            sparsity=float(sparsity),
            skip=self.uses_skip,
            jumprelu_bandwidth=self.jumprelu_bandwidth,
            jumprelu_init_threshold=self.jumprelu_init_threshold,
            aux_k_coefficient=self.aux_k_coefficient,
            aux_k_rows=self.aux_k_rows,
            balance_rate=self.resolved_balance_rate,
        )

    @classmethod
    def from_run_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The config a :meth:`run_dict` was made from (up to what it resolved); keys
        that are not fields are refused."""
        values = dict(data)
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data

    def run_dict(self, d_model: int) -> dict[str, Any]:
        """:meth:`to_dict` with the width, sparsity, skip and firing floor resolved for
        ``d_model`` and no ``expansion``: what a checkpoint compares on resume, so that
        ``--width 512`` and the default expansion on a 64-wide model are the same run, as
        are ``--sparsity 16`` and batchtopk's default."""
        data = self.to_dict()
        data["width"] = self.width_for(d_model)
        del data["expansion"]
        data["sparsity"] = self.module_config(d_model).sparsity
        data["skip"] = self.uses_skip
        data["balance_rate"] = self.resolved_balance_rate
        if not self.kl_steps:  # no end-to-end phase: its settings change nothing
            for name in KL_FIELDS:
                del data[name]
        if not self.compile:  # runs from before the flag existed resume as they were
            del data["compile"]
        return data
