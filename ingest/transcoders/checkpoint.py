"""Atomic, resumable training checkpoints in safetensors + JSON (no pickle).

One file, ``checkpoint.safetensors``, holds every tensor of the training state: the
module parameters (``module.*``), the optimizer state (``optim.{i}.{name}`` for the
optimizer's parameter i, as its ``state_dict`` numbers them), the dead-latent counters
(``tokens_since_fired.*``) and the torch CPU RNG state (``rng.torch``). Its safetensors
metadata carries the JSON state (step, buffer position, activation scales, configs, eval
history) under ``state``; a human-readable copy goes to ``checkpoint.json``. The file is
written to a temporary name and moved into place with ``os.replace``, so a run killed at
any moment leaves either the previous checkpoint or the new one, never a torn file.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ingest.errors import InvalidArgumentError
from ingest.paths import save_tensors

CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_COPY_FILE = "checkpoint.json"


@dataclass
class Checkpoint:
    state: dict[str, Any]
    module: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    counters: dict[str, torch.Tensor]
    rng: torch.Tensor


def save_checkpoint(
    directory: Path,
    state: dict[str, Any],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    counters: dict[str, torch.Tensor],
) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        tensors[f"module.{name}"] = value
    # numbered as the optimizer numbers its parameters (over all its groups), which is
    # what ``restore_optimizer`` hands back to ``load_state_dict``
    for index, param_state in optimizer.state_dict()["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
    for name, value in counters.items():
        tensors[f"tokens_since_fired.{name}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    text = json.dumps(state, sort_keys=True)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    save_tensors(tensors, tmp, metadata={"state": text})
    os.replace(tmp, path)
    copy_tmp = directory / (STATE_COPY_FILE + ".tmp")
    copy_tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(copy_tmp, directory / STATE_COPY_FILE)
    return path


def has_checkpoint(directory: Path) -> bool:
    return (directory / CHECKPOINT_FILE).is_file()


def load_checkpoint(directory: Path) -> Checkpoint:
    path = directory / CHECKPOINT_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise InvalidArgumentError(
            f"{path} is not a readable checkpoint ({exc}): delete it to start over"
        ) from exc
    if "state" not in meta:
        raise InvalidArgumentError(f"{path} has no training state: delete it to start over")
    out = Checkpoint(json.loads(meta["state"]), {}, {}, {}, tensors.pop("rng.torch"))
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        if group == "module":
            out.module[rest] = value
        elif group == "optim":
            out.optimizer[rest] = value
        elif group == "tokens_since_fired":
            out.counters[rest] = value
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, torch.Tensor]) -> None:
    """Put saved per-parameter optimizer tensors back through ``load_state_dict``, which
    places each where the optimizer needs it: moments on the parameter's device, and the
    step count on the CPU for plain Adam but on the parameter's device for fused Adam
    (whose CUDA kernel refuses a CPU step). Parameters are numbered as the optimizer's
    ``state_dict`` numbers them (``save_checkpoint`` writes them so)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
