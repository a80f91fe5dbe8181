"""Circuit faithfulness of attribution graphs: the MIB protocol (DESIGN 5.5).

Mueller et al. 2025 ("MIB: A Mechanistic Interpretability Benchmark"). For a prompt, its
counterfactual (same length, different answer) and a task metric ``m`` (logit
difference correct minus counterfactual token by default):

- ``m(N)``: the full model on the prompt; ``m(empty)``: the counterfactual run;
- a circuit ``C`` keeps the top ``k`` fraction of the graph's edges, ranked by a scoring
  method; its nodes are the endpoints of those edges. ``m(C)`` runs the replacement model
  on the prompt with every graph node outside ``C`` (features, errors, embeddings)
  patched to its counterfactual value and everything else recomputed, attention free
  (:func:`ingest.attribution.interventions.ablation_inputs`). Patching every node gives
  exactly the counterfactual run, patching none the clean run; so ``f(100%) = 1``;
- ``f(C) = (m(C) - m(empty)) / (m(N) - m(empty))``; over ``k`` = 0.1 ... 100 %,
  CPR = area under ``f(k)`` (higher is better), CMD = area under ``|1 - f(k)|``
  (0 is best), by the trapezoid rule over ``k`` in [0, 1].

This is node-level patching of an edge-ranked circuit: an edge's source is patched only
when no kept edge touches it (MIB patches edges themselves).

Edge scoring methods over the same nodes and edges (:data:`EDGE_SCORERS`):

- ``attribution``: the pruning score ``A_hat[t, s] (influence_t + w_t)`` (DESIGN 5.3);
- ``random``: uniformly random scores (the baseline MIB reports at CPR ~0.25);
- ``eap``: edge attribution patching (Syed et al. 2023) in the graph's nodes:
  ``|g_t * dA[t, s]|``, where ``dA`` is the edge computed with the source's
  counterfactual-minus-clean vector through the prompt's frozen Jacobian, and ``g_t`` the
  gradient of the metric with respect to target ``t`` (1 for the metric node itself).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ingest.attribution.interventions import ReplacementRunner, ablation_inputs
from ingest.attribution.pruning import compute_influence, normalize_matrix
from ingest.attribution.replacement import ReplacementState, build_replacement, skip_fn
from ingest.attribution.result import AttributionResult
from ingest.attribution.rows import ActiveFeatures, Row, RowComputer
from ingest.errors import InvalidArgumentError
from ingest.graph import NodeKind
from ingest.models import ModelAdapter
from ingest.transcoders.transcoder_set import TranscoderSet

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
Metric = Callable[[Tensor], Tensor]  # logits (1, T, V) -> scalar


def logit_diff_metric(correct: int, counterfactual: int) -> Metric:
    """``logit[correct] - logit[counterfactual]`` at the last position."""
    return lambda logits: logits[0, -1, correct] - logits[0, -1, counterfactual]


def prob_diff_metric(correct: Sequence[int], wrong: Sequence[int]) -> Metric:
    """Summed probability of ``correct`` minus that of ``wrong`` (greater-than)."""
    c, w = list(correct), list(wrong)
    return lambda logits: (
        torch.softmax(logits[0, -1], -1)[c].sum() - torch.softmax(logits[0, -1], -1)[w].sum()
    )


@dataclass
class FaithfulnessCurve:
    """f(k) of one scoring method; ``n_edges[i]`` edges kept at ``fractions[i]``."""

    method: str
    fractions: list[float]
    faithfulness: list[float]
    n_edges: list[int]
    m_full: float
    m_empty: float
    cpr: float = field(init=False)
    cmd: float = field(init=False)

    def __post_init__(self) -> None:
        self.cpr, self.cmd = area_scores(self.fractions, self.faithfulness)


def area_scores(fractions: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """(CPR, CMD): trapezoid areas under f(k) and |1 - f(k)| over the k in [0, 1] given."""
    if len(fractions) != len(values) or len(fractions) < 2:
        raise InvalidArgumentError("give at least two (fraction, value) pairs of equal count")
    cpr = cmd = 0.0
    for i in range(1, len(fractions)):
        dk = fractions[i] - fractions[i - 1]
        if dk <= 0:
            raise InvalidArgumentError("fractions must increase")
        cpr += dk * (values[i] + values[i - 1]) / 2
        cmd += dk * (abs(1 - values[i]) + abs(1 - values[i - 1])) / 2
    return cpr, cmd


# ------------------------------------------------------------------ edge scores (n, n)


def attribution_scores(result: AttributionResult) -> Tensor:
    """The pruning edge score on the full graph: (n, n)."""
    adjacency = result.adjacency.double()
    w = result.weights()
    norm = normalize_matrix(adjacency)
    return norm * (compute_influence(norm, w) + w)[:, None]


def random_scores(result: AttributionResult, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(result.adjacency.shape, generator=gen, dtype=torch.float64)
    return scores * (result.adjacency != 0)


def eap_scores(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    result: AttributionResult,
    clean: ReplacementState,
    counterfactual: ReplacementState,
    metric: Metric,
    batch_size: int = 64,
) -> Tensor:
    """Edge attribution patching over the graph's nodes (see the module docstring)."""
    lay = result.layout
    feats = result.nodes[lay.features]
    layer = torch.tensor([int(n.layer or 0) for n in feats], dtype=torch.long)
    pos = torch.tensor([n.pos for n in feats], dtype=torch.long)
    index = torch.tensor([int(n.feature or 0) for n in feats], dtype=torch.long)
    delta = torch.stack(
        [
            counterfactual.activations[int(lyr)][p, i] - clean.activations[int(lyr)][p, i]
            for lyr, p, i in zip(layer.tolist(), pos.tolist(), index.tolist(), strict=True)
        ]
    ) if feats else torch.zeros(0, dtype=adapter.dtype)  # fmt: skip
    computer = RowComputer(
        adapter, transcoders, clean, ActiveFeatures(layer, pos, index, delta), batch_size
    )
    computer.token_vectors = (counterfactual.resid0 - clean.resid0)[0]
    computer.error_vectors = [
        (c - k)[0] for c, k in zip(counterfactual.errors, clean.errors, strict=True)
    ]
    rows = [
        Row(int(lyr), p, transcoders.encoder_vectors(int(lyr), torch.tensor([i]))[0].detach())
        for lyr, p, i in zip(layer.tolist(), pos.tolist(), index.tolist(), strict=True)
    ]
    T = clean.n_tokens
    for node in result.nodes[lay.logits]:
        if not (node.label or "").startswith("logit diff"):
            raise InvalidArgumentError(
                "EAP scores need a graph computed for a logit-difference target: attribute "
                "with target=LogitDiffTarget(correct, counterfactual)"
            )
        a, b = (int(x) for x in (node.label or "").removeprefix("logit diff ").split(" - "))
        rows.append(Row(None, T - 1, adapter.W_U[:, a] - adapter.W_U[:, b]))
    delta_rows = computer.rows(rows).double()  # (n_targets, n_sources)
    gradients = torch.ones(len(rows), dtype=torch.float64)
    gradients[: len(feats)] = _feature_gradients(adapter, transcoders, clean, metric, feats)
    scores = torch.zeros_like(result.adjacency, dtype=torch.float64)
    target_index = list(range(lay.n_features)) + list(range(lay.logits.start, lay.logits.stop))
    scores[target_index, : lay.n_sources] = (delta_rows * gradients[:, None]).abs()
    return scores * (result.adjacency != 0)


