"""Model adapters: one interface over Hugging Face causal LMs (GPT-2, GPT-NeoX/Pythia,
Llama and its Mistral/Qwen2 relatives), for the local replacement model and transcoder
training.

``load_model`` / ``adapter_from_hf`` give a :class:`ModelAdapter`: a generic pre-norm
transformer forward over canonical weights (views of the HF parameters), which can
record every intermediate, run with frozen attention patterns and norm denominators, and
splice replacements in place of MLPs. Family differences live in small converters in
``ingest/models/families/``, chosen by ``config.model_type`` through
:mod:`ingest.models.registry`. See docs/models.md.

The names below are re-exported lazily, so importing this package (for example by the
``circuitscope model`` command module) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.models.adapter import MLPReplacement, ModelAdapter
    from ingest.models.loading import LoadedModel, adapter_from_hf, load_model
    from ingest.models.registry import (
        families,
        get_family,
        register_family,
        supported_model_types,
    )
    from ingest.models.state import FrozenState, Recording

_EXPORTS = {
    "MLPReplacement": "ingest.models.adapter",
    "ModelAdapter": "ingest.models.adapter",
    "LoadedModel": "ingest.models.loading",
    "adapter_from_hf": "ingest.models.loading",
    "load_model": "ingest.models.loading",
    "families": "ingest.models.registry",
    "get_family": "ingest.models.registry",
    "register_family": "ingest.models.registry",
    "supported_model_types": "ingest.models.registry",
    "FrozenState": "ingest.models.state",
    "Recording": "ingest.models.state",
}

__all__ = [
    "FrozenState",
    "LoadedModel",
    "MLPReplacement",
    "ModelAdapter",
    "Recording",
    "adapter_from_hf",
    "families",
    "get_family",
    "load_model",
    "register_family",
    "supported_model_types",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ingest.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
