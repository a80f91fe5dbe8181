"""Circuit faithfulness of attribution graphs: the MIB protocol (DESIGN 5.5).

Mueller et al. 2025 ("MIB: A Mechanistic Interpretability Benchmark", circuit
localization track). For a prompt, its counterfactual (same length, different answer)
and a task metric ``m`` (logit difference correct minus counterfactual token; probability
difference for greater-than, Hanna et al. 2023):

- a circuit ``C_k`` keeps the top ``floor(k * E)`` of the graph's ``E`` edges ranked by a
  scoring method (MIB's ``int(pct * n_edges)``), for k = 0.1, 0.2, 0.5, 1, 2, 5, 10, 20,
  50, 100 %; ``f(C) = (m(C) - m(empty)) / (m(N) - m(empty))``, not clipped;
- CPR = area under ``f(k)``, CMD = area under ``|1 - f(k)|``, both by the trapezoid rule
  with ``k`` itself (the fraction, linear, from 0.001 to 1) on the x-axis and no
  normalization (:func:`area_scores`). This is MIB's ``evaluate_area_under_curve`` with
  its default ``log_scale=False`` (``MIB_circuit_track/evaluation.py``; ``run_evaluation.py``
  never sets it). The interval ``[0.2, 1]`` holds 80 % of the x-range, so a curve that is
  1 from k = 20 % on already scores CPR >= 0.8: random circuits score about 0.25 / 0.75
  (CPR / CMD) and the best reported (EAP-IG, IOI on GPT-2) CMD 0.03, CPR 1.8 (CPR is
  unbounded above: circuits can overshoot the full model). MIB takes CPR from circuits
  ranked by the signed score and CMD from circuits ranked by its absolute value
  (``print_results.py``: ``abs-False`` for CPR, ``abs-True`` for CMD): here
  ``eap_signed`` and ``eap``. ``log_k=True`` integrates over ``ln k`` normalized to
  ``[0, 1]`` instead, which weighs every decade of circuit sizes alike; it is not MIB's
  headline number and is reported beside it (``cpr_log_k``, ``cmd_log_k``).

Two ways to evaluate ``m(C)`` (``patching``):

- ``edge`` (default, MIB's edge patching): in the prompt's linearized replacement model
  every edge outside ``C`` carries its source's counterfactual contribution and every
  edge in ``C`` its clean one, features re-activating in layer order; the target node's
  edges carry whole vectors into the final residual, so ``m`` is any metric of the
  logits (:mod:`ingest.attribution.edge_patching`). ``m(N)`` is the clean metric and
  ``m(empty)`` the linearized counterfactual one, so ``f`` is exactly 1 with all edges
  and 0 with none.
- ``node``: MIB's node patching on the graph's nodes: circuits are the top-k fraction of
  the graph's features, errors and token embeddings, ranked by the summed scores of
  their outgoing edges; circuit nodes stay clean (features recomputed from their
  inputs), every other graph node takes its counterfactual value; attention free (the
  real model's patterns and norms). ``m(N)``/``m(empty)`` are the model on the prompt and
  on the counterfactual. Circuits were once the endpoints of the top-k edges: that was
  lenient, as one kept edge out of the changed token embedding keeps the token clean,
  and the clean token alone carries the answer to every later position through attention
  (on IOI, random 0.2 % of edges gave f = 1).

Edge scoring methods over the same nodes and edges (:data:`EDGE_SCORERS`):

- ``attribution``: the pruning score ``A_hat[t, s] (influence_t + w_t)`` (DESIGN 5.3);
- ``weight``: ``|A[t, s]|`` alone, blind to the counterfactual and to influence;
- ``random``: uniformly random scores (MIB's baseline);
- ``eap``: edge attribution patching (Syed et al. 2023) in the graph's nodes:
  ``|g_t . dA[t, s]|``, where ``dA`` is the edge computed with the source's
  counterfactual-minus-clean vector through the prompt's frozen Jacobian, and ``g_t`` the
  gradient of the metric with respect to target ``t`` (a feature's activation, attention
  free; for the target node the gradient with respect to the final residual, ``dA``
  being the vector the source adds there);
- ``eap_signed``: ``-g_t . dA[t, s]``, the first-order change of ``m(C) - m(empty)``
  when the edge is kept (MIB's ranking for CPR).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ingest.attribution.edge_patching import LinearizedPatching, Metric
from ingest.attribution.interventions import ReplacementRunner, ablation_inputs
from ingest.attribution.pruning import compute_influence, normalize_matrix
from ingest.attribution.replacement import (
    ReplacementState,
    build_replacement,
    encode_held,
    skip_fn,
)
from ingest.attribution.result import AttributionResult
from ingest.errors import InvalidArgumentError
from ingest.graph import NodeKind
from ingest.models import ModelAdapter
from ingest.transcoders.transcoder_set import TranscoderSet

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
EDGE_SCORERS: tuple[str, ...] = ("attribution", "weight", "random", "eap", "eap_signed")
PATCHING: tuple[str, ...] = ("edge", "node")


def logit_diff_metric(correct: int, counterfactual: int) -> Metric:
    """``logit[correct] - logit[counterfactual]`` at the last position."""
    return lambda logits: logits[0, -1, correct] - logits[0, -1, counterfactual]


def prob_diff_metric(correct: Sequence[int], wrong: Sequence[int]) -> Metric:
    """Summed probability of ``correct`` minus that of ``wrong`` (greater-than)."""
    c, w = list(correct), list(wrong)

    def metric(logits: Tensor) -> Tensor:
        probs = torch.softmax(logits[0, -1], -1)
        return probs[c].sum() - probs[w].sum()

    return metric


def kept_edge_count(n_edges: int, fraction: float) -> int:
    """MIB's circuit size: ``int(fraction * n_edges)`` (0 when the fraction is too small)."""
    # The epsilon keeps 0.29 * 100 at 29 where binary floating point gives 28.999...
    return min(n_edges, int(fraction * n_edges + 1e-9))


