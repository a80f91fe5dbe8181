"""Loading a Hugging Face causal LM and its tokenizer into a :class:`ModelAdapter`.

``load_model`` accepts a local checkpoint directory (anything written by
``save_pretrained``, such as the task zoo's models) or a hub id. It works offline: when
``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set, or the hub cannot be reached, it
reads the local Hugging Face cache only, and says how to proceed when the model is not
there. Models load in float32 by default, with HF's eager attention.

Errors: a directory that is not a checkpoint, a file, or a checkpoint without a tokenizer
-> :class:`InvalidArgumentError`; a path that does not exist or a hub id the hub does not
know -> :class:`NotFoundError`; a hub id that is neither cached nor reachable ->
:class:`UnavailableError`; a ``model_type`` with no registered family ->
:class:`InvalidArgumentError` listing the supported ones.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ingest.devices import resolve_device
from ingest.errors import InvalidArgumentError, NotFoundError, UnavailableError
from ingest.models.adapter import ModelAdapter
from ingest.models.registry import get_family

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class LoadedModel:
    """A model ready for the circuit pipeline. ``hf_model`` is the HF module whose
    parameters the adapter references (kept for generation and comparisons)."""

    adapter: ModelAdapter
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    hf_config: PretrainedConfig
    hf_model: PreTrainedModel | None = None


def adapter_from_hf(model: PreTrainedModel) -> ModelAdapter:
    """Wrap an HF causal LM already in memory; the adapter references its weights
    (views, no copy), on the model's device and dtype."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        raise InvalidArgumentError(
            f"{type(model).__name__} has no config.model_type: pass a Hugging Face "
            "PreTrainedModel (AutoModelForCausalLM)"
        )
    family = get_family(model_type)
    try:
        weights = family.convert(model)
    except AttributeError as exc:
        raise InvalidArgumentError(
            f"{type(model).__name__} does not have the module layout of a {family.name} causal "
            f"LM ({exc}): pass the model loaded with AutoModelForCausalLM, not the base model"
        ) from exc
    adapter = ModelAdapter(weights)
    bos = getattr(model.config, "bos_token_id", None)
    if isinstance(bos, int) and 0 <= bos < adapter.vocab_size:
        adapter.bos_token_id = bos
    logger.info(
        "adapted %s (%s): %d layers, d_model %d, %d heads (%d kv), vocab %d",
        type(model).__name__,
        family.name,
        adapter.n_layers,
        adapter.d_model,
        adapter.n_heads,
        adapter.n_kv_heads,
        adapter.vocab_size,
    )
    return adapter


def _env_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds.

    Without this probe an unreachable hub costs about half a minute of client retries.
    Behind a proxy the probe is skipped and the hub client decides.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    if url.hostname is None:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1


def _is_missing_repo(exc: BaseException) -> bool:
    """Whether the hub answered that the repository does not exist."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _resolve_source(name_or_path: str) -> tuple[str, bool, PretrainedConfig]:
    """(what to pass to from_pretrained, local_files_only, the config)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidArgumentError(
                f"{str(path)!r} is not a Hugging Face checkpoint (no config.json): pass a "
                "directory written by save_pretrained, or a hub id"
            )
        try:
            return str(path), True, AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidArgumentError(
                f"cannot read the config in {str(path)!r}: {exc}; re-save the checkpoint "
                "with save_pretrained"
            ) from exc
    if path.exists():
        raise InvalidArgumentError(
            f"{str(path)!r} is a file: pass the checkpoint directory that holds config.json"
        )
    if _looks_like_path(name_or_path):
        raise NotFoundError(f"no such checkpoint directory {str(path)!r}: check the path")

    offline = _env_offline()
    reachable = not offline and _hub_reachable()
    online_error: BaseException | None = None
    if reachable:
        try:
            return name_or_path, False, AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            online_error = exc
            logger.info("hub lookup of %s failed (%s); trying the local cache", name_or_path, exc)
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        if online_error is not None and _is_missing_repo(online_error):
            raise NotFoundError(
                f"the hub has no model {name_or_path!r}: check the id, or pass a local "
                "checkpoint directory"
            ) from online_error
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise UnavailableError(
            f"model {name_or_path!r} is not a local directory, not in the local Hugging Face "
            f"cache, and {why}: download it on a machine with internet access (for example "
            f"`hf download {name_or_path} --local-dir DIR`) and pass the local directory DIR"
        ) from exc
    return name_or_path, True, config


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    ``device``: ``cpu``, ``cuda[:N]`` or ``auto``. ``dtype``: float32 (default), float64
    (exactness tests), bfloat16 or float16. See the module docstring for errors.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise InvalidArgumentError(
            f"unsupported dtype {dtype}: use one of {', '.join(map(str, SUPPORTED_DTYPES))}"
        )
    target = resolve_device(str(device))
    source, local_only, config = _resolve_source(name_or_path)
    get_family(config.model_type)  # fail before loading weights
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="eager", **kwargs
        )
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            f"cannot load the weights of {name_or_path!r}: {exc}; check that the checkpoint "
            "is complete (config.json plus *.safetensors)"
        ) from exc
    no_tokenizer = (
        f"no usable tokenizer with {name_or_path!r}: save the tokenizer next to the model "
        "with tokenizer.save_pretrained(<same directory>)"
    )
    if local_only and Path(source).is_dir() and not _has_tokenizer_files(Path(source)):
        raise InvalidArgumentError(no_tokenizer)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"{no_tokenizer} ({exc})") from exc
    # transformers may build an empty tokenizer from the model type alone
    if tokenizer.vocab_size == 0:
        raise InvalidArgumentError(no_tokenizer)
    model.eval()
    cast(Any, model).to(target)
    adapter = adapter_from_hf(model)
    if len(tokenizer) > adapter.vocab_size:
        logger.warning(
            "tokenizer of %s has %d tokens but the model embeds only %d; ids past %d will be "
            "rejected",
            name_or_path,
            len(tokenizer),
            adapter.vocab_size,
            adapter.vocab_size - 1,
        )
    # a local checkpoint is named by its absolute path, so that "./zoo/x", "zoo/x/" and
    # "~/…/zoo/x" store graphs and transcoder sets under one model id
    model_id = str(Path(source).resolve()) if Path(source).is_dir() else name_or_path
    return LoadedModel(
        adapter=adapter,
        tokenizer=tokenizer,
        model_id=model_id,
        hf_config=config,
        hf_model=model,
    )
