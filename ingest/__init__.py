"""circuitscope ingest: everything from a model to a stored graph.

Kept light on purpose: importing ``ingest`` (or its graph types and store) must not
import torch models. Heavy modules are imported by the code that needs them.
"""
