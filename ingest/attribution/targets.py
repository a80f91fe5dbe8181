"""Attribution targets: what the graph explains, and how each target is read.

A target row ``t`` is read from the replacement model at one point, by one vector
``e_t`` (DESIGN 5.2): ``value_t = e_t . x_read + bias``.

- :class:`LogitTargets` (default): the most likely next tokens at the last position,
  taken by probability until their cumulative probability reaches
  ``desired_logit_prob`` (0.95), at most ``max_n_logits`` (10). Each is read at the
  final normalized residual by the demeaned unembedding column ``W_U[:, v] - mean_v W_U``
  (so a logit node explains the logit relative to the mean logit), weighted by its
  probability.
- :class:`LogitDiffTarget`: one node reading ``W_U[:, correct] - W_U[:, counterfactual]``
  (the task metric of IOI-style circuits), weight 1.
- :class:`FeatureTarget`: one transcoder feature's pre-activation at (layer, pos), read
  at that layer's MLP input by its encoder row, weight 1.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from ingest.errors import InvalidArgumentError


@dataclass(frozen=True)
class LogitTargets:
    """Top next-token logits by cumulative probability (the default target)."""

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95

    def __post_init__(self) -> None:
        if self.max_n_logits < 1:
            raise InvalidArgumentError(f"max_n_logits must be >= 1, got {self.max_n_logits}")
        if not 0.0 < self.desired_logit_prob <= 1.0:
            raise InvalidArgumentError(
                f"desired_logit_prob must lie in (0, 1], got {self.desired_logit_prob}"
            )


@dataclass(frozen=True)
class LogitDiffTarget:
    """The logit difference ``logit[correct] - logit[counterfactual]`` at the last position."""

    correct: int
    counterfactual: int

    def __post_init__(self) -> None:
        for what in ("correct", "counterfactual"):
            _check_int(getattr(self, what), f"LogitDiffTarget {what}", token=True)
            object.__setattr__(self, what, int(getattr(self, what)))  # numpy ints too

    def checked(self, vocab_size: int) -> tuple[int, int]:
        """``(correct, counterfactual)``; InvalidArgumentError for an id outside the
        vocabulary or two equal ids (the difference would always be 0)."""
        a = check_token(self.correct, vocab_size, "correct")
        b = check_token(self.counterfactual, vocab_size, "counterfactual")
        if a == b:
            raise InvalidArgumentError(
                f"the logit difference target compares token {a} with itself (always 0): "
                "give a different counterfactual token"
            )
        return a, b


@dataclass(frozen=True)
class FeatureTarget:
    """Feature ``index`` of layer ``layer`` at position ``pos`` (default: last position)."""

    layer: int
    index: int
    pos: int | None = None

    def __post_init__(self) -> None:
        for what in ("layer", "index", "pos"):
            value = getattr(self, what)
            if what != "pos" or value is not None:
                _check_int(value, f"FeatureTarget {what}")
                object.__setattr__(self, what, int(value))  # numpy ints too


Target = LogitTargets | LogitDiffTarget | FeatureTarget


TARGET_TYPES = (LogitTargets, LogitDiffTarget, FeatureTarget)


def _check_int(value: object, what: str, *, token: bool = False) -> None:
    """InvalidArgumentError unless ``value`` is a whole number >= 0 (not a bool)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0:
        return
    hint = (
        ": turn a token's text into its id with "
        "ingest.attribution.prompts.single_token_id(tokenizer, text)"
        if token and isinstance(value, str)
        else ""
    )
    raise InvalidArgumentError(f"{what} must be an int >= 0, got {value!r}{hint}")


def check_target(target: object) -> None:
    """InvalidArgumentError unless ``target`` is one of the target classes."""
    if not isinstance(target, TARGET_TYPES):
        raise InvalidArgumentError(
            f"target must be a LogitTargets, LogitDiffTarget or FeatureTarget "
            f"(ingest.attribution.targets), got {target!r}"
        )


def check_token(token_id: int, vocab_size: int, what: str) -> int:
    if not 0 <= int(token_id) < vocab_size:
        raise InvalidArgumentError(
            f"{what} token id {token_id} is outside the vocabulary [0, {vocab_size}): "
            "give a token id of this model's tokenizer"
        )
    return int(token_id)


def select_logits(last_logits: Tensor, spec: LogitTargets) -> tuple[Tensor, Tensor]:
    """last_logits: (V,) -> (token ids (k,), probabilities (k,)) of the target logits."""
    probs = torch.softmax(last_logits.double(), dim=-1)
    top = torch.topk(probs, min(spec.max_n_logits, probs.numel()))
    cumulative = torch.cumsum(top.values, 0)
    reached = torch.nonzero(cumulative >= spec.desired_logit_prob).flatten()
    k = int(reached[0]) + 1 if reached.numel() else top.values.numel()
    return top.indices[:k], top.values[:k].to(last_logits.dtype)


def demeaned_unembedding(W_U: Tensor, token_ids: Tensor) -> Tensor:
    """W_U: (d, V), token_ids: (k,) -> read vectors (k, d) ``W_U[:, v] - mean_v W_U``."""
    return (W_U[:, token_ids] - W_U.mean(dim=1, keepdim=True)).T