def area_scores(
    fractions: Sequence[float], values: Sequence[float], *, log_k: bool = False
) -> tuple[float, float]:
    """(CPR, CMD): trapezoid areas under f(k) and |1 - f(k)| (see the module docstring).

    ``log_k=False`` (MIB): x = k as given. ``log_k=True``: x = ln k scaled so that the
    given range of k spans 1.
    """
    if len(fractions) != len(values) or len(fractions) < 2:
        raise InvalidArgumentError("give at least two (fraction, value) pairs of equal count")
    if log_k and fractions[0] <= 0:
        raise InvalidArgumentError("log_k needs fractions above 0")
    xs = [math.log(k) for k in fractions] if log_k else list(fractions)
    span = (xs[-1] - xs[0]) if log_k else 1.0
    cpr = cmd = 0.0
    for i in range(1, len(xs)):
        dx = xs[i] - xs[i - 1]
        if dx <= 0:
            raise InvalidArgumentError("fractions must increase")
        cpr += dx * (values[i] + values[i - 1]) / 2
        cmd += dx * (abs(1 - values[i]) + abs(1 - values[i - 1])) / 2
    return cpr / span, cmd / span


#: f's denominator under edge patching, as a fraction of the real counterfactual's
#: change of the metric, below which a curve carries a warning.
SMALL_GAP = 0.25


@dataclass
class FaithfulnessCurve:
    """f(k) of one scoring method; ``n_edges[i]`` edges kept at ``fractions[i]``.
    ``m_counterfactual`` is the metric of the real run on the counterfactual prompt
    (attention free), which edge patching's linearized ``m_empty`` approximates."""

    method: str
    fractions: list[float]
    faithfulness: list[float]
    n_edges: list[int]
    m_full: float
    m_empty: float
    m_counterfactual: float | None = None
    cpr: float = field(init=False)
    cmd: float = field(init=False)
    cpr_log_k: float = field(init=False)
    cmd_log_k: float = field(init=False)

    def __post_init__(self) -> None:
        self.cpr, self.cmd = area_scores(self.fractions, self.faithfulness)
        self.cpr_log_k, self.cmd_log_k = area_scores(self.fractions, self.faithfulness, log_k=True)

    def warning(self) -> str | None:
        """Why f may not mean much here, or None: the linearized counterfactual (frozen
        attention) moves the metric by under :data:`SMALL_GAP` of what the real
        counterfactual run moves it, or the other way, so f divides by a small or
        unrepresentative gap."""
        if self.m_counterfactual is None:
            return None
        linear, real = self.m_full - self.m_empty, self.m_full - self.m_counterfactual
        if linear * real > 0 and abs(linear) >= SMALL_GAP * abs(real):
            return None
        return (
            f"the linearized counterfactual moves the metric by {linear:.3g} and the real "
            f"counterfactual run by {real:.3g}: with attention frozen the counterfactual "
            "barely acts, so f(k) divides by a small gap; node patching "
            "(patching='node') uses real runs"
        )


# ------------------------------------------------------------------ the protocol


