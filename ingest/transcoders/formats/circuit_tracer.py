"""circuit-tracer transcoder sets, which are also circuitscope's native layout.

Per-layer sets (``model_kind: transcoder_set``): one ``layer_{i}.safetensors`` per model
layer i with ``W_enc (d_transcoder, d_model)``, ``W_dec (d_transcoder, d_model)``,
``b_enc``, ``b_dec``, optional ``activation_function.threshold`` (JumpReLU), ``W_skip
(d_model, d_model)`` (used as ``x @ W_skip.T``) and ``k`` (TopK).

Cross-layer sets (``model_kind: cross_layer_transcoder``), indexed by position p in the
covered layers: ``W_enc_{p}.safetensors`` with ``W_enc_{p}``, ``b_enc_{p}``,
``b_dec_{p}``, optional ``threshold_{p}``, ``W_skip_{p}`` (stored as circuit-tracer uses
it, ``x @ W_skip``, i.e. ``(d_in, d_out)``) and ``k_{p}``; ``W_dec_{p}.safetensors`` with
``W_dec_{p} (d_transcoder, n_layers - p, d_model)``.

``config.yaml`` holds ``model_kind``, ``model_name``, ``feature_input_hook``,
``feature_output_hook`` and ``transcoders`` (the file list). circuitscope adds
``circuitscope.json`` (:class:`SetMetadata`: model id, fingerprint, layers, config);
without it, a set from elsewhere is read with its architecture inferred from its tensors
and no fingerprint. Tensors are written as they are held (float32), so a write followed
by a read is bit-exact.
"""

import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.transcoders.clt import CrossLayerTranscoder
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.formats.common import (
    StagedFiles,
    foreign_input_hook,
    infer_arch,
    per_layer_module,
    read_json,
    read_metadata,
    read_tensors,
    take,
)
from ingest.transcoders.transcoder import Transcoder
from ingest.transcoders.transcoder_set import SetMetadata, TranscoderSet

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
NATIVE_FILE = "circuitscope.json"
FORMAT_VERSION = 1
_KIND_TO_MODEL_KIND = {"transcoder": "transcoder_set", "sae": "transcoder_set"}


