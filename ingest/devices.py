"""Resolving a user's device string into a ``torch.device``, with clear errors; keeping
freed CPU memory for reuse during training."""

import ctypes
import ctypes.util
import functools
import sys

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
                "use device 'cpu' (--device cpu)"
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


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def retain_freed_cpu_memory(mmap_below: int = 64 << 20, trim_above: int = 256 << 20) -> bool:
    """Make the C allocator reuse freed blocks instead of returning them to the system.

    PyTorch allocates CPU tensors with ``malloc``. By default glibc serves blocks above
    a threshold (128 KiB, raised as blocks are freed, at most 32 MiB) with fresh
    ``mmap`` pages and gives freed heap back when more than twice that sits unused, so a
    training step that frees and re-allocates the same few (batch, width) matrices
    page-faults them in at every step: a tenth to a fifth of a TopK transcoder step at
    d_model 64 (``docs/transcoders_measurements.md``, "Training speed"). This serves
    blocks below ``mmap_below`` from the heap and keeps up to ``trim_above`` bytes of
    freed heap, for the rest of the process. Returns whether it took effect: True with
    glibc, False elsewhere (no-op).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_below)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_above)
    )
