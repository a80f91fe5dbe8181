"""Circuit faithfulness of attribution graphs: the MIB protocol (DESIGN 5.5).

Mueller et al. 2025 ("MIB: A Mechanistic Interpretability Benchmark"). For a prompt, its
counterfactual (same length, different answer) and a task metric ``m`` (logit
difference correct minus counterfactual token by default):

- a circuit ``C`` keeps the top ``k`` fraction of the graph's edges, ranked by a scoring
  method; ``f(C) = (m(C) - m(empty)) / (m(N) - m(empty))``; over ``k`` = 0.1 ... 100 %,
  CPR = area under ``f(k)`` (higher is better), CMD = area under ``|1 - f(k)|``
  (0 is best), by the trapezoid rule over ``k`` in [0, 1].

Two ways to evaluate ``m(C)`` (``patching``):

- ``edge`` (default, MIB's edge patching): in the prompt's linearized replacement model
  every edge outside ``C`` carries its source's counterfactual contribution and every
  edge in ``C`` its clean one, features re-activating in layer order
  (:mod:`ingest.attribution.edge_patching`). ``m(N)`` is the clean metric and ``m(empty)``
  the linearized counterfactual one, so ``f`` is exactly 1 with all edges and 0 with none.
- ``node``: the circuit's nodes are the endpoints of its edges; the replacement model runs
  on the prompt with every other graph node (features, errors, embeddings) patched to its
  counterfactual value and the rest recomputed, attention free; ``m(N)``/``m(empty)`` are
  the model on the prompt and on the counterfactual. Lenient: a kept node's value reaches
  every later node through the residual stream and attention, not only its kept edges.

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

from ingest.attribution.edge_patching import LinearizedPatching, counterfactual_edge_deltas
from ingest.attribution.interventions import ReplacementRunner, ablation_inputs
from ingest.attribution.pruning import compute_influence, normalize_matrix
from ingest.attribution.replacement import ReplacementState, build_replacement, skip_fn
from ingest.attribution.result import AttributionResult
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
    delta = counterfactual_edge_deltas(adapter, transcoders, result, clean, counterfactual,
                                       batch_size)  # fmt: skip
    gradients = torch.ones(lay.n, dtype=torch.float64)
    feats = result.nodes[lay.features]
    gradients[: lay.n_features] = _feature_gradients(adapter, transcoders, clean, metric, feats)
    scores = (delta * gradients[:, None]).abs()
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
    patching: str = "edge",
) -> FaithfulnessCurve:
    """f(k) of the circuits made of the top-k fraction of edges by ``scores`` (n, n).

    ``patching="edge"``: edge-level patching in the linearized replacement model
    (:mod:`ingest.attribution.edge_patching`; needs a logit-difference graph, and
    ``metric`` must be that logit difference). ``"node"``: graph nodes outside the
    circuit take their counterfactual values in the replacement model, attention free.
    """
    if patching not in PATCHING:
        raise InvalidArgumentError(f"unknown patching {patching!r}: use one of {PATCHING}")
    clean = build_replacement(adapter, transcoders, input_ids)
    cf = build_replacement(adapter, transcoders, counterfactual_ids)
    runner = ReplacementRunner(adapter, transcoders, clean)
    linear = None
    if patching == "edge":
        linear = LinearizedPatching.build(adapter, transcoders, result, clean, cf)
        all_edges = result.adjacency != 0
        m_full = linear.metric(all_edges)
        m_empty = linear.metric(torch.zeros_like(all_edges))
    else:
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
        if linear is not None:
            keep_edges = torch.zeros(result.adjacency.shape, dtype=torch.bool)
            keep_edges[kept[:, 0], kept[:, 1]] = True
            m_c = linear.metric(keep_edges)
        else:
            keep_nodes = torch.zeros(result.layout.n, dtype=torch.bool)
            keep_nodes[kept[:, 0]] = True
            keep_nodes[kept[:, 1]] = True
            m_c = circuit_metric(runner, result, keep_nodes, cf, metric)
        values.append((m_c - m_empty) / (m_full - m_empty))
        counts.append(n_keep)
    return FaithfulnessCurve(method, list(fractions), values, counts, m_full, m_empty)


EDGE_SCORERS: tuple[str, ...] = ("attribution", "random", "eap")
PATCHING: tuple[str, ...] = ("edge", "node")


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
    patching: str = "edge",
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
