"""Edge-level counterfactual patching in the linearized replacement model.

MIB (Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark", circuit
track) evaluates a circuit by patching *edges*: each node's input takes the clean
contribution of its in-circuit edges and the counterfactual contribution of the others.
In the prompt's frozen local replacement model, the contribution of source ``u`` to
target ``v`` is exactly the graph edge ``A[v, u] = x_u^T J e_v`` (``x_u`` the vector
``u`` writes); with ``u``'s counterfactual vector it is ``A_cf[v, u] = A[v, u] +
dA[v, u]``, ``dA`` computed by the same batched backward passes
(:func:`counterfactual_edge_deltas`). So, with ``b_v = pre_v - sum_u A[v, u]`` (row
completeness), a circuit ``C`` of edges gives, in topological (layer) order,

    pre_v(C) = b_v + sum_{u->v in C} r_u A[v, u] + sum_{u->v not in C} A_cf[v, u]
    a_v(C)   = max(pre_v(C), 0),   r_v = a_v(C) / a_v(clean)

(tokens and errors keep ``r = 1``).

The graph's target node (a logit difference) stands for the final normalized residual
at the last position: its incoming "edge" from ``u`` is the whole vector ``R[:, u]``
that ``u`` adds there (``d_model`` rows read by the basis vectors), of which the graph
edge is the projection on ``W_U[:, correct] - W_U[:, counterfactual]``. The circuit's
residual ``b + sum_{kept} r_u R[:, u] + sum_{not kept} (R + dR)[:, u]`` is unembedded,
so any metric of the logits (logit difference, probability difference) is evaluated
exactly in the linearized model.

All edges in ``C`` reproduce the clean logits exactly; none give the linearized
counterfactual logits. Where the linearization is exact (attention patterns and norm
denominators frozen, ReLU features, features inactive on the prompt held at zero) this
equals running the replacement model with the same patching
(``tests/ingest/attribution/test_edge_patching.py``). It differs from the real
counterfactual run where the counterfactual changes attention patterns, norm scales or
switches on features inactive on the prompt (not graph nodes, so they stay off), and
with TopK transcoders (the top-k selection is not re-applied).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ingest.attribution.replacement import ReplacementState
from ingest.attribution.result import AttributionResult
from ingest.attribution.rows import ActiveFeatures, Row, RowComputer
from ingest.errors import InvalidArgumentError
from ingest.models import ModelAdapter
from ingest.transcoders.transcoder_set import TranscoderSet

Metric = Callable[[Tensor], Tensor]  # logits (1, T, V) -> scalar


def logit_diff_tokens(result: AttributionResult) -> tuple[int, int]:
    """(correct, counterfactual) of a graph computed for a logit-difference target."""
    targets = result.nodes[result.layout.logits]
    label = targets[0].label if len(targets) == 1 else None
    if not label or not label.startswith("logit diff "):
        raise InvalidArgumentError(
            "this needs a graph computed for a logit-difference target: attribute with "
            "target=LogitDiffTarget(correct, counterfactual)"
        )
    a, b = (int(x) for x in label.removeprefix("logit diff ").split(" - "))
    return a, b


@dataclass(frozen=True)
class EdgeDeltas:
    """Counterfactual-minus-clean edges, float64.

    ``features``: (n_features, n_sources) into the graph's feature rows; ``output``:
    (d_model, n_sources) into the final normalized residual at the last position.
    """

    features: Tensor
    output: Tensor


def _feature_tensors(result: AttributionResult) -> tuple[Tensor, Tensor, Tensor]:
    feats = result.nodes[result.layout.features]
    layer = torch.tensor([int(n.layer or 0) for n in feats], dtype=torch.long)
    pos = torch.tensor([n.pos for n in feats], dtype=torch.long)
    index = torch.tensor([int(n.feature or 0) for n in feats], dtype=torch.long)
    return layer, pos, index


def _rows(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    result: AttributionResult,
    state: ReplacementState,
) -> list[Row]:
    """The graph's feature rows, then ``d_model`` basis rows at the final residual."""
    layer, pos, index = _feature_tensors(result)
    rows = [
        Row(lyr, p, transcoders.encoder_vectors(lyr, torch.tensor([i]))[0].detach())
        for lyr, p, i in zip(layer.tolist(), pos.tolist(), index.tolist(), strict=True)
    ]
    eye = torch.eye(adapter.d_model, dtype=adapter.dtype, device=adapter.device)
    rows += [Row(None, state.n_tokens - 1, eye[j]) for j in range(adapter.d_model)]
    return rows


def _check_lengths(clean: ReplacementState, counterfactual: ReplacementState) -> None:
    if counterfactual.n_tokens != clean.n_tokens:
        raise InvalidArgumentError(
            f"the counterfactual prompt has {counterfactual.n_tokens} tokens, the prompt "
            f"{clean.n_tokens}: patching needs prompts of the same length"
        )


