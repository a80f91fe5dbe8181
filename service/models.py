"""The models a server analyses on request, loaded on first use.

A server is started with named model specs (``--model NAME=MODEL_DIR,TRANSCODERS_DIR``):
a Hugging Face checkpoint (directory or hub id, :func:`ingest.models.load_model`) and a
transcoder set in any supported format (:func:`ingest.transcoders.formats.load_any`).
Clients name a model; they never pass paths, so a caller cannot make the server read
arbitrary files. Loading and every use happen in the model pool (one thread by
default), so torch state is never shared between concurrent computations.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ingest.errors import InvalidArgumentError, NotFoundError

if TYPE_CHECKING:
    from ingest.models import LoadedModel
    from ingest.transcoders.transcoder_set import TranscoderSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A served model: its name, checkpoint, transcoder set and device."""

    name: str
    model_path: str
    transcoders_path: Path
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.name or "=" in self.name or "," in self.name:
            raise InvalidArgumentError(
                f"model name {self.name!r} must be non-empty, without '=' or ','"
            )

    @classmethod
    def parse(cls, text: str, device: str = "cpu") -> ModelSpec:
        """``NAME=MODEL_DIR,TRANSCODERS_DIR`` (the ``--model`` flag)."""
        name, sep, paths = text.partition("=")
        model_path, comma, transcoders = paths.partition(",")
        if not sep or not comma or not model_path or not transcoders:
            raise InvalidArgumentError(
                f"--model {text!r}: write NAME=MODEL_DIR,TRANSCODERS_DIR "
                "(a checkpoint directory or hub id, and a transcoder set directory)"
            )
        model_path = model_path.strip()
        if (
            model_path.startswith(("/", "./", "../", "~"))
            and not Path(model_path).expanduser().is_dir()
        ):
            # written as a path, not a hub id: found missing now, not on the first call
            raise NotFoundError(
                f"--model {text!r}: no model directory at {model_path}; check the path after '='"
            )
        transcoders_path = Path(transcoders.strip())
        if not transcoders_path.is_dir():
            raise NotFoundError(
                f"--model {text!r}: no transcoder set directory at {transcoders_path}; "
                "check the path after the comma"
            )
        return cls(name.strip(), model_path, transcoders_path, device)


class ModelRegistry:
    """Named models, each loaded once on first use (call from the model pool)."""

    def __init__(self, specs: tuple[ModelSpec, ...] | list[ModelSpec]) -> None:
        names = [s.name for s in specs]
        duplicate = {n for n in names if names.count(n) > 1}
        if duplicate:
            raise InvalidArgumentError(f"model names {sorted(duplicate)} are given more than once")
        self._specs = {s.name: s for s in specs}
        self._loaded: dict[str, tuple[LoadedModel, TranscoderSet]] = {}
        self._set_ids: dict[str, str] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> ModelSpec:
        """The spec of served model ``name``; NotFoundError when not served."""
        spec = self._specs.get(name)
        if spec is None:
            served = ", ".join(self.names()) or "none; start the server with --model"
            raise NotFoundError(f"this server serves no model {name!r}; served models: {served}")
        return spec

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def model_id(self, name: str) -> str:
        """The id the store keeps served model ``name``'s graphs under (ListGraphs'
        ``model_id``)."""
        from ingest.paths import model_id

        return model_id(self.spec(name).model_path)

    def set_id(self, name: str) -> str | None:
        """The catalog id of ``name``'s transcoder set (graphs' and features' ``set_id``),
        or None until the model is loaded (hashing the set reads all of its weights)."""
        return self._set_ids.get(name)

    def get(self, name: str) -> tuple[LoadedModel, TranscoderSet]:
        """The loaded model and transcoder set named ``name``."""
        spec = self.spec(name)
        with self._lock:
            if name not in self._loaded:
                from ingest.models import load_model
                from ingest.transcoders.formats import load_any

                logger.info("loading model %r from %s", name, spec.model_path)
                model = load_model(spec.model_path, device=spec.device)
                transcoders = load_any(spec.transcoders_path)
                adapter = model.adapter
                # hashed as loaded, as ingest does: the model's dtype may round weights
                self._set_ids[name] = transcoders.catalog_id
                transcoders.to(device=adapter.device, dtype=adapter.dtype)
                self._loaded[name] = (model, transcoders)
            return self._loaded[name]