def _feature_gradients(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    state: ReplacementState,
    metric: Metric,
    feats: Sequence,
) -> Tensor:
    """d metric / d activation of each graph feature, attention free, errors fixed: (k,)."""
    leaves = {
        layer: torch.zeros_like(a).requires_grad_(True) for layer, a in state.activations.items()
    }
    acts: dict[int, Tensor] = {}

    def make(layer: int) -> Callable[[Tensor], Tensor]:
        skip = skip_fn(transcoders, layer)

        def replace(x: Tensor) -> Tensor:
            acts[layer] = transcoders.encode(layer, x[0]).to(x.dtype) + leaves[layer]
            out = transcoders.b_dec(layer).to(x.dtype).expand_as(x[0])
            for source in transcoders.layers:
                if source <= layer and layer in transcoders.targets(source):
                    out = out + acts[source] @ transcoders.W_dec(source, layer).to(x.dtype)
            if skip is not None:
                out = out + skip(x[0])
            return out[None] + state.errors[layer]

        return replace

    with torch.enable_grad():
        logits = adapter(resid0=state.resid0, mlp_replacements={
            layer: make(layer) for layer in transcoders.layers})  # fmt: skip
        layers = list(leaves)
        grads = torch.autograd.grad(metric(logits), [leaves[lyr] for lyr in layers],
                                    allow_unused=True)  # fmt: skip
    by_layer = {lyr: g for lyr, g in zip(layers, grads, strict=True)}
    out = torch.zeros(len(feats), dtype=torch.float64)
    for i, node in enumerate(feats):
        g = by_layer.get(int(node.layer))
        if g is not None:
            out[i] = float(g[node.pos, node.feature])
    return out


