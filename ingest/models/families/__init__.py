"""Built-in model families. Importing this package registers their converters.

One module per family; each maps a Hugging Face causal LM onto the canonical layout of
:mod:`ingest.models.weights` and registers itself with
:func:`ingest.models.registry.register_family`.
"""

from ingest.models.families import gpt2, gpt_neox, llama

__all__ = ["gpt2", "gpt_neox", "llama"]
