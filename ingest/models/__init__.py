"""Model adapters: one interface over Hugging Face causal LMs (GPT-2, GPT-NeoX/Pythia,
Llama), for the local replacement model and transcoder training.

``load_model`` / ``adapter_from_hf`` give a :class:`ModelAdapter`: a generic pre-norm
transformer forward over canonical weights (views of the HF parameters), which can
record every intermediate, run with frozen attention patterns and norm denominators, and
splice replacements in place of MLPs. Family differences live in small converters in
``ingest/models/families/``, chosen by ``config.model_type`` through
:mod:`ingest.models.registry`. See docs/models.md.
"""

from ingest.models.adapter import MLPReplacement, ModelAdapter
from ingest.models.loading import LoadedModel, adapter_from_hf, load_model
from ingest.models.registry import families, get_family, register_family, supported_model_types
from ingest.models.state import FrozenState, Recording

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
