"""Shared file helpers for the transcoder formats: safe reads, atomic writes, checks.

Every reader reports a wrong layout as :class:`InvalidArgumentError` naming the file and
the problem (missing tensor, wrong shape), and a missing file as :class:`NotFoundError`.
Writes go to a temporary file and are moved into place with ``os.replace`` so a reader
never sees half a file.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.transcoder import Transcoder


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise NotFoundError(f"transcoder file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InvalidArgumentError(f"{path} is not a readable safetensors file: {exc}") from exc


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{path} must hold a JSON object")
    return data


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def take(
    tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...] | None, path: Path
) -> torch.Tensor:
    """The tensor ``key`` from a file, checked against ``shape``, as float32."""
    if key not in tensors:
        raise InvalidArgumentError(
            f"{path} has no tensor {key!r} (it holds {sorted(tensors)}): is this the right "
            f"format and file?"
        )
    value = tensors[key]
    if shape is not None and tuple(value.shape) != shape:
        raise InvalidArgumentError(
            f"{path}: tensor {key!r} has shape {tuple(value.shape)}, expected {shape}"
        )
    return value.to(torch.float32)


def infer_arch(has_threshold: bool, k: int | None) -> tuple[str, float]:
    """Architecture name and sparsity value of a foreign file without our config."""
    if has_threshold:
        return "jumprelu", 0.0
    if k is not None:
        return "topk", float(k)
    return "relu", 0.0


@torch.no_grad()
def per_layer_module(
    cfg: TranscoderConfig,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    W_skip: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
) -> Transcoder:
    """A Transcoder holding exactly the given tensors (shapes in the module docstring)."""
    module = Transcoder(cfg)
    module.W_enc.copy_(W_enc)
    module.b_enc.copy_(b_enc)
    module.W_dec.copy_(W_dec)
    module.b_dec.copy_(b_dec)
    if module.W_skip is not None and W_skip is not None:
        module.W_skip.copy_(W_skip)
    if module.threshold is not None and threshold is not None:
        module.threshold.copy_(threshold.reshape(-1))
    return module
