"""EleutherAI sparsify checkpoints: one directory per hookpoint.

Each hookpoint directory holds ``cfg.json`` (``num_latents``, ``k``, ``transcode``,
``skip_connection``, ``d_in``) and ``sae.safetensors`` with ``encoder.weight
(num_latents, d_in)``, ``encoder.bias (num_latents,)``, ``W_dec (num_latents, d_out)``,
``b_dec (d_out,)`` and optional ``W_skip (d_out, d_in)`` (used as ``x @ W_skip.T``).
Sparsify SAEs (``transcode: false``) subtract ``b_dec`` from the input; that shift is
folded into ``b_enc`` on reading. The layer is the first integer in the hookpoint name
(``layers.3.mlp`` -> 3). Sparsify is TopK only. The writer exists for round-trip tests
and exports; it always writes ``transcode: true`` so no bias is folded.
"""

import re
from pathlib import Path

import torch

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.formats.common import (
    StagedFiles,
    check_no_other_layers,
    per_layer_module,
    read_json,
    read_metadata,
    read_tensors,
    some_layers,
    take,
)
from ingest.transcoders.transcoder import Transcoder
from ingest.transcoders.transcoder_set import SetMetadata, TranscoderSet

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def save_sparsify(tset: TranscoderSet, directory: str | Path) -> Path:
    meta = tset.metadata
    if tset.clt is not None or meta.config.arch != "topk":
        raise InvalidArgumentError(
            "sparsify checkpoints hold per-layer TopK modules only: save this set in the "
            "circuit-tracer format instead"
        )
    out = Path(directory)
    check_no_other_layers(out, WEIGHTS_FILE, {f"layers.{layer}.mlp" for layer in tset.layers})
    with StagedFiles() as staged:
        for layer in tset.layers:
            _stage_layer(staged, out / f"layers.{layer}.mlp", tset, layer)
    return out


def _stage_layer(staged: StagedFiles, sub: Path, tset: TranscoderSet, layer: int) -> None:
    meta = tset.metadata
    module = tset.module(layer)
    cfg = {
        "num_latents": meta.config.d_transcoder,
        "expansion_factor": 0,
        "k": meta.config.k,
        "normalize_decoder": True,
        "multi_topk": False,
        "skip_connection": meta.config.skip,
        "transcode": True,
        "d_in": meta.config.d_in,
        "circuitscope": meta.to_dict(),
    }
    tensors = {
        "encoder.weight": module.W_enc,
        "encoder.bias": module.b_enc,
        "W_dec": module.W_dec,
        "b_dec": module.b_dec,
    }
    if module.W_skip is not None:
        tensors["W_skip"] = module.W_skip
    staged.json(sub / CFG_FILE, cfg)
    staged.tensors(sub / WEIGHTS_FILE, tensors)


def is_sparsify_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() or any(path.glob(f"*/{WEIGHTS_FILE}"))


def load_sparsify(
    directory: str | Path,
    device: str | torch.device = "cpu",
    n_layers: int | None = None,
    model_id: str = "unknown",
) -> TranscoderSet:
    root = Path(directory)
    dirs = (
        [root]
        if (root / WEIGHTS_FILE).is_file()
        else sorted(p.parent for p in root.glob(f"*/{WEIGHTS_FILE}"))
    )
    if not dirs:
        raise NotFoundError(f"{root} holds no sparsify {WEIGHTS_FILE} (nor hookpoint dirs)")
    modules: dict[int, Transcoder] = {}
    meta: SetMetadata | None = None
    config: TranscoderConfig | None = None
    transcode = True
    for sub in dirs:
        cfg = read_json(sub / CFG_FILE)
        path = sub / WEIGHTS_FILE
        tensors = read_tensors(path)
        if "circuitscope" in cfg:
            meta = read_metadata(cfg["circuitscope"], sub / CFG_FILE)
            config = meta.config
        activation = cfg.get("activation", "topk")
        if activation != "topk":
            raise InvalidArgumentError(
                f"{sub / CFG_FILE}: activation {activation!r} is not supported: circuitscope "
                "reads sparsify's TopK coders (activation 'topk') only"
            )
        enc = take(tensors, "encoder.weight", None, path)
        d_t, d_in = enc.shape
        if config is None:
            if "k" not in cfg:
                raise InvalidArgumentError(f"{sub / CFG_FILE}: missing 'k'")
            config = TranscoderConfig(
                arch="topk", d_in=d_in, d_out=take(tensors, "b_dec", None, path).shape[0],
                d_transcoder=d_t, sparsity=float(cfg["k"]), skip="W_skip" in tensors,
            )  # fmt: skip
        transcode = bool(cfg.get("transcode", False))
        if (d_t, d_in) != (config.d_transcoder, config.d_in):
            raise InvalidArgumentError(
                f"{path}: encoder.weight has shape {(d_t, d_in)}, expected "
                f"{(config.d_transcoder, config.d_in)}"
            )
        b_enc = take(tensors, "encoder.bias", (d_t,), path)
        b_dec = take(tensors, "b_dec", (config.d_out,), path)
        if not transcode:
            b_enc = b_enc - enc @ b_dec
        match = re.search(r"(\d+)\.mlp$", sub.name)
        if match is None:
            raise InvalidArgumentError(
                f"{sub}: the hookpoint name must be an MLP's, with its layer number (e.g. "
                "layers.3.mlp): a coder of another site (the residual stream, attention) "
                "does not replace an MLP"
            )
        modules[int(match.group(1))] = per_layer_module(
            config, enc, b_enc, take(tensors, "W_dec", (d_t, config.d_out), path), b_dec,
            take(tensors, "W_skip", (config.d_out, d_in), path) if config.skip else None,
        )  # fmt: skip
    assert config is not None
    if meta is not None:
        meta = some_layers(meta, sorted(modules), root)
    if meta is None:
        layers = sorted(modules)
        meta = SetMetadata(
            kind="transcoder" if transcode else "sae", model_id=model_id, model_fingerprint="",
            n_layers=n_layers or layers[-1] + 1, d_model=config.d_in, layers=layers,
            config=config,
        )  # fmt: skip
    return TranscoderSet(meta, modules).to(device)
