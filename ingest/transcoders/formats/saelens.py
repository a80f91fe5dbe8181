"""SAELens directories: ``cfg.json`` + ``sae_weights.safetensors`` per hook.

SAELens stores one dictionary per directory with ``W_enc (d_in, d_sae)``, ``W_dec
(d_sae, d_out)``, ``b_enc (d_sae,)``, ``b_dec (d_out,)`` and optional ``threshold
(d_sae,)`` and ``W_skip (d_out, d_in)``; ``cfg.json`` names the ``architecture``,
``d_in``, ``d_sae``, ``d_out``, ``k`` for TopK, ``apply_b_dec_to_input``,
``normalize_activations`` and ``metadata`` (``model_name``, ``hook_name``,
``hook_name_out``, ``hook_layer``).

A set is written as ``layer_{i}/`` subdirectories; our full metadata travels in
``metadata.circuitscope`` so a round trip is exact, and ``metadata.sae_lens_version``
marks the config as SAELens 6's layout (without it SAELens rebuilds ``metadata`` from
the top-level keys and drops the hook names). Reading accepts one SAELens directory or a
directory of them (some of a set's layer directories read as those layers, with a
warning: :func:`~ingest.transcoders.formats.common.some_layers`). Folded into
the weights on reading, so that the set computes what SAELens computes:
``apply_b_dec_to_input`` into ``b_enc``; ``rescale_acts_by_decoder_norm`` (SAELens
scales pre-activations by the decoder rows' norms and divides them out before decoding)
into ``W_enc``, ``b_enc`` and ``W_dec``; a negative JumpReLU threshold is raised to 0
(SAELens' JumpReLU is ``relu(pre) * (pre > threshold)``).

Only what SAELens itself can load is written. Its transcoder architectures are
``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder`` and
``jumprelu_skip_transcoder``: there is no TopK transcoder, and its SAEs have no skip
connection. Such sets, and cross-layer sets, are refused with the format to use instead.
"""

import re
from pathlib import Path
from typing import Any

import torch

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.transcoders.config import TranscoderConfig
from ingest.transcoders.formats.common import (
    StagedFiles,
    check_no_other_layers,
    foreign_input_hook,
    infer_arch,
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
#: ``metadata.sae_lens_version`` written: the config layout of SAELens 6 and later.
SAELENS_LAYOUT_VERSION = "6.0.0"
WEIGHTS_FILE = "sae_weights.safetensors"
_ARCH_NAMES = {
    ("sae", "relu"): "standard",
    ("sae", "topk"): "topk",
    ("sae", "jumprelu"): "jumprelu",
    ("sae", "batchtopk"): "jumprelu",  # SAELens saves BatchTopK for inference as JumpReLU
    ("transcoder", "relu"): "transcoder",
    ("transcoder", "jumprelu"): "jumprelu_transcoder",
    ("transcoder", "batchtopk"): "jumprelu_transcoder",
}


def save_saelens(tset: TranscoderSet, directory: str | Path) -> Path:
    if tset.clt is not None:
        raise InvalidArgumentError(
            "SAELens has no cross-layer transcoder layout: save a CLT in the "
            "circuit-tracer format instead"
        )
    config = tset.metadata.config
    if (tset.metadata.kind, config.arch) not in _ARCH_NAMES:
        raise InvalidArgumentError(
            "SAELens has no TopK transcoder architecture (its transcoders are transcoder, "
            "skip_transcoder, jumprelu_transcoder and jumprelu_skip_transcoder): save a "
            "TopK transcoder in the sparsify or circuit-tracer format instead"
        )
    if tset.metadata.kind == "sae" and config.skip:
        raise InvalidArgumentError(
            "SAELens SAEs have no skip connection (W_skip): save an SAE with a skip "
            "connection in the circuit-tracer format instead"
        )
    out = Path(directory)
    check_no_other_layers(out, WEIGHTS_FILE, {f"layer_{layer}" for layer in tset.layers})
    with StagedFiles() as staged:
        for layer in tset.layers:
            _stage_layer(staged, out / f"layer_{layer}", tset, layer)
    return out


def _stage_layer(staged: StagedFiles, sub: Path, tset: TranscoderSet, layer: int) -> None:
    meta = tset.metadata
    module = tset.module(layer)
    arch = _ARCH_NAMES[(meta.kind, meta.config.arch)]
    if meta.config.skip:
        arch = arch.replace("transcoder", "skip_transcoder")
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": meta.config.d_in,
        "d_sae": meta.config.d_transcoder,
        "d_out": meta.config.d_out,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {
            "model_name": meta.model_id,
            "hook_name": f"blocks.{layer}.{meta.feature_input_hook}",
            "hook_name_out": f"blocks.{layer}.{meta.feature_output_hook}",
            "hook_layer": layer,
            "hook_head_index": None,
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "circuitscope": meta.to_dict(),
        },
    }
    if meta.config.arch == "topk":
        cfg["k"] = meta.config.k
    tensors = {
        "W_enc": module.W_enc.T,
        "W_dec": module.W_dec,
        "b_enc": module.b_enc,
        "b_dec": module.b_dec,
    }
    if module.threshold is not None:
        tensors["threshold"] = module.threshold
    if module.W_skip is not None:
        tensors["W_skip"] = module.W_skip
    staged.json(sub / CFG_FILE, cfg)
    staged.tensors(sub / WEIGHTS_FILE, tensors)