@dataclass
class FaithfulnessSetup:
    """One graph, prompt, counterfactual and metric, ready to evaluate circuits.

    ``m_full`` and ``m_empty`` follow from the patching (module docstring). The prompt's
    linearized replacement model (:attr:`linear`, backward passes over the graph's rows)
    is built on first use: edge patching and EAP need it, node patching with the other
    rankings does not. :meth:`with_patching` evaluates the same pair under the other
    patching without rebuilding anything.
    """

    adapter: ModelAdapter
    transcoders: TranscoderSet
    result: AttributionResult
    metric: Metric
    patching: str
    clean: ReplacementState
    counterfactual: ReplacementState
    _linear: LinearizedPatching | None = field(default=None, repr=False)
    m_full: float = field(init=False)
    m_empty: float = field(init=False)
    #: the metric of the real run on the counterfactual prompt
    m_counterfactual: float = field(init=False)

    def __post_init__(self) -> None:
        if self.patching not in PATCHING:
            raise InvalidArgumentError(f"unknown patching {self.patching!r}: use one of {PATCHING}")
        self.result.check_prompt(self.clean.input_ids)
        self.m_counterfactual = float(self.metric(self.counterfactual.logits))
        if self.patching == "edge":
            all_edges = self.result.adjacency != 0
            self.m_full = self.linear.metric(all_edges, self.metric)
            self.m_empty = self.linear.metric(torch.zeros_like(all_edges), self.metric)
        else:  # the real model on the prompt and on the counterfactual
            self.m_full = float(self.metric(self.clean.logits))
            self.m_empty = self.m_counterfactual
        if math.isclose(self.m_full, self.m_empty, rel_tol=1e-9, abs_tol=1e-12):
            raise InvalidArgumentError(
                "the metric is the same on the prompt and its counterfactual: faithfulness "
                "is undefined; choose a counterfactual that changes the answer"
            )

    @classmethod
    def build(
        cls,
        adapter: ModelAdapter,
        transcoders: TranscoderSet,
        result: AttributionResult,
        input_ids: Tensor,
        counterfactual_ids: Tensor,
        metric: Metric,
        patching: str = "edge",
    ) -> FaithfulnessSetup:
        """Edge patching and EAP need a graph computed for a ``LogitDiffTarget``."""
        if patching not in PATCHING:
            raise InvalidArgumentError(f"unknown patching {patching!r}: use one of {PATCHING}")
        clean = build_replacement(adapter, transcoders, input_ids)
        cf = build_replacement(adapter, transcoders, counterfactual_ids)
        return cls(adapter, transcoders, result, metric, patching, clean, cf)

    @property
    def linear(self) -> LinearizedPatching:
        """The prompt's linearized replacement model, built on first use."""
        if self._linear is None:
            self._linear = LinearizedPatching.build(
                self.adapter, self.transcoders, self.result, self.clean, self.counterfactual
            )
        return self._linear

    def with_patching(self, patching: str) -> FaithfulnessSetup:
        """The same prompt pair under ``patching``, sharing the replacement states and
        the linearization (when built)."""
        return FaithfulnessSetup(
            self.adapter,
            self.transcoders,
            self.result,
            self.metric,
            patching,
            self.clean,
            self.counterfactual,
            self._linear,
        )

    def edge_metric(self, kept: Tensor) -> float:
        """m(C), edge patching, for the graph edges ``kept`` (K, 2): (target, source)."""
        keep = torch.zeros(self.result.adjacency.shape, dtype=torch.bool)
        keep[kept[:, 0], kept[:, 1]] = True
        return self.linear.metric(keep, self.metric)

    def node_metric(self, keep_nodes: Tensor) -> float:
        """m(C), node patching, for the graph nodes ``keep_nodes`` (n,) bool."""
        runner = ReplacementRunner(self.adapter, self.transcoders, self.clean)
        return circuit_metric(runner, self.result, keep_nodes, self.counterfactual, self.metric)

    def faithfulness(self, m: float) -> float:
        return (m - self.m_empty) / (self.m_full - self.m_empty)


def circuit_metric(
    runner: ReplacementRunner,
    result: AttributionResult,
    keep_nodes: Tensor,
    counterfactual: ReplacementState,
    metric: Metric,
) -> float:
    """Node patching: graph nodes outside ``keep_nodes`` (n,) bool patched, attention free."""
    outside = [
        node
        for i, node in enumerate(result.nodes)
        if node.kind is not NodeKind.LOGIT and not bool(keep_nodes[i])
    ]
    over, errors, resid0 = ablation_inputs(runner.state, outside, "patch", counterfactual)
    out = runner.run(overrides=over, errors=errors, resid0=resid0, freeze_attention=False)
    return float(metric(out.logits))


