"""Shared file helpers for the transcoder formats: safe reads, atomic writes, checks.

Every reader reports a wrong layout as :class:`InvalidArgumentError` naming the file and
the problem (missing tensor, wrong shape), and a missing file as :class:`NotFoundError`.
Writes go to a temporary file and are moved into place with ``os.replace`` so a reader
never sees half a file; a set's files are staged together (:class:`StagedFiles`) and
moved into place only once every one of them is written, so a failure while writing a
set (a full disk, a value that does not serialize) leaves the directory as it was.
"""

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.paths import save_tensors
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.transcoder import Transcoder
from ingest.transcoders.transcoder_set import MLP_IN_HOOK, PRE_WEIGHT_HOOK, SetMetadata

logger = logging.getLogger(__name__)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, refused when a floating-point one holds nan,
    or inf outside a threshold (a set with such weights, e.g. from a diverged run,
    computes nan everywhere; an infinite JumpReLU threshold turns its latent off)."""
    if not path.is_file():
        raise NotFoundError(f"transcoder file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InvalidArgumentError(f"{path} is not a readable safetensors file: {exc}") from exc
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        bad = tensor.isnan() if "threshold" in name else ~torch.isfinite(tensor)
        if bad.any():
            raise InvalidArgumentError(
                f"{path}: tensor {name!r} holds nan or inf values (a diverged training run?); "
                "this transcoder set cannot be used: train it again"
            )
    return tensors


class StagedFiles:
    """Files written to temporary names and moved into place together when the ``with``
    block ends without an error; on an error the temporary files are removed and nothing
    is replaced. A write that fails names the file."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def _stage(self, path: Path, write: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self._staged.append((tmp, path))
        try:
            write(tmp)
        except (OSError, TypeError, ValueError, SafetensorError) as exc:
            raise InvalidArgumentError(f"cannot write {path}: {exc}") from exc

    def tensors(self, path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        plain = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
        self._stage(path, lambda tmp: save_tensors(plain, tmp))

    def json(self, path: Path, data: Any) -> None:
        try:
            text = json.dumps(data, indent=2, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot write {path}: {exc}") from exc
        self.text(path, text)

    def text(self, path: Path, text: str) -> None:
        self._stage(path, lambda tmp: tmp.write_text(text))

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            for tmp, path in self._staged:
                os.replace(tmp, path)
        else:
            for tmp, _ in self._staged:
                if tmp.is_file():
                    tmp.unlink()


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    with StagedFiles() as files:
        files.tensors(path, tensors)


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
    with StagedFiles() as files:
        files.json(path, data)


def read_metadata(data: dict[str, Any], path: Path) -> SetMetadata:
    """The set's circuitscope metadata from ``data`` (read from ``path``), or an error
    naming the file."""
    try:
        return SetMetadata.from_dict(data)
    except (TypeError, KeyError, ValueError, AttributeError, InvalidArgumentError) as exc:
        raise InvalidArgumentError(
            f"{path}: the set's circuitscope metadata is not readable ({exc!r}): the file is "
            "damaged or was written by another circuitscope version; export the set again"
        ) from exc


def check_no_other_layers(out: Path, weights_file: str, written: set[str]) -> None:
    """Refuse to write a set of layer directories into ``out`` when it already holds layer
    directories (with a ``weights_file``) that this set does not write: a reader would
    take them for part of the set."""
    others = sorted(
        p.parent.name for p in out.glob(f"*/{weights_file}") if p.parent.name not in written
    )
    if others:
        raise InvalidArgumentError(
            f"{out} already holds layer directories of another set ({', '.join(others)}): "
            "save into an empty directory, or remove them first"
        )


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


def foreign_input_hook(hook: str, where: Path) -> str:
    """The input hook a set from elsewhere names, with a warning when it is the norm's
    output before its weight and bias: circuitscope gives a transcoder the MLP's input
    after them, which is the same only for a norm with weight 1 and bias 0."""
    if hook.endswith(PRE_WEIGHT_HOOK):
        logger.warning(
            "%s: the set reads %r, the MLP input before the norm's weight and bias; "
            "circuitscope applies it to the input after them (%s), so its activations "
            "differ unless those are 1 and 0 (fold them into W_enc and b_enc)",
            where,
            hook,
            MLP_IN_HOOK,
        )
    return hook


def some_layers(meta: SetMetadata, layers: list[int], where: Path) -> SetMetadata:
    """``meta`` for the ``layers`` a directory of per-layer directories holds: formats
    that save a directory per hook are read (and re-saved by their own tools) a layer at a
    time; a set's layers missing from ``where`` are named in a warning."""
    if layers == meta.layers:
        return meta
    logger.warning(
        "%s holds layers %s of a set of layers %s: read as a set of those", where, layers,
        meta.layers,
    )  # fmt: skip
    return dataclasses.replace(meta, layers=layers)
