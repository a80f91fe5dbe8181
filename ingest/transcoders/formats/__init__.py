"""Reading and writing transcoder sets: circuit-tracer (native), SAELens, sparsify.

:data:`FORMATS` maps a format name to its (writer, reader); :func:`load_any` detects the
layout of a directory. The native layout is circuit-tracer's plus ``circuitscope.json``.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.transcoders.formats.circuit_tracer import is_circuit_tracer_dir, load_set, save_set
from ingest.transcoders.formats.saelens import is_saelens_dir, load_saelens, save_saelens
from ingest.transcoders.formats.sparsify import is_sparsify_dir, load_sparsify, save_sparsify
from ingest.transcoders.registry import Registry
from ingest.transcoders.transcoder_set import TranscoderSet

FORMATS: Registry[tuple[Callable[..., Path], Callable[..., TranscoderSet]]] = Registry("format")
FORMATS.add("circuit_tracer", (save_set, load_set))
FORMATS.add("saelens", (save_saelens, load_saelens))
FORMATS.add("sparsify", (save_sparsify, load_sparsify))


def detect_format(path: str | Path) -> str:
    root = Path(path)
    if not root.exists():
        raise NotFoundError(f"no transcoder set at {root}: check the path")
    if is_circuit_tracer_dir(root):
        return "circuit_tracer"
    if is_saelens_dir(root):
        return "saelens"
    if is_sparsify_dir(root):
        return "sparsify"
    raise InvalidArgumentError(
        f"{root} is not a transcoder set: expected config.yaml (circuit-tracer), "
        f"sae_weights.safetensors (SAELens) or sae.safetensors (sparsify)"
    )


def load_any(path: str | Path, fmt: str = "auto", **kwargs: Any) -> TranscoderSet:
    """Read a set in ``fmt`` (or the detected format)."""
    name = detect_format(path) if fmt == "auto" else fmt
    return FORMATS.get(name)[1](path, **kwargs)


def save(tset: TranscoderSet, path: str | Path, fmt: str = "circuit_tracer") -> Path:
    return FORMATS.get(fmt)[0](tset, path)


__all__ = ["FORMATS", "detect_format", "load_any", "load_set", "save", "save_set"]