def is_saelens_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() or any(path.glob(f"*/{WEIGHTS_FILE}"))


def load_saelens(
    directory: str | Path, device: str | torch.device = "cpu", n_layers: int | None = None
) -> TranscoderSet:
    root = Path(directory)
    dirs = (
        [root]
        if (root / WEIGHTS_FILE).is_file()
        else sorted(p.parent for p in root.glob(f"*/{WEIGHTS_FILE}"))
    )
    if not dirs:
        raise NotFoundError(f"{root} holds no SAELens {WEIGHTS_FILE} (nor subdirectories with one)")
    modules: dict[int, Transcoder] = {}
    meta: SetMetadata | None = None
    model_name, hooks, kind = "unknown", ("", ""), "sae"
    config: TranscoderConfig | None = None
    for sub in dirs:
        cfg = read_json(sub / CFG_FILE)
        cfg_meta = cfg.get("metadata") or {}
        if "circuitscope" in cfg_meta:
            meta = read_metadata(cfg_meta["circuitscope"], sub / CFG_FILE)
            config = meta.config
        layer = _layer_of(sub, cfg, cfg_meta)
        path = sub / WEIGHTS_FILE
        tensors = read_tensors(path)
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        d_out = int(cfg.get("d_out") or d_in)
        if cfg.get("normalize_activations") not in (None, "none"):
            raise InvalidArgumentError(
                f"{sub / CFG_FILE}: normalize_activations={cfg['normalize_activations']!r} is "
                f"not supported: fold the scaling into the weights and set it to 'none'"
            )
        if config is None:
            k = int(cfg["k"]) if cfg.get("k") is not None else None
            arch, sparsity = infer_arch("threshold" in tensors, k)
            config = TranscoderConfig(
                arch=arch, d_in=d_in, d_out=d_out, d_transcoder=d_sae,
                sparsity=sparsity, skip="W_skip" in tensors,
            )  # fmt: skip
            arch_name = str(cfg.get("architecture", ""))
            kind = "transcoder" if "transcoder" in arch_name or d_in != d_out else "sae"
            model_name = str(cfg_meta.get("model_name", "unknown"))
            hooks = (
                foreign_input_hook(_hook_suffix(cfg_meta.get("hook_name")), sub / CFG_FILE),
                _hook_suffix(cfg_meta.get("hook_name_out") or cfg_meta.get("hook_name")),
            )
        W_enc = take(tensors, "W_enc", (d_in, d_sae), path).T
        b_enc = take(tensors, "b_enc", (d_sae,), path)
        b_dec = take(tensors, "b_dec", (d_out,), path)
        W_dec = take(tensors, "W_dec", (d_sae, d_out), path)
        if cfg.get("apply_b_dec_to_input"):
            b_enc = b_enc - W_enc @ b_dec
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = W_dec.norm(dim=1)
            W_enc, b_enc = W_enc * norms[:, None], b_enc * norms
            W_dec = W_dec / norms.clamp_min(torch.finfo(norms.dtype).tiny)[:, None]
        threshold = (
            take(tensors, "threshold", (d_sae,), path).clamp_min(0)
            if config.spec.has_threshold
            else None
        )
        modules[layer] = per_layer_module(
            config, W_enc, b_enc, W_dec, b_dec,
            take(tensors, "W_skip", (d_out, d_in), path) if config.skip else None,
            threshold,
        )  # fmt: skip
    assert config is not None
    if meta is not None:
        meta = some_layers(meta, sorted(modules), root)
    if meta is None:
        layers = sorted(modules)
        meta = SetMetadata(
            kind=kind, model_id=model_name, model_fingerprint="",
            n_layers=n_layers or layers[-1] + 1, d_model=config.d_in, layers=layers,
            config=config, feature_input_hook=hooks[0], feature_output_hook=hooks[1],
        )  # fmt: skip
    return TranscoderSet(meta, modules).to(device)


def _layer_of(sub: Path, cfg: dict, cfg_meta: dict) -> int:
    if cfg_meta.get("hook_layer") is not None:
        return int(cfg_meta["hook_layer"])
    for text in (str(cfg_meta.get("hook_name") or cfg.get("hook_name") or ""), sub.name):
        match = re.search(r"(\d+)", text)
        if match:
            return int(match.group(1))
    raise InvalidArgumentError(
        f"{sub / CFG_FILE}: cannot tell which layer this SAE belongs to: set metadata.hook_layer"
    )


def _hook_suffix(hook: object) -> str:
    text = str(hook or "")
    return re.sub(r"^blocks\.\d+\.", "", text)