# ------------------------------------------------------------------ the protocol


def circuit_metric(
    runner: ReplacementRunner,
    result: AttributionResult,
    keep_nodes: Tensor,
    counterfactual: ReplacementState,
    metric: Metric,
) -> float:
    """m(C): graph nodes outside ``keep_nodes`` (n,) bool patched, attention free."""
    outside = [
        node
        for i, node in enumerate(result.nodes)
        if node.kind is not NodeKind.LOGIT and not bool(keep_nodes[i])
    ]
    over, errors, resid0 = ablation_inputs(runner.state, outside, "patch", counterfactual)
    out = runner.run(overrides=over, errors=errors, resid0=resid0, freeze_attention=False)
    return float(metric(out.logits))


def faithfulness_curve(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    result: AttributionResult,
    input_ids: Tensor,
    counterfactual_ids: Tensor,
    metric: Metric,
    scores: Tensor,
    *,
    method: str = "attribution",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> FaithfulnessCurve:
    """f(k) of the circuits made of the top-k fraction of edges by ``scores`` (n, n)."""
    clean = build_replacement(adapter, transcoders, input_ids)
    cf = build_replacement(adapter, transcoders, counterfactual_ids)
    runner = ReplacementRunner(adapter, transcoders, clean)
    with torch.no_grad():
        m_full = float(metric(adapter(input_ids)))
        m_empty = float(metric(adapter(counterfactual_ids)))
    if math.isclose(m_full, m_empty, abs_tol=1e-12):
        raise InvalidArgumentError(
            "the metric is the same on the prompt and its counterfactual: faithfulness is "
            "undefined; choose a counterfactual that changes the answer"
        )
    edges = torch.nonzero(result.adjacency != 0)  # (E, 2) target, source
    order = torch.argsort(scores[edges[:, 0], edges[:, 1]], descending=True, stable=True)
    values, counts = [], []
    for k in fractions:
        n_keep = min(len(order), max(1, math.ceil(k * len(order))))
        kept = edges[order[:n_keep]]
        keep_nodes = torch.zeros(result.layout.n, dtype=torch.bool)
        keep_nodes[kept[:, 0]] = True
        keep_nodes[kept[:, 1]] = True
        m_c = circuit_metric(runner, result, keep_nodes, cf, metric)
        values.append((m_c - m_empty) / (m_full - m_empty))
        counts.append(n_keep)
    return FaithfulnessCurve(method, list(fractions), values, counts, m_full, m_empty)


EDGE_SCORERS: tuple[str, ...] = ("attribution", "random", "eap")


def compare_methods(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    result: AttributionResult,
    input_ids: Tensor,
    counterfactual_ids: Tensor,
    metric: Metric,
    *,
    methods: Sequence[str] = EDGE_SCORERS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[FaithfulnessCurve]:
    """One f(k) curve per edge-scoring method over the same graph."""
    curves = []
    for method in methods:
        if method == "attribution":
            scores = attribution_scores(result)
        elif method == "random":
            scores = random_scores(result, seed)
        elif method == "eap":
            clean = build_replacement(adapter, transcoders, input_ids)
            cf = build_replacement(adapter, transcoders, counterfactual_ids)
            scores = eap_scores(adapter, transcoders, result, clean, cf, metric)
        else:
            raise InvalidArgumentError(f"unknown method {method!r}: use one of {EDGE_SCORERS}")
        curves.append(
            faithfulness_curve(
                adapter,
                transcoders,
                result,
                input_ids,
                counterfactual_ids,
                metric,
                scores,
                method=method,
                fractions=fractions,
            )
        )
    return curves


def plot_curves(curves: Sequence[FaithfulnessCurve], path: str | Path, title: str = "") -> Path:
    """Plot f(k) of each curve to a PNG at ``path`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for c in curves:
            ax.plot([100 * k for k in c.fractions], c.faithfulness, marker="o",
                    label=f"{c.method} (CPR {c.cpr:.2f}, CMD {c.cmd:.2f})")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("edges kept (%)")
        ax.set_ylabel("faithfulness f(k)")
        ax.set_title(title or "circuit faithfulness")
        ax.legend()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out
