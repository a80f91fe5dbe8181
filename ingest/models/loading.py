"""Loading a Hugging Face causal LM and its tokenizer into a :class:`ModelAdapter`.

``load_model`` accepts a local checkpoint directory (anything written by
``save_pretrained``, such as the task zoo's models) or a hub id. It works offline: when
``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set, or the hub cannot be reached, it
reads the local Hugging Face cache only, and says how to proceed when the model is not
there. Models load in float32 by default, with HF's eager attention.

The checkpoint must match its config exactly. ``from_pretrained`` re-initializes weights
the checkpoint lacks or has in another shape, and drops the ones the config has no place
for, with only a logged report; a model loaded that way is partly random, and so would be
everything computed from it. Here each of those is an error.

Errors (each one line, saying what to do): a directory that is not a checkpoint, a file,
a checkpoint without a tokenizer, a ``config.json`` that cannot be read or does not match
the weights, missing or unexpected weights, a truncated or corrupt weight file ->
:class:`InvalidArgumentError`; a ``model_type`` with no registered family ->
:class:`InvalidArgumentError` listing the supported ones (read from the raw
``config.json``, before transformers is asked about it); a path that does not exist or a
hub id the hub does not know -> :class:`NotFoundError`; a gated hub repository ->
:class:`PermissionDeniedError`; a hub id whose config or weights are neither cached nor
downloadable -> :class:`UnavailableError`.
"""

from __future__ import annotations

import logging
import os
import re
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
from transformers.utils import logging as hf_logging

