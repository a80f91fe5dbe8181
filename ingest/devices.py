"""Resolving a user's device string into a ``torch.device``, with clear errors."""

import torch

from ingest.errors import InvalidArgumentError, UnavailableError


def resolve_device(name: str | None) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``None``/``"auto"`` into a device.

    ``auto`` picks CUDA when present. A device that is not there raises
    :class:`UnavailableError` naming what is available.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidArgumentError(
            f"unknown device {name!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnavailableError(
                f"device {name!r} requested but CUDA is not available on this machine: "
                "use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UnavailableError(
                f"device {name!r} requested but only {count} CUDA device(s) exist: "
                f"use cuda:0 to cuda:{count - 1}"
            )
    elif device.type != "cpu":
        raise InvalidArgumentError(f"unsupported device {name!r}: use 'cpu' or 'cuda[:N]'")
    return device