def save_set(tset: TranscoderSet, directory: str | Path) -> Path:
    """Write ``tset`` in the circuit-tracer layout plus ``circuitscope.json``; every file
    is staged first, so a failure leaves the directory as it was."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = tset.metadata
    for problem in _circuit_tracer_limits(tset):
        logger.warning("%s: %s; circuitscope reads it back right (circuitscope.json)", out, problem)
    with StagedFiles() as staged:
        if tset.clt is not None:
            files = _write_clt(tset.clt, meta.config, out, staged)
            model_kind = "cross_layer_transcoder"
        else:
            files = []
            for layer in tset.layers:
                name = f"layer_{layer}.safetensors"
                staged.tensors(out / name, _per_layer_tensors(tset.module(layer)))
                files.append(name)
            model_kind = _KIND_TO_MODEL_KIND[meta.kind]
        config: dict[str, Any] = {
            "model_kind": model_kind,
            "model_name": meta.model_id,
            "feature_input_hook": meta.feature_input_hook,
            "feature_output_hook": meta.feature_output_hook,
        }
        if tset.clt is not None:
            config["transcoders"] = files
        staged.text(out / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        staged.json(out / NATIVE_FILE, {"format_version": FORMAT_VERSION, **meta.to_dict()})
    return out


def _circuit_tracer_limits(tset: TranscoderSet) -> list[str]:
    """What circuit-tracer itself would load wrong from this set, one phrase each."""
    meta, problems = tset.metadata, []
    if meta.layers != list(range(len(meta.layers))):
        problems.append(
            f"circuit-tracer numbers a set's files by model layer from 0, and this one covers "
            f"layers {meta.layers}: it would take a cross-layer set for layers "
            f"0-{len(meta.layers) - 1} and refuse a per-layer one"
        )
    if meta.config.arch == "topk":
        problems.append(
            "circuit-tracer has no TopK loader: it refuses a per-layer set's 'k' tensor and "
            "runs a cross-layer set as ReLU (save as batchtopk, read as JumpReLU, instead)"
        )
    if tset.clt is not None and meta.config.skip:
        problems.append("circuit-tracer's cross-layer loader drops the skip weights (W_skip_p)")
    return problems


def _per_layer_tensors(module: Transcoder) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {
        "W_enc": module.W_enc,
        "W_dec": module.W_dec,
        "b_enc": module.b_enc,
        "b_dec": module.b_dec,
    }
    if module.threshold is not None:
        tensors["activation_function.threshold"] = module.threshold
    if module.W_skip is not None:
        tensors["W_skip"] = module.W_skip
    if module.cfg.arch == "topk":
        tensors["k"] = torch.tensor(module.cfg.k)
    return tensors


def _write_clt(
    clt: CrossLayerTranscoder, cfg: TranscoderConfig, out: Path, staged: StagedFiles
) -> list[str]:
    files = []
    for p in range(clt.n_layers):
        enc: dict[str, torch.Tensor] = {
            f"W_enc_{p}": clt.W_enc[p],
            f"b_enc_{p}": clt.b_enc[p],
            f"b_dec_{p}": clt.b_dec[p],
        }
        threshold = clt.threshold(p)
        if threshold is not None:
            enc[f"threshold_{p}"] = threshold
        if clt.W_skip is not None:
            enc[f"W_skip_{p}"] = clt.W_skip[p].T
        if cfg.arch == "topk":
            enc[f"k_{p}"] = torch.tensor(cfg.k)
        staged.tensors(out / f"W_enc_{p}.safetensors", enc)
        staged.tensors(out / f"W_dec_{p}.safetensors", {f"W_dec_{p}": clt.W_dec[p]})
        files += [f"W_enc_{p}.safetensors", f"W_dec_{p}.safetensors"]
    return files


def is_circuit_tracer_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def load_set(
    directory: str | Path, device: str | torch.device = "cpu", n_layers: int | None = None
) -> TranscoderSet:
    """Read a circuit-tracer set (native when ``circuitscope.json`` is present)."""
    root = Path(directory)
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise NotFoundError(
            f"{cfg_path} does not exist: a circuit-tracer transcoder set is a directory with "
            f"config.yaml and layer_{{i}}.safetensors files"
        )
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidArgumentError(f"{cfg_path} is not valid YAML: {exc}") from exc
    model_kind = config.get("model_kind")
    if model_kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise InvalidArgumentError(
            f"{cfg_path}: model_kind must be 'transcoder_set' or 'cross_layer_transcoder', "
            f"got {model_kind!r}"
        )
    native = read_json(root / NATIVE_FILE) if (root / NATIVE_FILE).is_file() else None
    if native is not None:
        native.pop("format_version", None)
        meta: SetMetadata | None = read_metadata(native, root / NATIVE_FILE)
    else:
        meta = None
    if model_kind == "cross_layer_transcoder":
        tset = _load_clt(root, config, meta, n_layers)
    else:
        tset = _load_per_layer(root, config, meta, n_layers)
    return tset.to(device)


def _file_layers(root: Path, config: dict, pattern: str) -> list[tuple[int, Path]]:
    """The listed files (``transcoders``), or without a list the directory's files that
    match ``pattern`` (as circuit-tracer lists them itself)."""
    files = config.get("transcoders")
    if not isinstance(files, list) or not files:
        files = sorted(p.name for p in root.glob("*.safetensors") if re.fullmatch(pattern, p.name))
    if not files:
        raise InvalidArgumentError(
            f"{root / CONFIG_FILE}: no 'transcoders' file list and no file matching "
            f"{pattern!r} beside it: list the files, or put them in {root}"
        )
    out = []
    for name in files:
        # Hub configs may hold URIs; the layer file name is the last path component.
        base = str(name).rsplit("/", 1)[-1]
        match = re.fullmatch(pattern, base)
        if match is None:
            raise InvalidArgumentError(
                f"{root / CONFIG_FILE}: file {name!r} does not match {pattern!r}"
            )
        out.append((int(match.group(1)), root / base))
    return sorted(out)


def _load_per_layer(
    root: Path, config: dict, meta: SetMetadata | None, n_layers: int | None
) -> TranscoderSet:
    entries = _file_layers(root, config, r"layer_(\d+)\.safetensors")
    modules: dict[int, Transcoder] = {}
    cfg = meta.config if meta else None
    for layer, path in entries:
        tensors = read_tensors(path)
        if cfg is None:
            d_t, d_in = take(tensors, "W_enc", None, path).shape
            k = int(tensors["k"]) if "k" in tensors else None
            arch, sparsity = infer_arch("activation_function.threshold" in tensors, k)
            cfg = TranscoderConfig(
                arch=arch,
                d_in=d_in,
                d_out=take(tensors, "b_dec", None, path).shape[0],
                d_transcoder=d_t,
                sparsity=sparsity,
                skip="W_skip" in tensors,
            )
        d_t, d_in, d_out = cfg.d_transcoder, cfg.d_in, cfg.d_out
        modules[layer] = per_layer_module(
            cfg,
            take(tensors, "W_enc", (d_t, d_in), path),
            take(tensors, "b_enc", (d_t,), path),
            take(tensors, "W_dec", (d_t, d_out), path),
            take(tensors, "b_dec", (d_out,), path),
            take(tensors, "W_skip", (d_out, d_in), path) if cfg.skip else None,
            _threshold(tensors, "activation_function.threshold", d_t, path, cfg),
        )
    assert cfg is not None
    if meta is None:
        layers = sorted(modules)
        meta = SetMetadata(
            kind="transcoder",
            model_id=str(config.get("model_name", "unknown")),
            model_fingerprint="",
            n_layers=n_layers or layers[-1] + 1,
            d_model=cfg.d_in,
            layers=layers,
            config=cfg,
            feature_input_hook=foreign_input_hook(str(config.get("feature_input_hook", "")), root),
            feature_output_hook=str(config.get("feature_output_hook", "")),
        )
    return TranscoderSet(meta, modules)


def _threshold(
    tensors: dict[str, torch.Tensor], key: str, d_t: int, path: Path, cfg: TranscoderConfig
) -> torch.Tensor | None:
    if not cfg.spec.has_threshold:
        return None
    value = take(tensors, key, None, path)
    if value.numel() != d_t:
        raise InvalidArgumentError(
            f"{path}: tensor {key!r} has {value.numel()} entries, expected d_transcoder={d_t}"
        )
    return value.reshape(d_t)


@torch.no_grad()
def _load_clt(
    root: Path, config: dict, meta: SetMetadata | None, n_layers: int | None
) -> TranscoderSet:
    enc_entries = _file_layers_lenient(root, config, r"W_enc_(\d+)\.safetensors")
    positions = [p for p, _ in enc_entries]
    if positions != list(range(len(positions))):
        raise InvalidArgumentError(
            f"{root}: cross-layer files must be W_enc_0..W_enc_{{n-1}}, found {positions}"
        )
    count = len(positions)
    first = read_tensors(enc_entries[0][1])
    cfg = meta.config if meta else None
    if cfg is None:
        d_t, d_in = take(first, "W_enc_0", None, enc_entries[0][1]).shape
        k = int(first["k_0"]) if "k_0" in first else None
        arch, sparsity = infer_arch("threshold_0" in first, k)
        cfg = TranscoderConfig(
            arch=arch,
            d_in=d_in,
            d_out=take(first, "b_dec_0", None, enc_entries[0][1]).shape[0],
            d_transcoder=d_t,
            sparsity=sparsity,
            skip="W_skip_0" in first,
        )
    d_t, d_in, d_out = cfg.d_transcoder, cfg.d_in, cfg.d_out
    clt = CrossLayerTranscoder(cfg, count)
    for p, path in enc_entries:
        enc = read_tensors(path)
        clt.W_enc[p].copy_(take(enc, f"W_enc_{p}", (d_t, d_in), path))
        clt.b_enc[p].copy_(take(enc, f"b_enc_{p}", (d_t,), path))
        clt.b_dec[p].copy_(take(enc, f"b_dec_{p}", (d_out,), path))
        threshold = _threshold(enc, f"threshold_{p}", d_t, path, cfg)
        if threshold is not None:
            clt.threshold(p).copy_(threshold)  # type: ignore[union-attr]
        if clt.W_skip is not None:
            clt.W_skip[p].copy_(take(enc, f"W_skip_{p}", (d_in, d_out), path).T)
        dec_path = root / f"W_dec_{p}.safetensors"
        dec = read_tensors(dec_path)
        clt.W_dec[p].copy_(take(dec, f"W_dec_{p}", (d_t, count - p, d_out), dec_path))
    if meta is None:
        meta = SetMetadata(
            kind="clt",
            model_id=str(config.get("model_name", "unknown")),
            model_fingerprint="",
            n_layers=n_layers or count,
            d_model=d_in,
            layers=list(range(count)),
            config=cfg,
            feature_input_hook=foreign_input_hook(str(config.get("feature_input_hook", "")), root),
            feature_output_hook=str(config.get("feature_output_hook", "")),
        )
    elif len(meta.layers) != count:
        raise InvalidArgumentError(
            f"{root}: circuitscope.json lists layers {meta.layers} but there are {count} "
            f"W_enc files"
        )
    return TranscoderSet(meta, clt)


def _file_layers_lenient(root: Path, config: dict, pattern: str) -> list[tuple[int, Path]]:
    """Matching entries of the file list (a CLT lists encoder and decoder files)."""
    files = config.get("transcoders")
    names = [str(n).rsplit("/", 1)[-1] for n in files] if isinstance(files, list) else []
    if not names:
        names = sorted(p.name for p in root.glob("W_enc_*.safetensors"))
    out = []
    for name in names:
        match = re.fullmatch(pattern, name)
        if match is not None:
            out.append((int(match.group(1)), root / name))
    if not out:
        raise InvalidArgumentError(f"{root}: no files match {pattern!r}")
    return sorted(out)