from ingest.devices import resolve_device
from ingest.errors import (
    CircuitscopeError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from ingest.models.adapter import ModelAdapter
from ingest.models.registry import get_family
from ingest.paths import model_id

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A supported torch dtype from a dtype or its name ("float64", "torch.float64")."""
    names = {str(d).removeprefix("torch."): d for d in SUPPORTED_DTYPES}
    found = names.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if found not in SUPPORTED_DTYPES:
        raise InvalidArgumentError(
            f"unsupported dtype {dtype!r}: use one of {', '.join(names)} "
            "(a torch dtype or its name)"
        )
    return found  # type: ignore[return-value]


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


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line: HF's run over several, the CLI prints one."""
    return " ".join(str(exc).split())


def _first(keys: list[str], n: int = 3) -> str:
    """The first ``n`` of ``keys`` and how many more there are."""
    shown = ", ".join(keys[:n])
    return shown if len(keys) <= n else f"{shown} and {len(keys) - n} more"


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (transformers wraps the hub's
    exceptions in ``OSError``)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _hub_refusal(name: str, exc: BaseException) -> CircuitscopeError | None:
    """The domain error for a hub answer that neither a retry nor the cache fixes: a gated
    repository (:class:`PermissionDeniedError`) or one the hub does not show this user
    (:class:`NotFoundError`); None for any other failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    for cause in _causes(exc):
        # a GatedRepoError is also a RepositoryNotFoundError: test it first
        if isinstance(cause, GatedRepoError):
            return PermissionDeniedError(
                f"model {name!r} is gated: accept its licence at {constants.ENDPOINT}/{name} "
                "and log in (`hf auth login`, or set HF_TOKEN to a token of that account), "
                "or pass a local checkpoint directory"
            )
        if isinstance(cause, RepositoryNotFoundError):
            return NotFoundError(
                f"the hub has no model {name!r}: check the id (if the repository is private, "
                "log in with `hf auth login` or set HF_TOKEN), or pass a local checkpoint "
                "directory"
            )
    return None


def _hub_unreachable(exc: BaseException) -> bool:
    """Whether a failed hub read failed for want of a connection (or of the file in the
    cache, offline), not because the repository lacks the file."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    for cause in _causes(exc):
        if isinstance(cause, LocalEntryNotFoundError | OfflineModeIsEnabled):
            return True
        if isinstance(cause, EntryNotFoundError):
            return False
        if isinstance(cause, HfHubHTTPError | ConnectionError | TimeoutError):
            return True
    return False


def _download_advice(name: str) -> str:
    return (
        f"download it on a machine with internet access (for example `hf download {name} "
        "--local-dir DIR`) and pass the local directory DIR"
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


@dataclass(frozen=True)
class _Source:
    """Where the weights come from: ``target`` is passed to ``from_pretrained``."""

    target: str  # a checkpoint directory's path, or a hub id
    is_dir: bool
    local_only: bool  # read the local HF cache only
    config: PretrainedConfig
    offline_because: str | None = None  # why a hub id is read from the cache only
    hub_error: BaseException | None = None  # the hub's answer when that was an error


def _read_config(source: str, local_only: bool) -> PretrainedConfig:
    """The config at ``source``. Its ``model_type`` is read from the raw ``config.json``
    first: a type transformers does not know gets the registry's error (the supported
    types), not transformers' advice to upgrade."""
    raw, _ = PretrainedConfig.get_config_dict(source, local_files_only=local_only)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InvalidArgumentError(
            f"the config.json of {source!r} names no model_type: re-save the checkpoint with "
            "save_pretrained"
        )
    get_family(model_type)
    return AutoConfig.from_pretrained(source, local_files_only=local_only)


def _resolve_source(name_or_path: str) -> _Source:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidArgumentError(
                f"{str(path)!r} is not a Hugging Face checkpoint (no config.json): pass a "
                "directory written by save_pretrained, or a hub id"
            )
        try:
            config = _read_config(str(path), local_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidArgumentError(
                f"cannot read the config in {str(path)!r}: {_one_line(exc)}; re-save the "
                "checkpoint with save_pretrained"
            ) from exc
        return _Source(str(path), is_dir=True, local_only=True, config=config)
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
            config = _read_config(name_or_path, local_only=False)
            return _Source(name_or_path, is_dir=False, local_only=False, config=config)
        except (OSError, ValueError) as exc:
            online_error = exc
            logger.info("hub lookup of %s failed (%s); trying the local cache", name_or_path, exc)
    if offline:
        why = "HF_HUB_OFFLINE is set"
    elif online_error is None:
        why = "the hub cannot be reached"
    else:
        why = f"the hub lookup failed ({_one_line(online_error)})"
    try:
        config = _read_config(name_or_path, local_only=True)
    except (OSError, ValueError) as exc:
        refusal = None if online_error is None else _hub_refusal(name_or_path, online_error)
        if refusal is not None:
            raise refusal from online_error
        raise UnavailableError(
            f"model {name_or_path!r} is not a local directory, not in the local Hugging Face "
            f"cache, and {why}: {_download_advice(name_or_path)}"
        ) from exc
    return _Source(
        name_or_path,
        is_dir=False,
        local_only=True,
        config=config,
        offline_because=why,
        hub_error=online_error,
    )


def _corrupt_file(directory: Path) -> Path | None:
    """The first ``*.safetensors`` file in ``directory`` whose header does not read."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return file
    return None


def _weights_error(name: str, source: _Source, exc: Exception) -> CircuitscopeError:
    """The domain error for a failed ``from_pretrained``."""
    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError):
        bad = _corrupt_file(Path(source.target)) if source.is_dir else None
        where = f"weight file {str(bad)!r}" if bad else f"a weight file of {name!r}"
        return InvalidArgumentError(
            f"{where} is truncated or corrupt ({_one_line(exc)}): re-save or re-download it"
        )
    if not source.is_dir:
        for answer in (exc, source.hub_error):
            refusal = None if answer is None else _hub_refusal(name, answer)
            if refusal is not None:
                return refusal
        if source.local_only and isinstance(exc, OSError):
            return UnavailableError(
                f"the weights of {name!r} are not in the local Hugging Face cache (its config "
                f"is) and {source.offline_because}: {_download_advice(name)}"
            )
        if _hub_unreachable(exc):
            return UnavailableError(
                f"downloading the weights of {name!r} failed ({_one_line(exc)}): retry, or "
                f"{_download_advice(name)}"
            )
    return InvalidArgumentError(
        f"cannot load the weights of {name!r}: {_one_line(exc)}; check that the checkpoint "
        "is complete (config.json plus *.safetensors)"
    )


# Constant buffers older transformers versions saved with the weights (causal masks, the
# masked-attention fill value, rotary frequencies): the model rebuilds them, so a
# checkpoint that carries them is complete. transformers 5 reports GPT-2's
# ``attn.masked_bias`` as unexpected.
_LEGACY_BUFFER = re.compile(
    r"(^|\.)(attn|attention)\.(masked_bias|bias)$|(^|\.)rotary_emb\.inv_freq$"
)


def _check_loading_info(name: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint that does not fill the model its config describes exactly:
    HF re-initialized the weights it lacks or has in another shape, and dropped the ones
    with no place in the model. Tied heads are not reported, and the constant buffers of
    :data:`_LEGACY_BUFFER` are not refused."""
    mismatched = sorted(
        (key, tuple(ckpt), tuple(want)) for key, ckpt, want in info["mismatched_keys"]
    )
    if mismatched:
        key, ckpt, want = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise InvalidArgumentError(
            f"config.json does not match the weights of {name!r}: {key} has shape {ckpt} in "
            f"the checkpoint but the config implies {want}{more}; correct config.json, or "
            "re-save the checkpoint with save_pretrained"
        )
    missing = sorted(info["missing_keys"])
    unexpected = sorted(k for k in info["unexpected_keys"] if not _LEGACY_BUFFER.search(k))
    problems = []
    if missing:
        problems.append(f"lacks {_first(missing)}")
    if unexpected:
        problems.append(f"has weights its config has no place for ({_first(unexpected)})")
    if problems:
        raise InvalidArgumentError(
            f"the checkpoint {name!r} {' and '.join(problems)}: its weights are not the "
            "ones its config.json describes (it is incomplete, or was saved from a base model "
            "or with a different config); re-save it with save_pretrained from the causal LM "
            "(AutoModelForCausalLM)"
        )


def _load_weights(name: str, source: _Source, dtype: torch.dtype) -> PreTrainedModel:
    from safetensors import SafetensorError

    try:
        # mismatched shapes are reported in the loading info, not raised with HF's advice
        # to ignore them
        loaded = AutoModelForCausalLM.from_pretrained(
            source.target,
            dtype=dtype,
            attn_implementation="eager",
            local_files_only=source.local_only,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    except torch.OutOfMemoryError as exc:
        raise ResourceExhaustedError(
            f"not enough device memory to load {name!r} in {dtype}: {_one_line(exc)}; free "
            "memory, load on another device or in a smaller dtype"
        ) from exc
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):
            raise ResourceExhaustedError(
                f"not enough memory to load {name!r} in {dtype}: {_one_line(exc)}"
            ) from exc
        raise _weights_error(name, source, exc) from exc
    model, info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
    _check_loading_info(name, info)
    return model


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    progress: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    ``device``: ``cpu``, ``cuda[:N]`` or ``auto``. ``dtype``: float32 (default), float64
    (exactness tests), bfloat16 or float16, as a torch dtype or its name. ``progress``
    False hides transformers' weight-loading bar. See the module docstring for errors.
    """
    dtype = _dtype(dtype)
    if not progress and hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        try:
            return load_model(name_or_path, device=device, dtype=dtype)
        finally:
            hf_logging.enable_progress_bar()
    target = resolve_device(str(device))
    source = _resolve_source(name_or_path)
    model = _load_weights(name_or_path, source, dtype)
    no_tokenizer = (
        f"no usable tokenizer with {name_or_path!r}: save the tokenizer next to the model "
        "with tokenizer.save_pretrained(<same directory>)"
    )
    if source.is_dir and not _has_tokenizer_files(Path(source.target)):
        raise InvalidArgumentError(no_tokenizer)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.target, local_files_only=source.local_only)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"{no_tokenizer} ({_one_line(exc)})") from exc
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
    return LoadedModel(
        adapter=adapter,
        tokenizer=tokenizer,
        model_id=model_id(name_or_path),
        hf_config=source.config,
        hf_model=model,
    )
