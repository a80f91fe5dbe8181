"""Registry of model families, keyed by the Hugging Face ``config.model_type``.

A family is a small *weight converter*: a function from a loaded HF causal LM to
:class:`ingest.models.weights.CanonicalWeights`. Everything else (the forward pass,
freezing, recording, MLP replacement) is generic. Registering the same ``model_type``
twice is an error; asking for an unknown one names the supported types.

To add a family, write ``ingest/models/families/<name>.py`` with a converter decorated by
:func:`register_family` and import it in ``ingest/models/families/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedModel

from ingest.errors import InvalidArgumentError
from ingest.models.weights import CanonicalWeights

Converter = Callable[[PreTrainedModel], CanonicalWeights]


@dataclass(frozen=True)
class Family:
    """A registered family: its display name, the HF model types it reads, its converter."""

    name: str
    model_types: tuple[str, ...]
    convert: Converter


_BY_MODEL_TYPE: dict[str, Family] = {}


def register_family(name: str, *model_types: str) -> Callable[[Converter], Converter]:
    """Decorator registering ``convert`` for each of ``model_types`` under family ``name``."""
    if not model_types:
        raise ValueError(f"family {name!r} must name at least one HF model_type")

    def decorator(convert: Converter) -> Converter:
        taken = [t for t in model_types if t in _BY_MODEL_TYPE]
        if taken:
            owners = ", ".join(f"{t} -> {_BY_MODEL_TYPE[t].name}" for t in taken)
            raise InvalidArgumentError(
                f"model_type already registered ({owners}): choose another model_type or "
                "extend the existing family"
            )
        family = Family(name=name, model_types=tuple(model_types), convert=convert)
        for model_type in model_types:
            _BY_MODEL_TYPE[model_type] = family
        return convert

    return decorator


def _ensure_builtin_families() -> None:
    import ingest.models.families  # noqa: F401  (registers the built-in families)


def supported_model_types() -> list[str]:
    """Sorted HF ``model_type`` values that have a converter (the source of CLI choices)."""
    _ensure_builtin_families()
    return sorted(_BY_MODEL_TYPE)


def families() -> list[Family]:
    """The registered families, each once, in registration order."""
    _ensure_builtin_families()
    seen: dict[str, Family] = {}
    for family in _BY_MODEL_TYPE.values():
        seen.setdefault(family.name, family)
    return list(seen.values())


def get_family(model_type: str) -> Family:
    """The family for ``model_type``; :class:`InvalidArgumentError` listing the supported
    types when there is none."""
    _ensure_builtin_families()
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise InvalidArgumentError(
            f"unsupported model_type {model_type!r}: circuitscope supports "
            f"{', '.join(supported_model_types())}; use a model of one of these families or "
            "add a converter in ingest/models/families/ (see docs/models.md)"
        ) from None
