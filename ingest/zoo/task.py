"""The task contract of the zoo: examples, splits, counterfactuals and metrics.

A task is a synthetic next-token problem with known structure (DESIGN section 6). It
provides

- a word vocabulary (the tokenizer is built from it, see :mod:`ingest.zoo.tokenizer`);
- a deterministic example generator with a train / held-out split that never overlap;
- for every example a counterfactual prompt whose correct answer differs (the
  "corrupted" run of activation patching; Wang et al. 2023, Hanna et al. 2023,
  the MIB benchmark of Mueller et al. 2025);
- a metric computed from model logits on held-out prompts, and the quality bar the
  zoo benchmark holds trained models to.

Every prompt is predicted at its last token, except where the task trains on all tokens
(induction), whose metric reads the logits at every position.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")


@dataclass(frozen=True)
class TaskExample:
    """One prompt with its answers and its counterfactual.

    ``answers`` are the correct next tokens after ``prompt`` (greater-than accepts every
    later year; the other tasks accept exactly one token); training draws its target
    uniformly from them. ``wrong_answers`` are the tokens the task metric contrasts with
    (the earlier years, the IOI subject, the counterfactual sum). The counterfactual
    prompt has the same template and token count, and its answers differ.
    """

    prompt: str
    answers: tuple[str, ...]
    wrong_answers: tuple[str, ...]
    counterfactual_prompt: str
    counterfactual_answers: tuple[str, ...]
    key: tuple[int, ...] = field(default=())
    """The generating variables (indices into the task's word lists): equal keys give equal
    examples. No two examples of a split share a key unless the task says otherwise
    (:attr:`Task.unique_keys`)."""


@dataclass(frozen=True)
class ModelShape:
    """Size of a zoo transformer, shared by every architecture in the registry."""

    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    n_ctx: int

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_mlp", "n_ctx"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )


@dataclass(frozen=True)
class TrainingConfig:
    """Optimiser and schedule of one training run (AdamW, linear warmup, cosine decay)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_examples: int = 512

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError("lr must be a positive finite number")
        if self.weight_decay < 0:
            raise ValueError("weight_decay must be non-negative")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be non-negative")
        if self.eval_every <= 0 or self.eval_examples <= 0:
            raise ValueError("eval_every and eval_examples must be positive")

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step`` (0-based): linear warmup, then cosine to 10% of peak."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class EncodedBatch:
    """A batch of examples as tensors, right-padded (causal models never see the pads).

    Shapes: ``input_ids`` ``[B, T]``; ``last_index`` ``[B]`` (position of the prompt's last
    token, where the next-token prediction is read); ``answer_ids`` ``[B, A]`` and
    ``wrong_ids`` ``[B, W]`` padded with ``-1``; ``lengths`` ``[B]`` (real tokens per row).
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    last_index: torch.Tensor
    answer_ids: torch.Tensor
    wrong_ids: torch.Tensor


@dataclass(frozen=True)
class QualityBar:
    """A threshold on one metric; ``higher`` says which side passes. ``baseline`` is the
    metric's value for a model without the task's ability (a logit or probability
    difference of 0; a loss ratio of 1, no better on the repeated half than on the
    first), from which :func:`ingest.transcoders.evaluation.fraction_kept` measures how
    much of the ability a modified model keeps."""

    metric: str
    threshold: float
    higher: bool = True
    baseline: float = 0.0

    def passes(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric, float("nan"))
        if not math.isfinite(value):
            return False
        return value >= self.threshold if self.higher else value < self.threshold

    def describe(self) -> str:
        return f"{self.metric} {'>=' if self.higher else '<'} {self.threshold:g}"


def heldout_mask(n: int, heldout_fraction: float, seed: int) -> list[bool]:
    """A fixed pseudo-random choice of ``round(n * heldout_fraction)`` of ``n`` items.

    Deterministic in ``(n, heldout_fraction, seed)``; used to split a task's generating
    keys (never its examples' text) so train and held-out are disjoint by construction.
    """
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = set(order[: round(n * heldout_fraction)])
    return [i in chosen for i in range(n)]


class Task(ABC):
    """A synthetic task of the zoo. Subclasses are registered in :data:`ingest.zoo.tasks.TASKS`."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: Train on every next-token prediction (induction) instead of only on the answer.
    loss_on_all_tokens: ClassVar[bool] = False
    #: Split digit runs into two-digit tokens when tokenizing (years "1732" -> "17" "32").
    split_digit_pairs: ClassVar[bool] = False
    #: No two examples of a split share a key (and so none is repeated).
    unique_keys: ClassVar[bool] = True

    @abstractmethod
    def vocabulary(self) -> list[str]:
        """Every word a prompt or answer can contain, in a fixed order."""

    @abstractmethod
    def generate(self, split: Split) -> list[TaskExample]:
        """All examples of ``split``, in a deterministic order."""

    def examples(self, split: Split) -> list[TaskExample]:
        """All examples of ``split`` (generated once per task instance, then copied)."""
        cache: dict[Split, list[TaskExample]] = self.__dict__.setdefault("_examples", {})
        if split not in cache:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
            cache[split] = self.generate(split)
        return list(cache[split])

    @abstractmethod
    def metrics(self, logits: torch.Tensor, batch: EncodedBatch) -> dict[str, torch.Tensor]:
        """Per-example metric values ``{name: [B]}`` from ``logits`` ``[B, T, V]``."""

    @abstractmethod
    def default_shape(self) -> ModelShape: ...

    @abstractmethod
    def default_training(self) -> TrainingConfig: ...

    def tiny_shape(self) -> ModelShape:
        """A one-layer, 16-wide model for tests, with the default context length."""
        return ModelShape(
            d_model=16, n_layers=1, n_heads=2, d_mlp=32, n_ctx=self.default_shape().n_ctx
        )

    def tiny_training(self) -> TrainingConfig:
        """A seconds-long schedule for tests of code that needs a trained checkpoint."""
        return TrainingConfig(
            steps=40,
            batch_size=32,
            lr=5e-3,
            weight_decay=0.0,
            warmup_steps=5,
            eval_every=40,
            eval_examples=128,
        )

    @abstractmethod
    def quality_bars(self) -> tuple[QualityBar, ...]:
        """The thresholds a default-config model must reach on held-out prompts."""

    def hf_config_overrides(self, arch: str) -> dict[str, object]:
        """Settings of the Hugging Face config this task needs on architecture ``arch``."""
        return {}

    def config(self) -> dict[str, object]:
        """The task's own parameters, recorded in ``zoo.json`` (e.g. the modulus)."""
        return {}

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Held-out summary from the per-example means (tasks may add ratios)."""
        return means

    def eval_text(self, example: TaskExample) -> str:
        """The text fed to the model at evaluation; the prompt unless the task needs more."""
        return example.prompt