def counterfactual_edge_deltas(
    adapter: ModelAdapter,
    transcoders: TranscoderSet,
    result: AttributionResult,
    clean: ReplacementState,
    counterfactual: ReplacementState,
    batch_size: int = 64,
) -> EdgeDeltas:
    """``dA[v, u] = (x_u^cf - x_u)^T J e_v`` through the clean frozen model."""
    _check_lengths(clean, counterfactual)
    layer, pos, index = _feature_tensors(result)
    delta = torch.tensor(
        [
            float(counterfactual.activations[lyr][p, i] - clean.activations[lyr][p, i])
            for lyr, p, i in zip(layer.tolist(), pos.tolist(), index.tolist(), strict=True)
        ],
        dtype=adapter.dtype,
        device=adapter.device,
    )
    computer = RowComputer(
        adapter, transcoders, clean, ActiveFeatures(layer, pos, index, delta), batch_size
    )
    computer.token_vectors = (counterfactual.resid0 - clean.resid0)[0]
    computer.error_vectors = [
        (c - k)[0] for c, k in zip(counterfactual.errors, clean.errors, strict=True)
    ]
    rows = computer.rows(_rows(adapter, transcoders, result, clean)).double()
    n_f = result.layout.n_features
    return EdgeDeltas(features=rows[:n_f], output=rows[n_f:])


def _to_layout(block: Tensor, result: AttributionResult) -> Tensor:
    """(r, n_sources) -> (r, n) with zero target columns."""
    out = torch.zeros(block.shape[0], result.layout.n, dtype=torch.float64)
    out[:, : result.layout.n_sources] = block
    return out


@dataclass
class LinearizedPatching:
    """Evaluates the logits ``(V,)`` and ``m(C)`` of edge sets ``C`` (module docstring)."""

    result: AttributionResult
    delta: Tensor  # (n, n) float64: feature rows and the target row (logit-diff direction)
    bias: Tensor  # (n_features,) float64
    clean_activation: Tensor  # (n_features,) float64
    out_clean: Tensor  # (d, n) float64: clean edges into the final residual
    out_delta: Tensor  # (d, n) float64
    out_bias: Tensor  # (d,) float64
    W_U: Tensor  # (d, V) float64
    b_U: Tensor | None  # (V,) float64

    @classmethod
    def build(
        cls,
        adapter: ModelAdapter,
        transcoders: TranscoderSet,
        result: AttributionResult,
        clean: ReplacementState,
        counterfactual: ReplacementState,
        batch_size: int = 64,
    ) -> LinearizedPatching:
        correct, wrong = logit_diff_tokens(result)
        result.check_prompt(clean.input_ids)
        _check_lengths(clean, counterfactual)
        lay = result.layout
        deltas = counterfactual_edge_deltas(
            adapter, transcoders, result, clean, counterfactual, batch_size
        )
        layer, pos, index = _feature_tensors(result)
        acts = torch.tensor([float(n.activation or 0.0) for n in result.nodes[lay.features]],
                            dtype=adapter.dtype, device=adapter.device)  # fmt: skip
        computer = RowComputer(
            adapter, transcoders, clean, ActiveFeatures(layer, pos, index, acts), batch_size
        )
        basis = _rows(adapter, transcoders, result, clean)[lay.n_features :]
        out_clean = _to_layout(computer.rows(basis).double(), result)
        final = computer.final_normed()[-1].double().cpu()  # (d,)
        W_U = adapter.W_U.detach().double().cpu()
        direction = W_U[:, correct] - W_U[:, wrong]
        delta = _to_layout(deltas.features, result)
        delta = torch.cat([delta, torch.zeros(lay.n - lay.n_features, lay.n,
                                              dtype=torch.float64)])  # fmt: skip
        out_delta = _to_layout(deltas.output, result)
        delta[lay.logits.start] = direction @ out_delta
        pre = torch.zeros(lay.n_features, dtype=torch.float64)
        for i, (lyr, p, j) in enumerate(zip(layer.tolist(), pos.tolist(), index.tolist(),
                                            strict=True)):  # fmt: skip
            pre[i] = float(clean.pre_activations[lyr][p, j])
        adjacency = result.adjacency.double()
        b_U = adapter.b_U.detach().double().cpu() if adapter.b_U is not None else None
        return cls(
            result=result,
            delta=delta,
            bias=pre - adjacency[: lay.n_features].sum(dim=1),
            clean_activation=acts.double().cpu(),
            out_clean=out_clean,
            out_delta=out_delta,
            out_bias=final - out_clean.sum(dim=1),
            W_U=W_U,
            b_U=b_U,
        )

    def logits(self, keep: Tensor) -> Tensor:
        """Last-position logits (V,) of the circuit ``keep`` (n, n) bool (rows targets)."""
        lay = self.result.layout
        adjacency = self.result.adjacency.double()
        kept = adjacency * keep
        patched = ((adjacency + self.delta) * ~keep).sum(dim=1)  # (n,)
        ratio = torch.ones(lay.n, dtype=torch.float64)
        layers = torch.tensor([int(n.layer or 0) for n in self.result.nodes[lay.features]])
        for layer in torch.unique(layers).tolist():
            idx = torch.nonzero(layers == layer).flatten()
            pre = self.bias[idx] + kept[idx] @ ratio + patched[idx]
            act = pre.clamp_min(0.0)
            ratio[idx] = act / self.clean_activation[idx].clamp_min(1e-30)
        out_keep = keep[lay.logits.start]  # (n,) edges into the target node
        resid = (
            self.out_bias
            + self.out_clean @ (ratio * out_keep)
            + (self.out_clean + self.out_delta) @ (~out_keep).double()
        )
        logits = resid @ self.W_U
        return logits + self.b_U if self.b_U is not None else logits

    def metric(self, keep: Tensor, metric: Metric | None = None) -> float:
        """m(C): ``metric`` of the circuit's logits (default: the graph's logit difference)."""
        logits = self.logits(keep)
        if metric is None:
            correct, wrong = logit_diff_tokens(self.result)
            return float(logits[correct] - logits[wrong])
        return float(metric(logits[None, None]))