def faithfulness_curve(
    setup: FaithfulnessSetup,
    scores: Tensor,
    *,
    method: str = "attribution",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> FaithfulnessCurve:
    """f(k) of the top-k fraction of graph edges (edge patching) or nodes (node patching).

    ``scores`` (n, n) rank the graph's non-zero edges by descending score (ties in the
    graph's edge order). Node patching ranks the graph's features, errors and tokens by
    ``scores`` (n,) when given per node, else by the summed scores of their outgoing
    edges, as MIB's node level ranks nodes: a circuit of edges would keep a node as soon
    as one of its edges is kept. ``n_edges`` then counts the kept nodes.
    """
    result = setup.result
    values, counts = [], []
    if setup.patching == "edge":
        edges = torch.nonzero(result.adjacency != 0)  # (E, 2) target, source
        order = torch.argsort(scores[edges[:, 0], edges[:, 1]], descending=True, stable=True)
        for k in fractions:
            n_keep = kept_edge_count(len(order), k)
            values.append(setup.faithfulness(setup.edge_metric(edges[order[:n_keep]])))
            counts.append(n_keep)
    else:
        n_sources = result.layout.n_sources
        if scores.dim() == 1:
            node_scores = scores[:n_sources]
        else:
            node_scores = (scores * (result.adjacency != 0)).sum(dim=0)[:n_sources]
        order = torch.argsort(node_scores, descending=True, stable=True)
        for k in fractions:
            n_keep = kept_edge_count(n_sources, k)
            keep = torch.zeros(result.layout.n, dtype=torch.bool)
            keep[order[:n_keep]] = True
            values.append(setup.faithfulness(setup.node_metric(keep)))
            counts.append(n_keep)
    return FaithfulnessCurve(
        method,
        list(fractions),
        values,
        counts,
        setup.m_full,
        setup.m_empty,
        setup.m_counterfactual,
    )


# ------------------------------------------------------------------ edge scores (n, n)


def attribution_scores(result: AttributionResult) -> Tensor:
    """The pruning edge score on the full graph: (n, n)."""
    w = result.weights().double()
    norm = normalize_matrix(result.adjacency, torch.float64)
    return norm.mul_((compute_influence(norm, w) + w)[:, None])


def weight_scores(result: AttributionResult) -> Tensor:
    """``|A|``: the edge's own size, (n, n)."""
    return result.adjacency.double().abs()


def random_scores(result: AttributionResult, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(result.adjacency.shape, generator=gen, dtype=torch.float64)
    return scores * (result.adjacency != 0)


def eap_scores(setup: FaithfulnessSetup, *, signed: bool = False) -> Tensor:
    """Edge attribution patching over the graph's nodes (see the module docstring): (n, n)."""
    result, linear = setup.result, setup.linear
    lay = result.layout
    gradients = torch.zeros(lay.n, dtype=torch.float64)
    feats = result.nodes[lay.features]
    gradients[: lay.n_features] = _feature_gradients(
        setup.adapter, setup.transcoders, setup.clean, setup.metric, feats
    )
    effect = linear.delta * gradients[:, None]  # feature rows
    effect[lay.logits.start] = _output_gradient(linear, setup.metric) @ linear.out_delta
    scores = -effect if signed else effect.abs()
    return scores * (result.adjacency != 0)


def _output_gradient(linear: LinearizedPatching, metric: Metric) -> Tensor:
    """d metric / d final residual at the last position, at the clean logits: (d,)."""
    resid = linear.out_clean.sum(dim=1) + linear.out_bias
    resid = resid.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = resid @ linear.W_U
        if linear.b_U is not None:
            logits = logits + linear.b_U
        (grad,) = torch.autograd.grad(metric(logits[None, None]), [resid])
    return grad


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
            acts[layer] = encode_held(transcoders, state, layer, x[0]) + leaves[layer]
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
        g = by_layer.get(int(node.layer or 0))
        if g is not None:
            out[i] = float(g[node.pos, node.feature])
    return out


def method_scores(setup: FaithfulnessSetup, method: str, seed: int = 0) -> Tensor:
    """The (n, n) edge scores of one of :data:`EDGE_SCORERS`; for ``random`` under node
    patching, (n,) uniform node scores (summed random edge scores would rank by degree)."""
    if method == "random" and setup.patching == "node":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(setup.result.layout.n, generator=gen, dtype=torch.float64)
    if method == "attribution":
        return attribution_scores(setup.result)
    if method == "weight":
        return weight_scores(setup.result)
    if method == "random":
        return random_scores(setup.result, seed)
    if method == "eap":
        return eap_scores(setup)
    if method == "eap_signed":
        return eap_scores(setup, signed=True)
    raise InvalidArgumentError(f"unknown method {method!r}: use one of {EDGE_SCORERS}")


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
    """One f(k) curve per edge-scoring method over the same graph and patching."""
    for method in methods:
        if method not in EDGE_SCORERS:
            raise InvalidArgumentError(f"unknown method {method!r}: use one of {EDGE_SCORERS}")
    setup = FaithfulnessSetup.build(adapter, transcoders, result, input_ids,
                                    counterfactual_ids, metric, patching)  # fmt: skip
    return [
        faithfulness_curve(
            setup, method_scores(setup, method, seed), method=method, fractions=fractions
        )
        for method in methods
    ]


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
        ax.legend(fontsize=7)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out
