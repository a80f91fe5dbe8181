"""The order of nodes in a dense attribution matrix.

Every dense matrix in this package indexes its nodes in one fixed order, the one
circuit-tracer uses (Ameisen et al. 2025, "Circuit Tracing"):

    [ features | errors | tokens | logits ]

Rows are targets and columns are sources: ``A[t, s]`` is the direct effect of ``s`` on
``t``. Only feature and logit rows can be non-zero (errors and token embeddings have no
inputs in the local replacement model); logit columns are always zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.errors import InvalidArgumentError


@dataclass(frozen=True)
class NodeLayout:
    """Counts of each node kind; slices give their ranges in the dense order."""

    n_features: int
    n_errors: int
    n_tokens: int
    n_logits: int

    def __post_init__(self) -> None:
        for name in ("n_features", "n_errors", "n_tokens", "n_logits"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(f"{name} must be an integer >= 0, got {value!r}")

    @property
    def n(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens + self.n_logits

    @property
    def features(self) -> slice:
        return slice(0, self.n_features)

    @property
    def errors(self) -> slice:
        start = self.n_features
        return slice(start, start + self.n_errors)

    @property
    def tokens(self) -> slice:
        start = self.n_features + self.n_errors
        return slice(start, start + self.n_tokens)

    @property
    def logits(self) -> slice:
        start = self.n_features + self.n_errors + self.n_tokens
        return slice(start, start + self.n_logits)

    @property
    def n_sources(self) -> int:
        """Nodes that can be a source: features, errors and tokens."""
        return self.n_features + self.n_errors + self.n_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "n_features": self.n_features,
            "n_errors": self.n_errors,
            "n_tokens": self.n_tokens,
            "n_logits": self.n_logits,
        }
