"""The key of a graph: what makes two ingest runs compute the same graph.

A graph's id hashes the model (its weights fingerprint), the transcoder set, the
prompt with everything that changes its targets, and the attribution and pruning
settings. Rerunning the worker on the same file therefore finds its finished graphs
by id and skips them; changing any setting makes new graphs instead of mixing them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ingest.worker.prompts import PromptSpec


@dataclass(frozen=True)
class GraphSettings:
    """Settings that change a computed or pruned graph (batch size and device do not)."""

    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_feature_nodes: int | None = None
    desired_logit_prob: float = 0.95
    max_n_logits: int = 10


def graph_key(
    model_fingerprint: str, set_id: str, spec: PromptSpec, settings: GraphSettings
) -> str:
    """A 32-hex-digit id, stable across runs and machines."""
    payload = {
        "model": model_fingerprint,
        "transcoders": set_id,
        "prompt": spec.prompt,
        "correct": spec.correct,
        "incorrect": spec.incorrect,
        "settings": asdict(settings),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
