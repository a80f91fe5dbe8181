"""The compact graph artifact: a directory with ``graph.safetensors`` and ``graph.json``.

``graph.safetensors`` holds the dense adjacency ``(n, n)`` (rows targets), the target
logits' probabilities ``(n_logits,)`` and the node table as parallel tensors:
``node_kind`` int8 (0 feature, 1 error, 2 token, 3 logit), ``node_layer``,
``node_pos``, ``node_feature``, ``node_token_id`` int64 (-1 for "none"), and
``node_activation``, ``node_influence``, ``node_token_prob`` float64 (NaN for "none").
``graph.json`` holds the format version, the layout counts, the graph metadata, the
computation stats, and the node ids, token strings and labels.

Loading gives back an equal :class:`~ingest.attribution.result.AttributionResult`. The
directory is written atomically: everything goes to a temporary sibling directory,
which replaces the destination with ``os.replace`` only once complete, so an error
never leaves a partial artifact. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ingest.attribution.layout import NodeLayout
from ingest.attribution.result import AttributionResult
from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.graph import GraphMetadata, Node, NodeKind
from ingest.paths import save_tensors

FORMAT_VERSION = 1
TENSORS_FILE = "graph.safetensors"
JSON_FILE = "graph.json"
_KINDS = [NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TOKEN, NodeKind.LOGIT]


def _int_or_missing(value: int | None) -> int:
    return -1 if value is None else int(value)


def _float_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _node_tensors(nodes: list[Node]) -> dict[str, torch.Tensor]:
    return {
        "node_kind": torch.tensor([_KINDS.index(n.kind) for n in nodes], dtype=torch.int8),
        "node_layer": torch.tensor([_int_or_missing(n.layer) for n in nodes], dtype=torch.int64),
        "node_pos": torch.tensor([n.pos for n in nodes], dtype=torch.int64),
        "node_feature": torch.tensor(
            [_int_or_missing(n.feature) for n in nodes], dtype=torch.int64
        ),
        "node_token_id": torch.tensor(
            [_int_or_missing(n.token_id) for n in nodes], dtype=torch.int64
        ),
        "node_activation": torch.tensor(
            [_float_or_nan(n.activation) for n in nodes], dtype=torch.float64
        ),
        "node_influence": torch.tensor(
            [_float_or_nan(n.influence) for n in nodes], dtype=torch.float64
        ),
        "node_token_prob": torch.tensor(
            [_float_or_nan(n.token_prob) for n in nodes], dtype=torch.float64
        ),
    }


def _nodes_from(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> list[Node]:
    def opt_int(v: int) -> int | None:
        return None if v < 0 else v

    def opt_float(v: float) -> float | None:
        return None if math.isnan(v) else v

    cols = {k: v.tolist() for k, v in tensors.items() if k.startswith("node_")}
    return [
        Node(
            node_id=doc["node_ids"][i],
            kind=_KINDS[cols["node_kind"][i]],
            layer=opt_int(cols["node_layer"][i]),
            pos=cols["node_pos"][i],
            feature=opt_int(cols["node_feature"][i]),
            token_id=opt_int(cols["node_token_id"][i]),
            token=doc["node_tokens"][i],
            activation=opt_float(cols["node_activation"][i]),
            influence=opt_float(cols["node_influence"][i]),
            token_prob=opt_float(cols["node_token_prob"][i]),
            label=doc["node_labels"][i],
        )
        for i in range(len(doc["node_ids"]))
    ]


def write_atomic_dir(
    directory: str | os.PathLike[str],
    files: dict[str, bytes | None],
    writers: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Create ``directory`` holding ``files`` (name -> bytes) and whatever ``writers``
    (name -> callable(path)) write, atomically. Returns the final path."""
    final = Path(directory)
    if final.exists() and not overwrite:
        raise InvalidArgumentError(
            f"{final} already exists: choose another output directory or pass overwrite"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    # Named here rather than by tempfile.mkdtemp, whose 0700 would outlive the rename:
    # the artifact gets the permissions of any directory this process creates.
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        for name, data in files.items():
            if data is not None:
                (tmp / name).write_bytes(data)
        for name, writer in (writers or {}).items():
            writer(tmp / name)
        if final.exists():
            old = final.parent / f".{final.name}.{uuid.uuid4().hex}.old"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # the previous artifact back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_artifact(
    result: AttributionResult, directory: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``result`` to ``directory`` (created atomically; see the module docstring).

    Records the directory's ``file:`` URI as ``artifact_uri``, in the artifact and, once
    written, in ``result.metadata``: graphs made from ``result`` afterwards
    (:meth:`AttributionResult.to_graph`) point at their artifact, so the server can
    prune them again.
    """
    metadata = dataclasses.replace(result.metadata, artifact_uri=Path(directory).resolve().as_uri())
    tensors = {
        "adjacency": result.adjacency.detach().cpu().contiguous(),
        "logit_probs": result.logit_probs.detach().cpu().contiguous(),
        **_node_tensors(result.nodes),
    }
    if result.node_weights is not None:
        tensors["node_weights"] = result.node_weights.detach().cpu().contiguous()
    doc = {
        "format": "circuitscope-attribution-graph",
        "format_version": FORMAT_VERSION,
        "layout": result.layout.to_dict(),
        "n_layers": result.n_layers,
        "metadata": dataclasses.asdict(metadata),
        "stats": result.stats,
        "node_ids": [n.node_id for n in result.nodes],
        "node_tokens": [n.token for n in result.nodes],
        "node_labels": [n.label for n in result.nodes],
    }
    try:
        payload = json.dumps(doc, indent=1, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"graph metadata or stats are not JSON-serializable ({exc}): keep them to "
            "strings, finite numbers, lists and dicts"
        ) from exc
    written = write_atomic_dir(
        directory,
        {JSON_FILE: payload},
        {TENSORS_FILE: lambda path: save_tensors(tensors, path)},
        overwrite=overwrite,
    )
    result.metadata = metadata
    return written


def load_artifact(directory: str | os.PathLike[str]) -> AttributionResult:
    """Read an artifact written by :func:`save_artifact`."""
    root = Path(directory)
    json_path, tensor_path = root / JSON_FILE, root / TENSORS_FILE
    if not json_path.is_file() or not tensor_path.is_file():
        raise NotFoundError(
            f"{root} is not an attribution artifact (needs {JSON_FILE} and {TENSORS_FILE}): "
            "write one with save_artifact(result, DIR) or 'circuitscope attribute --out DIR'"
        )
    try:
        doc = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{json_path} is not valid JSON: {exc}") from exc
    if doc.get("format_version") != FORMAT_VERSION:
        raise InvalidArgumentError(
            f"{root} has artifact format version {doc.get('format_version')!r}; this version "
            f"reads {FORMAT_VERSION}: recompute the graph"
        )
    tensors = load_file(str(tensor_path))
    layout = NodeLayout(**doc["layout"])
    n = layout.n
    for name, value in tensors.items():
        expected: tuple[int, ...] | None = (n, n) if name == "adjacency" else None
        if name == "logit_probs":
            expected = (layout.n_logits,)
        elif name.startswith("node_"):
            expected = (n,)
        if expected is not None and tuple(value.shape) != expected:
            raise InvalidArgumentError(
                f"{tensor_path}: tensor {name!r} has shape {tuple(value.shape)}, expected "
                f"{expected}: the artifact is damaged, recompute it"
            )
    return AttributionResult(
        metadata=GraphMetadata(**doc["metadata"]),
        layout=layout,
        nodes=_nodes_from(tensors, doc),
        adjacency=tensors["adjacency"],
        logit_probs=tensors["logit_probs"],
        n_layers=int(doc["n_layers"]),
        stats=doc["stats"],
        node_weights=tensors.get("node_weights"),
    )
